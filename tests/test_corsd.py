"CORSD/BYOT: training lowers the loss, export is the plain model, save/load keeps exits and relation nets, DDP, AMP, bad input."
import pytest, torch
torch.set_num_threads(1)  # the CI and dev machines are small and shared: no OpenMP spinning
from torch import nn
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from helpers import run_ddp, ddp_fit, params_digest, roundtrip_save_load
from corsd_suite.core import seed_everything
from corsd_suite.data import digits_dls, digits, image_dls
from corsd_suite.models import resnet8, count_params, StagedNet
from corsd_suite.corsd import (exit_learner, multi_exit, MultiExitNet, CORSDCallback, BYOTCallback, exit_accuracies,
                               relation_matrices)

def _dls(bs=32, size=8, n=320):
    "A small slice of the embedded digits: `n` training and 160 validation images"
    tr, va = digits(size).split(0.2, seed=0)
    return image_dls(tr.subset(range(n)), va.subset(range(160)), bs=bs, device='cpu')

def _fit(learn, n=1, lr=5e-3):
    with learn.no_bar(), learn.no_logging(): learn.fit(n, lr)
    return learn

@pytest.mark.parametrize('method', ['byot', 'corsd'])
def test_loss_decreases_and_terms_recorded(method):
    seed_everything(0)
    learn = exit_learner(_dls(), 'resnet8', method)
    _fit(learn, 4, 1e-2)
    names, vals = list(learn.recorder.metric_names[1:-1]), learn.recorder.values
    assert vals[-1][0] < vals[0][0], vals                        # training loss went down
    terms = ['ce_exits', 'kd', 'hint'] + (['rel', 'rel_cls'] if method == 'corsd' else [])
    for t in terms + ['exit1_acc', 'exit2_acc', 'ensemble_acc']:
        assert t in names and vals[-1][names.index(t)] is not None, (t, names, vals[-1])
    assert vals[-1][names.index('accuracy')] > 0.5

def test_export_is_plain_model():
    learn = _fit(exit_learner(_dls(), 'resnet8', 'corsd'))
    plain = learn.model.plain().eval()
    assert count_params(plain) == count_params(resnet8(n_in=1, n_out=10))
    assert count_params(learn.model) > count_params(plain)
    x = learn.dls.valid.one_batch()[0]
    with torch.no_grad():
        deepest = learn.model.eval().exits(x)[0]
        assert torch.allclose(plain(x), deepest) and torch.allclose(learn.model(x), deepest)
        preds, _ = learn.get_preds(dl=learn.dls.valid)             # fastai's predictions are the plain model's
    assert torch.allclose(preds[:len(x)], torch.softmax(deepest, 1), atol=1e-5)
    accs = exit_accuracies(learn.model, learn.dls.valid)
    assert set(accs) == {'exit1', 'exit2', 'deepest', 'ensemble'}

def test_save_load_roundtrip_keeps_heads_and_relations(tmp_path):
    seed_everything(0)
    mk = lambda: exit_learner(_dls(), 'resnet8', 'corsd')
    learn = _fit(mk())
    new = roundtrip_save_load(learn, mk, tmp_path)
    keys = new.model.state_dict().keys()
    assert any(k.startswith('heads.') for k in keys) and any(k.startswith('relations.') for k in keys)
    x = learn.dls.valid.one_batch()[0][:16]
    for a, b in zip(relation_matrices(learn.model, x), relation_matrices(new.model, x)): assert torch.allclose(a, b)
    _fit(new)  # training goes on after loading, optimizer state included

def _ddp_rank(rank, method):
    seed_everything(0)
    learn = exit_learner(_dls(), 'resnet8', method)
    before = params_digest(learn.model)
    ddp_fit(learn, 1, 5e-3)
    return dict(before=before, after=params_digest(learn.model), rel=params_digest(learn.model.relations))

def test_ddp_two_ranks_identical_weights():
    r0, r1 = run_ddp(_ddp_rank, 'corsd')
    assert r0['before'] == r1['before'] and r0['after'] != r0['before']
    assert abs(r0['after'] - r1['after']) < 1e-6 and abs(r0['rel'] - r1['rel']) < 1e-6

@pytest.mark.parametrize('mode', ['fp16', 'bf16'])
def test_mixed_precision(mode):
    seed_everything(0)
    learn = exit_learner(_dls(), 'resnet8', 'corsd')
    learn = learn.to_fp16() if mode == 'fp16' else learn.to_bf16()
    _fit(learn)
    assert all(torch.isfinite(p).all() for p in learn.model.parameters())
    assert torch.isfinite(torch.tensor(learn.recorder.values[-1][0]))

def _learner(model, cb, dls=None): return Learner(dls or _dls(), model, loss_func=CrossEntropyLossFlat(), cbs=cb)

def test_bad_input():
    with pytest.raises(ValueError, match='needs batches of at least 2'):
        _fit(_learner(multi_exit(resnet8(n_in=1, n_out=10), 1, 8, relations=True), CORSDCallback(), _dls(bs=1)))
    with pytest.raises(AttributeError, match='has no `stages`'):
        multi_exit(nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10)), 1, 8)
    with pytest.raises(TypeError, match='needs a `MultiExitNet`'):
        _fit(_learner(resnet8(n_in=1, n_out=10), BYOTCallback()))
    with pytest.raises(ValueError, match='outputs 7 classes but the data has 10'):
        multi_exit(resnet8(n_in=1, n_out=7), 1, 8, n_out=10)
    with pytest.raises(ValueError, match='output 7 classes but the data has 10'):
        _fit(_learner(multi_exit(resnet8(n_in=1, n_out=7), 1, 8), BYOTCallback()))
    with pytest.raises(ValueError, match='needs relation networks'):
        _fit(_learner(multi_exit(resnet8(n_in=1, n_out=10), 1, 8), CORSDCallback()))
    with pytest.raises(ValueError, match='at least 2 stages'):
        multi_exit(StagedNet(nn.Identity(), [nn.Conv2d(1, 4, 3)], nn.Flatten()), 1, 8)
    with pytest.raises(ValueError, match="method must be 'byot' or 'corsd'"):
        exit_learner(_dls(), 'resnet8', 'rkd')

def test_labels_out_of_range():
    learn = exit_learner(_dls(), 'resnet8', 'byot')
    learn.dls.train.after_batch = lambda b: (b[0].float()/255, b[1] + 10)
    with pytest.raises(ValueError, match=r'labels must be in \[0, 10\)'): _fit(learn)

def test_demo_row_registered():
    from corsd_suite.cli import load_method_modules
    from corsd_suite.core import DEMO_ROWS
    assert 'CORSD' in load_method_modules() and DEMO_ROWS['CORSD'][0] == 10

def test_exits_and_losses_under_cpu_bf16_autocast():
    "fastai's MixedPrecision autocasts for CUDA only; check the exits and every loss term also work in bf16 on CPU"
    seed_everything(0)
    net = multi_exit(resnet8(n_in=1, n_out=10), 1, 8, relations=True)
    x, y = _dls().one_batch()
    net.return_exits = True
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out, ex = net(x)
        terms = CORSDCallback().loss_terms(ex, y)
    assert out.dtype == torch.bfloat16 and set(terms) == {'ce_exits', 'kd', 'hint', 'rel', 'rel_cls'}
    total = sum(terms.values())
    assert total.dtype == torch.float32 and torch.isfinite(total)
    total.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.relations.parameters())
