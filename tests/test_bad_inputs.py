"""Every learner of the package, fed the five bad batches a careless loader makes (uint8 pixels, floats on the 0–255 scale,
NaN pixels, the wrong channel count, labels past the last class), stops at the first batch with an error naming the
problem; `reverse_pgd` and `evaluate_accuracy` use the same check. A good batch still trains."""
import copy, re, pytest, torch
from fastai.callback.core import Callback
from corsd_suite.core import seed_everything
from corsd_suite.data import digits, image_dls, TensorDL, cluttered
from corsd_suite.models import zoo_learner, dtn
from corsd_suite.corsd import byot_learner, corsd_learner
from corsd_suite.mgnet import mgnet_learner, backbone_learner
from corsd_suite.calibration import Calibrator
from corsd_suite.calibrator import calibrator_learner, shifted_digits
from corsd_suite.reverse_adversarial import reverse_adv_learner, reverse_pgd
from corsd_suite.admm import ADMMCallback, HardPruneCallback, lenet5_targets
from corsd_suite.evaluate import evaluate_accuracy
from corsd_suite.interop import BatchCheck, check_input_batch

BAD = {   # name: (what the loader gives instead of a good batch, what the error must say)
    'uint8':    (lambda x, y: ((x * 255).round().byte(), y), 'dtype torch.uint8'),
    '0-255':    (lambda x, y: (x * 255, y), 'scale them to [0, 1]'),
    'nan':      (lambda x, y: (torch.where(x > .5, float('nan'), x), y), 'NaN'),
    'channels': (lambda x, y: (x.expand(-1, 3, -1, -1).contiguous(), y), 'channels'),
    'labels':   (lambda x, y: (x, y + 10), 'labels run from'),
}

class Corrupt(Callback):
    "Turn every batch into a bad one before any other callback sees it, as a broken loader would"
    order = -50
    def __init__(self, f): self.f = f
    def before_batch(self):
        x, y = self.f(self.learn.xb[0], self.learn.yb[0])
        self.learn.xb, self.learn.yb = (x,), (y,)

def _digits(n=64, bs=16, size=16):
    tr, va = digits(size).split(0.25, 0)
    return image_dls(tr.subset(range(n)), va.subset(range(32)), bs=bs, device='cpu')

def _cluttered():
    tr, va = digits(8).split(0.2, 0)
    return image_dls(cluttered(tr.subset(range(32)), 16, 1, 3, seed=1), cluttered(va.subset(range(16)), 16, 1, 3, seed=2), bs=16, device='cpu')

def _calibrator():
    pair = shifted_digits(16)
    dls = image_dls(pair.source_train.subset(range(64)), pair.target_eval.subset(range(32)), bs=16, device='cpu')
    tdl = TensorDL(pair.target_adapt, 16, shuffle=True, drop_last=True, device='cpu')
    return calibrator_learner(dls, dtn(1, 10, dls.stats, width=0.25, size=16).eval(), tdl, cal=Calibrator(1, n_blocks=1))

def _reverse():
    dls = _digits()
    clf = zoo_learner(dls, 'lenet5').model.eval()
    return reverse_adv_learner(dls, clf, model_kw=dict(n_blocks=1, ngf=4))

def _with(cb):
    learn = zoo_learner(_digits(), 'lenet5'); learn.add_cb(cb); return learn

LEARNERS = {
    'zoo': lambda: zoo_learner(_digits(), 'lenet5'),
    'byot': lambda: byot_learner(_digits(), 'resnet8', model_kw=dict(width=0.25)),
    'corsd': lambda: corsd_learner(_digits(n=96, bs=24), 'resnet8', model_kw=dict(width=0.25)),
    'mgnet': lambda: mgnet_learner(_cluttered(), 'resnet8', model_kw=dict(n_glimpses=2, down_factor=2., width=0.25)),
    'backbone': lambda: backbone_learner(_cluttered(), 'resnet8', model_kw=dict(width=0.25)),
    'calibrator': _calibrator,
    'reverse_adversarial': _reverse,
    'admm': lambda: _with(ADMMCallback(lenet5_targets())),
    'hard_prune': lambda: _with(HardPruneCallback(lenet5_targets())),
}

@pytest.mark.parametrize('name', list(LEARNERS))
def test_every_learner_names_every_bad_batch(name):
    seed_everything(0)
    learn = LEARNERS[name]()
    assert any(isinstance(c, BatchCheck) for c in learn.cbs), f"{name} has no BatchCheck"
    if name == 'hard_prune':
        with learn.no_bar(), learn.no_logging(): learn.fit(0)        # the masks go on at the start of a fit, by design
    before = {k: v.detach().clone() for k, v in learn.model.named_parameters()}
    for bad, (f, msg) in BAD.items():
        with learn.no_bar(), learn.no_logging(), pytest.raises(ValueError, match=re.escape(msg)):
            learn.fit(1, 1e-3, cbs=Corrupt(f))
    after = dict(learn.model.named_parameters())
    assert all(torch.equal(before[k], after[k]) for k in before), "a bad batch trained the model"
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)       # and the same learner then trains on good batches

def test_validation_and_predictions_are_checked():
    "validate and get_preds check their own first batch (a fit's check does not cover them)"
    learn = zoo_learner(_digits(), 'lenet5')
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    for bad, (f, msg) in BAD.items():
        with learn.no_bar(), pytest.raises(ValueError, match=re.escape(msg)): learn.validate(cbs=Corrupt(f))
        with learn.no_bar(), pytest.raises(ValueError, match=re.escape(msg)): learn.get_preds(cbs=Corrupt(f))

def test_reverse_pgd_and_evaluate_check_their_input():
    dls = _digits()
    m = zoo_learner(dls, 'lenet5').model.eval()
    x, y = dls.one_batch()
    for bad in ('uint8', '0-255', 'nan'):
        xb, _ = BAD[bad][0](x, y)
        with pytest.raises(ValueError, match=re.escape(BAD[bad][1])): reverse_pgd(m, xb, eps=0.01, steps=1)
        with pytest.raises(ValueError, match=re.escape(BAD[bad][1])): evaluate_accuracy(m, [(xb, y)], show=False)
    with pytest.raises(ValueError, match="labels run from 10 to"): evaluate_accuracy(m, [(x, y + 10)], show=False)
    assert 0 <= evaluate_accuracy(m, [(x, y)], show=False) <= 1

def test_own_scale_on_purpose():
    "A learner whose data is on a scale of its own trains once the range check is switched off (the other checks stay)"
    learn = zoo_learner(_digits(), 'lenet5')
    with learn.no_bar(), learn.no_logging(), pytest.raises(ValueError, match='scale them'): learn.fit(1, cbs=Corrupt(BAD['0-255'][0]))
    learn.batch_check.pixel_range = None
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-4, cbs=Corrupt(BAD['0-255'][0]))
    with learn.no_bar(), learn.no_logging(), pytest.raises(ValueError, match='NaN'): learn.fit(1, cbs=Corrupt(BAD['nan'][0]))
    with pytest.raises(ValueError, match='float64'): check_input_batch(torch.rand(2, 1, 4, 4, dtype=torch.float64))
