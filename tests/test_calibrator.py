"Calibrator: save/load of the whole adaptation state, 2-process DDP, mixed precision, bad input, demo row."
import copy, pytest, torch
from torch import nn
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from helpers import run_ddp, params_digest, roundtrip_save_load
from corsd_suite.core import seed_everything, DEMO_ROWS
from corsd_suite.data import TensorDL, image_dls, ImageSet
from corsd_suite.models import dtn
from corsd_suite.calibrator import (Calibrator, CalibratorCallback, calibrator_learner, shifted_digits, bn_state,
                                    CalibratedModel, calibrator_row)

def _setup(n=128, bs=32, seed=0):
    seed_everything(seed)
    pair = shifted_digits(16)
    dls = image_dls(pair.source_train.subset(range(n)), pair.target_eval.subset(range(64)), bs=bs, device='cpu')
    clf = dtn(1, 10, dls.stats, width=0.25, size=16).eval()
    return pair, dls, clf, TensorDL(pair.target_adapt, bs, shuffle=True, drop_last=True, device='cpu')

def _learner(seed=0, **kw):
    pair, dls, clf, tdl = _setup(seed=seed)
    return calibrator_learner(dls, clf, tdl, cal=Calibrator(1, n_blocks=1), **kw)

def _cb(learn): return learn.cbs.filter(lambda c: isinstance(c, CalibratorCallback))[0]

def _fit(learn, n=1, lr=1e-3):
    with learn.no_bar(), learn.no_logging(): learn.fit(n, lr)
    return learn

def test_save_load_roundtrip(tmp_path):
    learn = _fit(_learner())
    cb = _cb(learn)
    assert cb.d_steps == 4 and len(cb.d_opt.state) > 0           # the discriminators' Adam has moments to save
    new = roundtrip_save_load(learn, _learner, tmp_path)          # model, calibrator opt, both discriminators, their opt, d_steps
    nc = _cb(new)
    assert nc.d_steps == 4
    for a,b in zip(cb.d_opt.state_dict()['state'].values(), nc.d_opt.state_dict()['state'].values()):
        assert torch.equal(a['exp_avg'], b['exp_avg'])
    assert len(new.opt.state) > 0 or new.opt.state_dict()['state']  # calibrator optimiser state came back too
    _fit(new)                                                      # training resumes from the loaded state
    assert nc.d_steps == 8

def _ddp_rank(rank):
    from helpers import ddp_fit
    seed_everything(0)
    learn = _learner()
    clf0 = copy.deepcopy(learn.model.clf.state_dict())
    ddp_fit(learn, 1, 1e-3)
    m = learn.model.module if hasattr(learn.model, 'module') else learn.model
    cb = _cb(learn)
    same = all(torch.equal(v, clf0[k]) for k,v in m.clf.state_dict().items())
    return dict(cal=params_digest(m.cal), d=params_digest(cb.d_out) + params_digest(cb.d_pix), iters=cb.d_steps, clf_same=same)

def test_ddp_two_ranks():
    r0, r1 = run_ddp(_ddp_rank)
    assert r0['iters'] == r1['iters'] == 2                         # 4 source batches shared by 2 ranks
    assert abs(r0['cal'] - r1['cal']) < 1e-6 and abs(r0['d'] - r1['d']) < 1e-6   # replicas agree (calibrator by DDP, discriminators by the callback)
    assert r0['clf_same'] and r1['clf_same']
    seed_everything(0)
    assert abs(params_digest(_learner().model.cal) - r0['cal']) > 1e-6   # and they trained

@pytest.mark.parametrize('mode', ['fp16', 'bf16'])
def test_mixed_precision(mode):
    learn = _learner()
    clf0 = copy.deepcopy(learn.model.clf.state_dict())
    learn = learn.to_fp16() if mode == 'fp16' else learn.to_bf16()
    _fit(learn)
    cb = _cb(learn)
    assert len(cb.history) == 4 and all(torch.isfinite(torch.tensor([h['g_loss'], h['d_loss']])).all() for h in cb.history)
    assert all(torch.equal(v, clf0[k]) for k,v in learn.model.clf.state_dict().items())

def test_bad_input():
    pair, dls, clf, tdl = _setup()
    small = TensorDL(pair.target_adapt.resize(12), 32, shuffle=True, drop_last=True)
    with pytest.raises(ValueError, match='target images'): _fit(calibrator_learner(dls, copy.deepcopy(clf), small, cal=Calibrator(1, n_blocks=1)))
    rgb = TensorDL(pair.target_adapt.to_channels(3), 32, shuffle=True, drop_last=True)
    with pytest.raises(ValueError, match='target images'): _fit(calibrator_learner(dls, copy.deepcopy(clf), rgb, cal=Calibrator(1, n_blocks=1)))
    empty = TensorDL(pair.target_adapt.subset(range(10)), 32, shuffle=True, drop_last=True)   # fewer images than a batch
    with pytest.raises(ValueError, match='yielded no images'): _fit(calibrator_learner(dls, copy.deepcopy(clf), empty, cal=Calibrator(1, n_blocks=1)))
    clf7 = dtn(1, 7, dls.stats, width=0.25, size=16)
    with pytest.raises(ValueError, match='class count'): _fit(calibrator_learner(dls, clf7, tdl, cal=Calibrator(1, n_blocks=1)))
    from fastai.torch_core import params
    bad = Learner(dls, CalibratedModel(Calibrator(1, n_blocks=1), copy.deepcopy(clf)), loss_func=CrossEntropyLossFlat(),
                  splitter=lambda m: [params(m)], cbs=CalibratorCallback(tdl, n_classes=10))
    with pytest.raises(ValueError, match='optimiser'): _fit(bad)    # a splitter that hands the classifier to the optimiser
    with pytest.raises(ValueError, match='channels'): Calibrator(1)(torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match='mode'): Calibrator(1, mode='both')

def test_frozen_bn_buffers_identical_and_code_faithful_moves():
    learn = _learner()
    bn0 = bn_state(learn.model.clf)
    _fit(learn, 2)
    assert all(torch.equal(v, bn0[k]) for k,v in bn_state(learn.model.clf).items())
    cf = _fit(_learner(code_faithful_bn=True))
    assert not all(torch.equal(v, bn0[k]) for k,v in bn_state(cf.model.clf).items())

def test_demo_row_registered():
    order, f = DEMO_ROWS['Calibrator']
    assert order == 30 and f is calibrator_row
