"MGNet: glimpses, gradients, shapes, BatchNorm modes, save/load, resume, interrupts, DDP, mixed precision, bad input, demo row."
import copy, pickle, pytest, torch, torch.nn.functional as F
from fastai.callback.core import Callback, CancelFitException
from helpers import run_ddp, ddp_fit, params_digest, roundtrip_save_load, TRAIN_EVENTS, BATCH_EVENTS, RaiseAt, SaveAndStop
from corsd_suite.core import seed_everything, DEMO_ROWS
from corsd_suite.data import digits, cluttered, image_dls, ImageSet
from corsd_suite.models import get_model
from corsd_suite.mgnet import (MGNet, MultiGlimpseLoss, take_glimpse, mgnet_learner, backbone_learner, cluttered_digits_dls,
                               mgnet_flops, show_glimpses, mgnet_of, cluttered_natural)

def _mg(n=3, d=2., **kw):
    torch.manual_seed(0)
    return MGNet(get_model('resnet8', n_in=1, n_out=10, width=0.5), n, d, **kw)

def _dls(bs=32): return cluttered_digits_dls(canvas=32, bs=bs, device='cpu')

def _tiny_dls(n_train=48, n_valid=16, bs=16):
    "8×8 digits on 16×16 cluttered frames: a few batches, for tests that train many times"
    tr, va = digits(8).split(0.2, 0)
    tr = cluttered(tr.subset(range(n_train)), 16, 1, 3, seed=1); va = cluttered(va.subset(range(n_valid)), 16, 1, 3, seed=2)
    return image_dls(tr, va, bs=bs, device='cpu')

TINY = dict(n_glimpses=2, down_factor=2., width=0.25)
def _tiny_learner(**kw): return mgnet_learner(_tiny_dls(), 'resnet8', model_kw={**TINY, **kw})

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
    assert loc_grad(0.).abs().sum() == 0   # loc_grad_scale=0 freezes the locator (allowed)

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

NAN, INF = float('nan'), float('inf')
@pytest.mark.parametrize('kw,msg', [
    (dict(d=0.), 'down_factor'), (dict(d=-1.), 'down_factor'), (dict(d=0.5), 'down_factor'), (dict(d=NAN), 'down_factor'),
    (dict(d=INF), 'down_factor'), (dict(n=0), 'n_glimpses'), (dict(n=True), 'n_glimpses'), (dict(n=2.5), 'n_glimpses'),
    (dict(n='3'), 'n_glimpses'), (dict(scale_min=0.6, scale_max=0.5), 'scale_min'), (dict(scale_min=0.), 'scale_min'),
    (dict(scale_min=-0.1), 'scale_min'), (dict(scale_max=1.5), 'scale_max'), (dict(scale_max=NAN), 'scale_max'),
    (dict(translation='any'), 'translation'), (dict(loc_grad_scale=-1), 'loc_grad_scale'),
    (dict(loc_grad_scale=NAN), 'loc_grad_scale'), (dict(glimpse_bn=True), 'glimpse_bn'), (dict(glimpse_bn='per'), 'glimpse_bn'),
    (dict(n_classes=0), 'n_classes'), (dict(feat_dim=-3), 'feat_dim'), (dict(min_glimpse=0), 'min_glimpse')])
def test_invalid_arguments(kw, msg):
    n, d = kw.pop('n', 2), kw.pop('d', 2.)
    with pytest.raises(ValueError, match=msg): _mg(n, d, **kw)

@pytest.mark.parametrize('kw,msg', [(dict(coefs=[NAN, 1.]), 'coefs'), (dict(coefs=[-1., 2.]), 'coefs'), (dict(coefs=[0., 0.]), 'coefs'),
                                    (dict(coefs=[1., 2., 3.]), 'coefs'), (dict(coefs=[INF, 1.]), 'coefs'), (dict(alpha=1.5), 'alpha'),
                                    (dict(alpha=1.), 'alpha'), (dict(alpha=-0.1), 'alpha'), (dict(alpha=NAN), 'alpha')])
def test_invalid_loss_arguments(kw, msg):
    with pytest.raises(ValueError, match=msg): MultiGlimpseLoss(_mg(2), **kw)
    with pytest.raises(ValueError, match=msg): mgnet_learner(_tiny_dls(), 'resnet8', model_kw=TINY, cb_kw=kw)

def test_invalid_inputs():
    mg = _mg(2, 2.)
    with pytest.raises(ValueError, match='square'): mg(torch.rand(2, 1, 32, 40))
    with pytest.raises(ValueError, match='glimpses'): mg(torch.rand(2, 1, 12, 12))
    with pytest.raises(ValueError, match='channels'): mg(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r'\(N, C, H, W\)'): mg(torch.rand(1, 32, 32))
    with pytest.raises(TypeError, match='MGNet'): MultiGlimpseLoss(torch.nn.Linear(2, 2))

def test_nonfinite_loss_is_reported():
    mg = _mg(2); lf = MultiGlimpseLoss(mg)
    x = torch.rand(2, 1, 32, 32); x[0, 0, 0, 0] = float('nan')
    with pytest.raises(FloatingPointError, match='multi-glimpse loss'): lf(mg(x), torch.tensor([0, 1]))

def test_one_way_to_build_learners():
    dls = _tiny_dls()
    learn = mgnet_learner(dls, 'resnet8', model_kw=dict(TINY, glimpse_bn='shared', scale_min=0.3), cb_kw=dict(alpha=0.3, coefs=[1, 2]))
    mg = mgnet_of(learn.model)
    assert (mg.n_glimpses, mg.glimpse_bn, mg.scale_min, mg.n_classes) == (2, 'shared', 0.3, dls.c)
    assert learn.loss_func.alpha == 0.3 and learn.loss_func.coefs == pytest.approx([1/3, 2/3])
    assert [m.name for m in learn.metrics] == ['accuracy', 'acc_g1', 'acc_g2']
    assert mg.feat_dim < get_model('resnet8', n_in=1, n_out=10).head[-1].in_features   # width went to the zoo model
    learn2 = mgnet_learner(dls, 'resnet8', model_kw=TINY, wd=0.1, metrics=[])   # other kwargs go to the Learner
    assert learn2.wd == 0.1 and len(learn2.metrics) == 0
    base = backbone_learner(dls, 'resnet8', model_kw=dict(width=0.25), wd=0.2)
    assert base.wd == 0.2 and base.model.head[-1].out_features == dls.c
    for bad, msg in [(dict(n_glimpses=3), 'model_kw'), (dict(down_factor=2.), 'model_kw'), (dict(alpha=0.5), 'cb_kw'), (dict(coefs=[1, 1]), 'cb_kw')]:
        with pytest.raises(TypeError, match=msg): mgnet_learner(dls, 'resnet8', **bad)

@pytest.mark.parametrize('split', ['train', 'valid'])
@pytest.mark.parametrize('make', [mgnet_learner, backbone_learner])
def test_empty_dataloaders_are_refused(split, make):
    with pytest.raises(ValueError, match=split): make(_with_empty(split), 'resnet8')

def _with_empty(split):
    "The tiny DataLoaders with an empty `split` (built by hand: `image_dls` itself refuses empty sets)"
    from fastai.data.core import DataLoaders
    from corsd_suite.data import TensorDL
    dls = _tiny_dls()
    empty = TensorDL(dls.train.dataset.subset([]), bs=16, device='cpu')
    new = DataLoaders(empty if split == 'train' else dls.train, empty if split == 'valid' else dls.valid, device='cpu')
    for k in ('c', 'classes', 'n_channels', 'size', 'stats'): setattr(new, k, getattr(dls, k))
    return new

def test_class_count_mismatch():
    dls = _tiny_dls()   # 10 classes
    with pytest.raises(ValueError, match='10 classes'): mgnet_learner(dls, 'resnet8', model_kw=dict(TINY, n_classes=7))
    with pytest.raises(ValueError, match='7 classes'): backbone_learner(dls, 'resnet8', model_kw=dict(n_out=7))
    from fastai.learner import Learner
    mg7 = MGNet(get_model('resnet8', n_in=1, n_out=7, width=0.25), 2, 2.)     # a 7-class model built by hand
    learn = Learner(dls, mg7, loss_func=MultiGlimpseLoss(mg7))
    with learn.no_bar(), learn.no_logging(), pytest.raises(ValueError, match='7 classes'): learn.fit(1)
    base = backbone_learner(dls, 'resnet8', model_kw=dict(width=0.25))
    base.model = get_model('resnet8', n_in=1, n_out=7, width=0.25)            # swapped for a 7-class model
    with base.no_bar(), base.no_logging(), pytest.raises(ValueError, match='7 classes'): base.fit(1)

def _bn_input_stats(mg, x):
    "Per-glimpse (mean, unbiased var) of the input of the body's first BatchNorm during a train-mode forward"
    bn, got = mg._bns[0], []
    h = bn.register_forward_pre_hook(lambda m, i: got.append((i[0].mean((0, 2, 3)), i[0].var((0, 2, 3), unbiased=True))))
    mg.train()(x); h.remove()
    return bn, got

def test_shared_bn_is_the_authors_running_average():
    "'shared': one running average updated once per glimpse (as one backbone called on every glimpse); 'per_glimpse': one per glimpse"
    x = torch.rand(16, 1, 32, 32)
    sh = _mg(3, glimpse_bn='shared')
    bn, got = _bn_input_stats(sh, x)
    mean, var = torch.zeros_like(bn.running_mean), torch.ones_like(bn.running_var)
    for m, v in got: mean, var = 0.9*mean + 0.1*m, 0.9*var + 0.1*v
    assert len(got) == 3 and torch.allclose(bn.running_mean, mean, atol=1e-5) and torch.allclose(bn.running_var, var, atol=1e-4)
    assert not any(k.startswith('glimpse_bn') for k in sh.state_dict())
    per = _mg(3)
    _, got = _bn_input_stats(per, x)
    for t, (m, v) in enumerate(got):
        assert torch.allclose(getattr(per, f'glimpse_bn0_{t}_mean'), 0.1*m, atol=1e-5)
        assert torch.allclose(getattr(per, f'glimpse_bn0_{t}_var'), 0.9 + 0.1*v, atol=1e-4)
    # same weights: same outputs in train mode, different in eval mode
    sh.load_state_dict({k: v for k, v in per.state_dict().items() if not k.startswith('glimpse_bn')})
    torch.manual_seed(1); a = per.train()(x); torch.manual_seed(1); b = sh.train()(x)
    assert torch.allclose(a, b, atol=1e-5)
    with torch.no_grad(): assert not torch.allclose(per.eval()(x), sh.eval()(x), atol=1e-4)

def test_save_load_roundtrip(tmp_path):
    mk = lambda: mgnet_learner(_dls(), 'resnet8', model_kw=dict(n_glimpses=3, down_factor=2., width=0.5))
    seed_everything(0); learn = mk()
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    new = roundtrip_save_load(learn, mk, tmp_path)
    x = learn.dls.valid.one_batch()[0]
    learn.model.eval(); new.model.eval()
    assert torch.allclose(learn.model(x), new.model(x))
    assert all(torch.equal(a, b) for a, b in zip(learn.model.trace['params'], new.model.trace['params']))

@pytest.mark.parametrize('glimpse_bn', ['per_glimpse', 'shared'])
def test_resume_equals_uninterrupted(tmp_path, glimpse_bn):
    from corsd_suite.core import load_checkpoint
    def fresh():
        seed_everything(0); return _tiny_learner(glimpse_bn=glimpse_bn)
    a = fresh()
    with a.no_bar(), a.no_logging(): a.fit_one_cycle(3, 1e-2)
    b = fresh()
    with b.no_bar(), b.no_logging(): b.fit_one_cycle(3, 1e-2, cbs=SaveAndStop(tmp_path/'ck.pth', 1))
    torch.manual_seed(123)                                                     # the crash moved the RNG: the checkpoint restores it
    c = _tiny_learner(glimpse_bn=glimpse_bn)                                   # a NEW learner
    c.create_opt()
    assert load_checkpoint(c, tmp_path/'ck.pth')['epoch'] == 1
    with c.no_bar(), c.no_logging(): c.fit_one_cycle(3, 1e-2, start_epoch=1)
    sa, sc = a.model.state_dict(), c.model.state_dict()
    assert sa.keys() == sc.keys()
    for k in sa: assert torch.equal(sa[k], sc[k]), f"{k} differs after resume"
    assert any(k.startswith('glimpse_bn') for k in sa) == (glimpse_bn == 'per_glimpse')

EVENTS = [(e, False) for e in TRAIN_EVENTS] + [(e, True) for e in BATCH_EVENTS]

@pytest.mark.parametrize('exc', [KeyboardInterrupt, CancelFitException])
@pytest.mark.parametrize('event,valid', EVENTS)
def test_interrupt_leaves_a_working_learner(event, valid, exc):
    seed_everything(0)
    learn = _tiny_learner()
    stop = RaiseAt(event, exc, order=50, valid=valid)
    with learn.no_bar(), learn.no_logging():
        cbs, n_metrics = [type(c) for c in learn.cbs], len(learn.metrics)
        if exc is KeyboardInterrupt or event == 'after_fit':   # fastai catches CancelFitException up to after_cancel_fit only
            with pytest.raises(exc): learn.fit(1, 1e-2, cbs=stop)
        else: learn.fit(1, 1e-2, cbs=stop)
        assert stop.fired, f"{event} never happened"
        assert [type(c) for c in learn.cbs] == cbs and len(learn.metrics) == n_metrics
        before = [p.detach().clone() for p in learn.model.parameters()]
        learn.fit(1, 1e-2)                                                     # trains again
    assert all(torch.isfinite(torch.tensor(v)).all() for v in learn.recorder.values[-1])
    assert any(not torch.equal(a, p) for a, p in zip(before, learn.model.parameters()))
    mg = mgnet_of(learn.model)
    preds, targs = learn.get_preds(dl=learn.dls.valid)                           # predicts as the model does in eval mode
    mg.eval()
    with torch.no_grad(): want = torch.cat([mg(x).softmax(1) for x, _ in learn.dls.valid])
    assert torch.allclose(preds, want, atol=1e-6)
    copy.deepcopy(learn.model); pickle.dumps(learn.model)                      # no stale autograd graph in the trace

def test_deepcopy_and_pickle_after_a_training_step():
    learn = _tiny_learner()
    x, y = learn.dls.train.one_batch()
    learn.model.train(); learn.loss_func(learn.model(x), y).backward()        # the trace now holds autograd graphs
    for m in (copy.deepcopy(learn.model), pickle.loads(pickle.dumps(learn.model))):
        assert m.trace is None
        m.eval(); learn.model.eval()
        with torch.no_grad(): assert torch.equal(m(x), learn.model(x))
    assert learn.model.trace is not None                                       # the original keeps its trace

def test_cluttered_natural_is_deterministic_per_index():
    g = torch.Generator().manual_seed(0)
    rgb = ImageSet(torch.randint(1, 256, (20, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(20) % 10)
    a, boxes = cluttered_natural(rgb, 64, 4, 16, seed=7, return_boxes=True)
    assert a.x.shape == (20, 3, 64, 64) and a.x.dtype == torch.uint8 and torch.equal(a.y, rgb.y)
    for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        assert torch.equal(a.x[i, :, y0:y1, x0:x1], rgb.x[i])                # the object is whole and on top
        assert (a.x[i] > 0).sum() > (rgb.x[i] > 0).sum()                      # and there is clutter around it
    assert len({tuple(b) for b in boxes.tolist()}) > 10                       # positions vary
    part, pb = cluttered_natural(rgb.subset(range(5)), 64, 0, 16, seed=7, return_boxes=True)
    assert torch.equal(pb, boxes[:5])                                         # image i's place depends on (seed, i) only
    assert torch.equal(cluttered_natural(rgb, 64, 4, 16, seed=7).x, a.x)
    # clutter comes from other images: a set of 2 images with constant colours shows only the other's colour
    two = ImageSet(torch.stack([torch.full((3, 32, 32), 50, dtype=torch.uint8), torch.full((3, 32, 32), 200, dtype=torch.uint8)]), torch.tensor([0, 1]))
    t, tb = cluttered_natural(two, 64, 3, 8, seed=0, return_boxes=True)
    for i, other in ((0, 200), (1, 50)):
        x0, y0, x1, y1 = tb[i].tolist(); rest = t.x[i].clone(); rest[:, y0:y1, x0:x1] = 0
        assert set(rest.unique().tolist()) <= {0, other} and (rest == other).any()
    with pytest.raises(ValueError, match='canvas'): cluttered_natural(rgb, 31)
    with pytest.raises(ValueError, match='n_clutter'): cluttered_natural(rgb, 64, -1)
    with pytest.raises(ValueError, match='clutter_size'): cluttered_natural(rgb, 64, 2, 0)

def test_mixed_precision_and_plot():
    seed_everything(0)
    learn = mgnet_learner(_dls(), 'resnet8', model_kw=dict(n_glimpses=2, down_factor=2., width=0.5)).to_fp16()
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
    learn = mgnet_learner(_dls(16), 'resnet8', model_kw=dict(n_glimpses=2, down_factor=2., width=0.5))
    before = params_digest(learn.model)
    ddp_fit(learn, 1, 1e-3)
    return dict(before=before, after=params_digest(learn.model), loc=learn.model.locator.weight.detach().sum().item())

def test_ddp_two_ranks_agree():
    r0, r1 = run_ddp(_fit_on_rank)
    assert r0['before'] == r1['before'] and r0['after'] != r0['before']
    assert abs(r0['after'] - r1['after']) < 1e-6 and abs(r0['loc'] - r1['loc']) < 1e-7

def test_demo_row_registered():
    assert 'MGNet' in DEMO_ROWS and DEMO_ROWS['MGNet'][0] == 20
