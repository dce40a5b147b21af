"""ADMM-NN-S on LeNet-5 at the authors' own budget (issue 37), on the resumable runner (rerun the command to resume).

Reference check (`--part reference`): the 71x LeNet-5 result of the ADMM weight-pruning reference code
(Zhang et al. 2018, github.com/KaiqiZhang/admm-pruning, TensorFlow), with its constants:
- dense LeNet-5 (Caffe shape) with dropout 0.5 on fc1, Adam 1e-3 constant, L2 5e-5, batch 50 (`--dense-epochs`);
- ADMM: `--rounds` rounds of `--round-steps` Adam steps at batch 50 (30 x 5,000 = 150,000 steps, ~136 epochs of the
  55,000 fitting images), Z/U updated after each round, rho constant (`--rho` 1e-4), per-layer kept fractions
  conv1/conv2/fc1/fc2 = 20 / 8 / 0.9 / 7 % (71.2x overall);
- hard pruning to those fractions, then `--retrain-epochs` of masked retraining with dropout (Adam 1e-3 constant).
The validation split (`--n-valid` images held out of MNIST's training images) is the only data any choice may read;
the test split is read once per run, at the end, for the dense model and for the pruned one.

Recorded per seed: dense and pruned accuracy (valid and test), the validation curve per epoch, the relative primal
residual ||W - Z|| / ||W|| per layer and round, the validation accuracy just before and just after hard pruning,
the live hidden units (fc1 outputs with a kept weight in and out) and the compression report.

Run from the repo root: CORSD_DATA=../shared/data python benchmarks/admm_lenet.py --threads 2
Smoke test (a minute): --out admm_lenet_smoke --n-train 1100 --n-valid 100 --dense-epochs 1 --rounds 2 --round-steps 10
  --retrain-epochs 1 --seeds 0   (then delete results/admm_lenet_smoke* and results/runs/admm_lenet_smoke)
"""
from __future__ import annotations
import argparse, json, math, sys
from pathlib import Path
import numpy as np, torch
sys.path.insert(0, str(Path(__file__).parent))
import runner
from common import RESULTS, md_table, mean_std, fmt_ms, command_line, save_figure
from corsd_suite.data import load_dataset, image_dls
from corsd_suite.models import zoo_learner
from corsd_suite.optim import adam
from corsd_suite.evaluate import evaluate_accuracy
from corsd_suite.admm import (ADMMCallback, HardPruneCallback, LENET5_LAYERS, ADMM_LENET5_KEEP, lenet5_targets,
                              compression_report, apply_targets, plain_copy)

NAMES = {v: k for k, v in LENET5_LAYERS.items()}

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0]); runner.add_args(p)
    p.add_argument('--part', choices=['reference'], default='reference')
    p.add_argument('--out', default='admm_lenet', help='results name (use a temporary one for smoke tests)')
    p.add_argument('--seeds', default='0,1,2')
    p.add_argument('--n-train', type=int, default=0, help='training images before the validation split (0: all 60,000)')
    p.add_argument('--n-valid', type=int, default=5000, help='validation images held out of the training images')
    p.add_argument('--bs', type=int, default=50, help='batch size (the reference: 50)')
    p.add_argument('--lr', type=float, default=1e-3, help='Adam learning rate, constant (the reference: 1e-3)')
    p.add_argument('--l2', type=float, default=5e-5, help='L2 weight decay added to the gradient (the reference: 5e-5)')
    p.add_argument('--dropout', type=float, default=0.5, help="dropout on fc1's output (the reference: 0.5)")
    p.add_argument('--dense-epochs', type=int, default=18, help='dense training epochs (the reference: 20,000 steps at batch 50)')
    p.add_argument('--rounds', type=int, default=30, help='ADMM rounds (Z/U updates; the reference: 30)')
    p.add_argument('--round-steps', type=int, default=5000, help='Adam steps per ADMM round (the reference: 5,000)')
    p.add_argument('--rho', type=float, default=1e-4, help='ADMM penalty rho, constant (the reference: 1e-4)')
    p.add_argument('--retrain-epochs', type=int, default=18, help='masked retraining epochs (the reference: ~17-18)')
    return p.parse_args(argv)

# ------------------------------------------------------------------------------------------------------- data
def loaders(c:dict, device):
    "MNIST less a seeded validation split (train/valid `DataLoaders`) and the test loader"
    tr, te = load_dataset('mnist', train=True), load_dataset('mnist', train=False)
    if c['n_train']: tr = tr.subset(torch.randperm(len(tr), generator=torch.Generator().manual_seed(c['seed']))[:c['n_train']].sort().values)
    tr, va = tr.split(c['n_valid'] / len(tr), seed=c['seed'])
    dls = image_dls(tr, va, bs=c['bs'], device=device, val_bs=1000)
    return dls, image_dls(tr, te, bs=c['bs'], device=device, val_bs=1000).valid

def acc(model, dl) -> float: return float(evaluate_accuracy(model, dl, show=False))
def curve(learn) -> list: return [float(v[-1]) for v in (learn.recorder.values or [])]   # validation accuracy per epoch

def live_hidden_units(model) -> int:
    "fc1 outputs that can carry a signal: at least one kept fc1 weight in and one kept fc2 weight out"
    mods = dict(model.named_modules())
    w1, w2 = mods[LENET5_LAYERS['fc1']].weight, mods[LENET5_LAYERS['fc2']].weight
    return int(((w1 != 0).any(1) & (w2 != 0).any(0)).sum())

# ------------------------------------------------------------------------------------------------------- the run
def reference_run(ctx):
    "Dense LeNet-5, then ADMM at the reference's 71x constants, hard pruning and masked retraining"
    c = ctx.config
    dls, test = loaders(c, ctx.device)
    learn = zoo_learner(dls, 'lenet5', model_kw=dict(dropout=c['dropout']),
                        opt_func=adam(sqr_mom=0.999, eps=1e-8, wd=c['l2'], decouple_wd=False))   # TF's Adam + L2
    dense_key = runner.settings_hash({k: c[k] for k in ('seed', 'n_train', 'n_valid', 'bs', 'lr', 'l2', 'dropout', 'dense_epochs')})
    ctx.fit(learn, c['dense_epochs'], c['lr'], stage='dense', kind='fit', shared=f'lenet-dense-{dense_key}')
    res = dict(fit_images=len(dls.train_ds), valid_images=len(dls.valid_ds), dense_curve=curve(learn),
               dense_valid_acc=acc(learn.model, dls.valid), dense_test_acc=acc(learn.model, test))
    targets = lenet5_targets()                      # the reference's 20 / 8 / 0.9 / 7 %
    steps = c['rounds'] * c['round_steps']
    admm_epochs = math.ceil(steps / len(dls.train))
    admm = ADMMCallback(targets, rho=c['rho'], rho_schedule=None, every=c['round_steps'], unit='batch')
    learn.add_cb(admm)
    ctx.fit(learn, admm_epochs, c['lr'], stage='admm', kind='fit')
    learn.remove_cb(admm)
    hist = admm.residuals()
    res.update(admm_epochs=admm_epochs, admm_steps=admm_epochs * len(dls.train), rounds_done=int(len(hist)), admm_curve=curve(learn),
               residual_rel={NAMES[n]: hist[n + '/rel'].tolist() for n in admm.state.names},
               valid_before_prune=acc(learn.model, dls.valid))
    pruned = plain_copy(learn.model); apply_targets(pruned, targets)
    res['valid_at_prune'] = acc(pruned, dls.valid)  # hard pruning alone, before any retraining
    learn.add_cb(HardPruneCallback(targets))
    ctx.fit(learn, c['retrain_epochs'], c['lr'], stage='retrain', kind='fit')
    rep = compression_report(learn.model, names=NAMES)
    res.update(retrain_curve=curve(learn), valid_acc=acc(learn.model, dls.valid), test_acc=acc(learn.model, test),
               rate=float(rep.iloc[-1]['ratio']), kept=int(rep.iloc[-1]['kept']), live_hidden_units=live_hidden_units(learn.model),
               kept_per_layer={r['layer']: int(r['kept']) for _, r in rep.iterrows() if r['layer'] in LENET5_LAYERS})
    return res

def plan(bench, a):
    keys = ('n_train', 'n_valid', 'bs', 'lr', 'l2', 'dropout', 'dense_epochs', 'rounds', 'round_steps', 'rho', 'retrain_epochs')
    for seed in [int(s) for s in a.seeds.split(',')]:
        bench.add(reference_run, f'reference-71x-s{seed}', seed=seed, **{k: getattr(a, k) for k in keys})

# ------------------------------------------------------------------------------------------------------- report
def build_report(a):
    "The `build(runs)` of `Benchmark.report`: summary `reference_71x` and the page"
    def build(runs):
        rs = sorted(runs.values(), key=lambda r: r['settings']['seed'])
        R = [r['result'] for r in rs]
        dense, pruned = mean_std([x['dense_test_acc'] for x in R]), mean_std([x['test_acc'] for x in R])
        gaps = [100 * (x['dense_test_acc'] - x['test_acc']) for x in R]
        ref = dict(acc=100 * pruned['mean'], acc_std=100 * pruned['std'], dense_acc=100 * dense['mean'], dense_acc_std=100 * dense['std'],
                   loss_points=float(np.mean(gaps)), loss_points_per_seed=gaps, within_0p1=bool(np.mean(gaps) <= 0.1),
                   rate=R[0]['rate'], rounds=R[0]['rounds_done'], live_hidden_units=[x['live_hidden_units'] for x in R],
                   epochs=dict(dense=a.dense_epochs, admm=R[0]['admm_epochs'], retrain=a.retrain_epochs),
                   seeds=[r['settings']['seed'] for r in rs])
        drop = [100 * (x['valid_before_prune'] - x['valid_at_prune']) for x in R]
        resid = [max(v[-1] for v in x['residual_rel'].values()) for x in R]
        ref.update(valid_drop_at_prune=float(np.mean(drop)), final_rel_residual_max=float(np.mean(resid)))
        landed = RESULTS/'admm.json'    # the 60-epoch ladder's dense LeNet-5 (one-cycle Adam, no dropout), same test split
        landed_dense = 100 * json.loads(landed.read_text())['summary']['dense_acc'] if landed.exists() else None
        ref['ladder_dense_acc'] = landed_dense
        summary = dict(reference_71x=ref, command=command_line())
        rows = [{'seed': r['settings']['seed'], 'dense test %': f"{100*x['dense_test_acc']:.2f}", '71x test %': f"{100*x['test_acc']:.2f}",
                 'loss (points)': f"{100*(x['dense_test_acc'] - x['test_acc']):+.2f}", 'valid before / at / after prune %':
                 f"{100*x['valid_before_prune']:.2f} / {100*x['valid_at_prune']:.2f} / {100*x['valid_acc']:.2f}",
                 'rate': f"{x['rate']:.1f}x", 'live hidden units': x['live_hidden_units'],
                 'final rel. residual (conv1/conv2/fc1/fc2)': ' / '.join(f"{v[-1]:.3f}" for v in x['residual_rel'].values())}
                for r, x in zip(rs, R)]
        budget = md_table([
            dict(what='ADMM', reference=f"30 rounds x 5,000 Adam steps, batch 50 (~136 epochs)", here=f"{a.rounds} rounds x {a.round_steps} steps, batch {a.bs} ({R[0]['admm_epochs']} epochs)"),
            dict(what='rho', reference='1e-4, constant', here=f"{a.rho:g}, constant"),
            dict(what='optimiser', reference='Adam 1e-3 constant, L2 5e-5', here=f"Adam {a.lr:g} constant, L2 {a.l2:g} (torch kernels)"),
            dict(what='masked retraining', reference='~17-18 epochs, dropout 0.5', here=f"{a.retrain_epochs} epochs, dropout {a.dropout:g}"),
            dict(what='kept per layer', reference='20 / 8 / 0.9 / 7 %', here=' / '.join(f"{100*ADMM_LENET5_KEEP[k]:g}" for k in ('conv1', 'conv2', 'fc1', 'fc2')) + ' %')])
        png = plot(R, RESULTS/f'{a.out}.png')
        verdict = 'met' if ref['within_0p1'] else 'NOT met'
        md = (f"## The reference 71x check\n\nMNIST, LeNet-5 (Caffe shape), {R[0]['fit_images']:,} fitting images, "
              f"{R[0]['valid_images']:,} held-out validation images (every choice), the 10,000 test images read once per run at the end.\n\n"
              f"Dense {fmt_ms(dense)} %, ADMM 71x after masked retraining {fmt_ms(pruned)} % (mean ± std over {len(R)} seed(s)); "
              f"loss {ref['loss_points']:+.2f} points (target: within 0.1 point of dense: **{verdict}**).\n\n"
              f"{md_table(rows)}\n\n" + finding(ref) + f"\n\nBudget next to the reference code's:\n\n{budget}\n\n![residual and validation curves]({png.name})")
        return summary, md
    return build

def finding(ref:dict) -> str:
    "What the numbers say about convergence and about the dense model the check is measured against"
    out = [f"At the last round the largest relative residual ||W - Z|| / ||W|| is {ref['final_rel_residual_max']:.2f} and the hard "
           f"projection costs {ref['valid_drop_at_prune']:.1f} validation points before retraining: "
           + ("W had not converged to Z, so the pruned accuracy comes from masked retraining, not from ADMM."
              if ref['final_rel_residual_max'] > 0.1 else "W had converged to Z.")]
    if ref.get('ladder_dense_acc') is not None:
        gap = ref['ladder_dense_acc'] - ref['dense_acc']
        out.append(f"This recipe's dense LeNet-5 ({ref['dense_acc']:.2f} %) is {gap:+.2f} points from the 60-epoch ladder's dense model "
                   f"({ref['ladder_dense_acc']:.2f} %, one-cycle Adam, same test split)" +
                   (": the check is measured against a weaker dense model than the package can train." if gap > 0.1 else "."))
    return ' '.join(out)

def plot(R:list, png:Path) -> Path:
    "Per seed: relative primal residual per layer and round; validation accuracy per epoch through dense, ADMM and retraining"
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(11, 3.8))
    for i, x in enumerate(R):
        for j, (k, v) in enumerate(x['residual_rel'].items()):
            a0.semilogy(range(1, len(v) + 1), v, color=f'C{j}', alpha=.8, label=k if i == 0 else None)
        cv = x['dense_curve'] + x['admm_curve'] + x['retrain_curve']
        a1.plot(range(1, len(cv) + 1), [100 * v for v in cv], color=f'C{i}', label=f'seed {i}')
        for e in (len(x['dense_curve']), len(x['dense_curve']) + len(x['admm_curve'])): a1.axvline(e + .5, color='gray', ls=':', lw=.8)
    a0.set_xlabel('ADMM round'); a0.set_ylabel('||W - Z|| / ||W||'); a0.legend(fontsize=8); a0.set_title('primal residual')
    a1.set_xlabel('epoch (dense | ADMM | masked retraining)'); a1.set_ylabel('validation accuracy (%)')
    lo = min(100 * v for x in R for v in x['dense_curve'][2:] + x['admm_curve'] + x['retrain_curve'] or [90])
    a1.set_ylim(max(lo - .5, 90), 100); a1.legend(fontsize=8); a1.grid(alpha=.3); a1.set_title('validation accuracy')
    fig.tight_layout()
    return save_figure(fig, png)

def main(argv=None): return runner.run_all(get_args(argv), plan, build_report)   # None with --list

if __name__ == '__main__': main()
