"""Training throughput of the model zoo, in one process: the fp32 matrix-multiply peak, then images/s of each model in a
fastai `Learner` and in a bare PyTorch loop on the same in-memory batches, utilisation against the peak, the Learner's
overhead, and variants that might speed up training (channels_last, torch.compile, bf16 autocast, threads, batch size).

utilisation = 6 × MACs per image × images/s ÷ peak FLOP/s (forward 2 FLOPs per MAC, backward about twice the forward);
overhead = bare-loop images/s ÷ Learner images/s − 1. Run it alone on the machine (it takes the benchmark lock):
    python benchmarks/throughput.py            # the real measurement (minutes)
    python benchmarks/throughput.py --quick    # a smoke test: a few steps, written to throughput_quick.json
    python benchmarks/throughput.py --plot     # redraw the figure from the JSON (no measurement)
"""
from __future__ import annotations
import argparse, json, os, sys, time
from functools import partial
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parent))
import torch
from torch import nn
import runner
from common import write_result, md_table, save_figure, link_figure, RESULTS

CIFAR_MODELS = ('resnet8', 'resnet20', 'mobilenet_v2')
MODELS = ('lenet5',) + CIFAR_MODELS + ('mgnet',)
CIFAR10_TRAIN = 50_000
OPTIMISER = "fastai's Adam stepped by torch's foreach kernels (`corsd_suite.optim.adam()`, the package's default)"

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    runner.add_machine_args(p)
    p.add_argument('--quick', action='store_true', help='a smoke test: few steps, small GEMMs, no torch.compile')
    p.add_argument('--models', default=','.join(MODELS), help=f'comma-separated, from {MODELS}')
    p.add_argument('--bs', type=int, default=None, help='batch size of the main table (default 128; quick 16)')
    p.add_argument('--steps', type=int, default=None, help='timed training steps per measurement (default 40; quick 2)')
    p.add_argument('--rounds', type=int, default=None, help='alternate Learner and bare loop this often, keep the best of each (default 2; quick 1)')
    p.add_argument('--warmup', type=int, default=None, help='untimed steps first (default 5; quick 1)')
    p.add_argument('--channels_last', action=argparse.BooleanOptionalAction, default=True,
                   help="main table in channels_last memory format (fastai's ChannelsLast in the Learner), as the benchmark runner trains")
    p.add_argument('--variant-models', default='resnet20', help='models the variants are tried on')
    p.add_argument('--compile', action=argparse.BooleanOptionalAction, default=None,
                   help='try the torch.compile variant (default: yes, except with --quick; compiling takes minutes on CPU)')
    p.add_argument('--methods', action=argparse.BooleanOptionalAction, default=True,
                   help="measure every method's training cost against the plain Learner (ResNet-20, CIFAR-shaped batches)")
    p.add_argument('--plot', action='store_true', help='only redraw results/<out>.png from results/<out>.json')
    p.add_argument('--out', default=None, help='result name (default throughput; quick: throughput_quick)')
    a = p.parse_args(argv)
    a.steps = a.steps or (2 if a.quick else 40)
    a.bs = a.bs or (16 if a.quick else 128)
    a.rounds = a.rounds or (1 if a.quick else 2)
    if a.compile is None: a.compile = not a.quick
    a.warmup = a.warmup if a.warmup is not None else (1 if a.quick else 5)
    a.out = a.out or ('throughput_quick' if a.quick else 'throughput')
    bad = [m for m in a.models.split(',') + a.variant_models.split(',') if m not in MODELS]
    if bad: p.error(f"unknown model(s) {bad}; choose from {MODELS}")
    return a

def sync(dev:torch.device):
    "Wait for queued kernels so that wall-clock times are honest on asynchronous devices"
    if dev.type == 'cuda': torch.cuda.synchronize(dev)
    elif dev.type == 'mps': torch.mps.synchronize()

# ------------------------------------------------------------------------------------------------------- GEMM peak
def gemm_peak(dev:torch.device, sizes=(256, 512, 1024, 2048), repeats:int=5, min_seconds:float=0.2) -> dict:
    "Best fp32 matmul GFLOP/s over square sizes and repeats (each timing loops until `min_seconds`)"
    rows = []
    for n in sizes:
        a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
        a @ b; sync(dev)
        best = 0.
        for _ in range(repeats):
            k, t0 = 0, time.perf_counter()
            while True:
                a @ b; k += 1
                if k % 4 == 0:
                    sync(dev)
                    if time.perf_counter() - t0 >= min_seconds: break
            best = max(best, 2 * n**3 * k / (time.perf_counter() - t0) / 1e9)
        rows.append(dict(n=n, gflops=round(best, 1)))
    return dict(gemm_gflops=max(r['gflops'] for r in rows), by_size=rows)

# ------------------------------------------------------------------------------------------------ models and data
def random_set(shape, n:int, seed:int=0):
    "An ImageSet of `n` random uint8 images of `shape` (throughput does not depend on content)"
    from corsd_suite.data import ImageSet
    g = torch.Generator().manual_seed(seed)
    return ImageSet(torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=g), torch.randint(0, 10, (n,), generator=g))

def make_learner(name:str, bs:int, n_batches:int, dev:torch.device, opt_func=None):
    "A fresh Learner for zoo model `name` at its benchmark input size, on `n_batches` in-memory training batches"
    from corsd_suite.core import seed_everything
    from corsd_suite.data import image_dls
    from corsd_suite.models import zoo_learner
    seed_everything(0)
    kw = dict(opt_func=opt_func) if opt_func is not None else {}   # the package's default: fastai's Adam stepped by torch
    if name == 'mgnet':   # the MGNet benchmark's model: ResNet-8 (half width) body, 3 glimpses, 60×60 cluttered digits
        from corsd_suite.mgnet import mgnet_learner, cluttered_digits_dls, CLUTTER_GLIMPSES
        dls = cluttered_digits_dls(canvas=60, digit_size=28, n_clutter=4, clutter_size=8, bs=bs, device=dev)
        tr = dls.train.dataset                 # exactly n_batches batches (the embedded digits repeated as needed)
        idx = torch.arange(len(tr)).repeat(-(-n_batches*bs // len(tr)))[:n_batches*bs]
        dls = image_dls(tr.subset(idx), dls.valid.dataset.subset(range(min(bs, len(dls.valid.dataset)))), bs=bs, device=dev)
        mkw = dict(n_glimpses=3, down_factor=2.5, width=0.5, **CLUTTER_GLIMPSES)
        return mgnet_learner(dls, 'resnet8', model_kw=mkw, **kw), (1, 60, 60)
    shape = (1, 28, 28) if name == 'lenet5' else (3, 32, 32)
    dls = image_dls(random_set(shape, n_batches*bs), random_set(shape, bs, seed=1), bs=bs, device=dev)
    return zoo_learner(dls, name, **kw), shape

# ----------------------------------------------------------------------------------------------------- measuring
from fastai.callback.core import Callback, CancelFitException

class StepTimer(Callback):
    "Time the training batches from `warmup` on, then stop the fit (no validation)"
    order = 100
    def __init__(self, warmup:int, dev): self.warmup, self.dev, self.t0, self.images = warmup, dev, None, 0
    def before_batch(self):
        if self.training and self.iter == self.warmup: sync(self.dev); self.t0 = time.perf_counter()
    def after_batch(self):
        if self.training and self.iter >= self.warmup: self.images += len(self.yb[0])
    def after_train(self):
        sync(self.dev); self.seconds = time.perf_counter() - self.t0
        raise CancelFitException

def learner_img_s(learn, a, dev) -> float:
    "Training images/s of `learn.fit` over the batches after `a.warmup`"
    timer = StepTimer(a.warmup, dev)
    with learn.no_bar(), learn.no_logging():
        try: learn.fit(1, 1e-3, cbs=timer)
        finally: runner.close_autocast(learn)   # a batch that raised before its loss leaves no autocast entered
    if not timer.images: raise ValueError(f"no timed batch: the training DataLoader has {len(learn.dls.train)} batches, warm-up {a.warmup}")
    return timer.images / timer.seconds

class _null:
    def __enter__(self): return self
    def __exit__(self, *a): pass

def bare_img_s(model:nn.Module, loss_func, dl, a, dev, autocast=None, channels_last:bool=False, step=None) -> float:
    "Training images/s of a plain PyTorch loop (torch Adam, foreach) over the same DataLoader's batches"
    model.to(dev).train()
    if channels_last: model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), 1e-3, foreach=True)
    fwd = model if step is None else step
    t0, images = None, 0
    for i, (x, y) in enumerate(dl):
        if i == a.warmup: sync(dev); t0 = time.perf_counter()
        if channels_last: x = x.contiguous(memory_format=torch.channels_last)
        with (torch.autocast(dev.type, dtype=autocast) if autocast else _null()):
            loss = loss_func(fwd(x), y)
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        if i >= a.warmup: images += len(y)
        if i + 1 == a.warmup + a.steps: break
    sync(dev)
    if not images: raise ValueError(f"no timed batch: the DataLoader has {len(dl)} batches, warm-up {a.warmup}")
    return images / (time.perf_counter() - t0)

def measure_model(name:str, a, dev, peak:float, bs:int|None=None) -> dict:
    "Learner and bare-loop images/s of zoo model `name`, its MACs, utilisation and Learner overhead"
    from corsd_suite.evaluate import count_flops
    bs = bs or a.bs
    n = a.warmup + a.steps
    learn, shape = make_learner(name, bs, n, dev)
    bare_learn, _ = make_learner(name, bs, n, dev)          # same init and batches, its own model and loss
    macs = count_flops(learn.model.to(dev), shape)['macs']
    runner.set_train_format(learn, dict(channels_last=a.channels_last))
    li = bi = 0.
    for _ in range(a.rounds):   # alternate, keep the best of each: neither gains from going second
        li = max(li, learner_img_s(learn, a, dev))
        bi = max(bi, bare_img_s(bare_learn.model, bare_learn.loss_func, bare_learn.dls.train, a, dev, channels_last=a.channels_last))
    return dict(input=list(shape), macs=macs, bs=bs, learner_img_s=li, bare_img_s=bi,
                utilisation=6 * macs * bi / (peak * 1e9), learner_utilisation=6 * macs * li / (peak * 1e9),
                overhead=bi / li - 1)

# ------------------------------------------------------------------------------------------------------ variants
def cpu_bf16() -> bool:
    "Whether this CPU has native bf16 arithmetic (AVX512-BF16 or AMX)"
    try: flags = Path('/proc/cpuinfo').read_text()
    except OSError: return False
    return 'avx512_bf16' in flags or 'amx_bf16' in flags

def variants(name:str, a, dev, base:dict) -> list:
    "Bare-loop (and Learner) images/s of `name` under settings that might speed training up"
    rows, n = [], a.warmup + a.steps
    def row(variant, img_s, note=''):
        rows.append(dict(model=name, variant=variant, img_s=round(img_s, 1), speedup=round(img_s / base['bare_img_s'], 3), note=note))
    def bare(bs=None, **kw):   # best of `a.rounds`, like the baseline
        l, _ = make_learner(name, bs or a.bs, n, dev)
        return max(bare_img_s(l.model, l.loss_func, l.dls.train, a, dev, **{'channels_last': a.channels_last, **kw}) for _ in range(a.rounds))
    fmt, other = ('channels_last', 'contiguous') if a.channels_last else ('contiguous', 'channels_last')
    row(f'bare loop, fp32, {fmt} (baseline: the main table)', base['bare_img_s'])
    row(f'{other} (fp32)', bare(channels_last=not a.channels_last))
    l, _ = make_learner(name, a.bs, n, dev)
    runner.set_train_format(l, dict(channels_last=not a.channels_last))
    row(f'Learner, {other} (fp32)', learner_img_s(l, a, dev), f"Learner, {fmt}: {base['learner_img_s']:.1f}")
    bf = torch.bfloat16
    native = dev.type != 'cpu' or cpu_bf16()
    bf_note = 'native bf16' if native else 'no native bf16 on this CPU (emulated)'
    row(f'{fmt} + bf16 autocast', bare(autocast=bf), bf_note)
    row(f'{other} + bf16 autocast', bare(autocast=bf, channels_last=not a.channels_last), bf_note)
    l, _ = make_learner(name, a.bs, n, dev)
    runner.set_train_format(l, dict(channels_last=a.channels_last, bf16=True))
    row(f'Learner, {fmt} + bf16 autocast (the runner\'s --bf16)', learner_img_s(l, a, dev), bf_note)
    for bs in sorted({64, 256} - {a.bs}) if not a.quick else [max(8, a.bs // 2)]:
        row(f'batch {bs}', bare(bs), 'images/s at another batch size')
    if dev.type == 'cpu':
        nt = torch.get_num_threads()
        for t in sorted({1, os.cpu_count() or 1} - {nt}):
            torch.set_num_threads(t)
            try: row(f'{t} thread(s) (main: {nt})', bare())
            finally: torch.set_num_threads(nt)
    from fastai.optimizer import Adam
    from corsd_suite.optim import adam
    for label, of in (("Learner with fastai's own Adam (before: Python per-parameter steps)", Adam),
                      ("Learner with fastai's Adam on torch's fused kernel (`adam(impl='fused')`)", adam(impl='fused'))):
        l, _ = make_learner(name, a.bs, n, dev, opt_func=of)
        runner.set_train_format(l, dict(channels_last=a.channels_last))
        row(label, learner_img_s(l, a, dev), f"Learner with the default (torch foreach): {base['learner_img_s']:.1f}")
    if not a.compile: rows.append(dict(model=name, variant='torch.compile', note='skipped (--no-compile or --quick)'))
    else:
        t0 = time.perf_counter()
        try:
            a2 = argparse.Namespace(**{**vars(a), 'warmup': max(a.warmup, 3)})   # the first steps compile
            l, _ = make_learner(name, a.bs, a2.warmup + a.steps, dev)
            comp = torch.compile(l.model)
            img_s = bare_img_s(l.model, l.loss_func, l.dls.train, a2, dev, step=comp, channels_last=a.channels_last)
            row('torch.compile (default mode)', img_s, f'compile + warm-up {time.perf_counter() - t0:.0f}s')
        except Exception as e: rows.append(dict(model=name, variant='torch.compile', note=f'failed: {type(e).__name__}: {str(e)[:120]}'))
    return rows

# ------------------------------------------------------------------------------------------------ per method
PHASES = ('data and loop', 'forward', 'loss', 'backward', 'optimiser step', 'after the step')
_EVENTS = ('before_batch', 'after_pred', 'after_loss', 'after_backward', 'after_step', 'after_batch')

class PhaseTimer(Callback):
    "Seconds spent in each phase of the training batches from `warmup` on (each callback's own work counted in its event's phase), then stop the fit"
    order = 1000   # last at every event: a phase ends when every callback has done its part of it
    def __init__(self, warmup:int, dev): self.warmup, self.dev, self.t, self.images, self.last = warmup, dev, dict.fromkeys(PHASES, 0.), 0, None
    def _mark(self, phase):
        if not self.training or self.iter < self.warmup: return
        sync(self.dev); now = time.perf_counter()
        if self.last is not None: self.t[phase] += now - self.last
        self.last = now
    def before_batch(self): self._mark('data and loop')
    def after_pred(self): self._mark('forward')
    def after_loss(self): self._mark('loss')
    def after_backward(self): self._mark('backward')
    def after_step(self): self._mark('optimiser step')
    def after_batch(self):
        self._mark('after the step')
        if self.training and self.iter >= self.warmup: self.images += len(self.yb[0]) if len(self.yb) else len(self.xb[0])
    def after_train(self):
        self.seconds = sum(self.t.values())
        raise CancelFitException

def _synthetic_dls(bs:int, n_batches:int, dev, seed:int=0):
    from corsd_suite.data import image_dls
    return image_dls(random_set((3, 32, 32), n_batches*bs, seed), random_set((3, 32, 32), bs, seed+1), bs=bs, device=dev)

def method_learners(a, dev, arch:str='resnet20') -> dict:
    "Each method's Learner on the same CIFAR-shaped batches and zoo model, beside the plain Learner it is compared with"
    from corsd_suite.core import seed_everything
    from corsd_suite.models import zoo_learner, get_model
    from corsd_suite.corsd import corsd_learner, byot_learner
    from corsd_suite.mgnet import mgnet_learner
    from corsd_suite.admm import ADMMCallback, HardPruneCallback, weight_layers
    from corsd_suite.calibrator import calibrator_learner
    from corsd_suite.reverse_adversarial import reverse_adv_learner
    n = a.warmup + a.steps + 1
    dls = lambda: _synthetic_dls(a.bs, n, dev)
    def convs(m): return {k: 0.5 for k, l in weight_layers(m).items() if isinstance(l, nn.Conv2d)}
    def clf(): seed_everything(0); return get_model(arch, n_in=3, n_out=10).to(dev)
    def admm():
        l = zoo_learner(dls(), arch); l.add_cb(ADMMCallback(convs(l.model), unit='batch')); return l
    def hard():
        l = zoo_learner(dls(), arch); l.add_cb(HardPruneCallback(convs(l.model))); return l
    def cal(): d = dls(); return calibrator_learner(d, clf(), _synthetic_dls(a.bs, n, dev, seed=2).train)
    return {'plain (baseline)': lambda: zoo_learner(dls(), arch), 'BYOT': lambda: byot_learner(dls(), arch),
            'CORSD': lambda: corsd_learner(dls(), arch), 'MGNet (4 glimpses, 16 px)': lambda: mgnet_learner(dls(), arch),
            'ADMM (every batch)': admm, 'hard-prune retraining': hard, 'calibrator step (+ discriminators)': cal,
            'reverse adversarial calibrator': lambda: reverse_adv_learner(dls(), clf())}

def method_costs(a, dev, arch:str='resnet20') -> dict:
    "Training seconds per CIFAR-10-sized epoch of every method, its ratio to the plain Learner, and its time per phase"
    from corsd_suite.core import seed_everything
    res = {}
    for name, mk in method_learners(a, dev, arch).items():
        best = None
        for _ in range(a.rounds):
            seed_everything(0)
            learn = mk()
            runner.set_train_format(learn, dict(channels_last=a.channels_last))
            timer = PhaseTimer(a.warmup, dev)
            with learn.no_bar(), learn.no_logging():
                try: learn.fit(1, 1e-3, cbs=timer)
                finally: runner.close_autocast(learn)
            if not timer.images: raise ValueError(f"{name}: no timed batch")
            if best is None or timer.images / timer.seconds > best['img_s']:
                best = dict(img_s=timer.images / timer.seconds, phases={k: v / timer.images * CIFAR10_TRAIN for k, v in timer.t.items()})
        best['epoch_s'] = CIFAR10_TRAIN / best['img_s']
        res[name] = best
        print(name, round(best['epoch_s'], 1), {k: round(v, 1) for k, v in best['phases'].items()}, flush=True)
    base = res['plain (baseline)']
    for r in res.values(): r['ratio'] = r['epoch_s'] / base['epoch_s']
    return res

# ---------------------------------------------------------------------------------------------------------- main
def figure(s:dict, path:Path) -> Path:
    "Utilisation of the GEMM peak per model (bare loop and Learner) and the CIFAR-10 epoch time, from a summary"
    import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot as plt
    ms, ep = s['models'], s['cifar10_epoch_seconds']
    fig, axs = plt.subplots(1, 2, figsize=(11, 3.4), gridspec_kw=dict(width_ratios=[3, 2]))
    x = range(len(ms))
    for dx, k, lab in ((-.2, 'utilisation', 'bare loop'), (.2, 'learner_utilisation', 'fastai Learner')):
        axs[0].bar([i + dx for i in x], [100 * r[k] for r in ms.values()], width=.4, label=lab)
    axs[0].axhline(100 * (s.get('targets') or {}).get('utilisation_target', 0.8), color='k', lw=.7, ls='--', label='target (ResNet-20, Learner)')
    axs[0].set_xticks(list(x), list(ms)); axs[0].set_ylabel('% of fp32 GEMM peak'); axs[0].legend(fontsize=8)
    axs[0].set_title(f"training, {s['threads']} thread(s), peak {s['gemm_gflops']:.0f} GFLOP/s", fontsize=9)
    if not ep: axs[1].axis('off')          # no CIFAR model measured
    else:
        axs[1].barh(list(ep), [v['learner'] for v in ep.values()])
        for i, v in enumerate(ep.values()): axs[1].text(v['learner'], i, f" {v['learner']:.0f} s", va='center', fontsize=8)
        axs[1].set_xlim(0, 1.2 * max(v['learner'] for v in ep.values()))
        axs[1].set_xlabel('seconds per CIFAR-10 epoch (Learner)'); axs[1].invert_yaxis()
    plt.tight_layout()
    return save_figure(fig, path)

def main(argv=None):
    a = get_args(argv)
    if a.plot:
        res = json.loads((RESULTS/f'{a.out}.json').read_text())
        return link_figure(RESULTS/f'{a.out}.md', figure(res['summary'], RESULTS/f'{a.out}.png'))
    dev = runner.resolve_device(a.device)
    if a.threads: torch.set_num_threads(a.threads)
    t_all = time.perf_counter()
    with runner.MachineLock(Path(a.cache or runner.default_cache()).expanduser(), 'throughput', wait=a.wait):
        load_start = runner.load_avg()
        g = gemm_peak(dev, sizes=(128, 256) if a.quick else (256, 512, 1024, 2048), repeats=2 if a.quick else 5,
                      min_seconds=0.05 if a.quick else 0.3)
        peak = g['gemm_gflops']
        print(f"fp32 GEMM peak: {peak:.1f} GFLOP/s ({torch.get_num_threads()} threads, {dev})", flush=True)
        models = {}
        for m in a.models.split(','):
            models[m] = measure_model(m, a, dev, peak)
            print(m, {k: round(v, 3) if isinstance(v, float) else v for k, v in models[m].items()}, flush=True)
        var = []
        for m in a.variant_models.split(','):
            base = models.get(m) or measure_model(m, a, dev, peak)
            var += variants(m, a, dev, base)
            for r in var[-8:]: print(r, flush=True)
        meth = method_costs(a, dev) if a.methods else {}
        load_end = runner.load_avg()
    epoch_s = {m: dict(learner=CIFAR10_TRAIN / models[m]['learner_img_s'], bare=CIFAR10_TRAIN / models[m]['bare_img_s'])
               for m in CIFAR_MODELS if m in models}
    env = dict(threads=torch.get_num_threads(), cores=os.cpu_count(), device=str(dev), load_start=load_start, load_end=load_end,
               quick=a.quick, channels_last=a.channels_last, steps=a.steps, warmup=a.warmup, bs=a.bs, cpu_native_bf16=cpu_bf16())
    env['overloaded'] = max(l for l in (load_start, load_end, 0) if l is not None) > env['threads'] + 0.5
    keys = ('learner_img_s', 'bare_img_s', 'utilisation', 'learner_utilisation', 'overhead', 'macs', 'bs')
    r20 = models.get('resnet20')
    targets = None if r20 is None else dict(resnet20_learner_utilisation=r20['learner_utilisation'], utilisation_target=0.80,
                                            utilisation_met=r20['learner_utilisation'] >= 0.80, overhead=r20['overhead'],
                                            overhead_target=0.05, overhead_met=r20['overhead'] <= 0.05)
    summary = dict(gemm_gflops=peak, models={m: {k: r[k] for k in keys} for m, r in models.items()}, targets=targets,
                   cifar10_epoch_seconds=epoch_s, variants=var, methods=meth, optimiser=OPTIMISER, command=runner.command_line(), **env)
    md = report(summary, g, models, var, epoch_s, a) + f"\n![{a.out}.png]({figure(summary, RESULTS/f'{a.out}.png').name})\n"
    return write_result(a.out, summary, dict(gemm=g, models=models), md, seconds=time.perf_counter() - t_all)

def report(s, g, models, var, epoch_s, a) -> str:
    f = lambda v, nd=1: f"{v:,.{nd}f}"
    rows = [{'model': m, 'input': '×'.join(map(str, r['input'])), 'MMACs/img': f(r['macs']/1e6, 2), 'Learner img/s': f(r['learner_img_s']),
             'bare img/s': f(r['bare_img_s']), 'utilisation (bare)': f"{100*r['utilisation']:.1f}%",
             'utilisation (Learner)': f"{100*r['learner_utilisation']:.1f}%", 'Learner overhead': f"{100*r['overhead']:+.1f}%"}
            for m, r in models.items()]
    ep = md_table([{'model': m, 'CIFAR-10 epoch, Learner (s)': f(v['learner']), 'bare loop (s)': f(v['bare'])} for m, v in epoch_s.items()]) if epoch_s else ''
    t = s['targets']
    tg = '' if t is None else (f"\n\nTargets (ResNet-20): training at ≥ {100*t['utilisation_target']:.0f}% of the GEMM peak in the Learner: {100*t['resnet20_learner_utilisation']:.1f}% "
                               f"({'met' if t['utilisation_met'] else 'NOT met'}); Learner overhead ≤ {100*t['overhead_target']:.0f}%: {100*t['overhead']:+.1f}% "
                               f"({'met' if t['overhead_met'] else 'NOT met'}).")
    if t is not None and not t['utilisation_met'] and t['overhead_met']:
        tg += (f" The bare torch loop reaches {100*models['resnet20']['utilisation']:.1f}% of the peak on the same batches: what stands "
               "between the Learner and the peak is the efficiency of torch's CPU convolution kernels (forward and backward), "
               "not fastai's loop, callbacks or optimiser (see the variants and the per-method phases below).")
    warn = tg + ("\n\n**QUICK smoke test** (a few steps): these numbers are not measurements." if a.quick else '') + \
           ("\n\n**The machine was loaded** (load average above threads + 0.5): the figures are low." if s['overloaded'] else '')
    return f"""fp32 GEMM peak: **{g['gemm_gflops']:,.1f} GFLOP/s** (best of square matmuls {', '.join(str(r['n']) for r in g['by_size'])};
{s['threads']} thread(s) on {s['cores']} core(s), device {s['device']}; load average {s['load_start']} at start, {s['load_end']} at end).
Training: batch {a.bs}, Adam, fp32, {'channels_last memory format (fastai `ChannelsLast` in the Learner)' if a.channels_last else 'contiguous memory format'}, {a.steps} timed steps after {a.warmup} warm-up steps (best of {a.rounds} alternating round(s)), random uint8 batches held in memory
(MGNet: the embedded digits at 28×28 on 60×60 cluttered canvases, ResNet-8 at half width, 3 glimpses), gathered and
converted by the same `TensorDL`. Utilisation = 6 × MACs × images/s ÷ GEMM peak; overhead = bare images/s ÷ Learner
images/s − 1 (the Learner's optimiser: {s['optimiser']}; the bare loop: torch's Adam, foreach).{warn}

{md_table(rows)}

One epoch of CIFAR-10 (50,000 training images) at these rates:

{ep}

Variants (bare loop unless named; speedup against the bare loop of the main table):

{md_table(var, ['model', 'variant', 'img_s', 'speedup', 'note'])}
{methods_report(s['methods'], a)}"""

def methods_report(meth:dict, a) -> str:
    "The per-method table: seconds per CIFAR-10-sized epoch, the ratio to the plain Learner, and where the extra time goes"
    if not meth: return ''
    base = meth['plain (baseline)']['phases']
    def extra(r):
        d = {k: v - base[k] for k, v in r['phases'].items()}
        k = max(d, key=d.get)
        if r is meth['plain (baseline)']: return ''
        return f"{k} (+{d[k]:.0f} s)" if d[k] > 0 else 'none: faster than plain in every phase'
    rows = [{'method': m, 's / epoch': f"{r['epoch_s']:.1f}", '× plain': f"{r['ratio']:.2f}",
             **{p: f"{r['phases'][p]:.1f}" for p in PHASES}, 'most of the extra time': extra(r)} for m, r in meth.items()]
    return f"""
Each method's training cost (ResNet-20 on CIFAR-shaped random batches of {a.bs}, channels_last, fp32, the package's
default optimiser; seconds per 50,000 training images, best of {a.rounds} round(s) of {a.steps} timed batches). The
phases split each batch at fastai's events (each callback's own work counted in the phase of its event): *data and
loop* from the end of one batch to the start of the next (batch gathering, transfer, fastai's loop), *forward* up to
`after_pred`, *loss* up to `after_loss` (a method's extra loss terms), *backward*, *optimiser step*, and *after the
step* (masks, schedules, recording). CORSD's batches are triplets (a third of the batch size in anchors, same image
count); MGNet's backbone sees 4 glimpses of 16×16 instead of one 32×32 image; the calibrators train a generator in
front of a frozen ResNet-20 (and, for the domain calibrator, two discriminators).

{md_table(rows)}
"""

if __name__ == '__main__': main()
