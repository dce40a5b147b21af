"""Baseline vs BYOT vs CORSD self-distillation on Fashion-MNIST with a CIFAR-style ResNet on one channel.

Quick protocol (default, sized for 2 shared CPU cores): ResNet-8, a class-balanced training subset, a held-out
validation split taken from the training set (monitoring only; no choice was tuned on it or on test), the same
one-cycle schedule, batch size and augmentation for the three arms, several seeds; final accuracy on the full
10,000-image test split of every exit. `--full` is the issue's protocol (ResNet-20, larger subset, longer schedule).
The three arms run in parallel processes (one thread each) so that they share the machine's load equally and their
seconds per epoch are comparable.

Run from the repository root: CORSD_DATA=/work/shared/data python benchmarks/corsd.py
"""
import argparse, os, sys, time
import multiprocessing as mp
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parent))
import torch

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--full', action='store_true', help="the issue's protocol: resnet20, 28x28, 1000/class, 15 epochs, full test split")
    p.add_argument('--arch', default=None); p.add_argument('--width', type=float, default=None)
    p.add_argument('--n-per-class', type=int, default=None); p.add_argument('--n-valid-per-class', type=int, default=50)
    p.add_argument('--size', type=int, default=None); p.add_argument('--epochs', type=int, default=None)
    p.add_argument('--bs', type=int, default=64); p.add_argument('--lr', type=float, default=1e-2)
    p.add_argument('--seeds', default='0,1,2'); p.add_argument('--arms', default='baseline,byot,corsd')
    p.add_argument('--n-test', type=int, default=None, help='0: the whole test split; else a class-balanced subset')
    p.add_argument('--name', default='corsd')
    p.add_argument('--beta', type=float, default=1.); p.add_argument('--gamma', type=float, default=0.5)
    p.add_argument('--jobs', type=int, default=3, help='parallel processes (one torch thread each)')
    a = p.parse_args(argv)
    full = dict(arch='resnet20', width=1., n_per_class=1000, epochs=15, size=28, n_test=0)
    quick = dict(arch='resnet8', width=1., n_per_class=200, epochs=5, size=20, n_test=5000)
    for k,v in (full if a.full else quick).items():
        if getattr(a, k) is None: setattr(a, k, v)
    return a

def load_data(a):
    from corsd_suite.data import load_dataset
    tr = load_dataset('fashion_mnist', train=True, size=a.size)
    te = load_dataset('fashion_mnist', train=False, size=a.size)
    pool = tr.balanced(a.n_per_class + a.n_valid_per_class, seed=0)   # one fixed subset for every arm and seed
    train, valid = pool.split(a.n_valid_per_class/(a.n_per_class + a.n_valid_per_class), seed=0)
    if a.n_test: te = te.balanced(a.n_test//te.c, seed=0)
    return train, valid, te

def run_arm(arm, a, seed):
    "Train arm `arm` with `seed`; returns a result dict"
    torch.set_num_threads(1)
    from fastai.callback.all import Callback
    from corsd_suite.core import seed_everything
    from corsd_suite.data import image_dls, CropFlip, TensorDL
    from corsd_suite.models import get_model
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.metrics import accuracy
    from corsd_suite.evaluate import evaluate_accuracy
    from corsd_suite.corsd import exit_learner, exit_accuracies
    class EpochTimer(Callback):
        order = 99
        def before_fit(self): self.times = []
        def before_train(self): self.t0 = time.time()
        def after_train(self): self.times.append(time.time() - self.t0)
    train, valid, test = load_data(a)
    seed_everything(seed)
    dls = image_dls(train, valid, bs=a.bs, augment=CropFlip(pad=2, flip=True), device='cpu')
    timer = EpochTimer()
    if arm == 'baseline':
        m = get_model(a.arch, n_in=dls.n_channels, n_out=dls.c, stats=dls.stats, width=a.width)
        learn = Learner(dls, m, loss_func=CrossEntropyLossFlat(), metrics=accuracy, cbs=timer)
    else: learn = exit_learner(dls, a.arch, arm, cbs=timer, model_kwargs=dict(width=a.width),
                               cb_kwargs=dict(beta=a.beta, gamma=a.gamma) if arm == 'corsd' else None)
    t0 = time.time()
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(a.epochs, a.lr)
    test_dl = TensorDL(test, bs=256, device='cpu')
    if arm == 'baseline': accs = dict(deepest=evaluate_accuracy(learn.model, test_dl, show=False))
    else: accs = exit_accuracies(learn.model, test_dl)
    valid_acc = evaluate_accuracy(learn.model, dls.valid, show=False)
    res = dict(arm=arm, seed=seed, test=accs, valid_acc=valid_acc, sec_per_epoch=sum(timer.times)/len(timer.times),
               train_seconds=time.time()-t0, final_train_loss=float(learn.recorder.values[-1][0]))
    print(f"[{arm} seed {seed}] test {accs} valid {valid_acc:.4f} {res['sec_per_epoch']:.1f}s/epoch", flush=True)
    return res

def summarise(a, results, seconds):
    from common import mean_std, md_table, write_result
    arms = [r for r in a.arms.split(',') if r in results]
    ms = {arm: mean_std([r['test']['deepest'] for r in results[arm]]) for arm in arms}
    spe = {arm: float(sum(r['sec_per_epoch'] for r in results[arm])/len(results[arm])) for arm in arms}
    summary = dict(seeds=len(a.seeds.split(',')), sec_per_epoch=spe, protocol='full' if a.full else 'quick',
                   arch=a.arch, width=a.width, n_per_class=a.n_per_class, size=a.size, epochs=a.epochs, bs=a.bs, lr=a.lr)
    for arm in arms: summary[f'{arm}_acc'], summary[f'{arm}_std'] = 100*ms[arm]['mean'], 100*ms[arm]['std']
    rows = []
    for arm in arms:
        row = {'method': arm, 'deepest (test %)': f"{100*ms[arm]['mean']:.2f} ± {100*ms[arm]['std']:.2f}"}
        for k in results[arm][0]['test']:
            if k == 'deepest': continue
            e = mean_std([r['test'][k] for r in results[arm]])
            row[f'{k} (test %)'] = f"{100*e['mean']:.2f} ± {100*e['std']:.2f}"
        row['valid %'] = f"{100*mean_std([r['valid_acc'] for r in results[arm]])['mean']:.2f}"
        row['s/epoch'] = f"{spe[arm]:.1f}"
        rows.append(row)
    cols = ['method', 'deepest (test %)'] + sorted({k for r in rows for k in r if k.startswith('exit')}) + \
           [c for c in ['ensemble (test %)', 'valid %', 's/epoch']]
    seed_rows = [dict(method=r['arm'], seed=r['seed'], **{k: f"{100*v:.2f}" for k,v in r['test'].items()},
                      **{'s/epoch': f"{r['sec_per_epoch']:.1f}"}) for arm in arms for r in results[arm]]
    per_seed = md_table(seed_rows, ['method', 'seed', 'deepest'] + sorted({k for r in seed_rows for k in r if k.startswith('exit')}) + ['ensemble', 's/epoch'])
    verdict = ''
    if {'baseline','corsd'} <= set(arms):
        gap = summary['corsd_acc'] - summary['baseline_acc']
        verdict += f"\n\nCORSD − baseline (deepest exit, mean over seeds): **{gap:+.2f} points** (target ≥ +1.0: {'met' if gap >= 1 else 'NOT met'})."
        summary['corsd_minus_baseline'] = gap
    if {'byot','corsd'} <= set(arms):
        gap = summary['corsd_acc'] - summary['byot_acc']
        verdict += f"\nCORSD − BYOT: **{gap:+.2f} points** ({'CORSD ahead' if gap > 0 else 'CORSD NOT ahead'})."
        summary['corsd_minus_byot'] = gap
    proto = (f"Fashion-MNIST at {a.size}×{a.size}, 1 channel; {a.arch} (width {a.width}); class-balanced training subset of "
             f"{a.n_per_class}/class ({10*a.n_per_class} images) plus a held-out validation split of {a.n_valid_per_class}/class taken from "
             f"the training set (monitoring only); test = {'the full 10,000-image test split' if not a.n_test else f'{a.n_test} test images'}; "
             f"fit_one_cycle({a.epochs} epochs, lr {a.lr}), Adam (fastai default), batch {a.bs}, random crop (pad 2) + flip; "
             f"seeds {a.seeds} (init/order; same data subset); BYOT T=3, α=0.3, λ=0.03; CORSD adds β={a.beta} relational, γ={a.gamma} "
             f"relation-classifier loss. Arms ran in parallel processes, one torch thread each, on a 2-core CPU shared "
             f"with other jobs: seconds per epoch are comparable between arms, not absolute.")
    if not a.full: proto += (" This is the QUICK protocol (the issue's ~10 min/run × 3 seeds × 3 arms does not fit this "
                             "machine's budget); `--full` runs ResNet-20 at 28×28, 1000/class, 15 epochs, full test split.")
    md = f"{proto}\n\n{md_table(rows, cols)}{verdict}\n\nPer seed (test accuracy %, every exit):\n\n{per_seed}"
    return write_result(a.name, summary, dict(results=results, args=vars(a)), md, seconds)

def main(argv=None):
    a = get_args(argv)
    os.environ.setdefault('CORSD_DATA', str(Path(__file__).resolve().parents[2]/'shared'/'data'))
    t0 = time.time()
    arms, seeds = a.arms.split(','), [int(s) for s in a.seeds.split(',')]
    jobs = [(arm, a, seed) for seed in seeds for arm in arms]  # the arms of one seed run side by side
    with mp.get_context('spawn').Pool(min(a.jobs, len(jobs))) as pool: outs = pool.starmap(run_arm, jobs)
    results = {arm: [r for r in outs if r['arm'] == arm] for arm in arms}
    return summarise(a, results, time.time() - t0)

if __name__ == '__main__': main()
