"""Baseline vs BYOT vs CORSD vs a compute-matched baseline on CIFAR-10, as the authors' code trains them.

Protocol (issue 16): a class-balanced CIFAR-10 training subset (`--n_train`, default 10,000 images) and a validation
split of OTHER training images (`--n_valid`, default 2,000, for monitoring and for any choice: none is tuned here,
the recipe is the authors'); the full 10,000-image test split is read once, after the final epoch. Every arm: SGD
momentum 0.9, weight decay 5e-4 as L2 on every parameter (the authors' `optim.SGD`), fastai's one-cycle with
PyTorch's OneCycleLR shape (30% warm-up, final lr/2.5e5), crop (pad 4) + flip, the same epochs. Arms:
- `baseline`: the plain zoo network, batches of `--bs` (128);
- `byot`: BYOT exits and losses (`byot_learner`), batches of `--bs`;
- `corsd`: CORSD (`corsd_learner`) on triplet batches of `--triplets` anchors (43 = 129 images, as the authors); an
  epoch is one pass over the anchors, hence 3 images per anchor: 3× the image passes of a baseline epoch;
- `baseline_compute_matched`: the plain network for 3× the epochs (as many image forward/backward passes as CORSD);
- `corsd_byot` (off by default; `--arms ...,corsd_byot`): CORSD stacked on BYOT, a separate arm.
Seeds 0, 1, 2 (initialisation, order, augmentation; one fixed data subset). The deployed network of every arm is the
plain backbone; its test accuracy is what is compared. Seconds per epoch are per arm (runs made alone).

Runs go through the resumable runner (`benchmarks/runner.py`): finished runs are skipped, an interrupted run resumes
from its last epoch with the same result. From the repository root (the lead runs it alone on the machine):

    CORSD_DATA=../shared/data python benchmarks/corsd.py --arch resnet8 --epochs 20 --threads 2

Choice of ResNet-8 and 20 epochs (a rough estimate, to be checked against the first run's seconds per epoch): in the
smoke test (one thread, on a machine loaded ~6x) CORSD cost about as much per image as the plain network (its relation
networks are small next to three backbone passes), and its epoch holds 3x the images. At an estimated ~4 ms per image
for ResNet-8 alone on 2 cores, a CORSD epoch on 10,000 anchors is ~2 min, so 20 epochs is ~40 min, and the
compute-matched baseline (60 epochs of 10,000 images) about the same; ResNet-20 costs ~3x more per image and would
allow only ~7 epochs within the ~45 min per arm-seed run the issue allows.

Smoke test (a couple of minutes; writes benchmarks/results/corsd_smoke* and results/runs/corsd_smoke/, delete after):
    CORSD_DATA=../shared/data python benchmarks/corsd.py --out corsd_smoke --cache /tmp/corsd_smoke --n_train 200 \
        --n_valid 100 --epochs 1 --seeds 0 --n_test 500
"""
import argparse, sys
from pathlib import Path
import numpy as np
sys.path.insert(0, str(Path(__file__).parent))
import runner
from common import mean_std, fmt_ms, md_table, command_line, save_figure, RESULTS

ARMS = dict(baseline='plain network', byot='BYOT (exits + self-distillation)', corsd='CORSD (triplets + relation networks)',
            baseline_compute_matched='plain network, 3× the epochs (CORSD\'s image passes)', corsd_byot='CORSD stacked on BYOT')
DEFAULT_ARMS = 'baseline,byot,corsd,baseline_compute_matched'

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    runner.add_args(p)
    p.add_argument('--arch', default='resnet8', choices=['resnet8', 'resnet20'], help='CIFAR ResNet of the zoo')
    p.add_argument('--epochs', type=int, default=20, help='epochs of every arm (the compute-matched baseline: 3×)')
    p.add_argument('--n_train', type=int, default=10_000, help='class-balanced training subset (images)')
    p.add_argument('--n_valid', type=int, default=2_000, help='validation split of other training images')
    p.add_argument('--n_test', type=int, default=0, help='0: the full 10,000-image test split (smoke tests: fewer)')
    p.add_argument('--bs', type=int, default=128, help='batch size of the baseline and BYOT arms')
    p.add_argument('--triplets', type=int, default=43, help='anchors per CORSD batch (3 images each)')
    p.add_argument('--lr', type=float, default=0.1, help='one-cycle maximum learning rate (the authors: 0.1)')
    p.add_argument('--seeds', default='0,1,2')
    p.add_argument('--arms', default=DEFAULT_ARMS, help=f'comma-separated, from {list(ARMS)}')
    p.add_argument('--out', default='corsd', help='result name (benchmarks/results/<out>.json/.md)')
    a = p.parse_args(argv)
    bad = [x for x in a.arms.split(',') if x not in ARMS]
    if bad: p.error(f"--arms: unknown {bad}; choose from {list(ARMS)}")
    for k in ('epochs', 'n_train', 'n_valid', 'bs', 'triplets'):
        if getattr(a, k) < 1: p.error(f"--{k} must be at least 1")
    if a.n_train % 10 or a.n_valid % 10: p.error("--n_train and --n_valid must be multiples of 10 (class-balanced)")
    if not (a.lr > 0): p.error("--lr must be positive")
    return a

_DATA = {}
def load_data(n_train:int, n_valid:int, n_test:int):
    "Class-balanced training subset, a disjoint validation split of other training images, the test split (cached)"
    key = (n_train, n_valid, n_test)
    if key not in _DATA:
        from corsd_suite.data import load_dataset
        tr, te = load_dataset('cifar10', train=True), load_dataset('cifar10', train=False)
        pool = tr.balanced((n_train + n_valid)//10, seed=0)
        train, valid = pool.split(n_valid/(n_train + n_valid), seed=0)
        if n_test: te = te.balanced(n_test//10, seed=0)
        _DATA[key] = train, valid, te
    return _DATA[key]

def make_learner(arm:str, dls, arch:str, triplets:int):
    "The learner of `arm`: SGD momentum 0.9 with L2 weight decay 5e-4 on every parameter, as the authors"
    from corsd_suite.optim import sgd
    from corsd_suite.models import zoo_learner
    from corsd_suite.corsd import byot_learner, corsd_learner
    opt = dict(opt_func=sgd(0.9, decouple_wd=False), wd=5e-4, wd_bn_bias=True)
    if arm in ('baseline', 'baseline_compute_matched'): return zoo_learner(dls, arch, **opt)
    if arm == 'byot': return byot_learner(dls, arch, **opt)
    return corsd_learner(dls, arch, cb_kw=dict(byot=arm == 'corsd_byot'), n_triplets=triplets, **opt)

def train_arm(ctx):
    "One run: train arm `ctx.config['arm']` with seed `ctx.seed`; the test split is read after the final epoch"
    from corsd_suite.data import image_dls, CropFlip, TensorDL
    from corsd_suite.evaluate import evaluate_accuracy
    from corsd_suite.corsd import MultiExitNet, exit_accuracies
    c = ctx.config
    train, valid, test = load_data(c['n_train'], c['n_valid'], c['n_test'])
    dls = image_dls(train, valid, bs=c['bs'], augment=CropFlip(pad=4, flip=True), device=ctx.device)
    learn = make_learner(c['arm'], dls, c['arch'], c['triplets'])
    epochs = c['epochs'] * (3 if c['arm'] == 'baseline_compute_matched' else 1)
    ctx.fit(learn, epochs, c['lr'], pct_start=0.3, div_final=2.5e5)
    net = learn.model
    plain = net.plain() if isinstance(net, MultiExitNet) else net
    test_dl = TensorDL(test, bs=500, device=ctx.device)
    tdl = learn.dls.train
    res = dict(test_acc=evaluate_accuracy(plain, test_dl, show=False), valid_acc=evaluate_accuracy(plain, dls.valid, show=False),
               epochs=epochs, images_per_epoch=len(tdl) * tdl.bs * (3 if c['arm'].startswith('corsd') else 1),
               final_train_loss=float(learn.recorder.values[-1][0]) if learn.recorder.values else None)
    if isinstance(net, MultiExitNet) and len(net.heads): res['exits_test'] = exit_accuracies(net, test_dl)
    return res

def plan(bench, a):
    for seed in [int(s) for s in a.seeds.split(',')]:
        for arm in a.arms.split(','):
            bench.add(train_arm, run_id=f"{arm}-{a.arch}-n{a.n_train}-e{a.epochs}-s{seed}", arm=arm, arch=a.arch, seed=seed,
                      epochs=a.epochs, n_train=a.n_train, n_valid=a.n_valid, n_test=a.n_test, bs=a.bs,
                      triplets=a.triplets, lr=a.lr)

def build_report(a):
    "The `build(runs)` of `Benchmark.report`: the issue's summary keys and the markdown page"
    def build(runs):
        by = {}
        for r in runs.values(): by.setdefault(r['settings']['arm'], []).append(r)
        arms = [x for x in ARMS if x in by]
        summary = dict(dataset='cifar10', arch=a.arch, n_train=a.n_train, epochs=a.epochs,
                       seeds=sorted({r['settings']['seed'] for r in runs.values()}), n_valid=a.n_valid,
                       n_test=a.n_test or 10_000, command=command_line())
        rows, sec, loaded = [], {}, []
        for arm in arms:
            rs = sorted(by[arm], key=lambda r: r['settings']['seed'])
            t, v = mean_std([r['result']['test_acc'] for r in rs]), mean_std([r['result']['valid_acc'] for r in rs])
            summary[f'{arm}_acc'], summary[f'{arm}_acc_std'] = 100*t['mean'], 100*t['std']
            summary[f'{arm}_valid_acc'] = 100*v['mean']
            alone = [r['sec_per_epoch'] for r in rs if r['sec_per_epoch'] is not None and not r['overloaded']]
            every = [r['sec_per_epoch'] for r in rs if r['sec_per_epoch'] is not None]
            sec[arm] = float(np.mean(alone or every)) if every else None
            if every and not alone: loaded.append(arm)
            row = {'arm': ARMS[arm], 'test % (deployed)': fmt_ms(t), 'valid %': fmt_ms(v), 'seeds': len(rs),
                   'epochs': rs[0]['result']['epochs'], 'images/epoch': rs[0]['result']['images_per_epoch'],
                   's/epoch': '' if sec[arm] is None else f"{sec[arm]:.1f}" + (' (loaded machine)' if arm in loaded else '')}
            if 'exits_test' in rs[0]['result']:
                for k in rs[0]['result']['exits_test']:
                    if k != 'deepest': row[f'{k} %'] = fmt_ms(mean_std([r['result']['exits_test'][k] for r in rs]))
            rows.append(row)
        summary['sec_per_epoch'] = sec
        summary['sec_per_epoch_not_alone'] = loaded   # arms whose every run shared the machine: not comparable
        lines = []
        if {'corsd', 'baseline'} <= set(arms):
            gap = summary['corsd_acc'] - summary['baseline_acc']; summary['corsd_minus_baseline'] = gap
            lines.append(f"CORSD − baseline: **{gap:+.2f} points** (target ≥ +1.0: {'met' if gap >= 1 else 'NOT met'}).")
        if {'corsd', 'byot'} <= set(arms):
            gap = summary['corsd_acc'] - summary['byot_acc']; summary['corsd_minus_byot'] = gap
            lines.append(f"CORSD − BYOT: **{gap:+.2f} points** (target > 0: {'met' if gap > 0 else 'NOT met'}).")
        if {'corsd', 'baseline_compute_matched'} <= set(arms):
            gap = summary['corsd_acc'] - summary['baseline_compute_matched_acc']; summary['corsd_minus_compute_matched'] = gap
            lines.append(f"CORSD − compute-matched baseline: **{gap:+.2f} points** (reported without a target).")
        cols = ['arm', 'test % (deployed)', 'valid %'] + sorted({k for r in rows for k in r if k.startswith('exit') or k.startswith('ensemble')}) + \
               ['seeds', 'epochs', 'images/epoch', 's/epoch']
        per_seed = md_table([{'run': rid, 'arm': r['settings']['arm'], 'seed': r['settings']['seed'],
                              'test %': f"{100*r['result']['test_acc']:.2f}", 'valid %': f"{100*r['result']['valid_acc']:.2f}",
                              's/epoch': '' if r['sec_per_epoch'] is None else f"{r['sec_per_epoch']:.1f}"}
                             for rid, r in sorted(runs.items(), key=lambda kv: (kv[1]['settings']['arm'], kv[1]['settings']['seed']))])
        proto = (f"CIFAR-10 (official binary files), {a.arch}; class-balanced training subset of {a.n_train} images, a validation "
                 f"split of {a.n_valid} other training images, test = {'the full 10,000-image test split' if not a.n_test else f'{a.n_test} test images (NOT the full split)'}, "
                 f"read once after the final epoch. SGD momentum 0.9, L2 weight decay 5e-4 on every parameter, fit_one_cycle"
                 f"({a.epochs} epochs, lr {a.lr}, 30% warm-up, final lr/2.5e5), crop (pad 4) + flip; batches of {a.bs} images "
                 f"(CORSD: {a.triplets} triplets = {3*a.triplets} images); the compute-matched baseline trains 3× the epochs. "
                 f"Accuracy of the deployed (plain) network, mean ± std over seeds.")
        png = plot(by, arms, RESULTS/f'{a.out}.png', a)
        md = (f"{proto}\n\n{md_table(rows, cols)}\n\n" + '\n'.join(f"- {l}" for l in lines) +
              f"\n\n![test accuracy per arm and per exit]({png.name})\n\nPer seed:\n\n{per_seed}")
        return summary, md
    return build

def plot(by:dict, arms:list, png:Path, a) -> Path:
    "Test accuracy of the deployed network per arm (mean ± std over seeds, dots: seeds) and, for arms with exits, per exit"
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    exit_arms = [x for x in arms if 'exits_test' in by[x][0]['result']]
    fig, axs = plt.subplots(1, 2 if exit_arms else 1, figsize=(11 if exit_arms else 6, 3.8), squeeze=False)
    ax = axs[0, 0]
    for i, arm in enumerate(arms):
        accs = [100*r['result']['test_acc'] for r in by[arm]]
        ax.bar(i, np.mean(accs), yerr=np.std(accs, ddof=1) if len(accs) > 1 else 0, capsize=4, color=f'C{i}', alpha=.8)
        ax.plot([i]*len(accs), accs, 'k.', ms=5)
    allacc = [100*r['result']['test_acc'] for x in arms for r in by[x]]
    ax.set_xticks(range(len(arms)), [x.replace('_', '\n') for x in arms], fontsize=8)
    ax.set_ylim(min(allacc) - 3, max(allacc) + 2); ax.grid(axis='y', alpha=.3)
    ax.set_ylabel('test accuracy (%)'); ax.set_title(f'CIFAR-10, {a.arch}, {a.n_train} images, {a.epochs} epochs: deployed network')
    if exit_arms:
        ax = axs[0, 1]
        for j, arm in enumerate(exit_arms):
            ks = list(by[arm][0]['result']['exits_test'])
            mu = [100*np.mean([r['result']['exits_test'][k] for r in by[arm]]) for k in ks]
            sd = [100*np.std([r['result']['exits_test'][k] for r in by[arm]], ddof=1) if len(by[arm]) > 1 else 0 for k in ks]
            w = 0.8/len(exit_arms)
            ax.bar(np.arange(len(ks)) + j*w, mu, w, yerr=sd, capsize=3, label=arm)
            ax.set_xticks(np.arange(len(ks)) + w*(len(exit_arms) - 1)/2, ks, fontsize=8)
        ax.set_ylabel('test accuracy (%)'); ax.set_title('per exit'); ax.legend(fontsize=8); ax.grid(axis='y', alpha=.3)
    fig.tight_layout()
    return save_figure(fig, png)

def main(argv=None): return runner.run_all(get_args(argv), plan, build_report)   # None with --list

if __name__ == '__main__': main()
