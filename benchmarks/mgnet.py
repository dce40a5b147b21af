"""MGNet vs the same backbone run once on the full canvas, on cluttered MNIST (60×60) and cluttered CIFAR-10 (64×64).

Three arms: the single-pass backbone, MGNet with per-glimpse BatchNorm statistics (ours) and MGNet with shared
statistics (the authors' code). Every choice (glimpse scale range, learning rate, number of epochs) is made per arm
on a validation split of the training images (seed 0); the chosen settings are then trained with three seeds and the
test split is read once, at the end: clean accuracy, FLOPs per image, the 15 ImageNet-C corruptions × 5 severities,
a PGD L∞ curve on an eps grid where the baseline still stands (`corsd_suite.evaluate.pgd`: random start, its steps
and restarts) with gradient-masking checks, and seconds per epoch.

Runs go through the resumable runner (`benchmarks/runner.py`): finished runs are skipped, interrupted ones resume
from their last epoch. One invocation runs one dataset (`--dataset mnist|cifar10`); the report covers every finished
run of both. From the repository root:

    CORSD_DATA=../shared/data python benchmarks/mgnet.py --dataset mnist
    CORSD_DATA=../shared/data python benchmarks/mgnet.py --dataset cifar10 --device auto

Smoke test (a minute; writes benchmarks/results/mgnet_smoke*, delete it after):
    python benchmarks/mgnet.py --out mgnet_smoke --cache /tmp/mgnet_smoke --n_per_class 12 --n_valid 4 --epoch_grid 1
        --lrs 0.01 --scales 0.3,0.7 --seeds 1 --n_test 40 --n_corrupt 8 --n_attack 8 --n_sanity 8 --corruptions gaussian_noise --severities 3
"""
import argparse, functools, re, sys, time
from pathlib import Path
import numpy as np, torch
sys.path.insert(0, str(Path(__file__).parent))
import runner
from common import RESULTS, mean_std, fmt_ms, md_table, save_figure, command_line
from corsd_suite.data import load_dataset, cluttered, image_dls
from corsd_suite.models import get_model
from corsd_suite.evaluate import evaluate_accuracy, corruption_accuracy, attack_accuracy, pgd, CORRUPTIONS
from corsd_suite.mgnet import mgnet_learner, backbone_learner, mgnet_flops, cluttered_natural, CLUTTER_GLIMPSES

ARMS = {'baseline': 'backbone on the full canvas', 'mgnet': 'MGNet, per-glimpse BN (ours)', 'mgnet_shared': "MGNet, shared BN (authors' code)"}
# canvas, clutter patches and their size, glimpse down factor (24×24 glimpses), zoo width, default PGD grid, default epoch
# grid (CIFAR-10's is longer: see NOTES).
DATA = dict(
    mnist=dict(canvas=60, n_clutter=4, clutter_size=8, down=2.5, width=0.5, eps='0,0.005,0.01,0.02,0.03,0.05', epochs='5,10'),
    cifar10=dict(canvas=64, n_clutter=4, clutter_size=16, down=64/24, width=1., eps='0,0.001,0.002,0.004,0.008,0.016', epochs='10,20'))

NOTES = """
Notes (design facts; observations on a particular run are written by hand below the generated text):
- Selection: each arm's settings (learning rate, epochs and, for MGNet, the glimpse scale range) maximise accuracy on a
  validation split held out of the training images (seed 0); the test split is not read until the chosen settings
  have been trained with every seed.
- Epoch grid: 5 or 10 on MNIST, 10 or 20 on CIFAR-10. CIFAR-10's first selection runs had 5 and 10: from 5 to 10 epochs
  the backbone gained 13 validation points at both lrs (39.2 -> 52.7% at 0.003) and MGNet 8 (35.6 -> 43.9%, scales
  0.2-0.5, lr 0.003), so its grid moved up; those 5-epoch runs are not kept. When the chosen number is the grid's
  largest, longer schedules were not tried.
- MGNet BatchNorm: `glimpse_bn='per_glimpse'` (our deviation) keeps running statistics per glimpse; `'shared'` is the
  authors' code (one backbone on every glimpse, one running average over all glimpses, used by every glimpse in eval
  mode). Training mode is identical; only eval-mode normalisation differs.
- PGD runs through the whole model, grid sampling included (no straight-through or detached localization); the
  gradient-masking checks tell whether the sampling hides gradients.
"""

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    runner.add_args(p)
    # Contiguous by default: with torch 2.14.1 on the CPU, the backward of a 1×1 stride-2 convolution in channels_last
    # with at most 8 input channels on maps of 56 px or more crashes the process (segmentation fault): the half-width
    # ResNet-8's first shortcut on the 60×60 canvas. All arms train in the same format, so seconds per epoch compare.
    p.set_defaults(channels_last=False)
    p.add_argument('--dataset', default='mnist', choices=list(DATA))
    p.add_argument('--out', default='mgnet', help='result name (benchmarks/results/OUT.json/.md, OUT_pgd.png, runs/OUT/)')
    p.add_argument('--seeds', type=int, default=3, help='seeds of the final runs (selection uses seed 0)')
    p.add_argument('--n_per_class', type=int, default=600, help='training images per class')
    p.add_argument('--n_valid', type=int, default=100, help='validation images per class, held out of the training split')
    p.add_argument('--epoch_grid', default=None, help='epochs to choose from (on validation; default: per dataset, 5,10 on MNIST, 10,20 on CIFAR-10)')
    p.add_argument('--lrs', default='0.003,0.01', help='learning rates to choose from (on validation)')
    p.add_argument('--scales', default='0.2,0.5;0.3,0.7;0.4,0.9', help="glimpse scale ranges 'min,max;...' to choose from (on validation)")
    p.add_argument('--n_test', type=int, default=1000, help='clean test images (balanced, cluttered with a fixed seed)')
    p.add_argument('--n_corrupt', type=int, default=200, help='test images for the corruption suite')
    p.add_argument('--corruptions', default=','.join(CORRUPTIONS)); p.add_argument('--severities', default='1,2,3,4,5')
    p.add_argument('--n_attack', type=int, default=200, help='test images for the PGD curve')
    p.add_argument('--n_sanity', type=int, default=100, help='test images for the gradient-masking checks')
    p.add_argument('--eps', default=None, help='PGD eps grid (default: per dataset, where the baseline stays above 5%%)')
    p.add_argument('--steps', type=int, default=10)
    p.add_argument('--arch', default='resnet8'); p.add_argument('--width', type=float, default=None, help='zoo model width (default: 0.5 on MNIST, 1 on CIFAR-10)')
    p.add_argument('--glimpses', type=int, default=3); p.add_argument('--alpha', type=float, default=0.6)
    p.add_argument('--bs', type=int, default=64)
    a = p.parse_args(argv)
    a.eps = a.eps or DATA[a.dataset]['eps']; a.epoch_grid = a.epoch_grid or DATA[a.dataset]['epochs']
    if not a.only: a.only = f'{a.dataset}-*'          # plan both datasets (for the report), run this one
    return a

# -------------------------------------------------------------------------------------------------------- data
@functools.lru_cache(maxsize=2)
def get_data(dataset:str, n_per_class:int, n_valid:int, n_test:int):
    "Cluttered train / valid (held out of train) / test `ImageSet`s; fixed for every seed"
    d = DATA[dataset]
    clutter = ((lambda ds, seed: cluttered(ds, d['canvas'], d['n_clutter'], d['clutter_size'], seed=seed)) if dataset == 'mnist' else
               (lambda ds, seed: cluttered_natural(ds, d['canvas'], d['n_clutter'], d['clutter_size'], seed=seed)))
    pool = load_dataset(dataset, train=True).balanced(n_per_class + n_valid, 0)
    tr, va = pool.split(n_valid / (n_per_class + n_valid), seed=0)
    te = load_dataset(dataset, train=False).balanced(n_test // 10, 0)
    te = clutter(te, 12345)
    te = te.subset(torch.randperm(len(te), generator=torch.Generator().manual_seed(0)))   # mix classes for the subsets
    return clutter(tr, 1), clutter(va, 10_000), te

def batches(x, y, bs=100): return [(x[i:i+bs].float()/255, y[i:i+bs]) for i in range(0, len(y), bs)]

# -------------------------------------------------------------------------------------------------- one run
def build_learner(c:dict, dls):
    "The learner of arm `c['arm']` with the run's settings"
    if c['arm'] == 'baseline': return backbone_learner(dls, c['arch'], model_kw=dict(width=c['width']))
    return mgnet_learner(dls, c['arch'], cb_kw=dict(alpha=c['alpha']),
                         model_kw=dict(n_glimpses=c['glimpses'], down_factor=c['down'], width=c['width'], scale_min=c['scale'][0],
                                       scale_max=c['scale'][1], glimpse_bn='shared' if c['arm'] == 'mgnet_shared' else 'per_glimpse'))

def train_arm(ctx):
    "A runner run: train arm `ctx.config['arm']`; selection runs score on validation, final runs on the test split"
    c = ctx.config
    trn, val, tst = get_data(c['dataset'], c['n_per_class'], c['n_valid'], c['n_test'])
    dls = image_dls(trn, val, bs=c['bs'], device=ctx.device)
    learn = build_learner(c, dls)
    with learn.no_bar(), learn.no_logging(): ctx.fit(learn, c['epochs'], c['lr'])
    m = learn.model.eval()
    if c['stage'] == 'select': return dict(valid_acc=evaluate_accuracy(m, dls.valid, show=False))
    return evaluate_test(m, c, tst)

def evaluate_test(m, c:dict, tst) -> dict:
    "Clean, corruption, PGD and gradient-masking accuracies on the test split, and FLOPs"
    r = dict(clean_acc=evaluate_accuracy(m, batches(tst.x, tst.y), show=False))
    t0 = time.time()
    df = corruption_accuracy(m, tst.x[:c['n_corrupt']], tst.y[:c['n_corrupt']], c['corruptions'], c['severities'],
                             cache_dir=Path(__file__).parent/'cache', show=False)
    r.update(corruption_acc=float(df.accuracy.mean()), corruption_by_type=df.groupby('corruption').accuracy.mean().to_dict(),
             corruption_seconds=time.time() - t0)
    t0 = time.time()
    eps = c['eps']
    r['pgd_acc'] = attack_accuracy(m, batches(tst.x[:c['n_attack']], tst.y[:c['n_attack']]), eps, 'pgd', show=False, steps=c['steps']).accuracy.tolist()
    e = eps[len(eps)//2]          # gradient-masking checks at a middle eps: more steps, restarts, no random start
    sdl = batches(tst.x[:c['n_sanity']], tst.y[:c['n_sanity']])
    acc = lambda **kw: evaluate_accuracy(m, sdl, tfm=lambda x,y: pgd(m, x, y, e, **kw), show=False)
    st = c['steps']
    r['sanity'] = dict(eps=e, steps10=acc(steps=st), steps40=acc(steps=4*st, step_size=2.5*e/(4*st)),
                       restarts3=acc(steps=st, restarts=3), no_rand_init=acc(steps=st, rand_init=False))
    r['attack_seconds'] = time.time() - t0
    bb = get_model(c['arch'], n_in=tst.shape[0], n_out=tst.c, width=c['width'])
    r['flops'] = mgnet_flops(m, bb, tuple(tst.shape)) if c['arm'] != 'baseline' else None
    return r

# ------------------------------------------------------------------------------------------------------ the plan
def common(a, dataset:str) -> dict:
    return dict(dataset=dataset, arch=a.arch, width=a.width or DATA[dataset]['width'], glimpses=a.glimpses, down=round(DATA[dataset]['down'], 4),
                alpha=a.alpha, bs=a.bs, n_per_class=a.n_per_class, n_valid=a.n_valid, n_test=a.n_test)

def grid(a, arm:str) -> list:
    scales = [None] if arm == 'baseline' else [[float(v) for v in s.split(',')] for s in a.scales.split(';')]
    return [dict(scale=s, lr=lr, epochs=e) for s in scales for lr in map(float, a.lrs.split(',')) for e in map(int, a.epoch_grid.split(','))]

def sel_id(dataset, arm, g):
    sc = '' if g['scale'] is None else f"-s{g['scale'][0]:g},{g['scale'][1]:g}"
    return f"{dataset}-select-{arm}{sc}-lr{g['lr']:g}-e{g['epochs']}"

def recorded(bench, dataset:str, stage:str) -> dict:
    "{arm: [(run id, settings)]} of the run files of `dataset` at `stage` (the other dataset's runs, made by another invocation)"
    out = {}
    for f in sorted(bench.runs_dir.glob(f'{dataset}-{stage}-*.json')):
        st = runner.read_json(f)['settings']
        out.setdefault(st['arm'], []).append((f.stem, st))
    return out

def plan(bench, a) -> dict:
    """Add the selection runs of `a.dataset`, then the final runs of each arm whose selection is complete; the other
    dataset's runs are added as their files recorded them (so the report covers both). Returns the choices"""
    choices, done = {}, None
    for dataset in DATA:
        mine = dataset == a.dataset
        sel = ({arm: [(sel_id(dataset, arm, g), dict(stage='select', arm=arm, seed=0, **common(a, dataset), **g)) for g in grid(a, arm)]
                for arm in ARMS} if mine else recorded(bench, dataset, 'select'))
        fins = {} if mine else recorded(bench, dataset, 'final')
        for arm, runs in sel.items():
            ids = {bench.add(train_arm, rid, **st): st for rid, st in runs}
            done = bench.finished()
            if not all(r in done for r in ids): continue
            best = max(ids, key=lambda r: (done[r]['result']['valid_acc'], -ids[r]['epochs']))   # ties: fewer epochs
            pick = {k: ids[best][k] for k in ('scale', 'lr', 'epochs')}
            choices[(dataset, arm)] = dict(pick, valid_acc=done[best]['result']['valid_acc'], run=best)
            if not mine:
                for rid, st in fins.get(arm, []):
                    if all(st[k] == v for k, v in pick.items()): bench.add(train_arm, rid, **st)
                continue
            ev = dict(n_corrupt=a.n_corrupt, corruptions=a.corruptions.split(','), severities=[int(s) for s in a.severities.split(',')],
                      n_attack=a.n_attack, n_sanity=a.n_sanity, eps=[float(e) for e in a.eps.split(',')], steps=a.steps)
            for seed in range(a.seeds):
                bench.add(train_arm, f"{dataset}-final-{arm}-seed{seed}", stage='final', arm=arm, seed=seed, **common(a, dataset), **pick, **ev)
    return choices

# ------------------------------------------------------------------------------------------------------ report
def dataset_summary(runs:dict, dataset:str, choices:dict):
    "Summary keys (the landed ones for cluttered MNIST) and markdown of one dataset's final runs, or None"
    fin = {arm: [r for rid, r in sorted(runs.items()) if rid.startswith(f'{dataset}-final-{arm}-')] for arm in ARMS}
    if not all(fin.values()): return None
    R = {arm: [r['result'] for r in v] for arm, v in fin.items()}
    ms = lambda arm, k: mean_std([r[k] for r in R[arm]])
    pgd_mean = lambda arm: np.mean([r['pgd_acc'] for r in R[arm]], 0).tolist()
    spe = lambda arm: float(np.mean([r['sec_per_epoch'] for r in fin[arm] if r['sec_per_epoch'] is not None] or [float('nan')]))
    s0 = fin['mgnet'][0]['settings']; eps = s0['eps']; fl = R['mgnet'][0]['flops']
    def targets(arm):
        b, m = pgd_mean('baseline'), pgd_mean(arm)
        return dict(clean_within_1pt_at_half_flops=bool(ms(arm, 'clean_acc')['mean'] >= ms('baseline', 'clean_acc')['mean'] - 0.01 and R[arm][0]['flops']['ratio'] <= 0.5),
                    corruption_above_baseline=bool(ms(arm, 'corruption_acc')['mean'] > ms('baseline', 'corruption_acc')['mean']),
                    pgd_above_baseline_where_baseline_above_5pct=bool(all(mv > bv for mv, bv, e in zip(m, b, eps) if e > 0 and bv > 0.05)),
                    pgd_eps_where_baseline_above_5pct=[e for e, bv in zip(eps, b) if e > 0 and bv > 0.05])
    sel = {arm: {k: v for k, v in choices[(dataset, arm)].items() if k != 'run'} for arm in ARMS}
    summ = dict(baseline_clean_acc=ms('baseline', 'clean_acc')['mean'], mgnet_clean_acc=ms('mgnet', 'clean_acc')['mean'],
                flops_ratio=fl['ratio'], baseline_flops=fl['backbone_flops'], mgnet_flops=fl['mgnet_flops'],
                baseline_corruption_acc=ms('baseline', 'corruption_acc')['mean'], mgnet_corruption_acc=ms('mgnet', 'corruption_acc')['mean'],
                pgd_eps=eps, baseline_pgd_acc=pgd_mean('baseline'), mgnet_pgd_acc=pgd_mean('mgnet'),
                baseline_sec_per_epoch=spe('baseline'), mgnet_sec_per_epoch=spe('mgnet'),
                seeds=sorted(r['settings']['seed'] for r in fin['mgnet']), scale_range=s0['scale'], protocol='valid-selected',
                selected_on='valid', selected=sel, targets_met=targets('mgnet'),
                shared_bn=dict(mgnet_clean_acc=ms('mgnet_shared', 'clean_acc')['mean'], mgnet_corruption_acc=ms('mgnet_shared', 'corruption_acc')['mean'],
                               mgnet_pgd_acc=pgd_mean('mgnet_shared'), mgnet_sec_per_epoch=spe('mgnet_shared'),
                               scale_range=fin['mgnet_shared'][0]['settings']['scale'], flops_ratio=R['mgnet_shared'][0]['flops']['ratio'],
                               targets_met=targets('mgnet_shared')))
    return summ, report_md(dataset, fin, R, summ, eps)

def report_md(dataset, fin, R, summ, eps) -> str:
    s = fin['mgnet'][0]['settings']; d = DATA[dataset]
    ms = lambda arm, k: mean_std([r[k] for r in R[arm]])
    flops = lambda arm: summ['baseline_flops'] if arm == 'baseline' else R[arm][0]['flops']['mgnet_flops']
    sel_rows = [dict(arm=ARMS[arm], scale_range='' if v['scale'] is None else f"{v['scale'][0]}–{v['scale'][1]}", lr=v['lr'],
                     epochs=v['epochs'], valid_acc=f"{v['valid_acc']*100:.2f}") for arm, v in summ['selected'].items()]
    rows = [dict(model=ARMS[arm], clean=fmt_ms(ms(arm, 'clean_acc')), corruption=fmt_ms(ms(arm, 'corruption_acc')),
                 mflops=f"{flops(arm)/1e6:.2f}") for arm in ARMS]
    pgd_rows = [dict(eps=e, **{arm: f"{np.mean([r['pgd_acc'][i] for r in R[arm]])*100:.1f}" for arm in ARMS}) for i, e in enumerate(eps)]
    san_rows = [dict(model=arm, seed=f['settings']['seed'], eps=f['result']['sanity']['eps'],
                     **{k: f"{f['result']['sanity'][k]*100:.1f}" for k in ('steps10', 'steps40', 'restarts3', 'no_rand_init')})
                for arm in ARMS for f in fin[arm]]
    name = 'MNIST digits (28×28)' if dataset == 'mnist' else 'CIFAR-10 images (32×32 RGB)'
    how = ('`corsd_suite.data.cluttered`, max-pasted' if dataset == 'mnist' else '`corsd_suite.mgnet.cluttered_natural`, pasted over a black canvas')
    proto = (f"Data: {name} at a random place on {d['canvas']}×{d['canvas']} canvases with {d['n_clutter']} clutter patches of "
             f"{d['clutter_size']}×{d['clutter_size']} cut from other images ({how}). Train: {s['n_per_class']}/class; validation: "
             f"{s['n_valid']}/class held out of the training split (used for every choice); test: {s['n_test']} balanced test images, "
             f"read only by the final runs. Models: `{s['arch']}` (width {s['width']}), Adam (fastai default), one-cycle, batch {s['bs']}, "
             f"no augmentation. MGNet: {s['glimpses']} glimpses, down factor {s['down']:.3g}, alpha {s['alpha']}, localization gradient "
             f"scale 0.02, tight-crop translation. Corruptions: {len(s['corruptions'])} types × severities {s['severities']} on the first "
             f"{s['n_corrupt']} test images. PGD L∞: {s['steps']} steps, random start (`corsd_suite.evaluate.pgd`), first {s['n_attack']} "
             f"test images; gradient-masking checks on {s['n_sanity']}. Seeds {summ['seeds']}.")
    plot(eps, R, RESULTS/f"{OUT}{'' if dataset == 'mnist' else '_' + dataset}_pgd.png", dataset)
    png = f"{OUT}{'' if dataset == 'mnist' else '_' + dataset}_pgd.png"
    return (f"## Cluttered {dataset.upper() if dataset == 'mnist' else 'CIFAR-10'}\n\n{proto}\n\nChosen on validation (seed 0):\n\n{md_table(sel_rows)}\n\n"
            f"Test split, mean ± std over seeds (%):\n\n{md_table(rows)}\n\nFLOPs ratio MGNet/baseline: **{summ['flops_ratio']:.1%}** "
            f"(`torch.utils.flop_counter`; bilinear sampling not counted).\n\nPGD accuracy (%):\n\n{md_table(pgd_rows)}\n\n![PGD curve]({png})\n\n"
            f"Gradient-masking checks (accuracy %): more steps, 3 random restarts and no random start must not raise accuracy above "
            f"the {s['steps']}-step attack (beyond noise):\n\n{md_table(san_rows)}\n\nTargets (per-glimpse BN): {summ['targets_met']}\n\n"
            f"Targets (shared BN): {summ['shared_bn']['targets_met']}\n")

def plot(eps, R, path, dataset):
    import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for arm, lab in ARMS.items():
        accs = np.array([r['pgd_acc'] for r in R[arm]])
        ax.errorbar(eps, accs.mean(0), yerr=accs.std(0) if len(accs) > 1 else None, marker='o', label=lab, capsize=3)
    ax.set_xlabel('PGD L∞ eps (pixel scale [0,1])'); ax.set_ylabel('accuracy'); ax.grid(alpha=.3); ax.legend(fontsize=7)
    ax.set_title(f'cluttered {dataset}: PGD accuracy'); fig.tight_layout(); save_figure(fig, path, dpi=100)

def dataset_command(dataset:str) -> str:
    "This invocation's command line for `dataset` (each dataset's runs are made by their own invocation)"
    cmd = re.sub(r' --dataset[ =]\S+', '', command_line())
    return cmd.replace('benchmarks/mgnet.py', f'benchmarks/mgnet.py --dataset {dataset}', 1)

def build_report(choices):
    def build(runs):
        parts = {ds: dataset_summary(runs, ds, choices) for ds in DATA}
        for ds, p in parts.items():
            if p: p[0]['command'] = dataset_command(ds)
        summary = dict(parts['mnist'][0]) if parts['mnist'] else dict(selected_on='valid')
        if parts['cifar10']: summary['cifar10'] = parts['cifar10'][0]
        md = '\n\n'.join(p[1] for p in parts.values() if p) or '_No dataset has all its final runs yet._'
        return summary, md + '\n' + NOTES
    return build

OUT = 'mgnet'
def main(argv=None):
    global OUT
    a = get_args(argv); OUT = a.out
    for _ in range(2):   # pass 1: the selection runs; pass 2: the final runs of the arms whose selection is now complete
        bench = runner.Benchmark(a.out, a); choices = plan(bench, a); bench.run()
    bench.report(build_report(choices), command=' && '.join(dataset_command(ds) for ds in DATA))   # every dataset's invocation, in order

if __name__ == '__main__': main()
