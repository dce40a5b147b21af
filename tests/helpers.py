"Shared test helpers: run a Learner under 2-process DDP on CPU (gloo), and round-trip learn.save/learn.load and checkpoints."
import gc, os, socket, sys, tempfile, traceback
from pathlib import Path
import torch, torch.distributed as dist, torch.multiprocessing as mp
import fastai.distributed  # Learner.to_distributed
import corsd_suite.core  # DistributedDL broadcasts on CPU under gloo
from corsd_suite.core import save_checkpoint, load_checkpoint

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

def _worker(rank, world, port, fn, args, out_dir):
    """One rank: run `fn`, save its result, tear the process group down, then leave with `os._exit`. A spawned child
    otherwise ends in interpreter finalisation, where gloo's C++ threads can be destroyed out of order and abort the
    process ("terminate called without an active exception", seen once in CI after a rank had finished its work);
    a forked child leaves with `os._exit` anyway. Objects are collected while the process group is still alive."""
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS='1')
    torch.set_num_threads(1)
    dist.init_process_group('gloo', rank=rank, world_size=world)
    try: res, err = fn(rank, *args), None
    except Exception: res, err = None, traceback.format_exc()
    gc.collect()                              # the DDP wrapper and its reducer go while the process group lives
    torch.save(dict(res=res, err=err), Path(out_dir)/f'rank{rank}.pt')
    code = 0
    try:
        if err is None: dist.barrier()
        dist.destroy_process_group()
    except Exception: traceback.print_exc(); code = 1
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(code)

def run_ddp(fn, *args, world:int=2, timeout:float=300):
    """Run `fn(rank, *args)` in `world` processes joined in a gloo process group on CPU; returns each rank's result.
    `fn` must be importable (a module-level function) and its result picklable. Inside, build the Learner and call
    `learn.to_distributed(sync_bn=False, cpu=True)` (see `ddp_learner_fit`)."""
    with tempfile.TemporaryDirectory() as d:
        ctx = mp.start_processes(_worker, args=(world, _free_port(), fn, args, d), nprocs=world, join=False, start_method='spawn')
        try:
            while not ctx.join(timeout): pass
            exited = None
        except mp.ProcessExitedException as e: exited = e   # a rank died: say why, with any rank's own traceback
        files = [Path(d)/f'rank{r}.pt' for r in range(world)]
        outs = [torch.load(f, weights_only=False) if f.exists() else dict(res=None, err=None) for f in files]
    errs = [o['err'] for o in outs if o['err']]
    if errs or exited: raise RuntimeError(f"a DDP worker failed ({exited or 'it raised'}):\n" + (errs[0] if errs else ''))
    return [o['res'] for o in outs]

def ddp_fit(learn, epochs:int=1, lr:float=1e-3):
    "Fit `learn` for `epochs` under fastai's DistributedTrainer on CPU (call inside a `run_ddp` worker)"
    learn.to_distributed(sync_bn=False, cpu=True)
    with learn.no_bar(), learn.no_logging(): learn.fit(epochs, lr)
    return learn

def params_digest(model) -> float:
    "A number that changes when any parameter changes (to compare models across ranks)"
    return float(sum(p.detach().double().sum() * (i+1) for i,p in enumerate(model.parameters())))

def assert_same_state(a, b, what:str='model'):
    "The state dicts of modules `a` and `b` have the same keys and bit-identical tensors (NaN equal to NaN)"
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys(), f"{what}: keys differ {set(sa) ^ set(sb)}"
    for k in sa: torch.testing.assert_close(sa[k].cpu(), sb[k].cpu(), rtol=0, atol=0, equal_nan=True, msg=f"{what} tensor {k} differs")

def roundtrip_save_load(learn, make_learner, tmp_path, name:str='roundtrip'):
    """fastai's `learn.save`, a fresh Learner from `make_learner()`, fastai's `load` into it; returns it. Method state
    lives in modules on the model, so asserting the model's state dict came back equal covers it."""
    learn.path = Path(tmp_path); learn.model_dir = 'models'
    learn.save(name, with_opt=True)
    new = make_learner()
    new.path = Path(tmp_path); new.model_dir = 'models'
    new.load(name, with_opt=True)
    assert_same_state(learn.model, new.model)
    return new

def roundtrip_checkpoint(learn, make_learner, tmp_path, name:str='roundtrip.ckpt', extra=None):
    "`save_checkpoint`, a fresh Learner from `make_learner()`, `load_checkpoint` into it; returns (new learner, extra)"
    f = save_checkpoint(learn, Path(tmp_path)/name, extra=extra)
    new = make_learner()
    got = load_checkpoint(new, f)
    assert_same_state(learn.model, new.model)
    return new, got

# ------------------------------------------------------------------------------- interrupts and resumes, for every method
from fastai.callback.core import Callback, CancelFitException

TRAIN_EVENTS = ('before_fit', 'before_epoch', 'before_train', 'before_batch', 'after_pred', 'after_loss', 'before_backward',
                'after_backward', 'before_step', 'after_step', 'after_batch', 'after_train', 'before_validate',
                'after_validate', 'after_epoch', 'after_fit')
BATCH_EVENTS = ('before_batch', 'after_pred', 'after_loss', 'after_batch')   # these come in validation too

class RaiseAt(Callback):
    "Raise `exc` the first time `event` comes (a user's Ctrl-C, or a callback cancelling the fit); `valid`: in the validation phase"
    def __init__(self, event:str, exc=KeyboardInterrupt, order:int=0, valid:bool=False):
        self.event, self.exc, self.order, self.valid, self.fired = event, exc, order, valid, False
    def __call__(self, event_name):
        phase_ok = event_name not in BATCH_EVENTS or self.learn.training != self.valid
        if event_name == self.event and not self.fired and phase_ok: self.fired = True; raise self.exc()
        return super().__call__(event_name)

class SaveAndStop(Callback):
    "Save a checkpoint after `n` epochs (with `extra={'epoch': n}`), then stop the fit there, as a killed run would"
    order = 95
    def __init__(self, file, n:int=1): self.file, self.n = file, n
    def after_epoch(self):
        if self.epoch + 1 == self.n:
            save_checkpoint(self.learn, self.file, extra=dict(epoch=self.n))
            raise CancelFitException()

def bench_module(name:str):
    "The script `benchmarks/<name>.py` imported as a module (its folder on `sys.path`, for its `runner` and `common`)"
    import importlib.util
    root = Path(__file__).resolve().parents[1]/'benchmarks'
    if str(root) not in sys.path: sys.path.insert(0, str(root))
    spec = importlib.util.spec_from_file_location(f'{name}_bench', root/f'{name}.py')
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
    return m
