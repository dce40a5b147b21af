"Calibrator on a fastai user's own DataBlock (PNGs, aug_transforms, Normalize) and own model: build, fit, export/load/predict, deployable, Normalize equivalence."
import copy, pickle, pytest, torch
import matplotlib; matplotlib.use('Agg')
import matplotlib.pyplot as plt
from torch import nn
from fastai.learner import load_learner
from fastai.vision.all import (DataBlock, ImageBlock, CategoryBlock, get_image_files, parent_label, RandomSplitter, Resize,
                               Normalize, aug_transforms, imagenet_stats, TensorImage)
from own_data import *
from corsd_suite.core import seed_everything
from corsd_suite.models import Normalize as NormLayer
from corsd_suite.interop import deployable, PixelMap, batch_normalize
from corsd_suite.calibration import Calibrator, CalibratedModel
from corsd_suite.calibrator import calibrator_learner, CalibratorCallback, CalibratorModule

N, BS = 24, 8   # 18 training images: 2 batches of 8 (fastai drops the last one), 6 validation images
SMALL = 16      # image side for the tests that need no particular model: 4× less compute than `block_dls`' 32

def _cb(learn): return learn.cbs.filter(lambda c: isinstance(c, CalibratorCallback))[0]
def _fit(learn, n=1, lr=1e-4):
    with learn.no_bar(), learn.no_logging(): learn.fit(n, lr)
    return learn

def _dls(norm=True, stats=imagenet_stats, aug=True, seed=0, n=N, size=SMALL):
    "Like `block_dls`, with the `Normalize` statistics of our choosing (a target loader may normalise otherwise than the source)"
    if not norm or stats is imagenet_stats: return block_dls(norm=norm, bs=BS, n=n, aug=aug, seed=seed, size=size)
    tfms = (aug_transforms(size=size, do_flip=False, max_rotate=5.) if aug else []) + [Normalize.from_stats(*stats)]
    db = DataBlock(blocks=(ImageBlock, CategoryBlock), get_items=get_image_files, get_y=parent_label,
                   splitter=RandomSplitter(0.25, seed=seed), item_tfms=Resize(size), batch_tfms=tfms)
    return db.dataloaders(digit_pngs(n, size), bs=BS, device='cpu', num_workers=0)

def _small_net():
    "A small classifier with BatchNorm (frozen BN must stay frozen) for the equivalence tests"
    return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

@pytest.mark.parametrize('name', list(MODELS))
def test_own_model_fit_export_predict_deploy(name, tmp_path):
    "Any fastai DataLoaders and target loader, the method's own arguments only: fit, export → load_learner → predict, deployable"
    seed_everything(0)
    dls, tdls = _dls(size=SIZE), _dls(seed=1, size=SIZE)                  # `block_dls` as a user writes it, 32×32
    learn = calibrator_learner(dls, MODELS[name](), tdls.train)
    m = learn.model
    assert isinstance(m, CalibratorModule) and m.cal.n_in == 3 and m.d_out.n_classes == 10
    torch.testing.assert_close(m.pixels.mean.flatten(), torch.tensor(imagenet_stats[0]))   # the source loaders' Normalize
    clf0 = copy.deepcopy(m.clf.state_dict())
    _fit(learn)
    assert int(m.d_steps) == 2 and len(_cb(learn).history) == 2
    assert all(torch.equal(v, clf0[k]) for k, v in m.clf.state_dict().items())             # the classifier stays frozen
    learn.export(tmp_path/'cal.pkl')
    back = load_learner(tmp_path/'cal.pkl')
    png = get_image_files(dls.path)[0]
    with learn.no_bar(), back.no_bar(): p0, p1 = learn.predict(png), back.predict(png)
    assert p1[0] in dls.vocab and p1[0] == p0[0]
    torch.testing.assert_close(p1[2], p0[2])
    dep = deployable(learn)
    assert type(dep) is CalibratedModel and not any(hasattr(dep, k) for k in ('d_out', 'd_pix', 'd_state', 'tgt_state'))
    fresh = CalibratedModel(Calibrator(3), MODELS[name](), pixels=PixelMap(batch_normalize(dls)))
    fresh.load_state_dict(dep.state_dict(), strict=True)
    x = dls.valid.one_batch()[0]
    with torch.no_grad(): torch.testing.assert_close(fresh.eval()(x), learn.model.eval()(x), rtol=0, atol=0)

def _twin_learners(target_stats=imagenet_stats, seed=0, cal_kw=None):
    "The same classifier, seed and calibrator init: (A) `clf` on loaders with Normalize, (B) `Sequential(Normalize, clf)` on loaders without"
    torch.manual_seed(1)
    clf = _small_net().eval()
    res = []
    for norm in (True, False):
        seed_everything(seed)
        dls, tdl = _dls(norm=norm), _dls(norm=norm, stats=target_stats, seed=1).train
        net = copy.deepcopy(clf) if norm else nn.Sequential(NormLayer(*imagenet_stats), copy.deepcopy(clf))
        res.append(calibrator_learner(dls, net, tdl, cal=Calibrator(3, n_blocks=1, **(cal_kw or {}))))
    return res

def _same_images(a, b):
    "Validation batches of both twins: the same images, standardised for A, pixels for B"
    xa, ya = a.dls.valid.one_batch(); xb, yb = b.dls.valid.one_batch()
    assert torch.equal(ya, yb)
    torch.testing.assert_close(a.model.pixels.to_pixels(xa), xb, rtol=0, atol=1e-5)
    return xa, xb

@pytest.mark.parametrize('target_stats', [imagenet_stats, ([0.5]*3, [0.25]*3)], ids=['same_norm', 'own_target_norm'])
def test_results_do_not_depend_on_normalize(target_stats):
    "Calibrated outputs agree before training; after two steps the calibrator's weights, losses and outputs agree too"
    a, b = _twin_learners(target_stats)
    xa, xb = _same_images(a, b)
    ma, mb = a.model.eval(), b.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(ma.calibrate(xa), mb.calibrate(xb), rtol=0, atol=1e-5)
        torch.testing.assert_close(ma(xa), mb(xb), rtol=1e-4, atol=1e-5)
    for l in (a, b): seed_everything(0); _fit(l)                            # the same random draws in both fits
    ha, hb = _cb(a).history, _cb(b).history
    assert len(ha) == len(hb) == 2
    for i in range(2):
        for k in ('d_loss', 'g_loss'): assert ha[i][k] == pytest.approx(hb[i][k], rel=1e-4), (i, k)
    pa, pb = dict(ma.cal.named_parameters()), dict(mb.cal.named_parameters())
    init = dict(Calibrator(3, n_blocks=1).named_parameters())
    moved = max((pa[k] - init[k]).abs().max().item() for k in pa)
    assert moved > 1e-6                                                     # the two steps changed the calibrator
    for k in pa: torch.testing.assert_close(pa[k], pb[k], rtol=1e-4, atol=moved * 1e-3)
    with torch.no_grad(): torch.testing.assert_close(ma.eval()(xa), mb.eval()(xb), rtol=1e-4, atol=1e-4)

def test_untrained_calibrator_keeps_the_frozen_accuracy():
    "The issue's silent bug: on a Normalize pipeline an untrained calibrated model scored 10% against 17.5% frozen"
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    seed_everything(0)
    dls = _dls(n=60)
    clf = _small_net()
    l0 = Learner(dls, clf, loss_func=CrossEntropyLossFlat())
    with l0.no_bar(), l0.no_logging(): l0.fit(2, 3e-3)
    clf.eval()
    x, y = (torch.cat(t) for t in zip(*list(dls.valid)))                  # the whole validation set (no augmentation there)
    with torch.no_grad(): frozen = clf(x)
    zero = Calibrator(3, n_blocks=1, mode='signed')                        # δ = bound·tanh(0) = 0 exactly: the identity
    nn.init.zeros_(zero.net[-1].weight); nn.init.zeros_(zero.net[-1].bias)
    for cal, tol in ((zero, 1e-4), (None, None)):
        learn = calibrator_learner(dls, copy.deepcopy(clf), _dls(n=60, seed=1).train, cal=cal)
        m = learn.model.eval()
        with torch.no_grad(): out = m(x)
        assert (out.argmax(1) == y).float().mean() == (frozen.argmax(1) == y).float().mean()
        if tol: torch.testing.assert_close(out, frozen, rtol=tol, atol=tol)
        with learn.no_bar(): acc = learn.validate()[1]
        assert acc == pytest.approx((frozen.argmax(1) == y).float().mean().item())

def test_pixels_outside_the_box_raise():
    "Batches that are not pixels in [0, 1] (nor fastai-normalised pixels) raise instead of being clipped"
    seed_everything(0)
    dls = _dls()
    x = dls.train.one_batch()[0]
    u255 = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(TensorImage(dls.valid.one_batch()[0] * 0 + 200.)), batch_size=BS)
    with pytest.raises(ValueError, match='target batch spans'): _fit(calibrator_learner(dls, _small_net(), u255))
    learn = calibrator_learner(dls, _small_net(), _dls(seed=1).train)
    with pytest.raises(ValueError, match="outside the calibrator's box"): learn.model(x * 100)

def test_classifier_checked_from_the_data():
    "`check_classifier` reads the data's shape and class count from `data_spec`, not from package-only attributes"
    dls, tdl = _dls(aug=False), _dls(aug=False, seed=1).train
    with pytest.raises(ValueError, match='class count'): calibrator_learner(dls, tv_resnet18(num_classes=7), tdl)
    with pytest.raises(ValueError, match='expects 28×28'): calibrator_learner(dls, nn.Sequential(nn.Flatten(), nn.Linear(3*28*28, 10)), tdl)   # data: 16×16
    tdls = _dls(aug=False, seed=1)
    learn = calibrator_learner(dls, _small_net(), tdls)                      # the target's DataLoaders: their train loader
    assert _cb(learn).target_dl is tdls.train and _cb(learn).stream.dl is tdls.train

def test_fastai_target_loader_pickles_mid_pass():
    "A fastai target loader is mid-pass between fits (its `it` is a generator): pickle, deepcopy and export drop it and resume"
    seed_everything(0)
    a = calibrator_learner(_dls(), _small_net(), _dls(aug=False, seed=1).train, cal=Calibrator(3, n_blocks=1))   # no random target augmentation
    _fit(a)
    assert 'it' in _cb(a).target_dl.__dict__                              # the live pass the stream keeps between batches
    back = pickle.loads(pickle.dumps(a))
    cp = copy.deepcopy(a)
    for l in (back, cp):
        assert 'it' not in _cb(l).target_dl.__dict__ and _cb(l).target_dl is _cb(l).stream.dl
        assert torch.equal(l.model.tgt_state, a.model.tgt_state)
    tgt_a = _cb(a).stream.next(a.model.tgt_state.clone())                  # the original's next target batch ...
    tgt_b = _cb(back).stream.next(back.model.tgt_state.clone())            # ... and the unpickled one's: it resumed at the same place
    assert torch.equal(tgt_a, tgt_b)
    for l in (a, back, cp): _fit(l); assert int(l.model.d_steps) == 4     # all three train on

def test_show_results_and_get_preds(tmp_path):
    "fastai's `show_results`, `get_preds` work with DataBlock batches, also after an export (which once failed and left the DataLoaders empty)"
    seed_everything(0)
    learn = _fit(calibrator_learner(_dls(), timm_model(), _dls(seed=1).train))
    learn.export(tmp_path/'e.pkl')
    with learn.no_bar(): learn.show_results(max_n=2)
    plt.close('all')
    with learn.no_bar(): preds, targs = learn.get_preds()
    assert preds.shape == (len(learn.dls.valid_ds), 10) and torch.allclose(preds.sum(1), torch.ones(len(preds)))
