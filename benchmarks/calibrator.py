"""Light-weight calibrator on the authors' digits protocol, MNIST→USPS and USPS→MNIST, on the resumable runner.

Arms: source only, AdaBN, calibrator with frozen BN, calibrator with the authors' code's BN behaviour (the frozen
classifier's BN statistics move), DANN. Each arm × seed × direction is one run of `runner.Benchmark`: the calibrator
arms are checkpointed every epoch (of source batches) and resume where they stopped; the source classifier is a
shared stage, trained once per seed and direction and loaded by every arm. DANN (a plain torch loop) is not
checkpointed inside its run: an interrupted DANN run starts again.

Protocol (`domain_pair`): the source's train split, labelled; the target's train split, unlabelled, for adaptation
(all 7,291 USPS training images for MNIST→USPS); the target's test split for evaluation (2,007 USPS images).
The authors' settings are the defaults but for the image size: batch 128, calibrator with 9 residual blocks, Adam 1e-4
for calibrator, discriminators and DANN; for M→U ngf 8, bound 0.4 in [-1, 1] units (0.2 in pixel units) and ~11.4k
iterations (the code's 200 epochs of 57 steps; here whole epochs of MNIST batches, 11,232), for U→M ngf 4, bound 0.9
(0.45) and 2,850 iterations (the code's 50 epochs of 57 steps: an epoch of its loops is min(source, target) batches;
here 51 epochs of 56 USPS batches, 2,856). No setting reads target labels: there is no
model selection at all, every number is the last iteration's (the per-epoch target accuracy is reported only).
Image size: 16×16×1 in [0, 1] (USPS's own) by default, not the code's 32×32×3 in [-1, 1] (its data loader resizes both
domains to 32×32 and repeats the grey channel), for cost (`SIZE_NOTE` gives a measurement at 28×28: the 12 calibrator
runs take ~5.5 h instead of ~13 h on 2 CPU cores; 32×32×3 costs more still).

    CORSD_DATA=../shared/data python benchmarks/calibrator.py --device auto          # everything, resumable
    python benchmarks/calibrator.py --list                                          # what is done / missing
    python benchmarks/calibrator.py --plot_only                                     # the figure from the JSON
    # a smoke test (do not overwrite the committed results):
    python benchmarks/calibrator.py --out calibrator_smoke --seeds 1 --iters 20 --n_per_class 20 --clf_epochs 1 --n_blocks 1
"""
import sys, copy, json, argparse
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parent))
import numpy as np
import runner
from common import RESULTS, mean_std, fmt_ms, md_table, command_line, save_figure
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from corsd_suite.optim import adam
from corsd_suite.core import seed_everything
from corsd_suite.data import domain_pair, image_dls, TensorDL
from corsd_suite.evaluate import evaluate_accuracy
from corsd_suite.models import dtn, count_params
from corsd_suite.calibration import Calibrator
from corsd_suite.calibrator import calibrator_learner, CalibratorCallback
from corsd_suite.baselines import adabn, dann_adapt

DIRS = {'mnist_to_usps': ('mnist', 'usps'), 'usps_to_mnist': ('usps', 'mnist')}
CODE = {'mnist_to_usps': dict(ngf=8, bound=0.2, iters=11400), 'usps_to_mnist': dict(ngf=4, bound=0.45, iters=2850)}   # the authors' configs, pixel units
ARMS = {'source_only': 'source only', 'adabn': 'AdaBN', 'cal': 'calibrator, frozen BN',
        'cal_code_bn': "calibrator, the code's BN (statistics move)", 'dann': 'DANN (fine-tunes the classifier)'}
ACC_KEYS = {'source_only': 'source_only_acc', 'adabn': 'adabn_acc', 'cal': 'calibrated_acc',
            'cal_code_bn': 'calibrated_code_bn_acc', 'dann': 'dann_acc'}
SIZE_NOTE = ("16×16 is USPS's own resolution; the authors' code resizes both domains to 32×32 with 3 channels in [-1, 1]. Measured alone on the 2 "
             "CPU cores, a calibrator iteration (M→U, 9 blocks, batch 128) takes 0.33 s at 28×28 and 0.14 s at 16×16, "
             "so the protocol runs at 16×16.")
OLD = 'calibrator_old_protocol'   # the previous runs' page, kept
U2M_LONG = ("An earlier USPS→MNIST run took M→U's length by mistake, 11,424 iterations (4× the code's 2,850): frozen-BN "
            "calibrator, seed 0, 40.55% MNIST test at its last iteration (source only, same classifier: 56.00%; USPS test through "
            "the calibrator 86.40% vs 96.11%). Its target accuracy after each epoch of 56 iterations went from 68% after the first "
            "to 38% after the 50th and 41% at the end (the run file is in git at commit a1c7a81). The length is now the code's; "
            "it was set from the code, not from that curve.")

def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0]); runner.add_args(p)
    g = p.add_argument_group('protocol (defaults: the authors\')')
    g.add_argument('--seeds', type=int, default=3)
    g.add_argument('--directions', default='mnist_to_usps,usps_to_mnist', help=f'comma-separated, of {list(DIRS)}')
    g.add_argument('--arms', default=','.join(ARMS), help=f'comma-separated, of {list(ARMS)}')
    g.add_argument('--iters', type=int, default=None, help='adaptation iterations, rounded to whole epochs of source batches '
                   '(default: the code\'s, 11,400 for M→U, 2,850 for U→M)')
    g.add_argument('--bs', type=int, default=128)
    g.add_argument('--size', type=int, default=16, help='image side (16, USPS\'s own; the authors\' code: 32, with 3 channels in [-1, 1]; 28 costs 2.4x 16)')
    g.add_argument('--n_blocks', type=int, default=9, help='residual blocks of the calibrator')
    g.add_argument('--ngf', type=int, default=None, help='calibrator width (default: the code\'s, 8 for M→U, 4 for U→M)')
    g.add_argument('--bound', type=float, default=None, help='one-sided bound in pixel units (default: the code\'s, 0.2 M→U, 0.45 U→M)')
    g.add_argument('--patch', type=int, default=4, help='side of the pixel discriminator\'s patch')
    g.add_argument('--lr', type=float, default=1e-4, help='Adam lr of calibrator, discriminators and DANN (the code: 1e-4)')
    g.add_argument('--clf_epochs', type=int, default=10, help='one-cycle epochs of the source classifier')
    g.add_argument('--clf_lr', type=float, default=2e-3)
    g.add_argument('--width', type=float, default=1., help='DTN width multiplier (the code: 1)')
    g.add_argument('--n_per_class', type=int, default=0, help='a balanced source subset (0: all; for smoke tests)')
    g.add_argument('--out', default='calibrator', help='result name under benchmarks/results (and the runs folder)')
    g.add_argument('--plot_only', action='store_true', help='only redraw the figure from results/<out>.json')
    a = p.parse_args(argv)
    for k in ('iters', 'bs', 'size', 'n_blocks', 'patch', 'clf_epochs', 'seeds'):
        if getattr(a, k) is not None and getattr(a, k) < 1: raise SystemExit(f"--{k} must be at least 1, got {getattr(a, k)}")
    if not 0 < a.lr < 1: raise SystemExit(f"--lr must be in (0, 1), got {a.lr}")
    for k, allowed in (('directions', DIRS), ('arms', ARMS)):
        bad = [v for v in getattr(a, k).split(',') if v not in allowed]
        if bad: raise SystemExit(f"--{k}: unknown {bad}; choose from {list(allowed)}")
    return a

# ------------------------------------------------------------------------------------------------------ one run
def source_classifier(ctx, c):
    "The pair, source `dls` (valid = target evaluation set) and the source classifier, trained once per seed and direction"
    src, tgt = DIRS[c['direction']]
    pair = domain_pair(src, tgt, size=c['size'], n_channels=1, seed=c['seed'], n_per_class=c['n_per_class'] or None)
    dls = image_dls(pair.source_train, pair.target_eval, bs=c['bs'], device=ctx.device)
    seed_everything(c['seed'])
    clf = dtn(1, 10, dls.stats, width=c['width'], size=c['size'])
    lc = Learner(dls, clf, loss_func=CrossEntropyLossFlat(), opt_func=adam())
    key = (f"clf-{c['direction']}-s{c['seed']}-px{c['size']}-w{c['width']}-e{c['clf_epochs']}-lr{c['clf_lr']}"
           f"-bs{c['bs']}-n{c['n_per_class']}")
    ctx.fit(lc, c['clf_epochs'], c['clf_lr'], stage='clf', shared=key)
    return pair, dls, clf.eval()

def train(ctx):
    c = ctx.config
    pair, dls, clf = source_classifier(ctx, c)
    src_dl = TensorDL(pair.source_test, 500, device=ctx.device)
    tgt_dl = TensorDL(pair.target_adapt, c['bs'], shuffle=True, drop_last=True, device=ctx.device)
    n_ep = max(1, round(c['iters'] / len(dls.train)))
    r = dict(adapt_images=len(pair.target_adapt), eval_images=len(pair.target_eval), protocol=pair.protocol,
             clf_params=count_params(clf), iterations=0)
    arm, model = c['arm'], clf
    seed_everything(c['seed'])
    if arm == 'adabn': model = adabn(copy.deepcopy(clf), TensorDL(pair.target_adapt, c['bs'], device=ctx.device))
    elif arm in ('cal', 'cal_code_bn'):
        cal = Calibrator(1, ngf=c['ngf'], n_blocks=c['n_blocks'], bound=c['bound'])
        learn = calibrator_learner(dls, copy.deepcopy(clf), tgt_dl, cal=cal, cb_kw=dict(d_lr=c['lr']),
                                   model_kw=dict(code_faithful_bn=arm == 'cal_code_bn', patch=c['patch']))
        ctx.fit(learn, n_ep, c['lr'], stage='cal', kind='fit')
        model, names = learn.model, list(learn.recorder.metric_names[1:-1])
        i = names.index('accuracy') if 'accuracy' in names else None
        cb = learn.cbs.filter(lambda o: isinstance(o, CalibratorCallback))[0]
        r.update(iterations=n_ep * len(dls.train), cal_params=count_params(learn.model.cal),
                 target_acc_per_epoch=[float(v[i]) for v in learn.recorder.values] if i is not None else [],
                 s_per_iter=float(np.mean(ctx.epoch_seconds.get('cal') or [np.nan])) / len(dls.train),
                 last_disc={k: float(np.mean([h[k] for h in cb.history[-50:]])) for k in cb.history[-1] if k != 'iter'} if cb.history else {})
    elif arm == 'dann':
        import time
        t0, n = time.perf_counter(), n_ep * len(dls.train)
        model = dann_adapt(copy.deepcopy(clf).train(), dls.train, tgt_dl, iters=n, lr=c['lr'])
        r.update(iterations=n, s_per_iter=(time.perf_counter() - t0) / n)
    r.update(target_acc=evaluate_accuracy(model, dls.valid, show=False), source_acc=evaluate_accuracy(model, src_dl, show=False))
    return r

def plan(bench, a):
    for d in a.directions.split(','):
        code = dict(CODE[d], **{k: getattr(a, k) for k in ('ngf', 'bound', 'iters') if getattr(a, k) is not None})
        for seed in range(a.seeds):
            for arm in a.arms.split(','):
                bench.add(train, f'{d}-{arm}-s{seed}', direction=d, arm=arm, seed=seed, bs=a.bs, size=a.size,
                          n_blocks=a.n_blocks, patch=a.patch, lr=a.lr, clf_epochs=a.clf_epochs, clf_lr=a.clf_lr,
                          width=a.width, n_per_class=a.n_per_class, **code)

# ------------------------------------------------------------------------------------------------------ summary
def arm_runs(runs:dict, d:str, arm:str) -> list:
    "The finished runs of one direction and arm"
    return [r for r in runs.values() if r['settings']['direction'] == d and r['settings']['arm'] == arm]

def direction_summary(runs:dict, d:str) -> dict:
    "Mean accuracies (fractions) of one direction's finished runs; None for an arm with none"
    rs = {arm: [r['result'] for r in arm_runs(runs, d, arm)] for arm in ARMS}
    m = lambda arm, k: float(np.mean([x[k] for x in rs[arm]])) if rs[arm] else None
    out = {ACC_KEYS[arm]: m(arm, 'target_acc') for arm in ARMS}
    out.update(source_acc_plain=m('source_only', 'source_acc'), source_acc_calibrated=m('cal', 'source_acc'),
               source_acc_calibrated_code_bn=m('cal_code_bn', 'source_acc'), source_acc_dann=m('dann', 'source_acc'))
    anyr = [x for v in rs.values() for x in v]
    its = [x['iterations'] for x in anyr if x['iterations']]
    cal = [x for x in rs['cal'] + rs['cal_code_bn']]
    out.update(adapt_images=anyr[0]['adapt_images'] if anyr else None, eval_images=anyr[0]['eval_images'] if anyr else None,
               iterations=its[0] if its else None,
               calibrator_param_ratio=cal[0]['cal_params'] / cal[0]['clf_params'] if cal else None,
               seeds_done={arm: len(v) for arm, v in rs.items()},
               acc=({arm: dict(target=mean_std([x['target_acc'] for x in v]), source=mean_std([x['source_acc'] for x in v]))
                     for arm, v in rs.items() if v}))
    return out

def targets(s:dict) -> str:
    if s['calibrated_acc'] is None or s['source_only_acc'] is None: return 'Targets: not all arms have finished.'
    best = max(v for v in (s['calibrated_acc'], s['calibrated_code_bn_acc']) if v is not None)
    ok = lambda b: 'met' if b else 'NOT met'
    return (f"Targets of issue 18: frozen-BN calibrator ≥ source only + 10 points: {ok(s['calibrated_acc'] >= s['source_only_acc'] + .10)} "
            f"({100*(s['calibrated_acc'] - s['source_only_acc']):+.1f}); best calibrator arm ≥ 90%: {ok(best >= .90)} ({100*best:.1f}%); "
            f"source test accuracy through the calibrator within 1 point of the plain classifier: "
            f"{ok(s['source_acc_plain'] - s['source_acc_calibrated'] <= .01)} ({100*s['source_acc_calibrated']:.2f}% vs {100*s['source_acc_plain']:.2f}%).")

def best_epoch_bound(runs:dict, d:str) -> dict:
    "Per calibrator arm, the mean over seeds of the best per-epoch target accuracy: an upper bound on what any epoch selection could give (nothing is selected)"
    out = {}
    for arm in ('cal', 'cal_code_bn'):
        cs = [r['result']['target_acc_per_epoch'] for r in arm_runs(runs, d, arm) if r['result'].get('target_acc_per_epoch')]
        if cs: out[arm] = float(np.mean([max(c) for c in cs]))
    return out

def shortfall_md(runs:dict, d:str, s:dict) -> str:
    "What the M→U targets' shortfall rests on: measured bounds and what was tried, from the run files"
    b = best_epoch_bound(runs, d)
    if s['calibrated_acc'] is None or not b: return ''
    drop = [100*(s['source_acc_plain'] - s[k]) for k in ('source_acc_calibrated', 'source_acc_calibrated_code_bn') if s[k] is not None]
    return ("**Where the targets are missed, what was measured and tried.** (1) Even the best epoch of each run, read on the "
            "target labels (which no number here does; it is only a bound on what model selection could give), averages "
            f"{100*b.get('cal', np.nan):.1f}% for the frozen-BN calibrator ({100*(b.get('cal', np.nan) - s['source_only_acc']):+.1f} over "
            f"source only{', so even an epoch chosen on target labels would not give it +10 points' if b.get('cal', 1) < s['source_only_acc'] + .10 else ''}) "
            f"and {100*b.get('cal_code_bn', np.nan):.1f}% with the code's BN"
            f"{' (above 90% only with epochs chosen on target labels)' if b.get('cal_code_bn', 0) >= .90 > s['calibrated_code_bn_acc'] else ''}. (2) Seeds differ by several points (the per-seed column); the paper gives one figure per setting. "
            "(3) At deployment MNIST images go through the calibrator too (trained on them only by the λ_s = 0.1 term), "
            f"costing {' and '.join(f'{v:.1f}' for v in drop)} points for frozen BN and the code's BN. "
            "(4) Tried before, on the reduced protocol ([calibrator_old_protocol.md](calibrator_old_protocol.md)): a higher "
            "learning rate (3e-4, chosen on target labels, so not kept) and the code's exact output mapping (`mode='clamp'`, no "
            "better). (5) Not matched: the code's 32×32×3 input in [-1, 1] (28×28 alone costs 2.4×, see above); its source classifier's training "
            "(300 epochs of Adam 1e-4 with weight decay 5e-4; here 10 one-cycle epochs of Adam 2e-3, "
            f"{100*s['source_acc_plain']:.1f}% on MNIST test); the CycleGAN-translated source images behind the paper's 97.1% (its "
            "calibrator alone: 95.6%). No setting was tuned further: each further choice would need target labels.")

def direction_md(runs:dict, d:str, s:dict) -> str:
    src, tgt = (n.upper() for n in DIRS[d])
    rows = []
    for arm, name in ARMS.items():
        if arm not in s['acc']: rows.append({'arm': name, f'{tgt} test acc (%)': 'not run yet'}); continue
        per = sorted((r['settings']['seed'], r['result']['target_acc']) for r in arm_runs(runs, d, arm))
        rows.append({'arm': name, f'{tgt} test acc (%)': fmt_ms(s['acc'][arm]['target']), f'{src} test acc (%)': fmt_ms(s['acc'][arm]['source']),
                     'per seed (%)': ' / '.join(f's{k}: {100*v:.1f}' for k, v in per)})
    one = next((r for r in runs.values() if r['settings']['direction'] == d), None)
    st = one['settings'] if one else {}
    return (f"## {src}→{tgt}\n\nProtocol: {one['result']['protocol'] if one else '?'}.\n"
            f"Images {st.get('size')}×{st.get('size')} grey in [0, 1]; batch {st.get('bs')}; {s['iterations']} adaptation iterations; "
            f"calibrator ngf {st.get('ngf')}, {st.get('n_blocks')} blocks, one-sided bound {st.get('bound')} in pixel units; Adam {st.get('lr')}.\n"
            f"{SIZE_NOTE if st.get('size') == 16 else ''}\n\n"
            f"{md_table(rows)}\n\n{targets(s) + chr(10)*2 + shortfall_md(runs, d, s) if d == 'mnist_to_usps' else U2M_LONG}")

def summarise(runs:dict):
    by_dir = {d: direction_summary(runs, d) for d in DIRS}
    m2u, u2m = by_dir['mnist_to_usps'], by_dir['usps_to_mnist']
    one = next(iter(runs.values()))['settings']
    keep = lambda s: {k: s[k] for k in (*ACC_KEYS.values(), 'source_acc_plain', 'source_acc_calibrated', 'source_acc_calibrated_code_bn',
                                         'source_acc_dann', 'adapt_images', 'eval_images', 'iterations', 'calibrator_param_ratio',
                                         'seeds_done', 'acc')}
    summary = dict(keep(m2u), seeds=max([n for s in by_dir.values() for n in s['seeds_done'].values()] or [0]),
                   size=one['size'], lr=one['lr'], command=command_line(), usps_to_mnist=keep(u2m),
                   old_protocol=f'{OLD}.json')
    spi = {}   # per direction/arm, over its seeds: the seeds may have run on machines of different speeds
    for r in runs.values():
        if r['result'].get('s_per_iter') is not None and not r['overloaded']:
            spi.setdefault(f"{r['settings']['direction']}/{r['settings']['arm']}", []).append(r['result']['s_per_iter'])
    md = '\n\n'.join([
        "The light-weight calibrator on the authors' digits protocol: the target's **train** split, unlabelled, for adaptation "
        "and its test split for evaluation; last-iteration accuracy, mean ± sample std over seeds. No setting was chosen on "
        "target labels (the per-epoch target accuracy is recorded in the run files for the trajectory only).",
        *(direction_md(runs, d, by_dir[d]) for d in DIRS if any(r['settings']['direction'] == d for r in runs.values())),
        f"![accuracy per arm]({Path(OUT_PNG).name})",
        "Seconds per adaptation iteration (runs made alone on the machine; the lowest and highest over seeds, which ran on "
        "machines of different speeds: the run table below has each run's s/epoch): " +
        (', '.join(f'{k} {min(v):.3f}–{max(v):.3f}' for k, v in sorted(spi.items())) or 'none'),
        f"## The previous protocol (kept, not comparable)\n\nThe earlier runs ([{OLD}.md]({OLD}.md), and before them "
        "[calibrator_code_lr.md](calibrator_code_lr.md)) adapted on 1,003 images of the USPS *test* split and evaluated on the "
        "other 1,004, for 2,811 iterations at 16×16 with 3 residual blocks: source only 77.3%, frozen-BN calibrator 83.7%, "
        "code-faithful BN 85.0%, DANN 89.8% (3 seeds). **Their learning rate, 3e-4, was chosen on the target evaluation labels of "
        "two seeds (0 and 1)**, so those numbers are not clean; the runs above use the authors' 1e-4, chosen without target labels."])
    return summary, md

OUT_PNG = None
def plot(json_file:Path, png:Path):
    "Accuracy per arm with error bars (sample std over seeds), both directions, from the results JSON"
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    s = json.loads(Path(json_file).read_text())['summary']
    fig, ax = plt.subplots(figsize=(9, 3.8))
    w = 0.38
    for j, (d, sd) in enumerate((('MNIST→USPS', s), ('USPS→MNIST', s.get('usps_to_mnist') or {}))):
        acc = sd.get('acc') or {}
        mu = [100*acc[a]['target']['mean'] if a in acc else np.nan for a in ARMS]
        sd_ = [100*acc[a]['target']['std'] if a in acc else 0 for a in ARMS]
        ax.bar(np.arange(len(ARMS)) + (j - .5)*w, mu, w, yerr=sd_, capsize=3, label=d)
    ax.set_xticks(np.arange(len(ARMS)), [ARMS[a].replace(' (', '\n(').replace(', ', ',\n') for a in ARMS], fontsize=8)
    ax.set_ylabel('target test accuracy (%)'); ax.set_ylim(0, 100); ax.legend(); ax.grid(axis='y', alpha=.3)
    ax.set_title('Light-weight calibrator, last iteration, mean ± std over seeds')
    plt.tight_layout()
    save_figure(fig, png)
    print(f'wrote {png}')

if __name__ == '__main__':
    a = parse()
    OUT_PNG = RESULTS/f'{a.out}.png'
    if not a.plot_only:
        bench = runner.Benchmark(a.out, a)
        plan(bench, a)
        bench.run()
        if getattr(a, 'list', False): sys.exit(0)
        bench.report(summarise, a.out)
    plot(RESULTS/f'{a.out}.json', OUT_PNG)
