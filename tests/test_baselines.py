"Baselines (AdaBN, DANN): what each changes, bad input, and that they live in corsd_suite.baselines."
import copy, pytest, torch
from torch import nn
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from corsd_suite.core import seed_everything
from corsd_suite.data import TensorDL, image_dls
from corsd_suite.models import dtn
from corsd_suite.calibrator import shifted_digits
from corsd_suite.baselines import adabn, dann_adapt

_BN_KEYS = ('running_mean', 'running_var', 'num_batches_tracked')

@pytest.fixture(scope='module')
def setup():
    seed_everything(0)
    pair = shifted_digits(16)
    dls = image_dls(pair.source_train.subset(range(128)), pair.target_eval.subset(range(64)), bs=32, device='cpu')
    clf = dtn(1, 10, dls.stats, width=0.25, size=16)
    learn = Learner(dls, clf, loss_func=CrossEntropyLossFlat())
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 3e-3)
    return pair, dls, clf.eval()

def test_adabn_changes_only_bn_statistics(setup):
    pair, dls, clf = setup
    ab = adabn(copy.deepcopy(clf), TensorDL(pair.target_adapt, 64))
    w = clf.state_dict()
    moved = [k for k,v in ab.state_dict().items() if not torch.equal(v, w[k])]
    assert moved and all(k.rsplit('.', 1)[-1] in _BN_KEYS for k in moved)
    assert not ab.training
    bns = [m for m in ab.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(m.momentum == 0.1 for m in bns)                       # momentum restored
    with pytest.raises(ValueError, match='no BatchNorm'): adabn(nn.Linear(2, 2), TensorDL(pair.target_adapt, 64))
    with pytest.raises(ValueError, match='yielded no images'): adabn(copy.deepcopy(clf), TensorDL(pair.target_adapt.subset([]), 64))
    with pytest.raises(ValueError, match='max_batches'): adabn(copy.deepcopy(clf), TensorDL(pair.target_adapt, 64), max_batches=0)

def test_dann_fine_tunes(setup):
    pair, dls, clf = setup
    tdl = TensorDL(pair.target_adapt, 32, shuffle=True, drop_last=True)
    dn = dann_adapt(copy.deepcopy(clf), dls.train, tdl, iters=3)
    assert any(not torch.equal(a, b) for a, b in zip(dn.parameters(), clf.parameters()))
    assert not dn.training
    with pytest.raises(ValueError, match='iters'): dann_adapt(copy.deepcopy(clf), dls.train, tdl, iters=0)
    with pytest.raises(ValueError, match='lr'): dann_adapt(copy.deepcopy(clf), dls.train, tdl, lr=-1.)
    with pytest.raises(ValueError, match='target DataLoader is empty'):
        dann_adapt(copy.deepcopy(clf), dls.train, TensorDL(pair.target_adapt.subset([]), 32))

def test_moved_out_of_the_calibrator():
    import corsd_suite.calibrator as cal
    assert not hasattr(cal, 'adabn') and not hasattr(cal, 'dann_adapt')

def test_endless_whole_batches_refuses_empty():
    from corsd_suite.calibration import endless
    b = (torch.zeros(2, 1, 4, 4), torch.tensor([0, 1]))
    it = endless([b], 'source DataLoader', whole=True)
    assert all(next(it) is b for _ in range(3))
    with pytest.raises(ValueError, match='the source DataLoader yielded no images'): next(endless([], 'source DataLoader', whole=True))
