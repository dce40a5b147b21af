"""Resumable benchmark runs, one benchmark at a time per machine.

A benchmark is a list of runs (method × seed × configuration). Each run has a stable id and its settings (a JSON-able
dict, hashed). A finished run writes `benchmarks/results/runs/<benchmark>/<run-id>.json` (committed): settings,
result, git commit (+ dirty flag), threads, torch version, device, load average at start and end, wall seconds and
seconds per epoch. While a run trains, `RunContext.fit` saves a checkpoint at the end of every epoch (model,
optimiser, epochs done, RNG and DataLoader shuffle state, via `corsd_suite.core.save_checkpoint`) into a cache
folder outside the work tree (`--cache`, `$CORSD_CACHE`, else `~/.cache/corsd_suite/bench`). Invoking the
benchmark again skips finished runs and resumes unfinished ones from their last checkpoint; a resumed run ends
with the same weights as an uninterrupted one. A lock file in the cache folder lets one benchmark run at a time.
On CPU, subnormal floats are flushed to zero (`--keep-denormals` keeps them; see `flush_denormals`).
Runs train in channels_last, contiguous where the model has a convolution in `channels_last_hazards`.

Example (a script in benchmarks/):

    import argparse, runner
    from corsd_suite.data import digits_dls
    from corsd_suite.models import zoo_learner
    from corsd_suite.evaluate import evaluate_accuracy
    p = argparse.ArgumentParser(); runner.add_args(p)      # --device --threads --only --wait --cache --fresh --list
    p.add_argument('--epochs', type=int, default=5)
    a = p.parse_args()

    def train(ctx):                                        # ctx: a RunContext (run_id, config, seed, device, fit, cached)
        dls = digits_dls(16, device=ctx.device)
        learn = zoo_learner(dls, ctx.config['arch'])
        ctx.fit(learn, ctx.config['epochs'], 5e-3)         # checkpointed every epoch, resumed when interrupted
        return dict(valid_acc=evaluate_accuracy(learn.model, dls.valid, show=False))   # JSON-able

    bench = runner.Benchmark('digits', a)
    for seed in (0, 1):
        for arch in ('lenet5', 'resnet8'): bench.add(train, f'{arch}-s{seed}', arch=arch, seed=seed, epochs=a.epochs)
    bench.run()                                            # runs what is missing, under the machine lock
    def summarise(runs):                                   # {run_id: run json} of the finished runs -> (summary, markdown)
        acc = {arch: runner.mean_std([r['valid_acc'] for r in rs]) for arch, rs in runner.by(runs, 'arch').items()}
        spe = runner.sec_per_epoch(runs, 'arch')           # only runs made alone on the machine
        return dict(valid_acc=acc, sec_per_epoch=spe), runner.md_table([dict(arch=k, acc=f"{v['mean']:.3f}") for k,v in acc.items()])
    bench.report(summarise)                                # results/digits.json/.md, with missing and unusable runs listed

Multi-stage runs name their stages: `ctx.fit(learn, 3, lr, stage='dense')`, then `ctx.fit(learn2, 2, lr,
stage='retrain')`: a finished stage is loaded from the cache instead of trained again; `shared='base-s0'` keeps a
stage in a folder shared by several runs (e.g. one base model per seed reused by several arms). `ctx.cached(key,
build)` keeps any tensor/dict artefact the same way.
"""
from __future__ import annotations
import argparse, hashlib, json, os, re, shutil, subprocess, sys, time, fnmatch, warnings
from pathlib import Path
import numpy as np, torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, write_result, md_table, mean_std, command_line, atomic_write, default_cache, MachineLock

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------------------- setup
def add_machine_args(p:argparse.ArgumentParser) -> argparse.ArgumentParser:
    "--device, --threads, --wait/--no-wait and --cache: what any script measuring this machine needs"
    g = p.add_argument_group('machine')
    g.add_argument('--device', default='cpu', help="'cpu', 'cuda', 'cuda:N', 'mps' or 'auto' (best available)")
    g.add_argument('--threads', type=int, default=None, help="torch CPU threads (default: torch's own, usually all cores)")
    g.add_argument('--wait', action=argparse.BooleanOptionalAction, default=False,
                   help='when another benchmark holds the machine lock: wait for it (--wait) or exit (--no-wait, default)')
    g.add_argument('--cache', default=None, help='checkpoint folder and lock (default: $CORSD_CACHE or ~/.cache/corsd_suite/bench)')
    return p

def add_args(p:argparse.ArgumentParser) -> argparse.ArgumentParser:
    "Add the runner's flags to a benchmark's argument parser: the machine's, plus --only, --fresh and --list"
    add_machine_args(p)
    g = p.add_argument_group('runs')
    g.add_argument('--only', default=None, help='comma-separated run ids or glob patterns: run only these')
    g.add_argument('--fresh', action='store_true', help='discard the checkpoints of the selected runs and run them again (their results are replaced)')
    g.add_argument('--list', action='store_true', help='print the runs and their status, run nothing')
    g.add_argument('--keep-denormals', action='store_true', help='on CPU, compute on subnormal floats (slow) instead of flushing them to zero')
    g = p.add_argument_group('training format (part of every run\'s settings: runs made otherwise are not mixed in)')
    g.add_argument('--channels_last', action=argparse.BooleanOptionalAction, default=True,
                   help="train in channels_last memory format (fastai's ChannelsLast; 1.6x faster for ResNet-20 on CPU, see throughput.md)")
    g.add_argument('--bf16', action=argparse.BooleanOptionalAction, default=False,
                   help='bf16 autocast for forward and loss (2x faster on CPUs with native bf16; off by default: changes the numbers)')
    g.add_argument('--opt_impl', choices=OPT_IMPLS, default=OPT_IMPLS[0],
                   help="torch kernels that step the learners' optimisers (`corsd_suite.optim`: fastai's algorithms; see throughput.md)")
    return p

OPT_IMPLS = ('foreach', 'fused')   # the first is the default: the faster on this project's CPUs (throughput.md)

def train_format(args) -> dict:
    "The training format the flags ask for (defaults where a flag is absent): hashed into every run's settings"
    return dict(channels_last=bool(getattr(args, 'channels_last', True)), bf16=bool(getattr(args, 'bf16', False)),
                optimiser='torch-' + getattr(args, 'opt_impl', OPT_IMPLS[0]))

def set_optimiser(learn, optimiser:str) -> str:
    """Make `learn` step its optimiser with torch's `optimiser` kernels ('torch-foreach' or 'torch-fused'); its
    `opt_func` must be one of `corsd_suite.optim` (fastai's algorithm, torch's kernels): a clear error otherwise"""
    from functools import partial
    from corsd_suite.optim import TorchOpt
    of = learn.opt_func
    if not (isinstance(of, partial) and of.func is TorchOpt):
        raise ValueError(f"the runner trains with torch's optimiser kernels: build the learner with an `opt_func` of "
                         f"corsd_suite.optim (adam(), sgd(...)), not {getattr(of, '__name__', of)!r}")
    impl = optimiser.removeprefix('torch-')
    if impl not in OPT_IMPLS: raise ValueError(f"optimiser must be one of {['torch-' + i for i in OPT_IMPLS]}, not {optimiser!r}")
    torch_opt = of.keywords['opt']
    kw = {k: v for k, v in torch_opt.keywords.items() if k not in OPT_IMPLS}
    if learn.opt is not None and not torch_opt.keywords.get(impl): learn.opt = None   # built with other kernels: rebuilt by fit
    learn.opt_func = partial(TorchOpt, **dict(of.keywords, opt=partial(torch_opt.func, **kw, **{impl: True})))
    return optimiser

def subnormals(n:int) -> torch.Tensor:
    "`n` float32 subnormals (~1.5e-39), made from their bits: a float conversion would flush them where flushing is on"
    return torch.from_numpy(np.full(n, 1 << 20, dtype=np.uint32).view(np.float32))

def flush_denormals() -> bool:
    """Flush subnormal floats (|x| < 1.2e-38) to zero in this process, on every CPU thread; returns whether they are.
    x86 CPUs compute on subnormals up to ~100× slower: a calibrator run's discriminator weights and Adam moments drifted
    there (45k of 500k weights) and its epochs slowed 2.5× within 8 epochs. Values that small change no result
    measurably. The flag is per thread and threads copy it when they start, so this must run before torch starts its
    thread pool (the runner does it when a `Benchmark` is made, before any run); it checks every thread and warns if not."""
    if not torch.set_flush_denormal(True): return False
    if bool(((subnormals(1 << 20) * 1.0) == 0).all()): return True
    warnings.warn("subnormal floats are flushed on the main thread only: torch's thread pool started before the runner "
                  "could set the flag (make the Benchmark before any tensor work)")
    return False

def runner_args(argv=None, **kw) -> argparse.Namespace:
    "The runner's flags alone (for tests and small scripts), with `kw` overriding"
    a = add_args(argparse.ArgumentParser()).parse_args([] if argv is None else argv)
    for k,v in kw.items(): setattr(a, k, v)
    return a

def resolve_device(name:str|None) -> torch.device:
    "The torch device `name` asks for; a clear error when it is not present on this machine"
    name = (name or 'cpu').lower()
    if name == 'auto':
        from corsd_suite.core import best_device
        return best_device()
    dev = torch.device(name)
    if dev.type == 'cuda':
        if not torch.cuda.is_available(): raise RuntimeError(f"--device {name}: CUDA was asked for but torch sees no CUDA device here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RuntimeError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if dev.type == 'mps' and not (getattr(torch.backends, 'mps', None) and torch.backends.mps.is_available()):
        raise RuntimeError(f"--device {name}: MPS was asked for but is not available here")
    if dev.type not in ('cpu', 'cuda', 'mps'): raise ValueError(f"--device {name}: unsupported device type {dev.type!r}")
    return dev

# ------------------------------------------------------------------------------------------------ small helpers
def settings_hash(settings:dict) -> str:
    "A short stable hash of a JSON-able settings dict (key order does not matter)"
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]

def run_id_of(settings:dict) -> str:
    "A readable stable id from settings: `k=v` joined by `-` (long ids end with a hash instead)"
    s = '-'.join(f"{k}={v}" for k,v in sorted(settings.items()))
    s = re.sub(r'[^A-Za-z0-9_.=,+-]', '_', s)
    return s if len(s) <= 80 else s[:60] + '-' + settings_hash(settings)

def check_id(run_id:str) -> str:
    "A run id is used as a file name: letters, digits and `_.=,+-` only"
    if not run_id or not re.fullmatch(r'[A-Za-z0-9_.=,+-]+', run_id) or run_id.startswith('.'):
        raise ValueError(f"run id {run_id!r}: use letters, digits and _.=,+- only (it names a file)")
    return run_id

def read_json(path:Path) -> dict:
    "Read a run JSON; a clear error naming the file when it is not valid JSON"
    try: return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e: raise ValueError(f"{path} is not valid JSON ({e}); delete it to run that run again") from e

def git_state() -> dict:
    "The work tree's commit and whether tracked files differ from it (None when git is not available)"
    def git(*a): return subprocess.run(['git', '-C', str(REPO), *a], capture_output=True, text=True, timeout=20).stdout.strip()
    try: commit, status = git('rev-parse', 'HEAD'), git('status', '--porcelain', '--untracked-files=no')
    except (OSError, subprocess.SubprocessError): return dict(commit=None, dirty=None)
    return dict(commit=commit or None, dirty=bool(status) if commit else None)

def load_avg() -> float|None:
    "The machine's 1-minute load average (None where the OS has none)"
    try: return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError): return None

def overloaded(run:dict, margin:float=0.5) -> bool:
    "True when a run's load average (start or end of any segment) exceeded its threads + `margin`"
    loads = [l for seg in run.get('segments', []) for l in (seg.get('load_start'), seg.get('load_end')) if l is not None]
    return bool(loads) and max(loads) > run.get('threads', 1) + margin

# ------------------------------------------------------------------------------------------- checkpoint callback
from fastai.callback.core import Callback
from fastai.callback.channelslast import ChannelsLast

class Autocast(Callback):
    "bf16 autocast around forward and loss on the DataLoaders' device (fastai's `MixedPrecision` autocasts CUDA only)"
    order = 10
    def __init__(self, dtype=torch.bfloat16): self.dtype = dtype
    def before_batch(self):
        self.ctx = torch.autocast(torch.device(self.dls.device or 'cpu').type, dtype=self.dtype); self.ctx.__enter__()
    def after_pred(self): self.learn.pred = self.pred.float() if torch.is_tensor(self.pred) else self.pred
    def after_loss(self):
        if getattr(self, 'ctx', None) is not None: self.ctx.__exit__(None, None, None); self.ctx = None
    def after_cancel_batch(self): self.after_loss()

def close_autocast(learn):
    "Leave the autocast a batch entered, if it raised before its loss (fastai runs no event after other exceptions)"
    for cb in learn.cbs:
        if isinstance(cb, Autocast): cb.after_loss()

def channels_last_hazards(model:torch.nn.Module) -> list:
    """Names of `model`'s convolutions whose channels_last weight gradient corrupts the heap on the CPU (torch 2.14.1's
    oneDNN, seen on AVX2 machines: 'double free or corruption', segmentation faults): 1×1, strided, at most 8 input
    channels per group (e.g. the first shortcut of a quarter-width ResNet-8)"""
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1)
            and max(m.stride) > 1 and m.in_channels // m.groups <= 8]

def set_train_format(learn, fmt:dict) -> dict:
    """Add the callbacks that train `learn` in format `fmt` (see `train_format`), once; return the format used: contiguous
    instead of channels_last when the model has a convolution in `channels_last_hazards` (on every device, so that a
    run's format does not depend on the machine)"""
    fmt = dict(fmt)
    if fmt.get('channels_last') and channels_last_hazards(learn.model): fmt['channels_last'] = False
    if fmt.get('channels_last') and not hasattr(learn, 'channels_last'): learn.add_cb(ChannelsLast())
    if fmt.get('bf16') and not hasattr(learn, 'autocast'): learn.add_cb(Autocast())
    if fmt.get('optimiser'): set_optimiser(learn, fmt['optimiser'])
    return fmt

class EpochCheckpoint(Callback):
    "Save a checkpoint after every epoch from `start` on (epochs done, epoch seconds and recorder rows in `extra`)"
    order = 95   # after the Recorder and the method callbacks have finished the epoch
    def __init__(self, file:Path, start:int=0, epoch_seconds:list|None=None, values:list|None=None, meta:dict|None=None):
        self.file, self.start, self.meta = Path(file), start, meta or {}
        self.epoch_seconds, self.values = list(epoch_seconds or []), list(values or [])
    def before_epoch(self): self.t0 = time.perf_counter()
    def after_epoch(self):
        if self.epoch < self.start: return      # an epoch skipped by `start_epoch`
        self.epoch_seconds.append(time.perf_counter() - self.t0)
        rec = getattr(self.learn, 'recorder', None)
        if rec is not None and rec.values: self.values.append([float(v) for v in rec.values[-1]])
        from corsd_suite.core import save_checkpoint, trim_memory
        save_checkpoint(self.learn, self.file, extra=dict(self.meta, epoch=self.epoch+1, epoch_seconds=self.epoch_seconds,
                                                           values=self.values))
        trim_memory()   # a long process would otherwise keep every epoch's freed heap (glibc): 24 GiB in a CORSD run

def _load(learn, file:Path, device) -> dict:
    "`load_checkpoint`, with the file named and the way out given when it cannot be read"
    from corsd_suite.core import load_checkpoint
    try: return load_checkpoint(learn, file, device=device)
    except Exception as e:
        raise RuntimeError(f"cannot resume from checkpoint {file}: {e}. Delete it (or run with --fresh) to start that stage again.") from e

# ------------------------------------------------------------------------------------------------ the run context
class RunContext:
    "What a run's train function gets: its id, settings (`config`), `seed`, `device`, and resumable `fit`/`cached`"
    def __init__(self, bench:'Benchmark', run_id:str, config:dict, progress:dict):
        self.bench, self.run_id, self.config, self.progress = bench, run_id, config, progress
        self.seed, self.device = config.get('seed'), bench.device
        self.dir = bench.cache_dir/run_id
        self.epoch_seconds = progress.setdefault('epoch_seconds', {})
        self._stages = set()

    def _stage_dir(self, stage:str, shared:str|None) -> Path:
        check_id(stage)
        return self.bench.cache_dir/'_shared'/check_id(shared) if shared else self.dir/stage

    def _check_learner(self, learn):
        for name, dl in (('train', learn.dls.train), ('valid', learn.dls.valid)):
            if dl is not None and getattr(dl, 'n', 1) == 0: raise ValueError(f"run {self.run_id}: the {name} DataLoader is empty")
        dev = getattr(learn.dls, 'device', None)
        if dev is not None and torch.device(dev) != self.device and not (torch.device(dev).type == self.device.type == 'cuda'):
            raise ValueError(f"run {self.run_id}: DataLoaders on {dev} but the benchmark runs on {self.device}: "
                             f"build them with device=ctx.device")

    def fit(self,
            learn, # the fastai `Learner`, built the same way on every invocation
            epochs:int, # epochs of this stage
            lr=None, # learning rate (as fastai takes it)
            stage:str='train', # the stage's name, unique within the run
            kind:str='one_cycle', # 'one_cycle' (`fit_one_cycle`), 'fit', or 'flat_cos' (not resumable mid-stage: fastai ignores its start_epoch)
            shared:str|None=None, # keep this stage under `_shared/<shared>` so that other runs reuse it (e.g. 'base-s0')
            **kwargs): # more arguments of the fastai fit method
        "Fit `learn`, checkpointing each epoch; a finished stage is loaded, an unfinished one resumes after its last epoch"
        fits = dict(one_cycle=learn.fit_one_cycle, fit=learn.fit, flat_cos=learn.fit_flat_cos)
        if kind not in fits: raise ValueError(f"kind must be one of {list(fits)}, not {kind!r}")
        self._check_learner(learn)
        asked = self.bench.plan.get(self.run_id, {}).get('format', self.bench.format)
        fmt = set_train_format(learn, asked)
        if fmt != asked:
            convs = self.progress.setdefault('contiguous_stages', {})[stage] = channels_last_hazards(learn.model)
            print(f"[{self.run_id}] stage {stage!r}: trained contiguous, not channels_last: torch's CPU backend corrupts the heap "
                  f"in the weight gradient of {convs} in channels_last", flush=True)
        if stage in self._stages: raise ValueError(f"run {self.run_id}: stage {stage!r} fitted twice; give each fit its own stage name")
        self._stages.add(stage)
        d = self._stage_dir(stage, shared)
        final, ckpt = d/'final.pth', d/'epoch.pth'
        meta = dict(stage=stage, epochs=epochs, kind=kind, lr=lr if lr is None or isinstance(lr, (int, float)) else repr(lr),
                    format=fmt_str(fmt))   # a shared stage made in another format is not reused
        if final.exists():
            extra = _load(learn, final, self.device)
            self._check_meta(extra, meta, final)
            self.epoch_seconds.setdefault(shared or stage, extra.get('epoch_seconds', []))
            if extra.get('values') and getattr(learn, 'recorder', None) is not None: learn.recorder.values = extra['values']
            print(f"[{self.run_id}] stage {stage!r}: finished earlier, loaded {final}", flush=True)
            return learn
        start, secs, vals = 0, [], []
        if ckpt.exists():
            extra = _load(learn, ckpt, self.device)
            self._check_meta(extra, meta, ckpt)
            start, secs, vals = extra['epoch'], extra.get('epoch_seconds', []), extra.get('values', [])
            print(f"[{self.run_id}] stage {stage!r}: resuming after epoch {start}/{epochs} from {ckpt}", flush=True)
            if kind == 'flat_cos' and start: raise ValueError("fastai's fit_flat_cos ignores start_epoch: use kind='one_cycle' or 'fit' for resumable stages")
        cb = EpochCheckpoint(ckpt, start, secs, vals, meta)
        with learn.no_bar(), learn.no_logging():   # also when every epoch is done: the callbacks' after_fit still runs
            try: fits[kind](epochs, lr, cbs=cb, **({'start_epoch': start} if start else {}), **kwargs)
            finally: close_autocast(learn)
        if cb.values and getattr(learn, 'recorder', None) is not None: learn.recorder.values = list(cb.values)
        from corsd_suite.core import save_checkpoint
        save_checkpoint(learn, final, extra=dict(meta, epoch=epochs, epoch_seconds=cb.epoch_seconds, values=cb.values))
        if ckpt.exists(): ckpt.unlink()
        self.epoch_seconds[shared or stage] = cb.epoch_seconds
        return learn

    def _check_meta(self, extra:dict, meta:dict, file:Path):
        bad = {k: (extra.get(k), v) for k,v in meta.items() if k in extra and extra.get(k) != v}
        if bad: raise RuntimeError(f"checkpoint {file} was made with other fit settings {bad} (saved, asked): "
                                   f"delete it or run with --fresh")

    def cached(self,
               key:str, # the artefact's name; include in it every setting it depends on (e.g. f'stats-s{seed}')
               build, # a function of no argument returning tensors, numbers, strings, lists, dicts
               shared:bool=True): # shared by all runs of the benchmark (else kept in this run's folder)
        "The artefact `build()` returns (tensors, dicts, lists; weights-only safe), kept in the cache under `key`"
        d = self.bench.cache_dir/'_shared' if shared else self.dir
        f = d/f'{check_id(key)}.pt'
        if f.exists():
            try: return torch.load(f, map_location='cpu', weights_only=True)
            except Exception as e: raise RuntimeError(f"cached artefact {f} cannot be read ({e}): delete it to rebuild") from e
        from corsd_suite.core import rng_state, set_rng_state, save_atomic
        s = rng_state()                         # built or loaded, the run's random stream continues the same
        try: obj = build()
        finally: set_rng_state(s)
        save_atomic(obj, f)
        return obj

# -------------------------------------------------------------------------------------------------- the benchmark
class Benchmark:
    "A named list of runs; `run` executes the missing ones under the machine lock, `report` summarises what exists"
    def __init__(self,
                 name:str, # the benchmark's name: results/runs/<name>/, results/<name>.json, cache folder <name>
                 args:argparse.Namespace|None=None, # parsed flags of `add_args` (default: the defaults)
                 results:Path|None=None): # the results folder (default benchmarks/results)
        self.name, self.args = check_id(name), args if args is not None else runner_args()
        self.results = Path(results or RESULTS)
        self.runs_dir = self.results/'runs'/name
        self.cache_root = Path(getattr(self.args, 'cache', None) or default_cache()).expanduser()
        self.cache_dir = self.cache_root/name
        self.device = resolve_device(getattr(self.args, 'device', 'cpu'))
        if getattr(self.args, 'threads', None): torch.set_num_threads(self.args.threads)
        self.flush_denormal = self.device.type == 'cpu' and not getattr(self.args, 'keep_denormals', False) and flush_denormals()
        self.format = train_format(self.args)
        self.git = git_state()   # the code this process loaded (later edits to the work tree do not change it)
        self.plan = {}

    def add(self,
            fn, # `fn(ctx)` trains and returns a JSON-able result dict; `ctx` is a `RunContext`
            run_id:str|None=None, # the run's id (default: made from `settings`)
            train_format:dict|None=None, # this run's own format flags over the invocation's (e.g. `dict(bf16=True)`)
            **settings) -> str: # everything that defines the run (JSON-able); a `seed` setting seeds everything first
        "Add a run; its settings (and its training format) are hashed: a result made with other settings is not used"
        try: json.dumps(settings)
        except TypeError as e: raise TypeError(f"settings of run {run_id or settings}: not JSON-able ({e})") from e
        rid = check_id(run_id or run_id_of(settings))
        if rid in self.plan: raise ValueError(f"run id {rid!r} added twice")
        fmt = dict(self.format, **(train_format or {}))
        self.plan[rid] = dict(fn=fn, settings=settings, format=fmt, hash=settings_hash(dict(settings, train_format=fmt)))
        return rid

    def _selected(self) -> list:
        only = getattr(self.args, 'only', None)
        if not only: return list(self.plan)
        pats = only.split(',')
        sel = [r for r in self.plan if any(fnmatch.fnmatchcase(r, p) for p in pats)]
        if not sel: raise ValueError(f"--only {only}: matches none of the runs {list(self.plan)}")
        return sel

    def status(self) -> dict:
        "Every planned run's state: 'done', 'missing', or 'stale' (a result made with other settings); plus 'other' files"
        out = {}
        for rid, r in self.plan.items():
            f = self.runs_dir/f'{rid}.json'
            out[rid] = 'missing' if not f.exists() else 'done' if read_json(f).get('settings_hash') == r['hash'] else 'stale'
        others = sorted(p.stem for p in self.runs_dir.glob('*.json') if p.stem not in self.plan) if self.runs_dir.exists() else []
        return dict(runs=out, other=others)

    def run(self) -> dict:
        "Run the selected runs that have no result for the current settings; returns {run_id: run json} of finished runs"
        st = self.status()['runs']
        if getattr(self.args, 'list', False):
            print(md_table([dict(run=r, status=s) for r,s in st.items()])); return self.finished()
        if self._todo(st):
            with MachineLock(self.cache_root, self.name, wait=getattr(self.args, 'wait', False)):
                # what is left is decided under the lock: a runner queued with --wait behind another one running
                # the same benchmark must not run again what that one finished while this one waited
                for rid in self._todo(self.status()['runs']): self._run_one(rid)
        return self.finished()

    def _todo(self, st:dict) -> list:
        "The selected runs to make given their status `st`: those not done, or all of them with --fresh"
        return [r for r in self._selected() if st[r] != 'done' or getattr(self.args, 'fresh', False)]

    def _run_one(self, rid:str):
        plan, d = self.plan[rid], self.cache_dir/rid
        if getattr(self.args, 'fresh', False) and d.exists(): shutil.rmtree(d)
        prog_file = d/'progress.json'
        progress = read_json(prog_file) if prog_file.exists() else {}
        if progress and progress.get('settings_hash') != plan['hash']:
            print(f"[{rid}] checkpoints in {d} were made with other settings: discarded", flush=True)
            shutil.rmtree(d); progress = {}
        progress.setdefault('settings_hash', plan['hash']); progress.setdefault('segments', [])
        seg = dict(started=time.strftime('%Y-%m-%d %H:%M:%S'), load_start=load_avg(), **self.git,
                   flush_denormal=bool(self.flush_denormal))
        progress['segments'].append(seg)
        atomic_write(prog_file, json.dumps(progress, indent=1))
        ctx = RunContext(self, rid, plan['settings'], progress)
        if ctx.seed is not None:
            from corsd_suite.core import seed_everything
            seed_everything(ctx.seed)
        print(f"[{rid}] {'resuming' if len(progress['segments']) > 1 else 'starting'} on {self.device}, "
              f"{torch.get_num_threads()} thread(s)", flush=True)
        t0 = time.perf_counter()
        try: result = plan['fn'](ctx)
        except BaseException:                   # an interrupted segment still counts its time and load
            seg.update(seconds=time.perf_counter() - t0, load_end=load_avg(), interrupted=True)
            atomic_write(prog_file, json.dumps(progress, indent=1))
            raise
        seg.update(seconds=time.perf_counter() - t0, load_end=load_avg(), finished=time.strftime('%Y-%m-%d %H:%M:%S'))
        self._write_run(rid, plan, progress, result)
        atomic_write(prog_file, json.dumps(progress, indent=1))

    def _write_run(self, rid:str, plan:dict, progress:dict, result):
        try: json.dumps(result)
        except TypeError as e: raise TypeError(f"run {rid}: the train function must return JSON-able results ({e})") from e
        segs, eps = progress['segments'], progress.get('epoch_seconds', {})
        all_eps = [s for v in eps.values() for s in v]
        run = dict(benchmark=self.name, run_id=rid, settings=plan['settings'], settings_hash=plan['hash'], result=result,
                   git=dict(commit=segs[-1]['commit'], dirty=segs[-1]['dirty']),
                   commits=sorted({s['commit'] for s in segs if s['commit']}), threads=torch.get_num_threads(),
                   torch=torch.__version__, python=sys.version.split()[0], device=str(self.device),
                   device_name=torch.cuda.get_device_name(self.device) if self.device.type == 'cuda' else None,
                   cores=os.cpu_count(), load_start=segs[0]['load_start'], load_end=segs[-1]['load_end'],
                   wall_seconds=sum(s.get('seconds', 0.) for s in segs), resumed=len(segs) - 1, segments=segs,
                   epoch_seconds=eps, sec_per_epoch=float(np.mean(all_eps)) if all_eps else None,
                   train_format=plan['format'], contiguous_stages=progress.get('contiguous_stages', {}),
                   command=command_line(), date=time.strftime('%Y-%m-%d'))
        run['overloaded'] = overloaded(run)
        atomic_write(self.runs_dir/f'{rid}.json', json.dumps(run, indent=1, default=float) + '\n')
        print(f"[{rid}] done in {run['wall_seconds']:.1f}s: {result}", flush=True)

    def finished(self) -> dict:
        "{run_id: run json} of the planned runs finished with the current settings"
        st = self.status()['runs']
        return {r: read_json(self.runs_dir/f'{r}.json') for r,s in st.items() if s == 'done'}

    def report(self,
               build, # `build(runs)` -> (summary dict, markdown) from {run_id: run json} of the finished runs
               name:str|None=None, # result name (default: the benchmark's)
               command:str|None=None) -> dict: # the command that reproduces it (default: this process's)
        """Summary JSON + markdown from the finished runs: `build(runs)` returns (summary dict, markdown) for
        {run_id: run json}; the page adds the run table, the missing runs and the results not used. With `--list`
        nothing is written (a listing reproduces nothing) and None is returned"""
        if getattr(self.args, 'list', False): return None
        st, runs = self.status(), self.finished()
        missing = [r for r,s in st['runs'].items() if s == 'missing']
        stale = {r: read_json(self.runs_dir/f'{r}.json') for r,s in st['runs'].items() if s == 'stale'}
        summary, md = build(runs) if runs else ({}, '_No finished run yet._')
        commits = sorted({(r['git']['commit'] or '?')[:10] + ('+dirty' if r['git']['dirty'] else '') for r in runs.values()})
        summary = dict(summary, runs=dict(done=sorted(runs), missing=missing, stale=sorted(stale), other=st['other'],
                                          commits=commits, overloaded=sorted(r for r,v in runs.items() if v['overloaded'])))
        md = f"{md}\n\n## Runs\n\n{runs_section(runs, missing, stale, st['other'])}"
        return write_result(name or self.name, summary, dict(runs=runs), md,
                            seconds=sum(r['wall_seconds'] for r in runs.values()), results=self.results, command=command)

def run_all(a, # the script's parsed flags (`a.out` names the benchmark)
            plan, # `plan(bench, a)` adds the runs
            build_report): # `build_report(a)` -> the `build(runs)` of `Benchmark.report`
    "A benchmark script's whole `main`: plan its runs, run what is missing, write its report (None with --list)"
    bench = Benchmark(a.out, a)
    plan(bench, a)
    bench.run()
    return bench.report(build_report(a))

# ------------------------------------------------------------------------------------------------------ reporting
def runs_table(runs:dict) -> str:
    "A markdown table of runs: id, commit, device, threads, format, subnormals, load, s/epoch (comparable between runs made alone)"
    if not runs: return '_none_'
    rows = [{'run': rid, 'commit': (r['git']['commit'] or '?')[:10] + ('+dirty' if r['git']['dirty'] else ''),
             'device': r['device'], 'threads': r['threads'], 'format': fmt_str(r.get('train_format'), bool(r.get('contiguous_stages'))), 'load start/end': f"{r['load_start']}/{r['load_end']}",
             'subnormals': subnormal_mode(r), 'alone': 'no (overloaded)' if r['overloaded'] else 'yes', 'resumed': r['resumed'],
             's/epoch': '' if r['sec_per_epoch'] is None else f"{r['sec_per_epoch']:.2f}" + ('' if not r['overloaded'] else ' (not comparable)'),
             'wall s': f"{r['wall_seconds']:.0f}"} for rid, r in runs.items()]
    return md_table(rows)

def subnormal_mode(run:dict) -> str:
    "How a run's segments treated subnormal floats: 'flushed', 'kept', 'mixed', '?' (made before it was recorded), 'n/a' off the CPU"
    if not str(run.get('device', 'cpu')).startswith('cpu'): return 'n/a'
    modes = {s.get('flush_denormal') for s in run.get('segments') or [{}]}
    if None in modes: return '?'
    return 'mixed' if len(modes) > 1 else 'flushed' if modes.pop() else 'kept'

def fmt_str(fmt:dict|None, contiguous:bool=False) -> str:
    """A training format in a few characters: 'channels_last, torch-foreach', 'contiguous+bf16, torch-fused', '?' (not
    recorded); `contiguous`: some stages trained contiguous where channels_last was asked"""
    if fmt is None: return '?'
    return (('channels_last' if fmt.get('channels_last') else 'contiguous') + ('+bf16' if fmt.get('bf16') else '')
            + (' → contiguous' if contiguous else '') + (f", {fmt['optimiser']}" if fmt.get('optimiser') else ''))

def runs_section(runs:dict, missing:list, stale:dict, other:list) -> str:
    "The runs part of a results page: table, code versions, missing runs, results not used and why"
    out = [runs_table(runs)]
    commits = {}
    for rid, r in runs.items(): commits.setdefault((r['git']['commit'] or '?')[:10] + ('+dirty' if r['git']['dirty'] else ''), []).append(rid)
    if len(commits) > 1:
        out.append("**Runs made with different code**: " + '; '.join(f"`{c}`: {', '.join(v)}" for c,v in commits.items()))
    if any(r['overloaded'] for r in runs.values()):
        out.append("Runs marked overloaded had a load average above their threads + 0.5: their seconds per epoch are not compared.")
    modes = {subnormal_mode(r) for r in runs.values()} - {'n/a'}
    if len(modes) > 1:
        out.append("**Subnormal floats**: runs marked `kept` or `?` computed on them, `mixed` ones in some segments, `flushed` ones set them to zero (x86 CPUs "
                   "compute on subnormals many times slower; flushing changes only values below ~1.2e-38, float32's smallest normal "
                   "number, though a training run can then take a slightly different path).")
    if any(r.get('contiguous_stages') for r in runs.values()):
        out.append("**channels_last → contiguous**: these runs' models have a 1×1 strided convolution on at most 8 input channels, "
                   "whose channels_last weight gradient corrupts the heap in torch 2.14.1's CPU backend; the runner trained them "
                   "contiguous (`runner.channels_last_hazards`).")
    out.append("**Missing runs** (not run yet): " + (', '.join(missing) if missing else 'none'))
    if stale: out.append("**Not used** (made with other settings than the current ones; rerun to replace): " +
                         ', '.join(f"{r} (settings {v['settings_hash']}, commit {(v['git']['commit'] or '?')[:10]})" for r,v in stale.items()))
    if other: out.append("**Not used** (result files of runs that are no longer planned): " + ', '.join(other))
    return '\n\n'.join(out)

def by(runs:dict, key:str) -> dict:
    "The results of `runs` grouped by the value of their setting `key` (e.g. the arm): {value: [result, ...]}"
    out = {}
    for r in runs.values(): out.setdefault(r['settings'].get(key), []).append(r['result'])
    return out

def sec_per_epoch(runs:dict, key:str) -> dict:
    "Mean seconds per epoch for each value of setting `key`, from runs made alone on the machine only (None if none)"
    out = {}
    for r in runs.values():
        if r['sec_per_epoch'] is not None and not r['overloaded']: out.setdefault(r['settings'].get(key), []).append(r['sec_per_epoch'])
    return {k: float(np.mean(out[k])) if k in out else None for k in {r['settings'].get(key) for r in runs.values()}}
