"""ADMM-NN-S on MNIST / LeNet-5 (430,500 weights): dense baseline, progressive non-structured ADMM pruning at the
per-layer rates of ADMM pruning (Zhang et al. 2018) scaled up, iterative magnitude pruning with the same epochs,
joint quantization with index overhead, and structured pruning for the storage/compute comparison.

Quick (default, sized for 2 shared CPU cores): a balanced training subset, few epochs. `--full`: all 60k images and
longer schedules. Run from the repo root: CORSD_DATA=/work/shared/data python benchmarks/admm.py"""
import argparse, time, copy, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))
from common import write_result, md_table, RESULTS
from corsd_suite.core import seed_everything
from corsd_suite.data import load_dataset, image_dls
from corsd_suite.models import zoo_learner
from corsd_suite.evaluate import evaluate_accuracy
from corsd_suite.admm import (plain_state_dict, lenet5_targets, admm_prune, magnitude_prune, compression_report, export_compressed,
                              Target, LENET5_LAYERS, ADMM_LENET5_KEEP)

p = argparse.ArgumentParser()
p.add_argument('--full', action='store_true', help='60k training images and the long schedule')
p.add_argument('--n-per-class', type=int, default=1000)
p.add_argument('--dense-epochs', type=int, default=5)
p.add_argument('--admm-epochs', type=int, default=3)
p.add_argument('--retrain-epochs', type=int, default=3)
p.add_argument('--scales', type=str, default='1,0.5', help='multipliers of the ADMM-paper keep fractions, one progressive stage each')
p.add_argument('--bits', type=int, default=3)
p.add_argument('--lr', type=float, default=2e-3)
p.add_argument('--rho', type=float, default=1e-3)
p.add_argument('--rho-max', type=float, default=.1)
p.add_argument('--rho-factor', type=float, default=1.8)
p.add_argument('--updates-per-epoch', type=int, default=4)
p.add_argument('--seed', type=int, default=0)
p.add_argument('--bs', type=int, default=128)
a = p.parse_args()
if a.full:
    a.n_per_class, a.dense_epochs, a.admm_epochs, a.retrain_epochs = 0, 15, 10, 5
    a.scales = '4,2,1,0.5,0.3,0.2'
scales = [float(s) for s in a.scales.split(',')]
T0 = time.time()
NAMES = {v: k for k, v in LENET5_LAYERS.items()}
def log(*s): print(f"[{time.time()-T0:6.0f}s]", *s, flush=True)

seed_everything(a.seed)
tr = load_dataset('mnist', train=True)
if a.n_per_class: tr = tr.balanced(a.n_per_class, a.seed)
te = load_dataset('mnist', train=False)
small = te.balanced(30, a.seed)   # only for fastai's per-epoch logging; every reported number uses the full test set
dls = image_dls(tr, small, bs=a.bs, device='cpu')
test_dl = image_dls(tr, te, bs=a.bs, device='cpu', val_bs=1000).valid
every = max(1, len(dls.train) // a.updates_per_epoch)
log(f"train {len(tr)} images, test {len(te)}; {len(dls.train)} batches/epoch, ADMM update every {every} batches")

def acc(learn): return evaluate_accuracy(learn.model, test_dl, show=False)
def quiet(learn): return learn.no_bar(), learn.no_logging()
def summary_row(rep, accuracy, **kw):
    t = rep.iloc[-1]
    return dict(**kw, acc=round(100*accuracy, 2), ratio=round(float(t['ratio']), 1), kept=int(t['kept']),
                bytes=int(t['bytes']), compression=round(float(t['compression']), 1))
def layer_table(rep):
    return [dict(layer=r['layer'], weights=int(r['weights']), kept=int(r['kept']), pruned=f"{100*r['sparsity']:.2f}%",
                 ratio=f"{r['ratio']:.1f}x", bits=int(r['value_bits']) if r['layer'] != 'total' else '',
                 index_bits=int(r['index_bits']) if r['layer'] != 'total' else '', format=r.get('format', ''),
                 bytes=int(r['bytes'])) for _, r in rep.iterrows()]

# 1. dense
learn = zoo_learner(dls, 'lenet5')
cache = Path(f"/tmp/admm_dense_{a.n_per_class}_{a.dense_epochs}_{a.lr}_{a.seed}.pth")   # reuse the dense model across reruns
if cache.exists(): learn.model.load_state_dict(torch.load(cache))
else:
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(a.dense_epochs, a.lr)
    torch.save(learn.model.state_dict(), cache)
dense_acc, dense_sd = acc(learn), copy.deepcopy(learn.model.state_dict())
dense_rep = compression_report(learn.model, names=NAMES)
log(f"dense: {100*dense_acc:.2f}%")

def fresh():
    l = zoo_learner(dls, 'lenet5'); l.model.load_state_dict(dense_sd); return l

# 2. progressive non-structured ADMM and iterative magnitude pruning, same epochs per stage
admm_rows, mag_rows, admm_states, admm_reps = [], [], [], []
la, lm = fresh(), fresh()
for s in scales:
    tg = lenet5_targets(scale=s)
    with la.no_bar(), la.no_logging():
        admm, hard = admm_prune(la, tg, a.admm_epochs, a.retrain_epochs, lr=a.lr, rho=a.rho,
                                rho_schedule=(a.rho_factor, a.rho_max), every=every, unit='batch')
    assert hard.check()
    rep = compression_report(la.model, names=NAMES); r_acc = acc(la)
    admm_rows.append(summary_row(rep, r_acc, method='ADMM', scale=s, final_rho=admm.rho,
                                 residual_rel_fc1=round(admm.history[-1]['head.1/rel'], 4)))
    admm_states.append(copy.deepcopy(plain_state_dict(la.model)))   # without the ADMM/pruning state modules; admm_reps.append(rep)
    log('ADMM', admm_rows[-1])
    with lm.no_bar(), lm.no_logging(): mhard = magnitude_prune(lm, tg, a.admm_epochs + a.retrain_epochs, lr=a.lr)
    assert mhard.check()
    mag_rows.append(summary_row(compression_report(lm.model, names=NAMES), acc(lm), method='magnitude', scale=s))
    log('magnitude', mag_rows[-1])

def best_within(rows, loss):
    ok = [r for r in rows if r['acc'] >= 100*dense_acc - loss - 1e-9]
    return max(ok, key=lambda r: r['ratio']) if ok else None
b01, b05 = best_within(admm_rows, .1), best_within(admm_rows, .5)
pick = b01 or b05 or admm_rows[0]
i = admm_rows.index(pick)
mag_same = mag_rows[i]
log(f"<=0.1: {b01}; <=0.5: {b05}")

# 3. joint quantization after pruning, on the picked ADMM model
lq = fresh(); lq.model.load_state_dict(admm_states[i])
qtg = lenet5_targets(scale=pick['scale'], bits=a.bits)
with lq.no_bar(), lq.no_logging():
    qadmm, qhard = admm_prune(lq, qtg, max(1, a.admm_epochs//2), max(1, a.retrain_epochs), lr=a.lr/2, rho=a.rho,
                              rho_schedule=(a.rho_factor, a.rho_max), every=every, unit='batch')
assert qhard.check()
q_acc, qrep = acc(lq), compression_report(lq.model, names=NAMES)
ckpt = export_compressed(lq.model, RESULTS/'admm_lenet5_pruned_quant.pth')
log(f"quantized {a.bits} bit: {100*q_acc:.2f}%, {qrep.iloc[-1]['bytes']:.0f} bytes")

# 4. structured (filters of the convs, input columns of the fcs) + same bits, from dense, same epochs as one stage
stg = {'stages.0.0': Target(keep=10, kind='filter', bits=a.bits), 'stages.1.0': Target(keep=20, kind='filter', bits=a.bits),
       'head.1': Target(keep=160, kind='channel', bits=a.bits), 'head.3': Target(keep=100, kind='channel', bits=a.bits)}
ls = fresh()
with ls.no_bar(), ls.no_logging():
    sadmm, shard = admm_prune(ls, stg, a.admm_epochs, a.retrain_epochs, lr=a.lr, rho=a.rho,
                              rho_schedule=(a.rho_factor, a.rho_max), every=every, unit='batch')
assert shard.check()
s_acc, srep = acc(ls), compression_report(ls.model, names=NAMES)
log(f"structured: {100*s_acc:.2f}%")

def cmp_row(name, rep, accuracy):
    t = rep.iloc[-1]
    return dict(model=name, acc=round(100*accuracy, 2), kept=int(t['kept']), ratio=f"{t['ratio']:.1f}x",
                bytes=int(t['bytes']), index_and_filler_bits=int(sum(r['bits'] - r['kept']*r['value_bits'] for _, r in rep.iloc[:-1].iterrows() if r['format']=='sparse')),
                vs_dense_fp32=f"{t['compression']:.0f}x", MACs_dense=int(t['macs_dense']), MACs_nonzero=int(t['macs_sparse']),
                MACs_regular_block=int(t['macs_block']))
cmp = [cmp_row('dense fp32', dense_rep, dense_acc), cmp_row(f"non-structured ADMM {pick['ratio']}x, {a.bits} bit", qrep, q_acc),
       cmp_row(f"structured ADMM (filter/column), {a.bits} bit", srep, s_acc)]
secs = time.time() - T0

summary = dict(dense_acc=dense_acc, rate_at_0p1=b01['ratio'] if b01 else None, acc_at_0p1=b01['acc']/100 if b01 else None,
               rate_at_0p5=b05['ratio'] if b05 else None, acc_at_0p5=b05['acc']/100 if b05 else None,
               magnitude_acc_at_same_rate=mag_same['acc']/100, magnitude_rate=mag_same['ratio'],
               quant_bits=a.bits, quant_acc=q_acc, dense_bytes=int(dense_rep.iloc[-1]['dense_fp32_bytes']),
               compressed_bytes=int(qrep.iloc[-1]['bytes']), structured_acc=s_acc, structured_bytes=int(srep.iloc[-1]['bytes']),
               checkpoint=str(ckpt.relative_to(Path.cwd())) if ckpt.is_absolute() else str(ckpt),
               train_images=len(tr), protocol='full' if a.full else 'quick', seconds=round(secs))
from common import command_line
summary['command'] = command_line()
ladder = [dict(scale=r['scale'], ratio=f"{r['ratio']}x", ADMM_acc=r['acc'], magnitude_acc=m['acc'],
               ADMM_minus_magnitude=round(r['acc']-m['acc'], 2), ADMM_loss_vs_dense=round(100*dense_acc - r['acc'], 2))
          for r, m in zip(admm_rows, mag_rows)]
md = f"""LeNet-5 (Caffe shape, 430,500 weights) on MNIST, test set of 10,000 images; {len(tr)} training images
({'all' if not a.n_per_class else f'{a.n_per_class} per class'}); seed {a.seed}; {secs/60:.1f} min wall on 2 shared CPU cores (1 torch thread).
Protocol: {'full' if a.full else 'QUICK (reduced; `--full` runs 60k images, 15 dense epochs, 10 ADMM + 5 retrain epochs per stage)'}.
Dense {a.dense_epochs} epochs (one-cycle, Adam, lr {a.lr}); then progressive stages, each {a.admm_epochs} ADMM epochs
(rho {a.rho} x{a.rho_factor} per update, cap {a.rho_max}, {a.updates_per_epoch} Z/U updates per epoch) + {a.retrain_epochs} masked retraining
epoch(s). Per-layer keep fractions: the ADMM paper's (Zhang et al. 2018, 71x: conv1 20%, conv2 8%, fc1 0.9%, fc2 7%)
times `scale`. Iterative magnitude pruning: the same stages, prune + {a.admm_epochs + a.retrain_epochs} retraining epochs each.

**Dense accuracy: {100*dense_acc:.2f}%**

## Pruning ladder (non-structured)

{md_table(ladder)}

Highest rate at <= 0.1 point loss: {f"{b01['ratio']}x at {b01['acc']}%" if b01 else 'none of the rates tried'};
at <= 0.5 point: {f"{b05['ratio']}x at {b05['acc']}%" if b05 else 'none of the rates tried'}.
Magnitude pruning at {mag_same['ratio']}x: {mag_same['acc']}%.

## Per layer, ADMM at {pick['ratio']}x (before quantization)

{md_table(layer_table(admm_reps[i]))}

## Joint quantization ({a.bits} bits per layer) after pruning, relative indexing

{md_table(layer_table(qrep))}

Accuracy {100*q_acc:.2f}%; {int(qrep.iloc[-1]['bytes'])} bytes with index overhead vs {int(dense_rep.iloc[-1]['dense_fp32_bytes'])} dense fp32
bytes ({qrep.iloc[-1]['compression']:.0f}x). Checkpoint: `{summary['checkpoint']}` (plain `lenet5` state dict + report).

## Structured vs non-structured (both {a.bits} bit)

{md_table(cmp)}

Structured: conv1 10/20 filters, conv2 20/50 filters, fc1 160/800 input columns, fc2 100/500 input columns; per layer:

{md_table(layer_table(srep))}

MACs per image: `MACs_nonzero` counts one MAC per nonzero weight and output position (the ideal of a sparse
kernel, which also decodes an index per MAC); `MACs_regular_block` is the dense GEMM on the kept block, what
structured pruning runs with regular access. Chained effects (a removed conv filter making inputs of the next layer
constant) are not counted.
"""
write_result('admm', summary, dict(args=vars(a), admm=admm_rows, magnitude=mag_rows, quant_layers=layer_table(qrep),
                                    structured_layers=layer_table(srep), comparison=cmp), md, secs)
