"MGNet on your own model and data: a fastai `DataBlock` with `Normalize`, torchvision/timm networks, export, deploy."
import numpy as np, pytest, torch
from torch import nn
from fastai.vision.all import load_learner, get_image_files, imagenet_stats
from own_data import *
from corsd_suite.core import seed_everything
from corsd_suite.interop import deployable, PixelMap
from corsd_suite.models import get_model
from corsd_suite.mgnet import MGNet, mgnet_learner, backbone_learner, mgnet_of, show_glimpses

KW = dict(n_glimpses=2, down_factor=2.)          # 32×32 images: 16×16 glimpses

N = 48                                           # PNGs: 36 training images, 2 batches of 16

@pytest.fixture(scope='module')
def dls(): return block_dls(n=N)

@pytest.mark.parametrize('name', list(MODELS))
def test_own_model_and_data(name, dls, tmp_path):
    seed_everything(0)
    learn = mgnet_learner(dls, MODELS[name](), model_kw=KW)
    mg = mgnet_of(learn.model)
    assert mg.check_size(32) == 16 and mg.n_classes == 10 and not mg.pixels.identity   # every model takes 16-px glimpses
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    assert all(np.isfinite(v) for v in learn.recorder.values[-1])
    png = get_image_files(digit_pngs(N))[0]
    learn.export(tmp_path/'mgnet.pkl')
    pred, idx, probs = load_learner(tmp_path/'mgnet.pkl').predict(png)
    assert pred == learn.dls.vocab[idx] and probs.shape == (10,) and abs(float(probs.sum()) - 1) < 1e-5
    assert torch.allclose(probs, learn.predict(png)[2], atol=1e-6)                  # the exported learner is the trained one
    net = deployable(learn)
    assert type(net) is MGNet and not net.training and net is not mg
    fresh = MGNet(MODELS[name](), **KW)                                              # the same architecture, built afresh
    fresh.load_state_dict(net.state_dict())                                         # strict: weights, BN statistics, pixels
    x = dls.valid.one_batch()[0].as_subclass(torch.Tensor)
    with torch.no_grad(): assert torch.allclose(fresh.eval()(x), net(x), atol=1e-5)

def test_zoo_name_on_fastai_loaders(dls):
    "A zoo name on a DataBlock's loaders: shape and classes from the batches, no second normalisation inside the model"
    learn = mgnet_learner(dls, 'resnet8', model_kw=dict(KW, width=0.25))
    mg = mgnet_of(learn.model)
    assert (mg.n_in, mg.n_classes) == (3, 10) and isinstance(mg.body[0], nn.Identity) and not mg.pixels.identity
    x, y = (t.as_subclass(torch.Tensor) for t in dls.train.one_batch())
    assert learn.loss_func(learn.model(x), y).isfinite()
    assert mgnet_of(mgnet_learner(block_dls(norm=False, n=N), 'resnet8', model_kw=KW).model).pixels.identity

def test_callable_arch_and_backbone_learner(dls):
    learn = mgnet_learner(dls, timm_model, model_kw=dict(KW, n_glimpses=3))          # called with num_classes=10
    assert mgnet_of(learn.model).n_classes == 10 and len(learn.metrics) == 4
    with pytest.raises(TypeError, match='built model'): mgnet_learner(dls, timm_model(), model_kw=dict(KW, width=0.5))
    with pytest.raises(ValueError, match='7 classes'): mgnet_learner(dls, lambda num_classes: timm_model(7), model_kw=KW)
    base = backbone_learner(dls, tv_mobilenet())
    x, y = dls.valid.one_batch()
    assert base.model(x).shape == (len(x), 10) and base.loss_func(base.model(x), y).isfinite()

def test_glimpses_too_small_for_the_body(dls):
    "timm's ConvNeXt downsamples 32×: 16-px glimpses fail when the learner is built, with the sizes that work"
    import timm
    convnext = lambda num_classes=10: timm.create_model('test_convnext', num_classes=num_classes)
    with pytest.raises(ValueError, match=r"cannot take 16×16 glimpses \(32×32 images at down_factor=2.0\).*"
                                         r"smallest glimpse it takes is 32×32 px: use images of at least 64×64 px, or down_factor ≤ 1\b"):
        mgnet_learner(dls, convnext, model_kw=KW)
    learn = mgnet_learner(dls, convnext, model_kw=dict(KW, down_factor=1.))         # what the message says works
    x = dls.valid.one_batch()[0]
    with torch.no_grad(): assert learn.model.eval()(x).shape == (len(x), 10)
    assert learn.model.trace['glimpses'][0].shape[-1] == 32

def test_normalize_gives_the_same_glimpses_and_logits():
    "A body that normalises internally fed pixels = the same body fed fastai-normalised batches, crops leaving the image"
    raw, norm = block_dls(norm=False, aug=False, n=N), block_dls(norm=True, aug=False, n=N)
    kw = dict(n_glimpses=3, translation='free', scale_min=0.6, scale_max=1.)
    a = mgnet_learner(raw, get_model('resnet8', n_in=3, n_out=10, width=0.25, stats=imagenet_stats), model_kw=kw).model.eval()
    b = mgnet_learner(norm, get_model('resnet8', n_in=3, n_out=10, width=0.25), model_kw=kw).model.eval()
    assert a.pixels.identity and not b.pixels.identity
    with torch.no_grad(): a.locator.bias.fill_(-8.)                                   # glimpses 2 and 3 leave the image
    same = {k: v for k, v in a.state_dict().items() if not k.startswith(('pixels.', 'body.0.'))}
    r = b.load_state_dict(same, strict=False)
    assert sorted(r.missing_keys) == ['pixels.mean', 'pixels.std'] and not r.unexpected_keys
    xa, xb = raw.valid.one_batch()[0], norm.valid.one_batch()[0]
    assert torch.allclose(b.pixels.to_pixels(xb), xa, atol=1e-5)                     # the same images, normalised
    with torch.no_grad(): la, lb = a(xa), b(xb)
    assert torch.allclose(la, lb, atol=1e-4)
    for ga, gb in zip(a.trace['glimpses'], b.trace['glimpses']): assert torch.allclose(ga, b.pixels.to_pixels(gb), atol=1e-5)
    assert (a.trace['glimpses'][-1][..., 0, 0] == 0).all()                             # black padding in both
    naive = MGNet(get_model('resnet8', n_in=3, n_out=10, width=0.25), **kw).eval()  # cropping the normalised batch instead
    naive.load_state_dict(same, strict=False)
    with torch.no_grad(): assert not torch.allclose(naive(xb), la, atol=1e-3)

def test_infers_n_classes_and_feat_dim():
    from torchvision.models import resnet18
    mg = MGNet(tv_resnet18())
    assert (mg.n_classes, mg.feat_dim, mg.n_in) == (10, 512, 3)
    assert not any(isinstance(m, (nn.AdaptiveAvgPool2d, nn.Linear)) for m in mg.body.modules())   # cut before the pooling
    assert (MGNet(resnet18()).n_classes, MGNet(tv_mobilenet(7)).feat_dim) == (1000, 576)
    t = timm_model(4)
    assert (lambda m: (m.n_classes, m.feat_dim))(MGNet(t)) == (4, t.num_features)
    assert MGNet(tv_resnet18(), n_classes=10, feat_dim=512).feat_dim == 512
    body = nn.Sequential(*list(tv_resnet18().children())[:-2])
    assert MGNet(body, n_classes=3).feat_dim == 512
    with pytest.raises(ValueError, match='pass n_classes'): MGNet(body)
    with pytest.raises(ValueError, match='num_classes=0'): MGNet(timm_model(0))
    huge = nn.Sequential(nn.Conv2d(3, 2, 240), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 2))   # takes no probe size
    with pytest.raises(ValueError, match='cannot infer feat_dim.*pass feat_dim='): MGNet(huge)

def test_show_glimpses_on_a_datablock_learner(dls):
    import matplotlib; matplotlib.use('Agg')
    learn = mgnet_learner(dls, timm_model(), model_kw=dict(KW, n_glimpses=3))
    fig = show_glimpses(learn, 2)
    assert len(fig.axes) == 2 * 4
    t0, t1 = fig.axes[0].get_title(), fig.axes[1].get_title()
    assert t0.startswith('true: ') and t0[6:] in list(dls.vocab) and t1.startswith('g1: ') and t1.endswith('%)')
    x = dls.valid.one_batch()[0][0]
    shown = fig.axes[0].images[0].get_array()
    want = PixelMap([torch.tensor(s) for s in imagenet_stats]).to_pixels(x[None])[0].permute(1, 2, 0).clamp(0, 1)
    assert np.allclose(np.asarray(shown), want.numpy(), atol=1e-5)                  # shown as pixels, not normalised
