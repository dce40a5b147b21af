"""CORSD/BYOT as the authors built them: triplet sampler, relation networks on every zoo model, the note's weights,
detached teachers and gradients into the backbone, plain deployed model, save/load, DDP, resume = uninterrupted,
interrupt safety, bad input."""
import copy, pickle, pytest, torch
torch.set_num_threads(1)  # the CI and dev machines are small and shared: no OpenMP spinning
from torch import nn
from fastai.learner import Learner
from fastai.callback.core import Callback, CancelFitException
from fastai.losses import CrossEntropyLossFlat
from helpers import run_ddp, ddp_fit, params_digest, roundtrip_save_load, TRAIN_EVENTS, RaiseAt, SaveAndStop
from corsd_suite.core import seed_everything, get_stages, save_checkpoint, load_checkpoint
from corsd_suite.data import digits, image_dls, CropFlip, TensorDL
from corsd_suite.models import resnet8, count_params, StagedNet, MODELS
from corsd_suite.corsd import (corsd_learner, byot_learner, exit_learner, multi_exit, MultiExitNet, CORSDCallback,
                               BYOTCallback, CORSDLoss, BYOTLoss, PrototypeNet, CORSD_WEIGHTS, BYOT_WEIGHTS, TripletDL,
                               triplet_dls, triplet_tables, triplet_idxs, check_triplets, exit_accuracies, relation_scores, soft_ce)

def _dls(bs=30, size=8, n=120, n_valid=61, augment=None):
    "A small slice of the embedded digits: `n` training and `n_valid` validation images"
    tr, va = digits(size).split(0.2, seed=0)
    return image_dls(tr.balanced(n//10), va.subset(range(n_valid)), bs=bs, device='cpu', augment=augment)

def _fit(learn, n=1, lr=5e-3, **kw):
    with learn.no_bar(), learn.no_logging(): learn.fit(n, lr, **kw)
    return learn

def _one_cycle(learn, n, lr=5e-3, **kw):
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(n, lr, **kw)
    return learn

def _batch_feats(net, x):
    net.collect = True
    try: out = net.train()(x)
    finally: net.collect = False
    return out, net.take_features()

# ------------------------------------------------------------------------------------------------------ sampler
def test_sampler_positives_share_class_negatives_do_not():
    dls = triplet_dls(_dls(augment=CropFlip(pad=1)))
    assert isinstance(dls.train, TripletDL) and dls.train.bs == 10 and dls.valid.bs == 60
    for _ in range(5):
        x, y = dls.train.one_batch()
        assert x.shape == (30, 1, 8, 8) and x.dtype == torch.float32
        assert (y[0::3] == y[1::3]).all() and (y[0::3] != y[2::3]).all()
    # every image of an epoch is an anchor exactly once
    seen = torch.cat([y for _, y in dls.train])
    assert len(seen) == 3 * len(dls.train) * 10
    ds = dls.train.dataset
    t = triplet_tables(ds.y)
    idx = torch.arange(len(ds))
    trip = triplet_idxs(idx, t, torch.Generator().manual_seed(0)).view(-1, 3)
    assert (trip[:, 0] == idx).all() and (ds.y[trip[:, 1]] == ds.y).all() and (ds.y[trip[:, 2]] != ds.y).all()

def test_sampler_errors():
    ds = digits(8)
    one = ds.subset(torch.cat([(ds.y == 3).nonzero()[:1, 0], (ds.y == 5).nonzero()[:4, 0]]))
    with pytest.raises(ValueError, match=r'class\(es\) \[3\] have one'): triplet_tables(one.y)
    with pytest.raises(ValueError, match='at least 2 classes'): triplet_tables(torch.full((6,), 2))
    with pytest.raises(ValueError, match='no positive for that class'): check_triplets(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="negative has its anchor's class"): check_triplets(torch.tensor([1, 1, 1]))
    with pytest.raises(ValueError, match='3 images per anchor'): check_triplets(torch.tensor([1, 1, 2, 4]))
    with pytest.raises(TypeError, match='TensorDL'): triplet_dls(type('D', (), dict(train=object()))())

# ----------------------------------------------------------------------------------------------- architectures
@pytest.mark.parametrize('arch,n_in,size', [('resnet8', 3, 16), ('resnet20', 3, 8), ('lenet5', 1, 28),
                                            ('mobilenet_v2', 3, 16), ('vgg16_bn', 3, 16), ('resnet18', 3, 16)])
def test_relation_networks_fit_every_zoo_model(arch, n_in, size):
    kw = dict(size=size) if arch == 'lenet5' else dict(width=0.25) if arch in ('mobilenet_v2', 'vgg16_bn', 'resnet18') else {}
    m = MODELS[arch](n_in=n_in, n_out=10, **kw)
    net = multi_exit(m, n_in, size, n_out=10, relations=True, exits=True)
    assert len(net.relations) == len(get_stages(m)) and len(net.heads) == len(get_stages(m)) - 1
    x, y = torch.rand(9, n_in, size, size), torch.tensor([0, 0, 1, 2, 2, 3, 4, 4, 5])
    out, feats = _batch_feats(net, x)
    terms = {**CORSDLoss()(net, out, feats, y), **BYOTLoss()(net, out, feats, y)}
    total = sum(terms.values())
    assert torch.isfinite(total)
    total.backward()
    assert all(p.grad is not None for r in net.relations for p in r.parameters())
    for rp, rn in relation_scores(net, x): assert rp.shape == rn.shape == (3,) and ((rp > 0) & (rp < 1)).all()
    net.eval()
    with torch.no_grad(): assert torch.equal(net(x), m(x))

# ------------------------------------------------------------------------------------------------------- losses
def test_loss_weights_are_the_notes():
    assert CORSD_WEIGHTS == dict(pair_kd_pos=0.16, pair_ce_pos=0.04, pair_kd_neg=0.04, pair_soft_neg=0.01,
                                 triplet=0.01, score_mse=0.01, proto=0.01)
    c = CORSDLoss()
    assert c.w == CORSD_WEIGHTS and c.T == 3 and c.margin == 1
    b = BYOTLoss()
    assert (b.T, b.alpha, 1 - b.alpha, b.lam) == (3, 0.3, 0.7, 0.03) and BYOT_WEIGHTS == dict(exit_ce=0.7, exit_kd=0.3, hint=0.03)
    cb = CORSDCallback(byot=True)
    assert [type(l) for l in cb.losses] == [CORSDLoss, BYOTLoss] and cb.term_names == list(CORSD_WEIGHTS) + list(BYOT_WEIGHTS)

def test_terms_match_their_formulas():
    "Each term recomputed by hand from the relation networks' outputs"
    seed_everything(0)
    net = multi_exit(resnet8(n_in=1, n_out=10), 1, 8, relations=True)
    x, y = triplet_dls(_dls()).train.one_batch()
    out, feats = _batch_feats(net, x)
    protos0 = net.proto.protos.clone()
    torch.manual_seed(1); terms = CORSDLoss()(net, out, feats, y)
    assert not torch.equal(net.proto.protos, protos0)                      # the running class means moved
    ya, yn = y[0::3], y[2::3]
    with torch.no_grad():
        po = [(g(f[0::3], f[1::3]), g(f[0::3], f[2::3])) for g, f in zip(net.relations, feats)]
    (tp, tzp), (tn, tzn) = po[-1]
    ce = lambda z, t: -(torch.softmax(t/3, 1) * torch.log_softmax(z/3, 1)).sum(1).mean()
    s = (nn.functional.one_hot(ya, 10) + nn.functional.one_hot(yn, 10)).float()/2
    want = dict(pair_kd_pos=0.16*sum(ce(zp, tzp) for (_, zp), _ in po[:-1]),
                pair_ce_pos=0.04*sum(nn.functional.cross_entropy(zp, ya) for (_, zp), _ in po),
                pair_kd_neg=0.04*sum(ce(zn, tzn) for _, (_, zn) in po[:-1]),
                pair_soft_neg=0.01*sum(-(s*torch.log_softmax(zn, 1)).sum(1).mean() for _, (_, zn) in po),
                triplet=0.01*sum((rp - rn + 1).clamp_min(0).mean() for (rp, _), (rn, _) in po),
                score_mse=0.01*sum(((rn - tn)**2).mean() + ((rp - tp)**2).mean() for (rp, _), (rn, _) in po[:-1]))
    # BatchNorm in training mode: same statistics, so the recomputation matches
    for k, v in want.items(): torch.testing.assert_close(terms[k], v, rtol=1e-4, atol=1e-6, msg=k)
    assert terms['proto'].shape == ()

def test_teacher_detached_and_relations_reach_backbone():
    seed_everything(0)
    net = multi_exit(resnet8(n_in=1, n_out=10), 1, 8, relations=True, exits=True)
    x, y = triplet_dls(_dls()).train.one_batch()
    out, feats = _batch_feats(net, x)
    terms = {**CORSDLoss()(net, out, feats, y), **BYOTLoss()(net, out, feats, y)}
    teacher = list(net.relations[-1].parameters())
    for k in ('pair_kd_pos', 'pair_kd_neg', 'score_mse'):
        g = torch.autograd.grad(terms[k], teacher + list(net.relations[0].parameters()), retain_graph=True, allow_unused=True)
        assert all(t is None or not t.any() for t in g[:len(teacher)]), k
        assert any(t is not None and t.any() for t in g[len(teacher):]), k
    backbone = list(net.backbone.stages.parameters())
    for k in list(CORSD_WEIGHTS)[:-1] + ['exit_ce', 'exit_kd', 'hint']:
        g = torch.autograd.grad(terms[k], backbone, retain_graph=True, allow_unused=True)
        assert any(t is not None and t.any() for t in g), k
    # BYOT's teacher (the backbone's logits and deepest feature) gets nothing from the KD and the hint
    for k in ('exit_kd', 'hint'):
        g = torch.autograd.grad(terms[k], list(net.backbone.stages[-1].parameters()) + list(net.backbone.head.parameters()),
                                retain_graph=True, allow_unused=True)
        assert all(t is None or not t.any() for t in g), k
    z, t = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    soft_ce(z, t, 3.).backward()
    assert t.grad is None

# ---------------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize('method', ['byot', 'corsd', 'corsd+byot'])
def test_training_records_every_term(method):
    seed_everything(0)
    learn = _one_cycle(exit_learner(_dls(), 'resnet8', method), 3, 1e-2)
    names, vals = list(learn.recorder.metric_names[1:-1]), learn.recorder.values
    terms = (list(CORSD_WEIGHTS) if 'corsd' in method else []) + (list(BYOT_WEIGHTS) if 'byot' in method else [])
    for t in terms + (['exit1_acc', 'exit2_acc', 'ensemble_acc'] if 'byot' in method else []):
        assert t in names and vals[-1][names.index(t)] is not None, (t, names, vals[-1])
    assert vals[-1][0] < vals[0][0] and vals[-1][names.index('accuracy')] > 0.4, vals

def test_one_image_last_validation_batch_and_one_triplet_batch():
    "Issue 15 item 7: a one-image last validation batch; a training batch of one triplet skips the relational terms"
    seed_everything(0)
    learn = corsd_learner(_dls(n_valid=61), 'resnet8', cb_kw=dict(byot=True))
    assert len(learn.dls.valid.dataset) % learn.dls.valid.bs == 1
    _fit(learn, 1)
    one = corsd_learner(_dls(n=30), 'resnet8', n_triplets=1)
    assert one.dls.train.bs == 1
    _fit(one, 1)
    assert all(one.cbs.filter(lambda c: isinstance(c, CORSDCallback))[0].term_avg(k) == 0 for k in CORSD_WEIGHTS)

def test_export_is_plain_model():
    seed_everything(0)
    learn = _fit(corsd_learner(_dls(), 'resnet8', cb_kw=dict(byot=True)))
    plain = learn.model.plain().eval()
    assert plain is learn.model.backbone and count_params(plain) == count_params(resnet8(n_in=1, n_out=10))
    assert count_params(learn.model) > count_params(plain)
    x = learn.dls.valid.one_batch()[0]
    with torch.no_grad():
        assert torch.equal(plain(x), learn.model.eval()(x))
        preds, _ = learn.get_preds(dl=learn.dls.valid)
    assert torch.allclose(preds[:len(x)], torch.softmax(plain(x), 1), atol=1e-6)
    assert set(exit_accuracies(learn.model, learn.dls.valid)) == {'exit1', 'exit2', 'deepest', 'ensemble'}

def test_save_load_deepcopy_pickle_keep_state(tmp_path):
    seed_everything(0)
    mk = lambda: corsd_learner(_dls(), 'resnet8', cb_kw=dict(byot=True))
    learn = _fit(mk())
    assert not torch.equal(learn.model.proto.protos, torch.eye(10))          # the prototypes moved during training
    new = roundtrip_save_load(learn, mk, tmp_path)
    assert torch.equal(new.model.proto.protos, learn.model.proto.protos)
    for m in (copy.deepcopy(learn.model), pickle.loads(pickle.dumps(learn.model))):
        sa, sb = learn.model.state_dict(), m.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    x = triplet_dls(_dls()).train.one_batch()[0]
    for (a, b), (c, d) in zip(relation_scores(learn.model, x), relation_scores(new.model, x)):
        assert torch.equal(a, c) and torch.equal(b, d)
    _fit(new)  # training goes on after loading, optimizer state included

def _ddp_rank(rank, method):
    seed_everything(0)
    learn = exit_learner(_dls(), 'resnet8', method)
    before = params_digest(learn.model)
    ddp_fit(learn, 1, 5e-3)
    return dict(before=before, after=params_digest(learn.model), rel=params_digest(learn.model.relations),
                proto=learn.model.proto.protos.sum().item())

def test_ddp_two_ranks_identical_weights():
    r0, r1 = run_ddp(_ddp_rank, 'corsd+byot')
    assert r0['before'] == r1['before'] and r0['after'] != r0['before']
    assert abs(r0['after'] - r1['after']) < 1e-6 and abs(r0['rel'] - r1['rel']) < 1e-6

# ------------------------------------------------------------------------------------- resume, interrupts, input
def test_resume_equals_uninterrupted(tmp_path):
    def mk():
        seed_everything(0)
        return corsd_learner(_dls(augment=CropFlip(pad=1)), 'resnet8', cb_kw=dict(byot=True))
    straight = _one_cycle(mk(), 3)
    first = _one_cycle(mk(), 3, cbs=SaveAndStop(tmp_path/'ck.pth', 1))
    resumed = mk()
    assert load_checkpoint(resumed, tmp_path/'ck.pth')['epoch'] == 1
    _one_cycle(resumed, 3, start_epoch=1)
    sa, sb = straight.model.state_dict(), resumed.model.state_dict()
    assert sa.keys() == sb.keys()
    diff = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not diff, diff[:5]
    assert not torch.equal(first.model.proto.protos, resumed.model.proto.protos)

@pytest.mark.parametrize('exc', [KeyboardInterrupt, CancelFitException])
def test_interrupt_at_every_event_leaves_a_working_learner(exc):
    seed_everything(0)
    learn = corsd_learner(_dls(n=60), 'resnet8', cb_kw=dict(byot=True))
    names = list(learn.metrics.attrgot('name'))
    x = learn.dls.valid.one_batch()[0]
    for order in (0, 10):
        for ev in TRAIN_EVENTS:
            boom = RaiseAt(ev, exc, order)
            try: _fit(learn, 1, cbs=boom)
            except (KeyboardInterrupt, CancelFitException): pass
            assert boom.fired, ev
            out = learn.model(x)                                           # whatever mode it was left in
            assert isinstance(out, torch.Tensor) and out.shape == (len(x), 10), ev
            with torch.no_grad(): assert torch.equal(learn.model.eval()(x), learn.model.backbone(x)), ev
            assert list(learn.metrics.attrgot('name')) == names, ev
            assert not any(isinstance(c, RaiseAt) for c in learn.cbs), ev
    _fit(learn, 1)
    vals = dict(zip(learn.recorder.metric_names[1:-1], learn.recorder.values[-1]))
    assert all(vals[k] is not None for k in list(CORSD_WEIGHTS) + list(BYOT_WEIGHTS) + ['exit1_acc']), vals
    assert not learn.model.collect and learn.model._stash.feats is None
    preds, _ = learn.get_preds(dl=learn.dls.valid)
    assert preds.shape == (len(learn.dls.valid.dataset), 10)

def test_bad_input():
    dls = _dls()
    mk = lambda m, cb, d=dls: Learner(d, m, loss_func=CrossEntropyLossFlat(), cbs=cb)
    with pytest.raises(ValueError, match='at least 2 stages'):   # found by resolution: one stage (the 1×1 map is no stage)
        multi_exit(nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10)), 1, 8)
    with pytest.raises(ValueError, match='at least 2 stages'):
        multi_exit(StagedNet(nn.Identity(), [nn.Conv2d(1, 4, 3)], nn.Flatten()), 1, 8)
    with pytest.raises(ValueError, match='outputs 7 classes but the data has 10'): multi_exit(resnet8(n_in=1, n_out=7), 1, 8, n_out=10)
    with pytest.raises(ValueError, match='outputs 7 classes but the data has 10'):
        _fit(mk(multi_exit(resnet8(n_in=1, n_out=7), 1, 8), BYOTCallback()))
    with pytest.raises(ValueError, match='outputs 7 classes but the data has 10'):
        multi_exit(resnet8(n_in=1, n_out=7), 1, 8, n_out=10, exits=False, relations=True)
    with pytest.raises(TypeError, match='needs a `MultiExitNet`'): _fit(mk(resnet8(n_in=1, n_out=10), BYOTCallback()))
    with pytest.raises(ValueError, match='triplet batches'):
        _fit(mk(multi_exit(resnet8(n_in=1, n_out=10), 1, 8, relations=True), CORSDCallback()))
    with pytest.raises(ValueError, match='needs relation networks'):
        _fit(mk(multi_exit(resnet8(n_in=1, n_out=10), 1, 8), CORSDCallback(), triplet_dls(dls)))
    with pytest.raises(ValueError, match='needs exits'):
        _fit(mk(multi_exit(resnet8(n_in=1, n_out=10), 1, 8, exits=False, relations=True), CORSDCallback(byot=True), triplet_dls(dls)))
    with pytest.raises(ValueError, match="method must be"): exit_learner(dls, 'resnet8', 'rkd')
    with pytest.raises(ValueError, match='exits=True, relations=True or both'): multi_exit(resnet8(n_in=1, n_out=10), 1, 8, exits=False)

def test_batch_without_positive_is_refused():
    "A training loader whose batches are not triplets (here: a plain loader swapped in) is refused at the first batch"
    learn = corsd_learner(_dls(), 'resnet8')
    plain = _dls().train
    learn.dls.train.create_batches = plain.create_batches
    with pytest.raises(ValueError, match='no positive for that class|3 images per anchor'): _fit(learn)

@pytest.mark.parametrize('kw,msg', [(dict(T=-3), 'T must be'), (dict(alpha=1.5), 'alpha must be'), (dict(lam=-1), 'lam must be'),
                                    (dict(alpha=float('nan')), 'alpha must be')])
def test_byot_hyperparameters_out_of_range(kw, msg):
    with pytest.raises(ValueError, match=msg): BYOTCallback(**kw)
    with pytest.raises(ValueError, match=msg): byot_learner(_dls(), cb_kw=kw)

@pytest.mark.parametrize('kw,msg', [(dict(T=0), 'T must be'), (dict(margin=-1), 'margin must be'), (dict(triplet=-0.01), 'triplet must be'),
                                    (dict(pair_kd_pos=float('inf')), 'pair_kd_pos must be'), (dict(beta=1.), 'unknown CORSD loss weight'),
                                    (dict(byot_kw=dict(T=-3), byot=True), 'T must be')])
def test_corsd_hyperparameters_out_of_range(kw, msg):
    with pytest.raises(ValueError, match=msg): CORSDCallback(**kw)
    with pytest.raises(ValueError, match=msg): corsd_learner(_dls(), cb_kw=kw)
    with pytest.raises(ValueError, match='momentum must be'): PrototypeNet(10, momentum=-0.1)

def test_empty_splits_refused():
    "DataLoaders whose train or valid dataset is empty (image_dls refuses them too; these are built around it)"
    for fn in (corsd_learner, byot_learner):
        for split in ('train', 'valid'):
            dls = _dls()
            dl = getattr(dls, split)
            dl.dataset = dl.dataset.subset([])
            name = 'training' if split == 'train' else 'validation'
            with pytest.raises(ValueError, match=fr'{fn.__name__}: the {name} set \(dls.{split}_ds\) is empty'): fn(dls)

def test_labels_out_of_range():
    learn = byot_learner(_dls(), 'resnet8')
    learn.dls.train.after_batch = lambda b: (b[0].float()/255, b[1] + 10)
    with pytest.raises(ValueError, match=r'labels run from 10 to 19; the data has 10 classes'): _fit(learn)

def test_demo_row_registered():
    from corsd_suite.cli import load_method_modules
    from corsd_suite.core import DEMO_ROWS
    assert 'CORSD' in load_method_modules() and DEMO_ROWS['CORSD'][0] == 10

def test_losses_under_cpu_bf16_autocast():
    "fastai's MixedPrecision autocasts for CUDA only; the exits, relation networks and every term also work in bf16 on CPU"
    seed_everything(0)
    net = multi_exit(resnet8(n_in=1, n_out=10), 1, 8, relations=True, exits=True)
    x, y = triplet_dls(_dls()).train.one_batch()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out, feats = _batch_feats(net, x)
        terms = {**CORSDLoss()(net, out, feats, y), **BYOTLoss()(net, out, feats, y)}
    assert out.dtype == torch.bfloat16
    total = sum(terms.values())
    assert total.dtype == torch.float32 and torch.isfinite(total)
    total.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.relations.parameters())
