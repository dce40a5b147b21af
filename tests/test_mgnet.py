"MGNet: glimpses, gradients, shapes, save/load, DDP, mixed precision, bad input, demo row."
import pytest, torch, torch.nn.functional as F
from helpers import run_ddp, ddp_fit, params_digest, roundtrip_save_load
from corsd_suite.core import seed_everything, DEMO_ROWS
from corsd_suite.models import get_model
from corsd_suite.mgnet import (MGNet, MultiGlimpseLoss, take_glimpse, mgnet_learner, cluttered_digits_dls, mgnet_flops,
                               show_glimpses, mgnet_of)

def _mg(n=3, d=2., **kw):
    torch.manual_seed(0)
    return MGNet(get_model('resnet8', n_in=1, n_out=10, width=0.5), n, d, **kw)

def _dls(bs=32): return cluttered_digits_dls(canvas=32, bs=bs, device='cpu')

def test_identity_glimpse_is_downsampled_image():
    x = torch.rand(4, 1, 36, 36)
    g = take_glimpse(x, torch.tensor([[1., 0., 0.]]).expand(4, 3), 18)
    assert torch.allclose(g, F.interpolate(x, size=18, mode='bilinear', align_corners=True), atol=1e-5)
    mg = _mg().eval(); mg(x)
    assert torch.allclose(mg.trace['glimpses'][0], g, atol=1e-6)

def test_gradients_reach_localization_head():
    mg = _mg(3).eval()
    x = torch.rand(5, 1, 32, 32)
    F.cross_entropy(mg(x), torch.arange(5)).backward()
    assert mg.locator.weight.grad is not None and mg.locator.weight.grad.abs().sum() > 0
    assert mg.locator.bias.grad.abs().sum() > 0
    def loc_grad(gamma):   # 2 glimpses: the locator is used once, so its gradient scales exactly with gamma
        m = _mg(2, loc_grad_scale=gamma).eval()
        F.cross_entropy(m(x), torch.arange(5)).backward()
        return m.locator.weight.grad
    g1, g = loc_grad(1.), loc_grad(0.02)
    assert g1.abs().sum() > 0 and torch.allclose(g, 0.02 * g1, atol=1e-8, rtol=1e-4)

@pytest.mark.parametrize('n', [1, 2, 3, 4])
def test_shapes(n):
    mg = _mg(n)
    out = mg(torch.rand(2, 1, 40, 40))
    assert out.shape == (2, 10)
    assert len(mg.trace['logits']) == n and len(mg.trace['aux']) == n - 1 and len(mg.trace['params']) == n
    assert all(g.shape == (2, 1, 20, 20) for g in mg.trace['glimpses'])

def test_one_glimpse_is_backbone_on_downsampled():
    mg = _mg(1).eval()
    x = torch.rand(3, 1, 40, 40)
    down = F.interpolate(x, size=20, mode='bilinear', align_corners=True)
    with torch.no_grad():
        mg.use_glimpse_stats(0); h = mg.body(down).mean((2, 3))
        want = mg.classifier(mg.fuse([torch.cat([h, torch.tensor([[1., 0, 0]]).expand(3, 3)], 1)]))
        assert torch.allclose(mg(x), want, atol=1e-5)
    # one glimpse costs about (1/d)^2 of a full pass
    bb = get_model('resnet8', n_in=1, n_out=10, width=0.5)
    r = mgnet_flops(mg, bb, (1, 40, 40))['ratio']
    assert 0.2 < r < 0.35, r

@pytest.mark.parametrize('kw,msg', [(dict(d=0.), 'down_factor'), (dict(d=-1.), 'down_factor'), (dict(n=0), 'n_glimpses'),
                                    (dict(scale_min=0.6, scale_max=0.5), 'scale_min'), (dict(translation='any'), 'translation')])
def test_invalid_arguments(kw, msg):
    n, d = kw.pop('n', 2), kw.pop('d', 2.)
    with pytest.raises(ValueError, match=msg): _mg(n, d, **kw)

def test_invalid_inputs():
    mg = _mg(2, 2.)
    with pytest.raises(ValueError, match='square'): mg(torch.rand(2, 1, 32, 40))
    with pytest.raises(ValueError, match='glimpses'): mg(torch.rand(2, 1, 12, 12))
    with pytest.raises(ValueError, match='channels'): mg(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r'\(N, C, H, W\)'): mg(torch.rand(1, 32, 32))
    with pytest.raises(ValueError, match='coefs'): MultiGlimpseLoss(mg, coefs=[1., 2., 3.])
    with pytest.raises(ValueError, match='alpha'): MultiGlimpseLoss(mg, alpha=1.5)
    with pytest.raises(TypeError, match='MGNet'): MultiGlimpseLoss(torch.nn.Linear(2, 2))

def test_nonfinite_loss_is_reported():
    mg = _mg(2); lf = MultiGlimpseLoss(mg)
    x = torch.rand(2, 1, 32, 32); x[0, 0, 0, 0] = float('nan')
    with pytest.raises(FloatingPointError, match='multi-glimpse loss'): lf(mg(x), torch.tensor([0, 1]))

def test_save_load_roundtrip(tmp_path):
    mk = lambda: mgnet_learner(_dls(), 'resnet8', 3, 2., arch_kw=dict(width=0.5))
    seed_everything(0); learn = mk()
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    new = roundtrip_save_load(learn, mk, tmp_path)
    x = learn.dls.valid.one_batch()[0]
    learn.model.eval(); new.model.eval()
    assert torch.allclose(learn.model(x), new.model(x))
    assert all(torch.equal(a, b) for a, b in zip(learn.model.trace['params'], new.model.trace['params']))

def test_mixed_precision_and_plot():
    seed_everything(0)
    learn = mgnet_learner(_dls(), 'resnet8', 2, 2., arch_kw=dict(width=0.5)).to_fp16()
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    assert all(torch.isfinite(torch.tensor(v)) for v in learn.recorder.values[-1])
    mg = mgnet_of(learn.model).eval()
    x = learn.dls.valid.one_batch()[0]
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = mg(x)
    assert out.shape == (len(x), 10) and torch.isfinite(out.float()).all()
    import matplotlib; matplotlib.use('Agg')
    fig = show_glimpses(learn, 2)
    assert len(fig.axes) == 2 * 3

def _fit_on_rank(rank):
    seed_everything(0)
    learn = mgnet_learner(_dls(16), 'resnet8', 2, 2., arch_kw=dict(width=0.5))
    before = params_digest(learn.model)
    ddp_fit(learn, 1, 1e-3)
    return dict(before=before, after=params_digest(learn.model), loc=learn.model.locator.weight.detach().sum().item())

def test_ddp_two_ranks_agree():
    r0, r1 = run_ddp(_fit_on_rank)
    assert r0['before'] == r1['before'] and r0['after'] != r0['before']
    assert abs(r0['after'] - r1['after']) < 1e-6 and abs(r0['loc'] - r1['loc']) < 1e-7

def test_demo_row_registered():
    assert 'MGNet' in DEMO_ROWS and DEMO_ROWS['MGNet'][0] == 20
