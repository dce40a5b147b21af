"Shared test helpers: run a Learner under 2-process DDP on CPU (gloo), and round-trip learn.save/learn.load."
import os, socket, tempfile, traceback
from pathlib import Path
import torch, torch.distributed as dist, torch.multiprocessing as mp
import fastai.distributed  # Learner.to_distributed
import corsd_suite.core  # DistributedDL broadcasts on CPU under gloo
from corsd_suite.core import StatefulCallback

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

def _worker(rank, world, port, fn, args, out_dir):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS='1')
    torch.set_num_threads(1)
    dist.init_process_group('gloo', rank=rank, world_size=world)
    try: res, err = fn(rank, *args), None
    except Exception: res, err = None, traceback.format_exc()
    finally:
        dist.barrier() if err is None else None
        dist.destroy_process_group()
    torch.save(dict(res=res, err=err), Path(out_dir)/f'rank{rank}.pt')

def run_ddp(fn, *args, world:int=2, timeout:float=300):
    """Run `fn(rank, *args)` in `world` processes joined in a gloo process group on CPU; returns each rank's result.
    `fn` must be importable (a module-level function) and its result picklable. Inside, build the Learner and call
    `learn.to_distributed(sync_bn=False, cpu=True)` (see `ddp_learner_fit`)."""
    with tempfile.TemporaryDirectory() as d:
        ctx = mp.start_processes(_worker, args=(world, _free_port(), fn, args, d), nprocs=world, join=False, start_method='spawn')
        while not ctx.join(timeout): pass
        outs = [torch.load(Path(d)/f'rank{r}.pt', weights_only=False) for r in range(world)]
    errs = [o['err'] for o in outs if o['err']]
    if errs: raise RuntimeError('a DDP worker failed:\n' + errs[0])
    return [o['res'] for o in outs]

def ddp_fit(learn, epochs:int=1, lr:float=1e-3):
    "Fit `learn` for `epochs` under fastai's DistributedTrainer on CPU (call inside a `run_ddp` worker)"
    learn.to_distributed(sync_bn=False, cpu=True)
    with learn.no_bar(), learn.no_logging(): learn.fit(epochs, lr)
    return learn

def params_digest(model) -> float:
    "A number that changes when any parameter changes (to compare models across ranks)"
    return float(sum(p.detach().double().sum() * (i+1) for i,p in enumerate(model.parameters())))

def roundtrip_save_load(learn, make_learner, tmp_path, name:str='roundtrip'):
    """`learn.save` (with its callbacks' state), build a fresh Learner with `make_learner()`, `load` into it, and
    return it. Asserts the model's state dict and every `StatefulCallback`'s state came back equal."""
    learn.path = Path(tmp_path); learn.model_dir = 'models'
    learn.save(name, with_opt=True)
    new = make_learner()
    new.path = Path(tmp_path); new.model_dir = 'models'
    new.load(name, with_opt=True)
    sa, sb = learn.model.state_dict(), new.model.state_dict()
    assert sa.keys() == sb.keys(), set(sa) ^ set(sb)
    for k in sa: assert torch.equal(sa[k].cpu(), sb[k].cpu()), f"model tensor {k} differs after load"
    for cb in learn.cbs:
        if isinstance(cb, StatefulCallback):
            other = [c for c in new.cbs if type(c) is type(cb)]
            assert other, f"the new learner lacks a {type(cb).__name__}"
            _assert_same(cb.state_dict(), other[0].state_dict(), type(cb).__name__)
    return new

def _assert_same(a, b, where):
    "Recursively compare two states (dicts, lists, tensors, numbers)"
    if isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys differ {set(a) ^ set(b)}"
        for k in a: _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i,(x,y) in enumerate(zip(a,b)): _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor): assert torch.equal(a.cpu(), b.cpu()), f"{where} differs after load"
    else: assert a == b, f"{where}: {a!r} != {b!r}"
