"""ADMM-NN-S at the paper's scale (issue 17), on the resumable runner (every stage checkpointed: rerun to resume).

LeNet-5 part (`--part lenet`): LeNet-5 (Caffe shape) trained dense on all of MNIST's training images less a held-out
validation split (`--n-valid`, taken from the training images: every choice below is made on it; the test split is
read only for the final numbers); a progressive non-structured ADMM ladder (71x -> 142x -> 246x -> 348x by default)
with Z/U updates every `--zu-every` epochs and `--admm-epochs` + `--retrain-epochs` per rung (per-epoch validation
curves recorded); iterative magnitude pruning with the same epochs at every rung; per-layer bit widths searched
over 3-6 bits on validation (the smallest within `--quant-budget` points) and masked quantized retraining; the
model written with `save_compressed` and reloaded to check its accuracy.

Per-layer keep ratios of a rung of rate R (total/kept): conv1 keeps the reference 20% (its 100 weights are 0.02% of
the model; the ADMM papers prune it least), and conv2, fc1 and fc2 keep the reference fractions of ADMM pruning at
71.2x (8%, 0.9%, 7%; Zhang et al. 2018, the authors' code) times one factor s chosen so that the total is 430,500/R.
The paper's own per-layer rates behind 348x were not found in its text or the authors' repositories.

CIFAR-10 part (`--part cifar`): a zoo CIFAR ResNet (`--cifar-arch`) trained on CIFAR-10 less a validation split;
non-structured ADMM (both convs of every residual block) and structured ADMM (input channels of the second conv of
every residual block, so `shrink_blocks` builds physically smaller blocks with the same logits) on progressive
ladders; for each kind the highest rung within `--cifar-budget` points of dense on validation is quantized
(`--cifar-bits`, both convs of every block in both kinds) and reported: test accuracy, weights kept, bytes (with
index overhead), MACs, and CPU latency at batch 1 and 64 of the structured (shrunk) and non-structured (dense kernels
with zeros; torch sparse fc) models, each timed in turns with the dense model in its own run, contiguous and
channels_last (the machine's speed drifts between minutes, so only models timed together compare).

Run from the repo root: CORSD_DATA=/work/shared/data python benchmarks/admm.py --part all
Smoke test (a couple of minutes): --out admm_smoke --n-train 2000 --n-valid 500 --dense-epochs 1 --admm-epochs 1
  --retrain-epochs 1 --zu-every 1 --quant-epochs 1 --part lenet   (then delete results/admm_smoke* and runs/admm_smoke)
"""
import argparse, copy, shlex, sys
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).parent))
import runner
from common import RESULTS, md_table, command_line, save_figure
from corsd_suite.data import load_dataset, image_dls, CropFlip
from corsd_suite.models import zoo_learner, get_model
from corsd_suite.evaluate import evaluate_accuracy
from corsd_suite.admm import (ADMMCallback, HardPruneCallback, Target, LENET5_LAYERS, ADMM_LENET5_KEEP, weight_layers,
                              compression_report, apply_targets, save_compressed, load_compressed, plain_copy, shrink_blocks,
                              cpu_latency, sparse_linear_copy, _swap_cb)

p = argparse.ArgumentParser(description=__doc__.split('\n')[0]); runner.add_args(p)
p.add_argument('--part', choices=['lenet', 'cifar', 'all'], default='all')
p.add_argument('--out', default='admm', help='results name (use a temporary one for smoke tests)')
p.add_argument('--seed', type=int, default=0)
p.add_argument('--n-train', type=int, default=0, help='training images before the validation split (0: all)')
p.add_argument('--n-valid', type=int, default=5000, help='validation images held out of the training images')
p.add_argument('--bs', type=int, default=64)
p.add_argument('--lr', type=float, default=1e-3)
p.add_argument('--dense-epochs', type=int, default=30)
p.add_argument('--rates', default='71.2,142,246,348', help='the ladder: overall pruning rates (total/kept)')
p.add_argument('--admm-epochs', type=int, default=40, help='ADMM epochs per rung')
p.add_argument('--retrain-epochs', type=int, default=20, help='masked-retraining epochs per rung')
p.add_argument('--zu-every', type=int, default=4, help='Z/U update every this many epochs')
p.add_argument('--rho', type=float, default=1e-3)
p.add_argument('--rho-factor', type=float, default=1.3)
p.add_argument('--rho-max', type=float, default=1e-1)
p.add_argument('--quant-budget', type=float, default=0.1, help='accuracy points the quantization may lose on validation')
p.add_argument('--quant-epochs', type=int, default=10)
p.add_argument('--cifar-bf16', action='store_true', help='train the CIFAR-10 runs alone in bf16 autocast (the runner\'s --bf16 for that part only)')
p.add_argument('--cifar-arch', default='resnet20')
p.add_argument('--cifar-dense-epochs', type=int, default=60)
p.add_argument('--cifar-admm-epochs', type=int, default=20)
p.add_argument('--cifar-retrain-epochs', type=int, default=10)
p.add_argument('--cifar-lr', type=float, default=1e-3)
p.add_argument('--cifar-ns-rates', default='0.5,0.75,0.875,0.9375', help='non-structured ladder: fraction of weights removed')
p.add_argument('--cifar-s-rates', default='0.125,0.25,0.375,0.5', help='structured ladder: fraction of inner channels removed')
p.add_argument('--cifar-bits', type=int, default=4)
p.add_argument('--cifar-budget', type=float, default=0.5, help='accuracy points of loss allowed (validation)')
p.add_argument('--latency-threads', type=int, default=1)
p.add_argument('--latency-repeats', type=int, default=50, help='timed passes per model, batch size and memory format (models timed in turns)')
a = p.parse_args()
RATES = [float(r) for r in a.rates.split(',')]
NAMES = {v: k for k, v in LENET5_LAYERS.items()}

def loss_pts(ref:float, acc:float) -> float:
    "Accuracy points lost from `ref` to `acc` (fractions), rounded so that a loss of exactly the budget (0.904 vs 0.909: 0.5) is not read as 0.50000000000000004 > 0.5"
    return round(100 * (ref - acc), 6)

# ------------------------------------------------------------------------------------------------------- data
def splits(name):
    "(train, valid, test) ImageSets: the validation split is held out of the training images"
    tr, te = load_dataset(name, train=True), load_dataset(name, train=False)
    if a.n_train: tr = tr.subset(torch.randperm(len(tr), generator=torch.Generator().manual_seed(a.seed))[:a.n_train].sort().values)
    tr, va = tr.split(a.n_valid / len(tr), seed=a.seed)
    return tr, va, te

def loaders(ctx, name, augment=None):
    tr, va, te = splits(name)
    dls = image_dls(tr, va, bs=a.bs, augment=augment, device=ctx.device)
    test = image_dls(tr, te, bs=a.bs, device=ctx.device, val_bs=1000).valid
    return dls, test, len(tr)

def acc(model, dl): return float(evaluate_accuracy(model, dl, show=False))
def curve(learn): return [float(v[-1]) for v in (learn.recorder.values or [])]   # validation accuracy per epoch

def ladder_targets(rate, bits=None):
    "LeNet-5 targets of overall rate `rate`: conv1 keeps 20%, conv2/fc1/fc2 the 71.2x fractions times one factor"
    w = dict(conv1=500, conv2=25_000, fc1=400_000, fc2=5_000)
    s = (430_500 / rate - ADMM_LENET5_KEEP['conv1'] * w['conv1']) / sum(ADMM_LENET5_KEEP[k] * w[k] for k in ('conv2', 'fc1', 'fc2'))
    keep = dict(conv1=ADMM_LENET5_KEEP['conv1'], **{k: ADMM_LENET5_KEEP[k] * s for k in ('conv2', 'fc1', 'fc2')})
    return {LENET5_LAYERS[k]: Target(keep=max(1, round(f * w[k])), bits=(bits or {}).get(k)) for k, f in keep.items()}

def admm_cb(targets, rho=None):
    return ADMMCallback(targets, rho=rho or a.rho, rho_schedule=(a.rho_factor, a.rho_max), every=a.zu_every, unit='epoch')

def dense_lenet(ctx):
    dls, test, n = loaders(ctx, 'mnist')
    learn = zoo_learner(dls, 'lenet5')
    ctx.fit(learn, a.dense_epochs, a.lr, stage='dense', shared='lenet-dense-' + _tag(seed=a.seed, n_train=a.n_train, n_valid=a.n_valid, bs=a.bs, lr=a.lr, epochs=a.dense_epochs))
    return learn, dls, test, n

def rung_stats(learn, dls, test, **kw):
    rep = compression_report(learn.model, names=NAMES).iloc[-1]
    return dict(**kw, rate=float(rep['ratio']), kept=int(rep['kept']), valid_acc=acc(learn.model, dls.valid), test_acc=acc(learn.model, test))

# ------------------------------------------------------------------------------------------------------- LeNet-5
def lenet_dense(ctx):
    learn, dls, test, n = dense_lenet(ctx)
    return dict(train_images=n + len(dls.valid_ds), fit_images=n, valid_images=len(dls.valid_ds),
                valid_acc=acc(learn.model, dls.valid), test_acc=acc(learn.model, test), curve=curve(learn))

def _tag(**kw): return runner.settings_hash(kw)[:10]   # shared stages are named by every setting they depend on

def admm_rung(ctx, learn, r):
    "One rung of the progressive ADMM ladder (shared: the quantization run loads it instead of training it again)"
    tag = _tag(seed=a.seed, n_train=a.n_train, n_valid=a.n_valid, bs=a.bs, lr=a.lr, dense=a.dense_epochs, rates=RATES[:RATES.index(r) + 1],
               admm=a.admm_epochs, retrain=a.retrain_epochs, zu=a.zu_every, rho=[a.rho, a.rho_factor, a.rho_max])
    tg = ladder_targets(r)
    _swap_cb(learn, admm_cb(tg)); ctx.fit(learn, a.admm_epochs, a.lr, stage=f'admm-{r:g}', shared=f'lenet-admm-{r:g}-{tag}'); c1 = curve(learn)
    learn.remove_cbs([c for c in learn.cbs if isinstance(c, ADMMCallback)])
    _swap_cb(learn, HardPruneCallback(tg)); ctx.fit(learn, a.retrain_epochs, a.lr, stage=f'retrain-{r:g}', shared=f'lenet-retrain-{r:g}-{tag}')
    return c1 + curve(learn)

def lenet_ladder(ctx):
    "Progressive ADMM (method='admm') or iterative magnitude pruning (method='magnitude'), same epochs per rung"
    learn, dls, test, n = dense_lenet(ctx)
    rungs = []
    for r in RATES:
        if ctx.config['method'] == 'admm': c = admm_rung(ctx, learn, r)
        else:
            _swap_cb(learn, HardPruneCallback(ladder_targets(r)))
            ctx.fit(learn, a.admm_epochs + a.retrain_epochs, a.lr, stage=f'magnitude-{r:g}'); c = curve(learn)
        rungs.append(rung_stats(learn, dls, test, target_rate=r, curve=c))
    return dict(rungs=rungs)

def _num(v):
    "A JSON-able number (NaN: None) or string"
    if isinstance(v, str) or v is None: return v
    v = float(v)
    return None if v != v else int(v) if v.is_integer() else v

def lenet_quant(ctx):
    "Per-layer bits (3-6) searched on validation at the rate chosen on validation, masked quantized retraining, file"
    rate = ctx.config['rate']
    learn, dls, test, n = dense_lenet(ctx)
    for r in RATES[:RATES.index(rate) + 1]: admm_rung(ctx, learn, r)
    base = acc(learn.model, dls.valid)
    tg0, bits = ladder_targets(rate), dict(conv1=6, conv2=6, fc1=6, fc2=6)
    sd = copy.deepcopy(learn.model.state_dict())
    def val_with(b):
        m = plain_copy(learn.model); apply_targets(m, ladder_targets(rate, b)); return acc(m, dls.valid)
    for layer in ('fc1', 'conv2', 'fc2', 'conv1'):      # the biggest layer first: it decides the bytes
        for b in (3, 4, 5):
            if loss_pts(base, val_with({**bits, layer: b})) <= a.quant_budget: bits[layer] = b; break
    learn.model.load_state_dict(sd)
    qt = ladder_targets(rate, bits)
    _swap_cb(learn, HardPruneCallback(qt)); ctx.fit(learn, a.quant_epochs, a.lr / 10, stage=f'quant-{rate:g}')
    rep = compression_report(learn.model, names=NAMES)
    f = save_compressed(learn.model, RESULTS/f'{a.out}_lenet5.czip')
    back = load_compressed(lambda: get_model('lenet5', n_in=1, n_out=10, stats=dls.stats, size=28), f).to(ctx.device)
    return dict(rate=float(rep.iloc[-1]['ratio']), bits=bits, valid_acc=acc(learn.model, dls.valid), test_acc=acc(learn.model, test),
                file=str(f.relative_to(RESULTS.parents[1])), file_bytes=f.stat().st_size, report_bytes=float(rep.iloc[-1]['bytes']),
                file_test_acc=acc(back, test), curve=curve(learn),
                layers=[{k: _num(v) for k, v in r.items() if k != 'shape'}
                        for r in rep.to_dict('records')])

# ------------------------------------------------------------------------------------------------------- CIFAR-10
def cifar_dense(ctx):
    dls, test, n = loaders(ctx, 'cifar10', augment=CropFlip())
    learn = zoo_learner(dls, a.cifar_arch)
    ctx.fit(learn, a.cifar_dense_epochs, 1e-2, stage='dense', shared='cifar-dense-' + _tag(arch=a.cifar_arch, seed=a.seed, n_train=a.n_train, n_valid=a.n_valid, bs=a.bs, epochs=a.cifar_dense_epochs))
    return learn, dls, test

def cifar_targets(model, kind, rate, bits=None):
    "Both convs of every block are constrained: pruned (non-structured), or the second conv's input channels pruned and, with `bits`, the first conv quantized too (structured, so both kinds quantize the same layers)"
    if kind == 'structured':
        tg = {n: Target(rate=rate, kind='channel', bits=bits) for n in weight_layers(model) if n.endswith('convs.1.0')}
        return tg | ({n: Target(bits=bits) for n in weight_layers(model) if n.endswith('convs.0.0')} if bits else {})
    return {n: Target(rate=rate, bits=bits) for n, m in weight_layers(model).items() if isinstance(m, torch.nn.Conv2d) and '.convs.' in n}

FORMATS = dict(contiguous=torch.contiguous_format, channels_last=torch.channels_last)
def latency(models:dict) -> dict:
    "{memory format: {name: {batch size: ms}}}: the models timed in turns in one process (so they compare), in both formats"
    return {f: cpu_latency(models, (3, 32, 32), (1, 64), repeats=a.latency_repeats, threads=a.latency_threads, memory_format=mf)
            for f, mf in FORMATS.items()}

def cifar_run(ctx):
    kind = ctx.config['kind']
    learn, dls, test = cifar_dense(ctx)
    dense_val = acc(learn.model, dls.valid)
    if kind == 'dense':
        rep, lat = compression_report(learn.model, (3, 32, 32)).iloc[-1], latency({'dense': learn.model})
        return dict(valid_acc=dense_val, acc=acc(learn.model, test), kept=int(rep['kept']), bytes=float(rep['bytes']),
                    macs=int(rep['macs_dense']), latency=lat, latency_ms=lat['channels_last']['dense'], latency_repeats=a.latency_repeats)
    dense = plain_copy(learn.model)   # timed beside the pruned model at the end
    rates = [float(r) for r in (a.cifar_s_rates if kind == 'structured' else a.cifar_ns_rates).split(',')]
    rungs, chosen = [], None
    for r in rates:
        tg = cifar_targets(learn.model, kind, r)
        _swap_cb(learn, admm_cb(tg)); ctx.fit(learn, a.cifar_admm_epochs, a.cifar_lr, stage=f'admm-{r:g}')
        learn.remove_cbs([c for c in learn.cbs if isinstance(c, ADMMCallback)])
        _swap_cb(learn, HardPruneCallback(tg)); ctx.fit(learn, a.cifar_retrain_epochs, a.cifar_lr, stage=f'retrain-{r:g}')
        v = acc(learn.model, dls.valid); rungs.append(dict(rate=r, valid_acc=v))
        if loss_pts(dense_val, v) > a.cifar_budget: break      # later rungs would lose more
        chosen, sd = r, copy.deepcopy(learn.model.state_dict())
    if chosen is None: return dict(rungs=rungs, acc=None, note=f'no rung within {a.cifar_budget} points on validation')
    learn.model.load_state_dict(sd)
    qt = cifar_targets(learn.model, kind, chosen, a.cifar_bits)
    _swap_cb(learn, HardPruneCallback(qt)); ctx.fit(learn, a.cifar_retrain_epochs, a.cifar_lr / 10, stage=f'quant-{chosen:g}')
    rep = compression_report(learn.model, (3, 32, 32)).iloc[-1]
    res = dict(rungs=rungs, rate=chosen, bits=a.cifar_bits, valid_acc=acc(learn.model, dls.valid), acc=acc(learn.model, test),
               kept=int(rep['kept']), bytes=float(rep['bytes']))
    if kind == 'structured':
        small = shrink_blocks(learn.model)
        srep = compression_report(small, (3, 32, 32)).iloc[-1]
        res.update(acc_shrunk=acc(small, test), kept=int(srep['kept']), bytes=float(srep['bytes']), kept_masked=res['kept'],
                   bytes_masked=res['bytes'], macs=int(srep['macs_dense']), params_shrunk=int(sum(p.numel() for p in small.parameters())),
                   latency=latency({'dense': dense, 'structured': small}))
    else:
        res.update(macs=int(rep['macs_sparse']), macs_dense_kernels=int(rep['macs_dense']),
                   latency=latency({'dense': dense, 'nonstructured': learn.model, 'nonstructured_sparse_fc': sparse_linear_copy(learn.model)}))
    res.update(latency_ms=res['latency']['channels_last'][kind], latency_repeats=a.latency_repeats)   # headline: the format the runner trains in
    return res

# ------------------------------------------------------------------------------------------------------- plan
if a.part != 'all' and not a.only: a.only = f'{a.part}-*'   # plan every run (the report covers both parts), run one part
bench = runner.Benchmark(a.out, a)
if True:
    bench.add(lenet_dense, 'lenet-dense', part='lenet', seed=a.seed, n_train=a.n_train, n_valid=a.n_valid, bs=a.bs, lr=a.lr, dense_epochs=a.dense_epochs)
    common = dict(part='lenet', seed=a.seed, n_train=a.n_train, n_valid=a.n_valid, bs=a.bs, lr=a.lr, dense_epochs=a.dense_epochs,
                  rates=RATES, admm_epochs=a.admm_epochs, retrain_epochs=a.retrain_epochs, zu_every=a.zu_every,
                  rho=[a.rho, a.rho_factor, a.rho_max])
    bench.add(lenet_ladder, 'lenet-admm', method='admm', **common)
    bench.add(lenet_ladder, 'lenet-magnitude', method='magnitude', **common)
if True:
    cc = dict(part='cifar', seed=a.seed, n_train=a.n_train, n_valid=a.n_valid, bs=a.bs, arch=a.cifar_arch, dense_epochs=a.cifar_dense_epochs,
              admm_epochs=a.cifar_admm_epochs, retrain_epochs=a.cifar_retrain_epochs, lr=a.cifar_lr, bits=a.cifar_bits,
              budget=a.cifar_budget, rho=[a.rho, a.rho_factor, a.rho_max], zu_every=a.zu_every, threads=a.latency_threads)
    fmt = dict(bf16=True) if a.cifar_bf16 else None   # the LeNet part's runs keep the invocation's format
    bench.add(cifar_run, 'cifar-dense', kind='dense', train_format=fmt, **cc)
    bench.add(cifar_run, 'cifar-nonstructured', kind='nonstructured', rates=a.cifar_ns_rates, train_format=fmt, **cc)
    bench.add(cifar_run, 'cifar-structured', kind='structured', rates=a.cifar_s_rates, train_format=fmt, **cc)
runs = bench.run()

def chosen_rate(ladder, dense_val, budget):
    "The highest rung whose validation accuracy is within `budget` points of dense (None if none)"
    ok = [r for r in ladder if loss_pts(dense_val, r['valid_acc']) <= budget]
    return max(ok, key=lambda r: r['rate']) if ok else None

if {'lenet-dense', 'lenet-admm'} <= set(runs):
    d = runs['lenet-dense']['result']
    best = chosen_rate(runs['lenet-admm']['result']['rungs'], d['valid_acc'], 0.1)
    rate = best['target_rate'] if best else RATES[0]
    bench.add(lenet_quant, 'lenet-quant', rate=rate, quant_budget=a.quant_budget, quant_epochs=a.quant_epochs, **common)
    runs = bench.run()

# ------------------------------------------------------------------------------------------------------- report
def plots(runs):
    import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot as plt
    out = []
    if 'lenet-admm' in runs and 'lenet-magnitude' in runs:
        fig, axs = plt.subplots(1, 2, figsize=(11, 3.5))
        for m, st in (('admm', 'o-'), ('magnitude', 's--')):
            rs = runs[f'lenet-{m}']['result']['rungs']
            axs[0].plot([r['rate'] for r in rs], [100 * r['test_acc'] for r in rs], st, label=m)
            c = [100 * v for r in rs for v in r['curve']]
            axs[1].plot(range(1, len(c) + 1), c, label=m)
        if 'lenet-dense' in runs: axs[0].axhline(100 * runs['lenet-dense']['result']['test_acc'], color='k', lw=.7, label='dense')
        axs[0].set_xscale('log'); axs[0].set_xlabel('pruning rate (total / kept)'); axs[0].set_ylabel('test accuracy (%)'); axs[0].legend()
        axs[1].set_xlabel('epoch (all rungs)'); axs[1].set_ylabel('validation accuracy (%)'); axs[1].set_title('per-epoch curves'); axs[1].legend()
        plt.tight_layout(); out.append(save_figure(fig, RESULTS/f'{a.out}_ladder.png').name)
    rows = latency_rows(runs)
    if rows:
        fig, axs = plt.subplots(1, 2, figsize=(10, 3.4), sharey=True)
        for ax, bs in zip(axs, ('1', '64')):
            names = list(dict.fromkeys(r['model'] for r in rows))
            for j, f in enumerate(FORMATS):
                v = {r['model']: r[f'speedup_b{bs}'] for r in rows if r['format'] == f}
                ax.bar([i + (j - .5) * .38 for i in range(len(names))], [v.get(n, float('nan')) for n in names], .38, label=f)
            ax.set_xticks(range(len(names)), [n.replace('_', '\n') for n in names], fontsize=8)
            ax.axhline(1, color='k', lw=.7); ax.set_title(f'speed-up over dense timed beside it, batch {bs}')
        axs[0].set_ylabel('dense ms / model ms'); axs[0].legend(fontsize=8)
        plt.tight_layout(); out.append(save_figure(fig, RESULTS/f'{a.out}_latency.png').name)
    return out

def timed_repeats(run:dict) -> int:
    "The `--latency-repeats` a finished run was timed with (runs made before it was recorded: read from their command)"
    r = run['result'].get('latency_repeats')
    return r if r is not None else p.parse_known_args(shlex.split(run['command'].split('admm.py', 1)[1]))[0].latency_repeats

def latency_rows(runs:dict) -> list:
    "One row per pruned model and memory format: its latency and the dense model's, timed in turns in the same run"
    rows = []
    for kind in ('nonstructured', 'structured'):
        lat = runs.get(f'cifar-{kind}', {}).get('result', {}).get('latency')
        for f, ms in (lat or {}).items():
            d = ms['dense']
            rows += [dict(model=n, format=f, b1_ms=round(t['1'], 2), b64_ms=round(t['64'], 1), dense_b1_ms=round(d['1'], 2), dense_b64_ms=round(d['64'], 1),
                          speedup_b1=round(d['1'] / t['1'], 2), speedup_b64=round(d['64'] / t['64'], 2)) for n, t in ms.items() if n != 'dense']
    return rows

def full_command(runs:dict) -> str:
    "The commands that made the runs used, in order (the two parts are run by separate invocations), joined by &&"
    return ' && '.join(dict.fromkeys(r['command'] for r in runs.values())) or command_line()

def summarise(runs):
    s, md = dict(command=full_command(runs)), []
    if 'lenet-dense' in runs:
        d = runs['lenet-dense']['result']; s.update(train_images=d['train_images'], dense_acc=d['test_acc'])
        md.append(f"LeNet-5 dense: {100*d['test_acc']:.2f}% test ({d['fit_images']} images fitted, {d['valid_images']} held out for validation).")
    if 'lenet-admm' in runs and 'lenet-dense' in runs:
        dv, rungs = runs['lenet-dense']['result']['valid_acc'], runs['lenet-admm']['result']['rungs']
        mag = {r['target_rate']: r for r in runs.get('lenet-magnitude', {}).get('result', {}).get('rungs', [])}
        for b, k in ((0.1, '0p1'), (0.5, '0p5')):
            r = chosen_rate(rungs, dv, b)
            s[f'rate_at_{k}'], s[f'acc_at_{k}'] = (r['rate'], r['test_acc']) if r else (None, None)
        r = chosen_rate(rungs, dv, 0.1) or chosen_rate(rungs, dv, 0.5)
        s['magnitude_acc_at_same_rate'] = mag[r['target_rate']]['test_acc'] if r and r['target_rate'] in mag else None
        md.append(md_table([dict(rate=f"{r['rate']:.1f}x", admm_valid=f"{100*r['valid_acc']:.2f}", admm_test=f"{100*r['test_acc']:.2f}",
                                 magnitude_test=f"{100*mag[r['target_rate']]['test_acc']:.2f}" if r['target_rate'] in mag else '')
                            for r in rungs]))
    if 'lenet-quant' in runs:
        q = runs['lenet-quant']['result']
        s.update(quant_bits=q['bits'], compressed_file=q['file'], compressed_file_bytes=q['file_bytes'], compressed_file_acc=q['file_test_acc'],
                 quant_acc=q['test_acc'], quant_rate=q['rate'], report_bytes=q['report_bytes'])
        md.append(f"Quantized at {q['rate']:.1f}x with bits {q['bits']}: {100*q['test_acc']:.2f}% test; `{q['file']}` is "
                  f"{q['file_bytes']} bytes on disk against {q['report_bytes']:.0f} reported ({q['file_bytes']/q['report_bytes']-1:+.1%}); "
                  f"reloaded: {100*q['file_test_acc']:.2f}% test.")
        md.append(md_table([dict(layer=r['layer'], kept=r['kept'], format=r.get('format'), value_bits=r.get('value_bits'),
                                 index_bits=r.get('index_bits'), bytes=round(r['bytes'])) for r in q['layers']]))
    c = {k: runs[f'cifar-{k}']['result'] for k in ('dense', 'nonstructured', 'structured') if f'cifar-{k}' in runs}
    if 'dense' in c:
        keys = ('acc', 'kept', 'bytes', 'macs', 'latency_ms', 'rate', 'bits')
        s['cifar10'] = dict(dense_acc=c['dense']['acc'], dense_valid_acc=c['dense']['valid_acc'], **{k: {kk: v.get(kk) for kk in keys} for k, v in c.items()})
        for k, v in c.items():   # the dense model timed beside each pruned one (channels_last, as `latency_ms`)
            if k != 'dense' and v.get('latency'): s['cifar10'][k]['dense_latency_ms'] = v['latency']['channels_last']['dense']
        dv = c['dense']['valid_acc']
        md.append(f"CIFAR-10 ladders (fraction removed: of the inner convs' weights for non-structured, of the blocks' inner channels "
                  f"for structured), validation accuracy after ADMM + masked retraining; dense {100*dv:.2f}%, budget {a.cifar_budget} points:")
        md.append(md_table([dict(kind=k, removed=r['rate'], valid_acc=f"{100*r['valid_acc']:.2f}", loss_pts=f"{loss_pts(dv, r['valid_acc']):.2f}",
                                 kept_rung='yes' if r['rate'] == v.get('rate') else '') for k, v in c.items() for r in v.get('rungs', [])]))
        md.append(md_table([dict(model=k, removed=v.get('rate', ''), bits=v.get('bits', ''), acc=f"{100*v['acc']:.2f}" if v.get('acc') is not None else '',
                                 kept=v.get('kept'), bytes=round(v['bytes']) if v.get('bytes') else '', macs=v.get('macs')) for k, v in c.items()]))
        made = lambda get: '/'.join(sorted({str(get(r)) for k, r in runs.items() if k.startswith('cifar-')}))   # as the runs were timed
        md.append(f"CPU inference latency, fp32, {made(lambda r: r['settings']['threads'])} thread(s): each pruned model is timed in turns with the dense model in "
                  f"the same process (median of {made(timed_repeats)} passes each), in both memory formats; the speed-up is the dense "
                  "model's time over the pruned model's. The non-structured model runs dense kernels on its zeros; `_sparse_fc` also runs "
                  "its fc layer as a torch sparse CSR product (PyTorch has no sparse convolution on the CPU). The structured model is "
                  "rebuilt with physically smaller layers (`shrink_blocks`).")
        md.append(md_table(latency_rows(runs)))
        if c.get('structured', {}).get('acc_shrunk') is not None:
            v = c['structured']
            md.append(f"Structured, rebuilt with physically smaller layers (`shrink_blocks`): {100*v['acc_shrunk']:.2f}% test "
                      f"({v['params_shrunk']} parameters; masked model before shrinking: {100*v['acc']:.2f}%).")
    imgs = plots(runs)
    md += [f"![{i}]({i})" for i in imgs]
    return s, '\n\n'.join(md)

bench.report(summarise, command=full_command(runs))   # `runs`: the finished runs, as the last bench.run() returned them
