"No file the package writes or reads runs code: checkpoints, compressed models and fastai's own save/load, tried with a pickle payload."
import re, subprocess, sys, torch, pytest
from pathlib import Path
from fastai.learner import Learner
import corsd_suite
from corsd_suite.core import seed_everything, save_checkpoint, load_checkpoint, CheckpointError, CHECKPOINT_FORMAT
from corsd_suite.data import digits_dls
from corsd_suite.models import zoo_learner, lenet5
from corsd_suite.admm import ADMMCallback, HardPruneCallback, lenet5_targets, export_compressed, load_compressed

TG = lenet5_targets(keep=dict(fc1=.05), bits=3)

class Payload:
    "Unpickling this writes `marker`: proof that loading ran code"
    def __init__(self, marker): self.marker = str(marker)
    def __reduce__(self): return (Path(self.marker).write_text, ('code ran',))

def _learner():
    seed_everything(0)
    return zoo_learner(digits_dls(16, bs=32, device='cpu'), 'lenet5', cbs=[ADMMCallback(TG), HardPruneCallback(TG)])

def _poisoned(good:Path, bad:Path, marker:Path, key='model'):
    "A copy of the torch file `good` with a `Payload` slipped into its top-level dict"
    d = torch.load(good, weights_only=True)
    d['evil'] = Payload(marker)
    if key in d and isinstance(d[key], dict): d[key] = {**d[key], 'evil': Payload(marker)}
    torch.save(d, bad)
    return bad

def test_payload_is_live(tmp_path):
    "The payload does run when a file is unpickled without `weights_only` (so the tests below can fail)"
    m = tmp_path/'ran'; torch.save({'x': Payload(m)}, tmp_path/'p.pth')
    torch.load(tmp_path/'p.pth', weights_only=False)
    assert m.exists()

def test_load_checkpoint_runs_no_code(tmp_path):
    learn = _learner(); learn.create_opt()
    good = save_checkpoint(learn, tmp_path/'good.ckpt')
    marker = tmp_path/'ran'
    bad = _poisoned(good, tmp_path/'bad.ckpt', marker)
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    with pytest.raises(CheckpointError, match='bad.ckpt'): load_checkpoint(learn, bad)
    assert not marker.exists()
    for k, v in learn.model.state_dict().items(): torch.testing.assert_close(v, before[k], rtol=0, atol=0, equal_nan=True)
    load_checkpoint(learn, good)                                  # the clean file loads

def test_load_compressed_runs_no_code(tmp_path):
    learn = _learner()
    good = export_compressed(learn.model, tmp_path/'m.pth', input_shape=(1, 16, 16))
    marker = tmp_path/'ran'
    bad = _poisoned(good, tmp_path/'bad.pth', marker, key='state_dict')
    with pytest.raises(ValueError, match='bad.pth'): load_compressed(lenet5(size=16), bad)
    assert not marker.exists()
    load_compressed(lenet5(size=16, stats=learn.dls.stats), good)

def test_fastai_load_runs_no_code(tmp_path):
    "fastai's own learn.load reads the files learn.save writes for these learners weights-only, and refuses a payload"
    learn = _learner(); learn.path = tmp_path
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    f, plain = learn.save('m'), learn.save('plain', with_opt=False)
    torch.load(plain, weights_only=True)                          # no pickled objects in it: ADMM/pruning state is tensors
    marker = tmp_path/'ran'
    _poisoned(plain, tmp_path/'models'/'bad.pth', marker)
    with pytest.raises(Exception, match='Weights only load failed'): learn.load('bad', with_opt=False)
    assert not marker.exists()
    new = _learner(); new.path = tmp_path
    new.load('m')                                                 # a new learner with the same callbacks loads the clean file
    assert torch.equal(new.model.admm.Z_head_1, learn.model.admm.Z_head_1)

def test_everything_written_loads_weights_only(tmp_path):
    learn = _learner()
    for f in (save_checkpoint(learn, tmp_path/'c.ckpt'), export_compressed(learn.model, tmp_path/'e.pth', input_shape=(1, 16, 16))):
        torch.load(f, weights_only=True)
    assert torch.load(tmp_path/'c.ckpt', weights_only=True)['format'] == CHECKPOINT_FORMAT

def test_no_unsafe_load_in_the_package():
    src = Path(corsd_suite.__file__).parent
    hits = [f"{p.name}:{i+1}" for p in src.glob('*.py') for i, l in enumerate(p.read_text().splitlines())
            if re.search(r'weights_only\s*=\s*False', l) or re.search(r'\bpickle\.loads?\(', l)]
    assert not hits, f"unsafe loads in the package: {hits}"

def test_learner_save_load_are_fastais():
    import importlib, pkgutil
    for m in pkgutil.iter_modules(corsd_suite.__path__): importlib.import_module(f'corsd_suite.{m.name}')
    assert Learner.save.__module__ == 'fastai.learner' and Learner.load.__module__ == 'fastai.learner'
    import inspect
    assert inspect.getsourcefile(Learner.save).endswith('fastai/learner.py') and inspect.getsourcefile(Learner.load).endswith('fastai/learner.py')

def test_imports_without_accelerate():
    "A wheel without extras imports every module (fastai.distributed needs accelerate)"
    code = ("import sys, importlib, pkgutil; sys.modules['accelerate'] = None\n"
            "import corsd_suite\n"
            "for m in pkgutil.iter_modules(corsd_suite.__path__): importlib.import_module(f'corsd_suite.{m.name}')\n"
            "print('ok')")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and 'ok' in r.stdout, r.stderr[-2000:]
