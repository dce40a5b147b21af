"Reverse adversarial with your own model and data: a DataBlock of PNGs with fastai's Normalize, torchvision / timm classifiers."
import copy, warnings
import pytest, torch
from torch import nn
from fastai.vision.all import (Learner, CrossEntropyLossFlat, accuracy, load_learner, get_image_files, DataBlock, ImageBlock,
                               CategoryBlock, parent_label, RandomSplitter)
from own_data import *
from corsd_suite.core import seed_everything
from corsd_suite.models import Normalize
from corsd_suite.interop import PixelMap, deployable
from corsd_suite.evaluate import attack_accuracy
from corsd_suite.reverse_adversarial import (reverse_adv_learner, reverse_calibrator, model_with_calibrator, reverse_pgd,
                                             ReverseAdvCallback, ReverseAdvModel, adapt_to_scene)

def _fit1(learn, lr=1e-2):
    with learn.no_bar(), learn.no_logging(): learn.fit(1, lr)
    return learn

@pytest.mark.parametrize('name', list(MODELS))
def test_your_own_model(name, tmp_path):
    dls = block_dls(n=40)
    seed_everything(0)
    clf = MODELS[name]().eval()
    sd0 = copy.deepcopy(clf.state_dict())
    learn = _fit1(reverse_adv_learner(dls, clf))
    assert not learn.model.pixels.identity                               # the DataBlock's Normalize was read
    assert all(torch.equal(sd0[k], v) for k, v in clf.state_dict().items())   # the classifier stayed frozen
    assert any(p.abs().sum() > 0 for p in list(learn.model.cal.parameters())[-2:])   # the zero-initialised last conv trained
    learn.export(tmp_path/'ra.pkl')
    new = load_learner(tmp_path/'ra.pkl')
    png = get_image_files(digit_pngs(40))[0]
    dec, idx, probs = new.predict(png)
    assert dec in dls.vocab and probs.shape == (10,) and torch.isfinite(probs).all()
    fresh = model_with_calibrator(MODELS[name](), reverse_calibrator(3), pixels=PixelMap.from_dls(dls))
    fresh.load_state_dict(deployable(learn).state_dict(), strict=True)
    x = dls.valid.one_batch()[0]
    learn.model.eval()
    with torch.no_grad(): assert torch.allclose(fresh(x), learn.model(x), atol=1e-5)

def small_cnn(num_classes=10):
    return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16),
                         nn.ReLU(), nn.Flatten(), nn.Linear(16*8*8, num_classes))

@pytest.fixture(scope='module')
def trained():
    "A small CNN trained a few epochs on the normalised DataBlock (a learner as a fastai user has it)"
    seed_everything(0)
    dls = block_dls(aug=False)
    learn = Learner(dls, small_cnn(), loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(4, 1e-2)
    learn.model.eval()
    return learn

def test_pred_keeps_top1_on_normalize_learner(trained):
    learn = trained
    p0, y = learn.get_preds()
    p1, _ = learn.get_preds(cbs=[ReverseAdvCallback(y_star='pred')])
    assert (p0.argmax(1) == y).float().mean() > 0.5 and p0.max(1).values.min() < 0.9   # a trained classifier, not saturated
    assert torch.equal(p0.argmax(1), p1.argmax(1))                                      # every top-1 prediction kept
    assert (p1.max(1).values >= p0.max(1).values - 1e-6).float().mean() > 0.9           # and more confident
    # normalised batches given as pixels (no `pixels=`: eps and the [0, 1] box would act on standardised values) are refused
    x = learn.dls.valid.one_batch()[0]
    with pytest.raises(ValueError, match=r'outside the pixel range \[0, 1\]'): reverse_pgd(learn.model, x)
    test = learn.get_preds(cbs=[ReverseAdvCallback(8/255, 3, y_star='pred', attention=0.5)])[0]
    assert torch.equal(p0.argmax(1), test.argmax(1))
    with pytest.raises(TypeError, match='y_star'): ReverseAdvCallback('pred')

def _pair(seed=0):
    "The same images through a DataBlock with Normalize and one without, in the same order"
    seed_everything(seed); dn = block_dls(aug=False)
    seed_everything(seed); dp = block_dls(norm=False, aug=False)
    return dn, dp

def test_with_and_without_normalize_agree(trained):
    dn, dp = _pair()
    clf_A = trained.model.eval()
    mean, std = PixelMap.from_dls(dn).mean.flatten().tolist(), PixelMap.from_dls(dn).std.flatten().tolist()
    seq = nn.Sequential(Normalize(mean, std), clf_A).eval()
    pm = PixelMap.from_dls(dn)
    xn, yn = dn.valid.one_batch(); xp, yp = dp.valid.one_batch()
    assert torch.equal(yn, yp) and torch.allclose(pm.to_pixels(xn), xp, atol=1e-5)
    for kw in (dict(norm='l2', eps=0.5), dict(eps=8/255), dict(eps=8/255, attention=0.3)):
        rn, rp = reverse_pgd(clf_A, xn, pixels=pm, **kw), reverse_pgd(seq, xp, **kw)
        assert torch.allclose(pm.to_pixels(rn), rp, atol=1e-4), kw
        assert not torch.equal(rp, xp)
        assert (pm.to_pixels(rn) - xp).abs().max() <= kw['eps'] + 1e-5
    # the callback on both learners: the same predictions to float tolerance
    ln = Learner(dn, clf_A, loss_func=CrossEntropyLossFlat()); lp = Learner(dp, seq, loss_func=CrossEntropyLossFlat())
    cb = lambda: [ReverseAdvCallback(8/255, 3)]
    torch.testing.assert_close(ln.get_preds(cbs=cb())[0], lp.get_preds(cbs=cb())[0], atol=1e-4, rtol=1e-4)
    # attacks: attack_accuracy reads the Normalize of the loader
    torch.manual_seed(1); an = attack_accuracy(clf_A, dn.valid, eps_list=[4/255], steps=3, show=False).accuracy[0]
    torch.manual_seed(1); ap = attack_accuracy(seq, dp.valid, eps_list=[4/255], steps=3, show=False).accuracy[0]
    assert abs(an - ap) <= 1/len(dn.valid_ds) + 1e-9
    # the reverse calibrator: same init and batches give the same training losses (Adam amplifies float noise over
    # longer runs, so the first epoch's batches are compared), and one calibrator gives the same outputs on both
    dn, dp = _pair()
    ls = []
    for d, m in ((dn, clf_A), (dp, seq)):
        seed_everything(0)
        ls.append(_fit1(reverse_adv_learner(d, m, model_kw=dict(bound=0.3)), 3e-3))
    (a, b) = [torch.tensor([float(v) for v in l.recorder.losses]) for l in ls]
    assert len(a) >= 4
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    mn, mp = ls[0].model.eval(), ls[1].model.eval()
    mp.cal.load_state_dict(mn.cal.state_dict())
    with torch.no_grad():
        cn, cp, on, op = mn.calibrate(xn), mp.calibrate(xp), mn(xn), mp(xp)
    torch.testing.assert_close(cn, cp, atol=1e-5, rtol=1e-5)             # calibrated pixels
    torch.testing.assert_close(on, op, atol=1e-4, rtol=1e-4)             # logits
    assert (cn - xp).abs().max() > 0.01                                  # the calibrator moved the pixels
    assert cn.min() >= 0 and cn.max() <= 1 and (cn - xp).abs().max() <= 0.3 + 1e-5   # within the box and its bound, in pixels

def test_adapt_to_scene_fastai(trained):
    clf = trained.model.eval()
    sd0 = copy.deepcopy(clf.state_dict())
    dls = block_dls(n=40)
    cm = adapt_to_scene(clf, dls, epochs=1)
    assert isinstance(cm, ReverseAdvModel) and not cm.training
    torch.testing.assert_close(cm.pixels.mean.flatten(), PixelMap.from_dls(dls).mean.flatten())
    assert all(torch.equal(sd0[k], v) for k, v in clf.state_dict().items())
    assert any(p.abs().sum() > 0 for p in list(cm.cal.parameters())[-2:])
    x = dls.valid.one_batch()[0]
    with torch.no_grad(): out = cm(x)
    assert out.shape == (len(x), 10) and torch.isfinite(out).all()
    # a DataBlock's Datasets (PIL images): pixels in [0, 1], a classifier that takes pixels
    pixel_clf = nn.Sequential(Normalize(cm.pixels.mean.flatten().tolist(), cm.pixels.std.flatten().tolist()), clf).eval()
    db = DataBlock(blocks=(ImageBlock, CategoryBlock), get_items=get_image_files, get_y=parent_label, splitter=RandomSplitter(0.25, seed=0))
    cm2 = adapt_to_scene(pixel_clf, db.datasets(digit_pngs(40)), epochs=1, bs=16)
    assert cm2.pixels.identity and any(p.abs().sum() > 0 for p in list(cm2.cal.parameters())[-2:])
    with pytest.raises(TypeError, match='ImageSet, a fastai DataLoaders'): adapt_to_scene(clf, [(x, x)])
    with pytest.raises(ValueError, match='clean'): adapt_to_scene(clf, dls, clean=dls)
