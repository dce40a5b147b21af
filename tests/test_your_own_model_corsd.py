"""Issue 39 for BYOT and CORSD: a fastai user's `DataBlock` (PNG files, `aug_transforms`, `Normalize`) and a torchvision
or timm network train with no glue, export, reload, predict and deploy; stages are named, never aliased; a CORSD wrapper
has no BYOT heads; triplets come from any training loader; the package's own path is untouched."""
import math, random, pytest, torch
torch.set_num_threads(1)  # small shared machines: no OpenMP spinning
import matplotlib; matplotlib.use('Agg')
from fastai.learner import Learner, load_learner
from fastai.callback.core import Callback, CancelTrainException
from fastai.data.core import DataLoaders
from fastai.losses import CrossEntropyLossFlat
from fastai.vision.all import imagenet_stats
from own_data import *
from corsd_suite.core import seed_everything
from corsd_suite.data import digits_dls
from corsd_suite.interop import deployable, dl_labels, batch_normalize
from corsd_suite.corsd import (byot_learner, corsd_learner, exit_learner, multi_exit, triplet_dls, TripletDL, TripletTfmdDL,
                               CORSDCallback, BYOTCallback, CORSD_WEIGHTS, BYOT_WEIGHTS)

class _Short(Callback):
    "End the training part of the epoch after `n` batches (validation still runs): one short epoch on a small CPU"
    order = 99
    def __init__(self, n:int=3): self.n = n
    def after_batch(self):
        if self.training and self.iter + 1 >= self.n: raise CancelTrainException()

def _fit(learn, n:int=3):
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=_Short(n))
    return learn

LEARNERS = dict(byot=lambda dls, arch, **kw: byot_learner(dls, arch, **kw),
                corsd=lambda dls, arch, **kw: corsd_learner(dls, arch, n_triplets=4, **kw))

@pytest.fixture(scope='module')
def dls(): return block_dls(bs=12)

def _png(): return sorted(digit_pngs().rglob('*.png'))[0]

# ------------------------------------------------------------------------------------------ train, export, deploy
@pytest.mark.parametrize('arch', list(MODELS))
@pytest.mark.parametrize('method', list(LEARNERS))
def test_your_own_model_trains_exports_and_deploys(method, arch, dls, tmp_path):
    seed_everything(0)
    learn = _fit(LEARNERS[method](dls, MODELS[arch]()))
    cb = learn.cbs.filter(lambda c: isinstance(c, (BYOTCallback, CORSDCallback)))[0]
    for t in (CORSD_WEIGHTS if method == 'corsd' else BYOT_WEIGHTS):
        v = cb.term_avg(t)
        assert v is not None and math.isfinite(v) and (v > 0 or t == 'proto'), (t, v)   # every term trained (proto: a difference)
    assert all(math.isfinite(v) for v in learn.recorder.values[-1])         # validation loss and metrics (validation ran)
    learn.export(tmp_path/'learn.pkl')
    new = load_learner(tmp_path/'learn.pkl')
    cls, idx, probs = new.predict(_png())
    assert probs.shape == (10,) and cls == new.dls.vocab[int(idx)]
    torch.testing.assert_close(probs, learn.predict(_png())[2])             # the reloaded learner predicts as the trained one
    net = deployable(learn)
    fresh = MODELS[arch]()
    fresh.load_state_dict(net.state_dict(), strict=True)                    # the architecture's own keys, nothing else
    x = dls.valid.one_batch()[0]
    with torch.no_grad(): torch.testing.assert_close(fresh.eval()(x), learn.model.eval()(x))

@pytest.mark.parametrize('arch', list(MODELS))
def test_backbone_state_dict_is_the_architectures(arch, dls):
    "Stages are hooked by name: nothing aliased onto the backbone, its keys exactly a fresh instance's"
    learn = corsd_learner(dls, MODELS[arch](), n_triplets=4, cb_kw=dict(byot=True))
    bb = learn.model.backbone
    assert list(bb.state_dict()) == list(MODELS[arch]().state_dict())
    assert len(list(bb.named_modules(remove_duplicate=False))) == len(list(bb.named_modules()))   # no module held twice
    assert len(learn.model.stage_names) >= 2 and learn.model.stages == [bb.get_submodule(n) for n in learn.model.stage_names]

def test_corsd_only_export_has_no_byot_heads(dls, tmp_path):
    assert len(multi_exit(tv_resnet18(), 3, 32, relations=True).heads) == 0
    assert len(multi_exit(tv_resnet18(), 3, 32, relations=True, exits=True).heads) == 3    # the stacked arm asks for them
    assert len(multi_exit(tv_resnet18(), 3, 32).heads) == 3                                # a BYOT wrapper has them
    learn = _fit(corsd_learner(dls, timm_model(), n_triplets=4), 2)
    learn.export(tmp_path/'corsd.pkl')
    sd = load_learner(tmp_path/'corsd.pkl').model.state_dict()
    assert not any(k.startswith(('heads.', 'adapters.')) for k in sd) and any(k.startswith('relations.') for k in sd)

def test_show_results_and_get_preds_on_datablock_batches(dls):
    learn = _fit(corsd_learner(dls, timm_model(), n_triplets=4), 2)
    learn.show_results(max_n=4)
    preds, targs = learn.get_preds()
    assert preds.shape == (len(dls.valid_ds), 10) and torch.allclose(preds.sum(1), torch.ones(len(preds)))

# ----------------------------------------------------------------------------------------------------- triplets
def test_triplets_from_a_datablock_loader(dls):
    t = triplet_dls(dls, 4)
    tr, y = t.train, dl_labels(dls.train)
    assert isinstance(tr, TripletTfmdDL) and tr.bs == 12 and tr.n_triplets == 4 and t.valid is dls.valid
    assert len(tr) == len(dls.train_ds) // 4 and t.c == 10 and list(t.vocab) == list(dls.vocab)
    tr.rng = random.Random(0); tr.randomize(); idx = torch.tensor(tr.get_idxs())   # what the next epoch will serve
    a, p, n = idx[0::3], idx[1::3], idx[2::3]
    assert sorted(a.tolist()) == list(range(len(dls.train_ds)))                   # each item once an anchor
    assert (y[p] == y[a]).all() and (y[n] != y[a]).all() and (p != a).any()
    tr.rng = random.Random(0)
    batches = list(tr)
    assert len(batches) == len(tr)
    for xb, yb in batches:
        assert type(xb).__name__ == 'TensorImage' and xb.shape == (12, 3, 32, 32)
        assert (yb[0::3] == yb[1::3]).all() and (yb[0::3] != yb[2::3]).all()
    assert torch.equal(torch.cat([yb for _, yb in batches]), y[idx[:12*len(tr)]])  # the batches are those triplets, in order
    assert not torch.equal(torch.tensor(tr.get_idxs()), torch.tensor(tr.get_idxs()))   # a new draw each epoch
    assert type(tr.new(shuffle=False)).__name__ == 'TfmdDL'                         # derived loaders are plain

def test_triplets_survive_distributed_slicing(dls, monkeypatch):
    "fastai's `DistributedDL` hands each rank a contiguous slice of the epoch's indices: each slice must be whole triplets"
    tr, y = triplet_dls(dls, 4).train, dl_labels(dls.train)
    assert len(dls.train_ds) % 4                                           # 90 items: not a multiple of 4 ranks
    monkeypatch.setenv('WORLD_SIZE', '4')
    idx = torch.tensor(tr.get_idxs())
    assert len(idx) % 12 == 0
    for part in idx.view(4, -1):
        assert (y[part[1::3]] == y[part[0::3]]).all() and (y[part[2::3]] != y[part[0::3]]).all()

def test_triplet_batches_go_through_the_loaders_normalize():
    raw, norm = (triplet_dls(block_dls(norm=v, aug=False, bs=12), 4) for v in (False, True))
    assert batch_normalize(norm) is not None and batch_normalize(raw) is None
    raw.train.rng, norm.train.rng = random.Random(1), random.Random(1)
    (x0, y0), (x1, y1) = raw.train.one_batch(), norm.train.one_batch()
    assert torch.equal(y0, y1)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in imagenet_stats)
    torch.testing.assert_close(x1.as_subclass(torch.Tensor), ((x0 - mean)/std).as_subclass(torch.Tensor))
    assert x0.min() >= 0 and x0.max() <= 1 and x1.min() < 0

def test_package_loaders_still_give_a_tripletdl():
    d = digits_dls(16, bs=30, device='cpu')
    t = triplet_dls(d)
    assert type(t.train) is TripletDL and t.train.bs == 10 and t.stats == d.stats and t.size == d.size
    learn = corsd_learner(d, 'resnet8')
    assert type(learn.dls.train) is TripletDL and learn.model.stage_names == ['stages.0', 'stages.1', 'stages.2']

def test_callback_checks_batches_not_the_loaders_class(dls):
    "A hand-made triplet `TfmdDL` trains; a loader whose batches are not triplets is refused, pointing at `triplet_dls`"
    y = dl_labels(dls.train).tolist()
    trip = []
    for c in sorted(set(y)):
        same = [i for i, k in enumerate(y) if k == c]
        if len(same) > 1: trip += [same[0], same[1], next(i for i, k in enumerate(y) if k != c)]
    hand = dls.train.new(get_idxs=lambda: trip[:24], bs=12, shuffle=False, drop_last=True)   # fastai's own override
    mk = lambda dl: Learner(DataLoaders(dl, dls.valid), multi_exit(timm_model(), 3, 32, relations=True),
                            loss_func=CrossEntropyLossFlat(), cbs=CORSDCallback())
    learn = _fit(mk(hand))
    cb = learn.cbs.filter(lambda c: isinstance(c, CORSDCallback))[0]
    assert all(cb.term_avg(k) is not None for k in CORSD_WEIGHTS) and cb.term_avg('triplet') > 0
    with pytest.raises(ValueError, match=r'not one \(a triplet batch holds 3 images.*`triplet_dls\(dls\)`'):
        _fit(mk(dls.train.new(bs=10)))
    with pytest.raises(TypeError, match='TfmdDL'): triplet_dls(DataLoaders(torch.utils.data.DataLoader(list(range(6))), dls.valid))

# ------------------------------------------------------------------------------------------ stages and arch kinds
def test_stages_by_name_and_arch_kinds(dls):
    learn = corsd_learner(dls, tv_resnet18(), n_triplets=4, stages=['layer2', 'layer3', 'layer4'])
    assert learn.model.stage_names == ['layer2', 'layer3', 'layer4'] and len(learn.model.relations) == 3
    learn = exit_learner(dls, tv_resnet18, 'byot')                  # a callable, called with num_classes
    assert learn.model.stage_names == ['layer1', 'layer2', 'layer3', 'layer4'] and len(learn.model.heads) == 3
    learn = corsd_learner(dls, 'resnet8', n_triplets=4)              # a zoo name on a DataBlock's normalised batches
    assert learn.model.stage_names == ['stages.0', 'stages.1', 'stages.2'] and isinstance(learn.dls.train, TripletTfmdDL)

def test_missing_or_too_few_stages_are_clear_errors(dls):
    with pytest.raises(ValueError, match="ResNet has no module 'layer9'"): corsd_learner(dls, tv_resnet18(), stages=['layer1', 'layer9'])
    with pytest.raises(ValueError, match='at least 2 stages'): byot_learner(dls, tv_resnet18(), stages=['layer4'])
    with pytest.raises(ValueError, match='at least 2 stages'): byot_learner(dls, tv_resnet18(), stages='layer4')
    with pytest.raises(TypeError, match='built model'): corsd_learner(dls, tv_resnet18(), model_kw=dict(width=2))
