"""Reverse adversarial examples (issue 7): a frozen model (float and int8) on unseen transformations of MNIST /
Fashion-MNIST, alone, behind a learned calibrator, with training-free reverse-PGD refinement, and fine-tuned whole
on the same new-scene set (upper reference).

Quick default (2 shared CPU cores, <= ~25 min): see --help; `--full` runs the whole protocol."""
import sys, os, time, copy, argparse, warnings
sys.path.insert(0, os.path.dirname(__file__))
import numpy as np, torch, torch.nn.functional as F
from common import write_result, md_table
from corsd_suite.core import seed_everything
from corsd_suite.evaluate import pbar
from corsd_suite.data import load_dataset, image_dls, CropFlip, UNSEEN_TRANSFORMS
from corsd_suite.models import zoo_learner, count_params
from corsd_suite.reverse_adversarial import (adapt_to_scene, reverse_calibrator, reverse_pgd, quantize_int8,
                                            StraightThrough, model_with_calibrator)
warnings.filterwarnings('ignore')

ARCH_KW = dict(lenet5=dict(size=28), resnet8={}, resnet20={}, mobilenet_v2=dict(width=0.25))
BASE_LR = dict(lenet5=3e-3, resnet8=1e-2, resnet20=1e-2, mobilenet_v2=1e-2)

def parse():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument('--runs', default='lenet5@mnist,resnet8@mnist,mobilenet_v2@mnist,lenet5@fashion_mnist',
                   help='comma-separated arch@dataset pairs')
    p.add_argument('--tfms', default='rotation,zoom_out,elastic,noise,occlusion', help="transformations ('all' = the suite)")
    p.add_argument('--severity', type=int, default=2)
    p.add_argument('--n-train', type=int, default=300, help='base-model training images per class')
    p.add_argument('--base-epochs', type=int, default=3)
    p.add_argument('--n-scene', type=int, default=50, help='labelled new-scene images per class (from the training split)')
    p.add_argument('--n-test', type=int, default=50, help='test images per class (transformed test split)')
    p.add_argument('--epochs', type=int, default=8, help='calibrator / fine-tune epochs on the new-scene set')
    p.add_argument('--bound', type=float, default=0.3)
    p.add_argument('--refine-steps', type=int, default=5)
    p.add_argument('--refine-eps', type=float, default=4/255)
    p.add_argument('--seeds', default='0')
    p.add_argument('--out', default='reverse_adversarial', help='result name (benchmarks/results/OUT.json/.md)')
    p.add_argument('--merge', default='', help='comma-separated result names of partial runs to merge into OUT (no training)')
    p.add_argument('--logs', default='', help='with --merge: also take rows of unfinished runs from these stdout logs')
    p.add_argument('--full', action='store_true', help='the issue protocol: 3 archs x 2 datasets, whole suite, full splits, 3 seeds')
    a = p.parse_args()
    if a.full:
        a.runs = ','.join(f'{m}@{d}' for d in ('mnist', 'fashion_mnist') for m in ('lenet5', 'resnet20', 'mobilenet_v2'))
        a.tfms, a.n_train, a.base_epochs, a.n_scene, a.n_test, a.epochs, a.seeds = 'all', 6000, 5, 100, 1000, 15, '0,1,2'
        a.refine_steps = 10
    a.tfms = list(UNSEEN_TRANSFORMS) if a.tfms == 'all' else a.tfms.split(',')
    a.seeds = [int(s) for s in a.seeds.split(',')]
    return a

def acc(m, ds, bs=500):
    "Top-1 accuracy of `m` on uint8 ImageSet `ds`"
    c = 0
    with torch.no_grad():
        for i in range(0, len(ds.y), bs): c += (m(ds.x[i:i+bs].float()/255).argmax(1) == ds.y[i:i+bs]).sum().item()
    return c / len(ds.y)

def refined_acc(grad_model, eval_model, ds, bs=500, **kw):
    "Accuracy of `eval_model` on reverse-PGD inputs computed with `grad_model` (kw go to reverse_pgd)"
    c = 0
    for i in range(0, len(ds.y), bs):
        x, y = ds.x[i:i+bs].float()/255, ds.y[i:i+bs]
        xr = reverse_pgd(grad_model, x, y=y, **kw)
        with torch.no_grad(): c += (eval_model(xr).argmax(1) == y).sum().item()
    return c / len(ds.y)

def sec_per_image(m, ds, reps=2, bs=250):
    x = ds.x[:bs].float()/255
    with torch.no_grad():
        m(x); t = time.perf_counter()
        for _ in range(reps): m(x)
    return (time.perf_counter() - t) / (reps*len(x))

def train_base(arch, train, test, epochs, seed):
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from corsd_suite.models import get_model, staged_splitter
    seed_everything(seed)
    dls = image_dls(train, test, bs=128, augment=CropFlip(2, flip=False), device='cpu')
    m = get_model(arch, n_in=dls.n_channels, n_out=dls.c, stats=dls.stats, **ARCH_KW[arch])
    learn = Learner(dls, m, loss_func=CrossEntropyLossFlat(), splitter=staged_splitter)
    from corsd_suite.reverse_adversarial import _SkipValid
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs, BASE_LR[arch], cbs=_SkipValid())
    return learn.model.eval()

def finetune(clf, scene, epochs, seed, lr=1e-3):
    "Upper reference: the whole model trained on the new-scene set (BN in train mode), a copy"
    seed_everything(seed)
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    m = copy.deepcopy(clf).requires_grad_(True)
    dls = image_dls(scene, scene.subset(range(64)), bs=64, device='cpu')
    learn = Learner(dls, m, loss_func=CrossEntropyLossFlat())
    from corsd_suite.reverse_adversarial import _SkipValid
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs, lr, cbs=_SkipValid())
    return m.eval()

def cal_kw(clf):
    "ngf=4 (17k params) unless that is >= 10% of the model, then ngf=2 (4.4k)"
    n = count_params(clf)
    return dict(ngf=4 if 17233 < 0.1*n else 2, n_blocks=3)

def merge(a):
    "Merge the rows of partial runs (e.g. run in parallel) into one result"
    import json
    from common import RESULTS
    rows, per_run, secs = [], {}, 0.
    for n in a.merge.split(','):
        d = json.loads((RESULTS/f'{n}.json').read_text())
        rows += d['details']['rows']; secs += d['seconds'] or 0.
        for k,v in d['details']['per_run'].items():
            arch, rest = k.split('@'); ds, seed = rest.split('#')
            per_run[(arch, ds, int(seed))] = v
        a.runs = ','.join(dict.fromkeys((a.runs.split(',') if a.runs else []) + d['details']['args']['runs'].split(',')))
    have = {(r['arch'], r['dataset'], r['seed'], r['transformation']) for r in rows}
    for f in [f for f in a.logs.split(',') if f]:
        lr, lp = parse_log(f)
        rows += [r for r in lr if (r['arch'], r['dataset'], r['seed'], r['transformation']) not in have]
        for k,v in lp.items(): per_run.setdefault(k, v)
        a.runs = ','.join(dict.fromkeys(a.runs.split(',') + [f'{k[0]}@{k[1]}' for k in lp]))
    report(a, rows, per_run, time.time() - secs)

def parse_log(fname):
    "Rows and per-run facts printed by an unfinished run (its stdout); timings are unknown there"
    import re
    from corsd_suite.models import get_model
    rows, per_run, cur = [], {}, None
    for line in open(fname):
        m = re.match(r'(\w+)@(\w+) seed (\d+): clean ([\d.]+) \(int8 ([\d.]+)\).*calibrator (\d+) params', line)
        if m:
            arch, ds, seed = m.group(1), m.group(2), int(m.group(3))
            cur = (arch, ds, seed)
            per_run[cur] = dict(params=sum(p.numel() for p in get_model(arch, n_in=1, n_out=10, **ARCH_KW[arch]).parameters()),
                                cal_params=int(m.group(6)), clean=float(m.group(4)), int8_clean=float(m.group(5)),
                                sec_img=None, sec_img_cal=None, sec_img_int8=None, sec_img_int8_cal=None)
        elif line.startswith('  transformation=') and cur is not None:
            kv = dict(t.split('=') for t in line.split())
            r = dict(arch=cur[0], dataset=cur[1], seed=cur[2], transformation=kv.pop('transformation'), severity=None)
            r.update({k: float(v) for k,v in kv.items()})
            rows.append(r)
    return rows, per_run

def _mean(xs):
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None

def main():
    a = parse()
    if a.merge: a.runs = ''; return merge(a)
    torch.set_num_threads(1)
    t00 = time.time()
    data, rows, per_run = {}, [], {}
    for run in pbar(a.runs.split(','), 'runs'):
        arch, ds_name = run.split('@')
        for seed in a.seeds:
            t0 = time.time()
            if ds_name not in data: data[ds_name] = (load_dataset(ds_name, train=True), load_dataset(ds_name, train=False))
            full_tr, full_te = data[ds_name]
            train = full_tr.balanced(a.n_train, seed)
            test = full_te.balanced(a.n_test, seed) if a.n_test*10 < len(full_te) else full_te
            scene_pool = full_tr.balanced(a.n_scene, seed + 100)   # new-scene images: a separate draw from the training split
            clf = train_base(arch, train, test, a.base_epochs, seed)
            q = quantize_int8(clf, train.x[:512].float()/255)
            ste = StraightThrough(q, clf)
            kw = cal_kw(clf)
            n_cal = sum(p.numel() for p in reverse_calibrator(1, **kw).parameters())
            clean, clean_q = acc(clf, test), acc(q, test)
            print(f"{run} seed {seed}: clean {clean:.4f} (int8 {clean_q:.4f}), base trained in {time.time()-t0:.0f}s, calibrator {n_cal} params", flush=True)
            for name in a.tfms:
                t1 = time.time()
                s_tr = scene_pool.transformed(name, a.severity, seed=seed + 1)
                s_te = test.transformed(name, a.severity, seed=seed + 2)
                cm = adapt_to_scene(clf, s_tr, epochs=a.epochs, seed=seed, bound=a.bound, **kw)
                cm_q = adapt_to_scene(ste, s_tr, epochs=a.epochs, seed=seed, bound=a.bound, **kw)
                dep_q = model_with_calibrator(q, cm_q.cal)
                ft = finetune(clf, s_tr, a.epochs, seed)
                r = dict(arch=arch, dataset=ds_name, seed=seed, transformation=name, severity=a.severity,
                         frozen=acc(clf, s_te), calibrated=acc(cm, s_te),
                         refined=refined_acc(clf, clf, s_te, y_star='pred', eps=a.refine_eps, steps=a.refine_steps),
                         oracle_true_fgsm=refined_acc(clf, clf, s_te, y_star='true', eps=2/255, steps=1),
                         finetune=acc(ft, s_te), int8_frozen=acc(q, s_te), int8_calibrated=acc(dep_q, s_te),
                         int8_teacher_refined=refined_acc(clf, q, s_te, y_star='teacher', teacher=clf, eps=a.refine_eps, steps=a.refine_steps),
                         calibrated_clean=acc(cm, test), seconds=round(time.time()-t1, 1))
                rows.append(r)
                print('  ' + ' '.join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k,v in r.items() if k not in ('arch','dataset','seed','severity')), flush=True)
            cmd = model_with_calibrator(clf, cm.cal)
            per_run[(arch, ds_name, seed)] = dict(params=count_params(clf), cal_params=n_cal, clean=clean, int8_clean=clean_q,
                sec_img=sec_per_image(clf, test), sec_img_cal=sec_per_image(cmd, test),
                sec_img_int8=sec_per_image(q, test), sec_img_int8_cal=sec_per_image(dep_q, test))
            report(a, rows, per_run, t00)   # results so far, rewritten after every run

def _ms(a, b): return 'n/a (unfinished run)' if a is None else f"{1e3*a:.3f} / {1e3*b:.3f}"

def report(a, rows, per_run, t00):
    # summary keyed by architecture (means over datasets, seeds and transformations)
    summary, md_rows = {}, []
    keys = ['frozen', 'calibrated', 'refined', 'finetune', 'int8_frozen', 'int8_calibrated', 'int8_teacher_refined', 'oracle_true_fgsm', 'calibrated_clean']
    means = lambda rs: {k: float(np.mean([r[k] for r in rs])) for k in keys}
    for arch in dict.fromkeys(r['arch'] for r in rows):
        rs = [r for r in rows if r['arch'] == arch]
        pr = [v for k,v in per_run.items() if k[0] == arch]
        m = means(rs)
        summary[arch] = dict(frozen_mean_acc=m['frozen'], calibrated_mean_acc=m['calibrated'], refined_mean_acc=m['refined'],
            finetune_mean_acc=m['finetune'], int8_frozen_mean_acc=m['int8_frozen'], int8_calibrated_mean_acc=m['int8_calibrated'],
            int8_teacher_refined_mean_acc=m['int8_teacher_refined'], oracle_true_label_fgsm_mean_acc=m['oracle_true_fgsm'],
            calibrated_clean_acc=m['calibrated_clean'], clean_acc=float(np.mean([p['clean'] for p in pr])),
            int8_clean_acc=float(np.mean([p['int8_clean'] for p in pr])),
            calibrator_gain=m['calibrated']-m['frozen'], int8_calibrator_gain=m['int8_calibrated']-m['int8_frozen'],
            calibrator_param_ratio=float(np.mean([p['cal_params']/p['params'] for p in pr])),
            calibrator_params=pr[0]['cal_params'], model_params=pr[0]['params'],
            sec_per_image=_mean([p['sec_img'] for p in pr]), sec_per_image_calibrated=_mean([p['sec_img_cal'] for p in pr]),
            int8_sec_per_image=_mean([p['sec_img_int8'] for p in pr]), int8_sec_per_image_calibrated=_mean([p['sec_img_int8_cal'] for p in pr]),
            n_rows=len(rs),
            datasets=sorted({r['dataset'] for r in rs}), transformations=list(dict.fromkeys(r['transformation'] for r in rs)),
            target_met=bool(m['calibrated']-m['frozen'] >= 0.10 and m['int8_calibrated']-m['int8_frozen'] >= 0.10))
    pct = lambda v: f"{100*v:.1f}"
    tab = [dict(arch=k, clean=pct(v['clean_acc']), frozen=pct(v['frozen_mean_acc']), calibrated=pct(v['calibrated_mean_acc']),
                gain=f"{100*v['calibrator_gain']:+.1f}", refined_pred=pct(v['refined_mean_acc']), finetune=pct(v['finetune_mean_acc']),
                int8_frozen=pct(v['int8_frozen_mean_acc']), int8_calibrated=pct(v['int8_calibrated_mean_acc']),
                int8_gain=f"{100*v['int8_calibrator_gain']:+.1f}", int8_teacher=pct(v['int8_teacher_refined_mean_acc']),
                oracle_true=pct(v['oracle_true_label_fgsm_mean_acc']), cal_ratio=f"{100*v['calibrator_param_ratio']:.1f}%",
                ms_img=_ms(v['sec_per_image'], v['sec_per_image_calibrated']), int8_ms_img=_ms(v['int8_sec_per_image'], v['int8_sec_per_image_calibrated']),
                transformations=len(v['transformations'])) for k,v in summary.items()]
    grid = [dict(run=f"{r['arch']}@{r['dataset']}", tfm=r['transformation'], frozen=pct(r['frozen']), calibrated=pct(r['calibrated']),
                 refined=pct(r['refined']), finetune=pct(r['finetune']), int8=pct(r['int8_frozen']), int8_cal=pct(r['int8_calibrated']),
                 int8_teacher=pct(r['int8_teacher_refined']), oracle=pct(r['oracle_true_fgsm']), cal_on_clean=pct(r['calibrated_clean'])) for r in rows]
    quick = not a.full
    done = sorted({f"{r['arch']}@{r['dataset']}" for r in rows})
    by_ds = []
    for arch, ds in dict.fromkeys((r['arch'], r['dataset']) for r in rows):
        rs = [r for r in rows if (r['arch'], r['dataset']) == (arch, ds)]
        m = means(rs)
        by_ds.append(dict(arch=arch, dataset=ds, frozen=pct(m['frozen']), calibrated=pct(m['calibrated']),
                          gain=f"{100*(m['calibrated']-m['frozen']):+.1f}", int8_frozen=pct(m['int8_frozen']),
                          int8_calibrated=pct(m['int8_calibrated']), int8_gain=f"{100*(m['int8_calibrated']-m['int8_frozen']):+.1f}",
                          finetune=pct(m['finetune']), transformations=len(rs)))
    fmnist_archs = sorted({r['arch'] for r in rows if r['dataset'] == 'fashion_mnist'})
    whole_suite = len(a.tfms) == len(UNSEEN_TRANSFORMS)
    md = f"""Runs with results: {', '.join(done)} ({time.time()-t00:.0f} s of compute{', merged from parallel partial runs ' + a.merge if a.merge else ''}).
Protocol ({'QUICK, reduced for 2 shared CPU cores' if quick else 'full'}): runs {a.runs}; seeds {a.seeds}.
Base models trained on {a.n_train} images/class of the training split for {a.base_epochs} epochs (Adam one-cycle, random
crop after 2-px padding only; none of the suite's transformations). New scene = transformation at severity {a.severity}.
Calibrator and fine-tune reference trained on {a.n_scene} labelled images/class drawn from the *training* split
({10*a.n_scene} images, a draw separate from the base-training subset is not enforced), transformed; {a.epochs} epochs, Adam one-cycle
3e-3 (calibrator) / 1e-3 (fine-tune). Accuracy on {a.n_test} test images/class, transformed. Calibrator: signed, bound
{a.bound}, zero-initialised, ResNet generator ngf 4 (ngf 2 where 4 would exceed 10% of the model). `refined_pred` = reverse
PGD towards the model's own prediction (eps {a.refine_eps:.4f}, {a.refine_steps} steps): cannot change top-1, a regression
check. `oracle_true` = one reverse-FGSM step (eps 2/255) towards the TRUE label: an oracle diagnostic, not deployable.
int8 = PyTorch FX post-training static quantization (x86 kernels, 512 calibration images); its calibrator is trained
through a straight-through estimator (int8 forward, float gradient). `int8_teacher` = reverse PGD with the float
model's label and gradient, classified by the int8 model. Times: ms per image, batch 250, 1 thread, on a CPU shared
with other jobs (noisy). Transformations: {', '.join(a.tfms)}.
{f"Deviations from the issue protocol (for time): MobileNetV2 at width 0.25 and ResNet-8 (not ResNet-20); Fashion-MNIST for {', '.join(fmnist_archs) or 'no architecture'}; {'the whole suite' if whole_suite else 'a subset of the suite'}; 1 seed; small subsets. The full protocol: `--full`." if quick else ''}

{f"This file merges runs made in parallel (`--runs X --out NAME`); `CORSD_DATA=<data> python benchmarks/reverse_adversarial.py --runs {','.join(done)} --tfms {'all' if whole_suite else ','.join(a.tfms)} --epochs {a.epochs}` reproduces them sequentially." if a.merge else ''}
{'Runs unfinished at the deadline are included with the transformations they completed (column `transformations`; their timings are n/a); parsed from their logs.' if a.logs else ''}

## Mean accuracy (%) over transformations, per architecture

{md_table(tab)}

Target (issue): calibrator gain >= +10 points for every architecture, float and int8, calibrator < 10% of the model's
parameters. Met: {', '.join(f"{k}: {'yes' if v['target_met'] else 'no'}" + ('' if len(v['transformations']) == len(a.tfms) else f" (unfinished: {len(v['transformations'])} of {len(a.tfms)} transformations)") for k,v in summary.items())}.
The paper's abstract reports +19.02 (float, CIFAR-10-scale models) and +30.78 (quantized); different data and models.

## Mean accuracy (%) over transformations, per architecture and dataset

{md_table(by_ds)}

## Per transformation

{md_table(grid)}
"""
    write_result(a.out, summary, dict(rows=rows, per_run={f'{k[0]}@{k[1]}#{k[2]}': v for k,v in per_run.items()},
                 args={k: v for k,v in vars(a).items()}), md, seconds=time.time()-t00)

if __name__ == '__main__': main()
