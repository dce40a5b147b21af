"""Issue 39 for ADMM-NN-S: a user's own `Learner` (a `DataBlock` of PNGs with `Normalize`, torchvision/timm networks)
pruned with `admm_prune`/`magnitude_prune` by dotted layer names, exported, shipped with `deployable`, and written in
the compressed format bit for bit (batch norm's 0-dim `num_batches_tracked` included)."""
import pytest, torch
from torch import nn
from own_data import *
from fastai.vision.all import Learner, CrossEntropyLossFlat, accuracy, load_learner, get_image_files
from corsd_suite.admm import (admm_prune, magnitude_prune, weight_layers, save_compressed, load_compressed,
                              read_compressed, plain_state_dict, compressed_bytes)
from corsd_suite.interop import deployable
from corsd_suite.models import resnet8

N, BS = 40, 16   # 30 training images (one batch of 16), 10 validation: a few seconds per network on the CPU

@pytest.fixture(scope='module')
def dls(): return block_dls(n=N, bs=BS)

def _png(): return get_image_files(digit_pngs(N, SIZE))[0]

def _targets(model, n=3):
    "Half of the first `n` convolutions named with dots (torchvision/timm names, as a user writes them)"
    names = [k for k, m in weight_layers(model).items() if '.' in k and isinstance(m, nn.Conv2d)][:n]
    assert len(names) == n and all('.' in k for k in names)
    return {k: .5 for k in names}

def _same_bits(a:torch.Tensor, b:torch.Tensor) -> bool:
    "Equal values and dtype, and equal bytes once a pruned -0.0 reads as 0.0 (the format stores zeros without a sign)"
    if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b): return False
    if not a.is_floating_point(): return True
    a, b = (a + 0.).contiguous().reshape(-1), (b + 0.).contiguous().reshape(-1)
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))

def _assert_round_trip(model:nn.Module, factory, f):
    "`model`'s plain state dict comes back from the compressed file `f`, every tensor equal bit for bit, dtype included"
    sd = plain_state_dict(model)
    assert any(v.ndim == 0 for v in sd.values())                        # BN's num_batches_tracked is in the file
    raw = read_compressed(f)
    assert set(raw) == set(sd) == set(factory().state_dict())
    back = load_compressed(factory, f).state_dict()
    for k, v in sd.items(): assert _same_bits(raw[k], v) and _same_bits(back[k], v), k

@pytest.mark.parametrize('name', list(MODELS))
def test_own_model_admm(name, dls, tmp_path):
    factory = MODELS[name]
    learn = Learner(dls, factory(), loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    tg = _targets(learn.model)
    with learn.no_bar(), learn.no_logging(): admm, hard = admm_prune(learn, tg, admm_epochs=1, retrain_epochs=1)
    assert admm.n_updates == 1 and hard.check()
    layers = weight_layers(learn.model)
    for k in tg: assert int((layers[k].weight != 0).sum()) == round(layers[k].weight.numel() * .5), k
    # export -> load_learner -> predict on a PNG
    learn.export(tmp_path/'learn.pkl')
    back = load_learner(tmp_path/'learn.pkl')
    lbl, idx, probs = back.predict(_png())
    assert probs.shape == (10,) and torch.isclose(probs.sum(), torch.tensor(1.)) and lbl == back.dls.vocab[int(idx)]
    torch.testing.assert_close(probs, learn.predict(_png())[2])
    # deployable: no training-only state, strict load into a fresh instance, the pruned zeros kept
    dep = deployable(learn)
    assert not any(getattr(o, 'training_only', False) for o in dep.modules()) and not dep._forward_pre_hooks
    fresh = factory(); fresh.load_state_dict(dep.state_dict())          # strict
    fl = weight_layers(fresh)
    for k in tg: assert torch.equal(fl[k].weight != 0, hard.masks[k]), k
    x = dls.valid.one_batch()[0]
    with torch.no_grad(): assert torch.equal(fresh.eval()(x), learn.model.eval()(x))
    # the compressed format, bit for bit
    _assert_round_trip(learn.model, factory, save_compressed(learn.model, tmp_path/'m.czip'))

def test_magnitude_prune_own_resnet18(dls, tmp_path):
    learn = Learner(dls, tv_resnet18(), loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    tg = {n: .5 for n in weight_layers(learn.model) if 'layer1' in n}   # the user's own names, with dots
    with learn.no_bar(), learn.no_logging(): hard = magnitude_prune(learn, tg, epochs=1)
    assert hard.check() and len(tg) == 4
    learn.export(tmp_path/'learn.pkl')
    probs = load_learner(tmp_path/'learn.pkl').predict(_png())[2]
    assert probs.shape == (10,) and torch.isfinite(probs).all()
    fresh = tv_resnet18(); fresh.load_state_dict(deployable(learn).state_dict())
    for k in tg: assert torch.equal(fresh.get_submodule(k).weight != 0, hard.masks[k]), k

def test_zoo_resnet8_round_trip(tmp_path):
    "The zoo's own BN model after a few training-mode batches (running stats and the 0-dim batch counters moved)"
    torch.manual_seed(0)
    net = resnet8().train()
    for _ in range(3): net(torch.randn(4, 3, 32, 32))
    tg = {n: .7 for n in list(weight_layers(net))[1:4]}
    f = save_compressed(net, tmp_path/'r8.czip', targets=tg)
    assert int(net.state_dict()['stem.1.num_batches_tracked']) == 3
    _assert_round_trip(net, resnet8, f)

def test_zero_dim_entries_are_raw_scalars():
    "0-dim tensors are written raw, shape [] and one element of their dtype; other raw tensors as before (1-D bytes)"
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    net[1].num_batches_tracked.fill_(2**40 + 5)                        # all 8 bytes matter
    parts = {h['name']: (h, secs) for h, secs in compressed_bytes(net)}
    h, secs = parts['1.num_batches_tracked']
    assert (h['enc'], h['shape'], h['dtype']) == ('raw', [], 'int64') and secs == [(2**40 + 5).to_bytes(8, 'little')]
    h, secs = parts['1.running_var']
    assert h['shape'] == [4] and secs == [net[1].running_var.numpy().tobytes()]

def test_deployable_after_interrupted_step_ships_pruned_weights(dls):
    "A Ctrl-C between the optimiser step and the re-masking leaves weights off their masks: `deployable` puts them back"
    torch.manual_seed(0)
    learn = Learner(dls, resnet8(n_in=3, n_out=dls.c), loss_func=CrossEntropyLossFlat())
    t = {n: .5 for n in weight_layers(learn.model) if n.startswith('stages')}
    hard = magnitude_prune(learn, t, epochs=1)
    with torch.no_grad():                                       # what an interrupted step leaves: every weight moved
        for n in t: weight_layers(learn.model)[n].weight.add_(0.01)
    net = deployable(learn)
    for n in t:
        w = weight_layers(net)[n].weight
        assert int((w != 0).sum()) == w.numel() // 2, n         # half of each layer's weights, exactly the mask's
