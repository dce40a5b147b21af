"""Reverse adversarial examples on strong models (issue 19), on the resumable runner.

Per `<arch>@<dataset>` and seed: a base model trained on the whole training split (minus a held-out validation
split) with standard augmentation only (crop, plus flip on CIFAR-10), cached with the runner as a shared stage; then,
for each of the 11 unseen transformations at `--severity`, the frozen model alone, behind a calibrator trained on a
labelled new-scene set drawn from the training split, and fine-tuned whole on the same new-scene set (upper
reference), all evaluated on the whole transformed test split.
The low-bit arm: `pick_bits` chooses, on the validation split (never the test split), the mildest low-bit setting
whose clean accuracy drops by at least `--min-drop`; a calibrator is trained in front of the frozen low-bit model
on the clean new-scene set (recovery on clean test data) and on each transformation; and the training-free arm,
reverse PGD in `teacher` mode, moves each input of the low-bit model towards the float model's prediction (the
paper's teacher-guided refinement of quantized models; towards the model's own prediction, `pred` mode, it cannot
change the prediction, so it is not run on the float model).

Real protocol (the lead runs it alone; hours on a CPU):
    CORSD_DATA=../shared/data python benchmarks/reverse_adversarial.py --device auto
Smoke test (a couple of minutes; writes a temporary result name, delete it afterwards):
    CORSD_DATA=../shared/data python benchmarks/reverse_adversarial.py --models lenet5@mnist --seeds 0 --epochs 1 \\
        --n-train 50 --n-val 20 --n-test 30 --n-scene 10 --cal-epochs 1 --tfms rotation,noise --out ra_smoke
Diagnostic of the clean-accuracy cost (the scene calibrators also train on the new-scene images untransformed; its own
result name, which the main page then quotes; link the main cache's `_shared` folder to reuse the base models):
    CORSD_DATA=../shared/data python benchmarks/reverse_adversarial.py --models lenet5@mnist --clean-mix --out reverse_adversarial_clean_mix
`--plot` redraws the PNG from an existing JSON only."""
import sys, os, copy, json, argparse, warnings
sys.path.insert(0, os.path.dirname(__file__))
import numpy as np, torch
import runner
from common import RESULTS, md_table, mean_std, save_figure
from corsd_suite.data import load_dataset, image_dls, CropFlip, UNSEEN_TRANSFORMS
from corsd_suite.models import zoo_learner, count_params
from corsd_suite.reverse_adversarial import adapt_to_scene, with_clean, reverse_pgd, lowbit, pick_bits, _SkipValid
warnings.filterwarnings('ignore')

BASE_LR = dict(lenet5=3e-3, resnet8=1e-2, resnet20=1e-2, resnet32=1e-2, mobilenet_v2=1e-2)
TARGET = {'lenet5@mnist': 0.99, 'resnet20@fashion_mnist': 0.91}   # issue 19's clean-accuracy floors
KEYS = ['clean_acc', 'frozen_mean_acc', 'calibrated_mean_acc', 'refined_mean_acc', 'finetune_mean_acc',
        'calibrated_clean_acc', 'lowbit_bits', 'lowbit_clean_acc', 'lowbit_calibrated_clean_acc',
        'lowbit_frozen_mean_acc', 'lowbit_calibrated_mean_acc', 'calibrator_param_ratio', 'seeds']

def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    runner.add_args(p)
    p.add_argument('--models', default='lenet5@mnist,resnet20@fashion_mnist,resnet20@cifar10', help='comma-separated arch@dataset')
    p.add_argument('--epochs', type=int, default=30, help='base-model epochs (one cycle)')
    p.add_argument('--cal-epochs', type=int, default=15, help='calibrator / fine-tune epochs on the new-scene set')
    p.add_argument('--seeds', default='0,1,2')
    p.add_argument('--tfms', default='all', help="comma-separated transformations ('all' = the suite of 11)")
    p.add_argument('--severity', type=int, default=2)
    p.add_argument('--n-train', type=int, default=None, help='training images per class (default: the whole split; smoke tests only)')
    p.add_argument('--n-val', type=int, default=100, help='validation images per class held out of the training split (bit choice)')
    p.add_argument('--n-test', type=int, default=None, help='test images per class (default: the whole test split; smoke tests only)')
    p.add_argument('--n-scene', type=int, default=100, help='labelled new-scene images per class, from the training split')
    p.add_argument('--bound', type=float, default=0.3)
    p.add_argument('--refine-eps', type=float, default=4/255)
    p.add_argument('--refine-steps', type=int, default=10)
    p.add_argument('--min-drop', type=float, default=0.03, help='low-bit clean-accuracy drop wanted on the validation split')
    p.add_argument('--clean-mix', action='store_true', help='diagnostic: scene calibrators and fine-tuning also train on the '
                   'new-scene images untransformed (does the clean-accuracy cost come from training on transformed images only?)')
    p.add_argument('--out', default='reverse_adversarial', help='result name: benchmarks/results/OUT.{json,md,png}')
    p.add_argument('--plot', action='store_true', help='only redraw OUT.png from OUT.json')
    a = p.parse_args(argv)
    a.tfms = list(UNSEEN_TRANSFORMS) if a.tfms == 'all' else a.tfms.split(',')
    bad = [t for t in a.tfms if t not in UNSEEN_TRANSFORMS]
    if bad: p.error(f"unknown transformations {bad}; choose from {list(UNSEEN_TRANSFORMS)}")
    a.seeds = [int(s) for s in a.seeds.split(',')]
    return a

def acc(m, ds, bs=500, tfm=None):
    "Top-1 accuracy of `m` on the uint8 ImageSet `ds` (`tfm(x, y)` changes each batch first)"
    dev, c = runner_device(m), 0
    for i in range(0, len(ds.y), bs):
        x, y = (ds.x[i:i+bs].float()/255).to(dev), ds.y[i:i+bs].to(dev)
        if tfm is not None: x = tfm(x, y)
        with torch.no_grad(): c += (m(x).argmax(1) == y).sum().item()
    return c / len(ds.y)

def runner_device(m):
    from corsd_suite.core import model_device
    return model_device(m)

def splits(ds_name, a, seed):
    "(fit, val, test, scene pool): val held out of the training split; the pool is drawn from `fit`"
    train, test = load_dataset(ds_name, train=True), load_dataset(ds_name, train=False)
    if a.n_test: test = test.balanced(a.n_test, seed=0)
    n_val = a.n_val * train.c
    fit, val = train.split(n_val / len(train), seed=1000 + seed)
    if a.n_train: fit = fit.balanced(a.n_train, seed=seed)
    return fit, val, test, fit.balanced(a.n_scene, seed=100 + seed)

def base_model(ctx, arch, ds_name, fit, val, a):
    "The base model of this seed: trained once, cached as a stage shared by every run that needs it"
    flip = ds_name.startswith('cifar')
    dls = image_dls(fit, val, bs=128, augment=CropFlip(4 if flip else 2, flip=flip), device=ctx.device)
    learn = zoo_learner(dls, arch)
    key = f"base-{arch}_{ds_name}-s{ctx.seed}-e{a.epochs}-n{a.n_train or 'all'}-v{a.n_val}"
    ctx.fit(learn, a.epochs, BASE_LR.get(arch, 1e-2), stage='base', shared=key)
    # channels_last whether it was just trained (fastai's ChannelsLast leaves it so) or loaded from the cache (contiguous):
    # the arms then compute the same way in a run that resumes as in one that did not stop, and faster on the CPU
    return learn.model.eval().to(memory_format=torch.channels_last)

def finetune(clf, scene, epochs, seed, device, lr=1e-3):
    "Upper reference: a copy of the whole model trained on the new-scene set"
    from corsd_suite.core import seed_everything
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from corsd_suite.optim import adam
    seed_everything(seed)
    m = copy.deepcopy(clf).requires_grad_(True)
    learn = Learner(image_dls(scene, scene.subset(range(min(64, len(scene)))), bs=64, device=device), m, loss_func=CrossEntropyLossFlat(), opt_func=adam())
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs, lr, cbs=_SkipValid())
    return m.eval()

def train_fn(a):
    def train(ctx):
        arch, ds_name = ctx.config['model'].split('@')
        fit, val, test, pool = splits(ds_name, a, ctx.seed)
        clf = base_model(ctx, arch, ds_name, fit, val, a)
        dev, ck = ctx.device, dict(bound=a.bound, device=ctx.device)
        x_val, x_cal = val.x.float()/255, fit.x[:512].float()/255
        pb = pick_bits(clf, x_val, val.y, min_drop=a.min_drop, calib_x=x_cal)
        lb = lowbit(clf, pb['w_bits'], pb['a_bits'], x_cal)
        cm_lb = adapt_to_scene(lb, pool, epochs=a.cal_epochs, seed=ctx.seed, **ck)
        out = dict(clean_acc=acc(clf, test), val_acc=pb['base_acc'], lowbit_bits=f"w{pb['w_bits']}a{pb['a_bits'] or 32}",
                   lowbit_val_drop=pb['drop'], lowbit_reached=pb['reached'], lowbit_clean_acc=acc(lb, test),
                   lowbit_calibrated_clean_acc=acc(cm_lb, test), n_fit=len(fit), n_val=len(val), n_test=len(test), n_scene=len(pool),
                   model_params=count_params(clf), calibrator_params=count_params(cm_lb.cal), tfms={})
        out['calibrator_param_ratio'] = out['calibrator_params'] / out['model_params']
        refine = dict(eps=a.refine_eps, steps=a.refine_steps)
        teacher = lambda x, y: reverse_pgd(lb, x, 'teacher', teacher=clf, **refine)   # the low-bit model's input, towards the float model's label
        out['lowbit_refined_clean_acc'] = acc(lb, test, tfm=teacher)
        for t in a.tfms:
            def row(t=t):
                scene, tt = pool.transformed(t, a.severity, seed=1), test.transformed(t, a.severity, seed=2)
                if a.clean_mix: scene = with_clean(scene, pool)   # the new-scene images plus the same images untransformed
                cm = adapt_to_scene(clf, scene, epochs=a.cal_epochs, seed=ctx.seed, **ck)
                cl = adapt_to_scene(lb, scene, epochs=a.cal_epochs, seed=ctx.seed, **ck)
                return dict(frozen=acc(clf, tt), calibrated=acc(cm, tt), calibrated_clean=acc(cm, test),
                            finetune=acc(finetune(clf, scene, a.cal_epochs, ctx.seed, dev), tt),
                            lowbit_frozen=acc(lb, tt), lowbit_calibrated=acc(cl, tt), lowbit_refined=acc(lb, tt, tfm=teacher))
            out['tfms'][t] = ctx.cached(f"{ctx.run_id}-{t}", row, shared=False)
            print(f"[{ctx.run_id}] {t}: {out['tfms'][t]}", flush=True)
        return out
    return train

def _m(xs): return mean_std(xs)

def summarise(runs, a):
    "Summary keyed by `<arch>@<dataset>` with exactly the keys of issue 19's 'Done when', and the markdown page"
    summary, rows, low, tgt, per_tfm, clean_tfm, cl_rows, cl_notes, sizes = {}, [], [], [], {}, {}, [], [], []
    for model, rs in runner.by(runs, 'model').items():
        tm = lambda k: _m([np.mean([r['tfms'][t][k] for t in r['tfms']]) for r in rs])
        s = dict(clean_acc=_m([r['clean_acc'] for r in rs]), frozen_mean_acc=tm('frozen'), calibrated_mean_acc=tm('calibrated'),
                 refined_mean_acc=tm('lowbit_refined'), finetune_mean_acc=tm('finetune'), calibrated_clean_acc=tm('calibrated_clean'),
                 lowbit_bits=[r['lowbit_bits'] for r in rs], lowbit_clean_acc=_m([r['lowbit_clean_acc'] for r in rs]),
                 lowbit_calibrated_clean_acc=_m([r['lowbit_calibrated_clean_acc'] for r in rs]),
                 lowbit_frozen_mean_acc=tm('lowbit_frozen'), lowbit_calibrated_mean_acc=tm('lowbit_calibrated'),
                 calibrator_param_ratio=float(np.mean([r['calibrator_param_ratio'] for r in rs])), seeds=len(rs))
        assert list(s) == KEYS
        summary[model] = s
        per_tfm[model] = {t: _m([r['tfms'][t]['calibrated'] - r['tfms'][t]['frozen'] for r in rs]) for t in rs[0]['tfms']}
        clean_tfm[model] = {t: _m([r['tfms'][t]['calibrated_clean'] for r in rs]) for t in rs[0]['tfms']}
        f = lambda d: f"{100*d['mean']:.2f} ± {100*d['std']:.2f}"
        gain = s['calibrated_mean_acc']['mean'] - s['frozen_mean_acc']['mean']
        drop = s['clean_acc']['mean'] - s['lowbit_clean_acc']['mean']
        rec = s['lowbit_calibrated_clean_acc']['mean'] - s['lowbit_clean_acc']['mean']
        rows.append({'model': model, 'seeds': len(rs), 'clean': f(s['clean_acc']), 'frozen': f(s['frozen_mean_acc']),
                     'calibrated': f(s['calibrated_mean_acc']), 'gain': f"{100*gain:+.2f}", 'fine-tuned': f(s['finetune_mean_acc']),
                     'clean via calibrator': f(s['calibrated_clean_acc']), 'cal. params / model': f"{s['calibrator_param_ratio']:.1%}"})
        low.append({'model': model, 'bits (per seed)': ','.join(s['lowbit_bits']), 'clean': f(s['lowbit_clean_acc']),
                    'clean + cal.': f(s['lowbit_calibrated_clean_acc']),
                    'clean refined (teacher)': f(_m([r.get('lowbit_refined_clean_acc', np.nan) for r in rs])),
                    'drop recovered by the cal.': f"{rec/drop:.0%}" if drop > 0 else 'no drop',
                    'suite frozen': f(s['lowbit_frozen_mean_acc']), 'suite + cal.': f(s['lowbit_calibrated_mean_acc']),
                    'suite refined (teacher)': f(s['refined_mean_acc'])})
        ok = lambda b: 'met' if b else 'NOT met'
        tgt.append(f"{model}: gain ≥ +10 {ok(gain >= .10)} ({100*gain:+.1f}); clean via the calibrator within 0.5 points "
                   f"{ok(s['clean_acc']['mean'] - s['calibrated_clean_acc']['mean'] <= .005)} "
                   f"({100*s['calibrated_clean_acc']['mean']:.2f} vs {100*s['clean_acc']['mean']:.2f}); low-bit drop ≥ 3 points "
                   f"{ok(drop >= .03)} ({100*drop:.1f}); half of it recovered {ok(drop > 0 and rec >= drop/2)}")
        cl_rows.append({'model': model, 'alone': f"{100*s['clean_acc']['mean']:.2f}", **{t: f"{100*v['mean']:.2f}" for t, v in clean_tfm[model].items()}})
        cl_notes.append(clean_by_tfm(model, s['clean_acc']['mean'], clean_tfm[model]))
        sizes.append(f"{model}: {rs[0]['n_fit']} / {rs[0]['n_val']} / {rs[0]['n_scene']} / {rs[0]['n_test']}")   # per dataset
    variant = f"**Variant (`--clean-mix`)**: {MIX_WHAT}; the main page trains them on the new-scene images only.\n\n" if a.clean_mix else ''
    md = (f"# Reverse adversarial examples on strong models (issue 19)\n\n{variant}Accuracies in percent, mean ± std over seeds. "
          f"Base models: {a.epochs} epochs on the training split minus a stratified validation split ({a.n_val} images per class on average; it chooses "
          f"the low-bit setting), standard augmentation only. New-scene set: labelled training images per transformation "
          f"({a.n_scene} per class); evaluation on the transformed test split. Images (base training / validation / new scene / "
          f"test): {'; '.join(sizes)}. Severity {a.severity}; "
          f"transformations: {', '.join(a.tfms)}. Calibrators: {a.cal_epochs} epochs, bound {a.bound}. 'suite' columns are means "
          f"over the transformations; 'clean via calibrator' is the mean over the scene calibrators of their accuracy on the "
          f"clean test split.\n\n## Float models on the unseen transformations\n\n" + (md_table(rows) if rows else '') +
          f"\n\n## Low-bit models\n\nThe mildest setting whose accuracy on the validation split falls by ≥ {100*a.min_drop:.0f} points "
          f"(weights by the ADMM notebook's equal-interval quantizer, `aN` = N-bit activations, a32 = float). 'clean + cal.': a "
          f"calibrator trained on the clean new-scene set in front of the frozen low-bit model. Refinement (training-free, the "
          f"summary's `refined_mean_acc`): reverse PGD in `teacher` mode, the low-bit model's input moved towards the float model's "
          f"prediction, eps {a.refine_eps:.4f}, {a.refine_steps} steps (on the float model itself it would be `pred` mode, which "
          f"cannot change a prediction).\n\n" + (md_table(low) if low else '') +
          f"\n\n## Clean test accuracy through each scene calibrator\n\nEach column is the calibrator trained on that "
          f"transformation's new-scene set, run on the clean test split (mean over seeds; 'alone': the model without one).\n\n"
          + (md_table(cl_rows) if cl_rows else '') + '\n\n' + '\n'.join(f'- {n}' for n in cl_notes) + clean_mix_md(a, clean_tfm, per_tfm) +
          f"\n\n![gain per transformation and low-bit recovery]({a.out}.png)\n\n"
          f"**Targets** (gain ≥ +10 points for every model; clean accuracy via the calibrator within 0.5 points of the model "
          f"alone; the calibrator recovers at least half of the low-bit drop on clean test data):\n\n" + '\n'.join(f'- {t}' for t in tgt))
    return dict(summary, gain_per_tfm=per_tfm, clean_via_calibrator_per_tfm=clean_tfm), md

MIX = 'reverse_adversarial_clean_mix'   # the `--clean-mix` diagnostic's result name
MIX_WHAT = ("every scene calibrator, and the fine-tuned reference, trains on the new-scene images plus the same images "
            "untransformed (`adapt_to_scene(..., clean=...)`)")   # what `--clean-mix` changes, for both pages

def clean_mix_md(a, clean_tfm, gain_tfm):
    "The `--clean-mix` diagnostic (if its JSON exists) beside this page's runs: clean accuracy and gain per transformation"
    f = RESULTS/f'{MIX}.json'
    if a.clean_mix or not f.exists(): return ''
    d = json.loads(f.read_text())
    pct, pts = lambda v: f"{100*v['mean']:.2f}", lambda v: f"{100*v['mean']:+.2f}"
    rows = [{'model': m, 'transformation': t, 'seeds': d['summary'][m]['seeds'], 'clean via cal.': pct(clean_tfm[m][t]),
             'clean via cal., + clean images': pct(v), 'gain': pts(gain_tfm[m][t]), 'gain, + clean images': pts(d['summary']['gain_per_tfm'][m][t])}
            for m, per in d['summary'].get('clean_via_calibrator_per_tfm', {}).items() if m in clean_tfm
            for t, v in per.items() if t in clean_tfm[m]]
    if not rows: return ''
    return (f"\n\n**Tried: scene calibrators that also see clean images.** The same runs, where {MIX_WHAT} ([{MIX}.md]({MIX}.md); "
            f"`{d['command']}`):\n\n" + md_table(rows))

def clean_by_tfm(model, clean, per_tfm, tol=.005):
    "Which scene calibrators keep clean test accuracy within `tol` of the model alone, and what the others cost"
    far = sorted((v['mean'] - clean, t) for t, v in per_tfm.items() if clean - v['mean'] > tol)
    head = f"{model}: {len(per_tfm) - len(far)} of {len(per_tfm)} scene calibrators keep clean accuracy within {100*tol:.1f} points"
    if not far: return head
    return head + "; the others cost " + ', '.join(f"{t} {100*d:+.2f}" for d, t in far) + " (mean over seeds)"

def plot(out):
    "Draw OUT.png (gain per transformation with error bars; low-bit recovery) from OUT.json"
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    d = json.loads((RESULTS/f'{out}.json').read_text())['summary']
    models = [k for k in d if '@' in k]
    if not models: return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 4), gridspec_kw=dict(width_ratios=[3, 1]))
    tfms = list(d['gain_per_tfm'][models[0]])
    w = 0.8 / len(models)
    for i, m in enumerate(models):
        g = d['gain_per_tfm'][m]
        ax1.bar(np.arange(len(tfms)) + i*w, [100*g[t]['mean'] for t in tfms], w, yerr=[100*g[t]['std'] for t in tfms], capsize=2, label=m)
    ax1.set_xticks(np.arange(len(tfms)) + w*(len(models)-1)/2, tfms, rotation=30, ha='right')
    ax1.axhline(10, ls='--', c='gray', lw=1); ax1.set_ylabel('calibrated − frozen (points)'); ax1.legend(); ax1.set_title('gain per transformation')
    for j, (k, lab) in enumerate([('clean_acc', 'float'), ('lowbit_clean_acc', 'low-bit'), ('lowbit_calibrated_clean_acc', 'low-bit + cal.')]):
        ax2.bar(np.arange(len(models)) + j*0.27, [100*d[m][k]['mean'] for m in models], 0.27,
                yerr=[100*d[m][k]['std'] for m in models], capsize=2, label=lab)
    ax2.set_xticks(np.arange(len(models)) + 0.27, models, rotation=30, ha='right'); ax2.set_ylabel('clean test accuracy (%)')
    lo = min(100*d[m]['lowbit_clean_acc']['mean'] for m in models)
    ax2.set_ylim(max(0, lo - 10), 100); ax2.legend(fontsize=8); ax2.set_title('low-bit recovery')
    fig.tight_layout()
    save_figure(fig, RESULTS/f'{out}.png', dpi=100)

def main(argv=None):
    a = parse(argv)
    if a.plot: return plot(a.out)
    bench = runner.Benchmark(a.out, a)
    settings = dict(epochs=a.epochs, cal_epochs=a.cal_epochs, tfms=a.tfms, severity=a.severity, n_train=a.n_train, n_val=a.n_val,
                    n_test=a.n_test, n_scene=a.n_scene, bound=a.bound, refine_eps=a.refine_eps, refine_steps=a.refine_steps, refine_on='lowbit',
                    min_drop=a.min_drop, **({'clean_mix': True} if a.clean_mix else {}))   # absent when off: earlier runs stay valid
    for model in a.models.split(','):
        if '@' not in model: raise SystemExit(f"--models: {model!r} is not arch@dataset")
        for seed in a.seeds: bench.add(train_fn(a), f"{model.replace('@', '_')}-s{seed}", model=model, seed=seed, **settings)
    bench.run()
    bench.report(lambda runs: summarise(runs, a))
    plot(a.out)

if __name__ == '__main__': main()
