"Reverse adversarial: save/load, interrupts, 2-process DDP, mixed precision, int8 composition, bad input, demo row."
import copy, json, warnings
import pytest, torch
from torch import nn
from fastai.callback.core import Callback, CancelFitException
from fastai.data.core import DataLoaders
from helpers import run_ddp, ddp_fit, params_digest, TRAIN_EVENTS, RaiseAt, bench_module
from corsd_suite.core import seed_everything
from corsd_suite.data import digits_dls, digits, TensorDL
from corsd_suite.models import lenet5
from corsd_suite.reverse_adversarial import (reverse_adv_learner, reverse_calibrator, model_with_calibrator, reverse_pgd,
    quantize_int8, StraightThrough, adapt_to_scene, ReverseAdvCallback, is_quantized, reverse_adversarial_row)

def _clf(dls, seed=0):
    seed_everything(seed)
    return lenet5(dls.n_channels, dls.c, dls.stats, size=16).eval()

def _learner(seed=0, bs=64):
    dls = digits_dls(16, bs=bs, device='cpu')
    clf = _clf(dls, seed)
    seed_everything(seed)
    return reverse_adv_learner(dls, clf, model_kw=dict(bound=0.3)), clf

def test_save_load_roundtrip(tmp_path):
    learn, clf = _learner()
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2)
    learn.path, learn.model_dir = tmp_path, 'models'
    f = learn.save('ra', with_opt=False)
    torch.load(f, weights_only=True)
    new = _learner(seed=1)[0]
    new.path, new.model_dir = tmp_path, 'models'
    new.load('ra', with_opt=False)
    x = learn.dls.valid.one_batch()[0]
    learn.model.eval(); new.model.eval()
    with torch.no_grad(): assert torch.allclose(learn.model(x), new.model(x))
    assert any(p.abs().sum() > 0 for p in new.model.cal.parameters())   # the trained calibrator came back

def _fit_on_rank(rank):
    learn, clf = _learner(bs=32)
    before, cal0 = params_digest(clf), params_digest(learn.model.cal)
    ddp_fit(learn, 1, 1e-2)
    cm = learn.model.module if hasattr(learn.model, 'module') else learn.model
    return dict(clf_before=before, clf_after=params_digest(cm.clf), cal_before=cal0, cal_after=params_digest(cm.cal))

def test_ddp_two_ranks():
    r0, r1 = run_ddp(_fit_on_rank)
    assert r0['clf_before'] == r0['clf_after'] == r1['clf_after']      # the main model stayed frozen
    assert r0['cal_after'] != r0['cal_before']                           # the calibrator trained
    assert abs(r0['cal_after'] - r1['cal_after']) < 1e-6                # and the replicas agree

@pytest.mark.parametrize('prec', ['bf16', 'fp16'])
def test_mixed_precision(prec):
    learn, clf = _learner()
    sd = {k: v.clone() for k,v in clf.state_dict().items()}
    learn = learn.to_bf16() if prec == 'bf16' else learn.to_fp16()
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2)
    assert all(torch.equal(sd[k], v) for k,v in clf.state_dict().items())
    preds, _ = learn.get_preds(cbs=[ReverseAdvCallback(4/255, 2)])
    assert torch.isfinite(preds).all() and preds.shape == (len(learn.dls.valid_ds), 10)

def test_int8_composition():
    dls = digits_dls(16, device='cpu')
    clf = _clf(dls)
    tr = digits(16).split(0.2, 0)[0]
    q = quantize_int8(clf, tr.x[:128].float()/255)
    assert is_quantized(q)
    x = tr.x[:64].float()/255
    with torch.no_grad():
        # a zero-initialised calibrator leaves the int8 model's predictions unchanged
        assert torch.equal(model_with_calibrator(q, reverse_calibrator(1))(x).argmax(1), q(x).argmax(1))
        ste = StraightThrough(q, clf)
        assert torch.equal(ste(x), q(x))                                  # forward = the int8 model
    xg = x[:4].clone().requires_grad_(True)
    ste(xg).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0               # backward = the float model's gradient
    cm = adapt_to_scene(ste, tr.subset(range(128)).transformed('rotation', 2), epochs=1)
    with torch.no_grad(): out = model_with_calibrator(q, cm.cal)(x)
    assert out.shape == (64, 10) and torch.isfinite(out).all()
    xr = reverse_pgd(q, x, 'teacher', eps=4/255, steps=2, teacher=clf)
    assert (xr - x).abs().max() <= 4/255 + 1e-6

def test_bad_input():
    dls = digits_dls(16, device='cpu')
    clf = _clf(dls)
    x = torch.rand(4, 1, 16, 16)
    with pytest.raises(ValueError, match='train mode'): reverse_pgd(clf.train(), x)
    clf.eval()
    with pytest.raises(ValueError, match='train mode'): quantize_int8(lenet5(1, 10, size=16).train(), x)
    with pytest.raises(ValueError, match=r'\(N, C, H, W\)'): reverse_pgd(clf, x[0])
    with pytest.raises(ValueError, match='channels'): model_with_calibrator(clf, reverse_calibrator(1))(torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match=r'\(N, C, H, W\)'): model_with_calibrator(clf, reverse_calibrator(1))(torch.rand(1, 16, 16))
    with pytest.raises(ValueError, match='same shape'): model_with_calibrator(clf, nn.Conv2d(1, 1, 3))(x)
    with pytest.raises(ValueError, match='y_star'): reverse_pgd(clf, x, 'oracle')
    q = quantize_int8(clf, x)
    with pytest.raises(ValueError, match='int8'): reverse_pgd(q, x)
    with pytest.raises(ValueError, match='attention'): reverse_pgd(clf, x, attention=1.5)
    with pytest.raises(ValueError, match='bound'): reverse_calibrator(1, bound=0.)

@pytest.mark.parametrize('ex', [KeyboardInterrupt, CancelFitException])
def test_interrupt_at_every_event(ex):
    learn, clf = _learner(bs=128)
    sd = {k: v.clone() for k,v in clf.state_dict().items()}
    mets = list(learn.metrics)
    for ev in TRAIN_EVENTS:
        try:
            with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2, cbs=RaiseAt(ev, ex, order=1))
        except (KeyboardInterrupt, CancelFitException): pass
        assert len(learn.metrics) == len(mets), ev
        assert not any(p.requires_grad for p in learn.model.clf.parameters()), ev
        copy.deepcopy(learn.model)                                      # no activation left on the model
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2)        # trains again
    assert all(torch.equal(sd[k], v) for k,v in clf.state_dict().items())
    preds, _ = learn.get_preds()
    x = learn.dls.valid_ds.x.float() / 255
    m = learn.model.eval()
    with torch.no_grad(): assert torch.allclose(preds, torch.softmax(m.clf(m.cal(x)), 1), atol=1e-6)

def test_bad_hyper_parameters_and_data():
    dls = digits_dls(16, device='cpu')
    clf = _clf(dls)
    x = torch.rand(4, 1, 16, 16)
    with pytest.raises(ValueError, match='eps'): reverse_pgd(clf, x, eps=-0.1)
    with pytest.raises(ValueError, match='step_size'): reverse_pgd(clf, x, step_size=-1)
    with pytest.raises(ValueError, match='steps'): reverse_pgd(clf, x, steps=-2)
    with pytest.raises(ValueError, match='eps'): ReverseAdvCallback(eps=-0.1)
    with pytest.raises(ValueError, match='step_size'): ReverseAdvCallback(step_size=-1)
    with pytest.raises(ValueError, match='class count'): reverse_adv_learner(dls, lenet5(1, 7, size=16))   # 7 classes, dls.c 10
    with pytest.raises(ValueError, match='expects 28×28'): reverse_adv_learner(dls, lenet5(1, 10, size=28))   # built for 28
    plain = DataLoaders(dls.train, dls.valid)                  # no size known: caught at the first batch
    plain.c, plain.n_channels = dls.c, dls.n_channels
    with pytest.raises(ValueError, match='expects 28×28'):
        l = reverse_adv_learner(plain, lenet5(1, 10, size=28))
        with l.no_bar(), l.no_logging(): l.fit(1)
    d64 = DataLoaders(*[dl.new(after_batch=lambda b: (b[0].double(), b[1])) for dl in (dls.train, dls.valid)])
    d64.c, d64.n_channels, d64.size = dls.c, dls.n_channels, dls.size
    with pytest.raises(ValueError, match='float64'):
        l = reverse_adv_learner(d64, clf)
        with l.no_bar(), l.no_logging(): l.fit(1)
    tr = digits(16).split(0.2, 0)[0]
    with pytest.raises(ValueError, match='empty'): adapt_to_scene(clf, tr.subset([]))
    with pytest.raises(ValueError, match='validation set'): reverse_adv_learner(DataLoaders(dls.train, TensorDL(tr.subset([]), 32)), clf)
    with pytest.raises(ValueError, match='training set'): reverse_adv_learner(DataLoaders(TensorDL(tr.subset([]), 32), dls.valid), clf)

def test_demo_row():
    r = reverse_adversarial_row(quick=True)
    assert set(r) >= {'method', 'metric', 'baseline', 'result', 'note'}
    assert 0 <= r['baseline'] <= 1 and r['result'] > r['baseline']

def test_admm_compressed_lenet5():
    "Composition: an ADMM-pruned-and-quantized LeNet-5 (corsd_suite.admm), frozen, behind a reverse-adversarial calibrator"
    from corsd_suite.admm import admm_prune, lenet5_targets
    from corsd_suite.models import train_digits
    learn = train_digits('lenet5', epochs=3, size=16, seed=0)
    with learn.no_bar(), learn.no_logging():
        admm_prune(learn, lenet5_targets(keep=dict(fc1=.05), bits=4), admm_epochs=1, retrain_epochs=1, every=3, unit='batch')
    clf = learn.model.eval()
    w = clf.head[1].weight
    assert (w == 0).float().mean() > 0.9 and len(torch.unique(w)) <= 2**4   # pruned and quantized
    sd = {k: v.clone() for k,v in clf.state_dict().items()}
    tr, va = digits(16).split(0.2, 0)
    s_tr, s_va = tr.transformed('rotation', 2, seed=1), va.transformed('rotation', 2, seed=2)
    cm = adapt_to_scene(clf, s_tr, epochs=4)
    x = s_va.x.float()/255
    with torch.no_grad(): a0, a1 = [(m(x).argmax(1) == s_va.y).float().mean().item() for m in (clf, cm)]
    assert a1 > a0
    assert all(torch.equal(sd[k], v) for k,v in clf.state_dict().items())   # still the same compressed model
    xr = reverse_pgd(clf, x[:32], 'pred', eps=4/255, steps=3)
    with torch.no_grad(): assert (clf(xr).argmax(1) == clf(x[:32]).argmax(1)).float().mean() >= 0.95

def test_lowbit_levels_frozen_and_input_gradients():
    from corsd_suite.reverse_adversarial import lowbit, pick_bits
    dls = digits_dls(16, device='cpu')
    clf = _clf(dls)
    x = digits(16).x[:64].float()/255
    sd = {k: v.clone() for k,v in clf.state_dict().items()}
    for wb in (2, 3):
        lb = lowbit(clf, wb, 4, x)
        for m in lb.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)): assert m.weight.unique().numel() <= 2**wb
        assert not any(p.requires_grad for p in lb.parameters()) and not lb.training
    assert all(torch.equal(sd[k], v) for k,v in clf.state_dict().items())      # the float model is untouched
    xg = x[:4].clone().requires_grad_(True)
    lb(xg).logsumexp(1).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    with pytest.raises(ValueError, match='calib_x'): lowbit(clf, 4, 4)
    with pytest.raises(ValueError, match='w_bits'): lowbit(clf, 0)
    y = digits(16).y[:64]
    pb = pick_bits(clf, x, y, min_drop=0.5, candidates=((4, None), (2, 4)))
    assert not pb['reached'] and len(pb['tried']) == 2                  # an untrained model cannot drop by 50 points

def test_benchmark_summary(tmp_path):
    "The benchmark's summary has issue 19's keys per `<arch>@<dataset>`; `refined_mean_acc` is the low-bit model refined towards the float model"
    m = bench_module('reverse_adversarial')
    a = m.parse(['--tfms', 'rotation,noise'])
    assert a.seeds == [0, 1, 2] and a.epochs == 30 and a.n_train is None and a.n_test is None   # whole splits, 3 seeds
    row = lambda seed: dict(frozen=0.5, calibrated=0.7 + 0.01*seed, calibrated_clean=0.98, finetune=0.8,
                            lowbit_frozen=0.4, lowbit_calibrated=0.6, lowbit_refined=0.45)
    runs = {f'lenet5_mnist-s{s}': dict(settings=dict(model='lenet5@mnist', seed=s), result=dict(
                clean_acc=0.99, lowbit_bits='w3a32', lowbit_clean_acc=0.95, lowbit_calibrated_clean_acc=0.97, lowbit_refined_clean_acc=0.96,
                calibrator_param_ratio=0.05, n_fit=59000, n_val=1000, n_test=10000, n_scene=1000,
                tfms={t: row(s) for t in a.tfms})) for s in a.seeds}
    s, md = m.summarise(runs, a)
    r = s['lenet5@mnist']
    assert list(r) == m.KEYS and r['seeds'] == 3
    assert abs(r['calibrated_mean_acc']['mean'] - 0.71) < 1e-9 and abs(r['refined_mean_acc']['mean'] - 0.45) < 1e-9
    assert abs(s['gain_per_tfm']['lenet5@mnist']['rotation']['mean'] - 0.21) < 1e-9
    assert '| 50% |' in md and 'half of it recovered met' in md and 'gain ≥ +10 met (+21.0)' in md   # half of the 4-point drop
    assert 'NOT met (98.00 vs 99.00)' in md and 'clean refined (teacher)' in md and "towards the float model's prediction" in md
    assert "refine_on" not in md and 'lenet5@mnist: 59000 / 1000 / 1000 / 10000' in md   # split sizes, per dataset
    assert abs(s['clean_via_calibrator_per_tfm']['lenet5@mnist']['noise']['mean'] - 0.98) < 1e-9
    assert '## Clean test accuracy through each scene calibrator' in md and '0 of 2 scene calibrators' in md
    assert 'Variant' not in md and 'Variant (`--clean-mix`)' in m.summarise(runs, m.parse(['--tfms', 'rotation,noise', '--clean-mix']))[1]

def test_clean_by_tfm():
    "The page names the scene calibrators that cost clean accuracy, worst first, and only those"
    m = bench_module('reverse_adversarial')
    per = {'noise': dict(mean=0.992), 'translate': dict(mean=0.90), 'rotation': dict(mean=0.95)}
    note = m.clean_by_tfm('lenet5@mnist', 0.994, per)
    assert note.startswith('lenet5@mnist: 1 of 3 scene calibrators keep clean accuracy within 0.5 points')
    assert note.index('translate -9.40') < note.index('rotation -4.40') and 'noise' not in note
    assert m.clean_by_tfm('m', 0.994, {'noise': dict(mean=0.99)}) == 'm: 1 of 1 scene calibrators keep clean accuracy within 0.5 points'

def test_clean_mix_md(tmp_path, monkeypatch):
    "The main page quotes the `--clean-mix` diagnostic beside its own per-transformation figures, only where both exist"
    m = bench_module('reverse_adversarial')
    monkeypatch.setattr(m, 'RESULTS', tmp_path)
    a, v = m.parse([]), lambda x: dict(mean=x, std=0.)
    clean, gain = {'lenet5@mnist': {'translate': v(.85), 'noise': v(.99)}}, {'lenet5@mnist': {'translate': v(.6), 'noise': v(.2)}}
    assert m.clean_mix_md(a, clean, gain) == ''   # no diagnostic yet
    mix = dict(command='python benchmarks/reverse_adversarial.py --clean-mix', summary={
        'lenet5@mnist': dict(seeds=3), 'resnet20@cifar10': dict(seeds=1),
        'clean_via_calibrator_per_tfm': {'lenet5@mnist': {'translate': v(.98)}, 'resnet20@cifar10': {'translate': v(.9)}},
        'gain_per_tfm': {'lenet5@mnist': {'translate': v(.55)}, 'resnet20@cifar10': {'translate': v(.1)}}})
    (tmp_path/f'{m.MIX}.json').write_text(json.dumps(mix))
    md = m.clean_mix_md(a, clean, gain)
    assert '| lenet5@mnist | translate | 3 | 85.00 | 98.00 | +60.00 | +55.00 |' in md and '--clean-mix`' in md
    assert 'resnet20' not in md and 'noise' not in md   # only what both pages have
    assert m.clean_mix_md(m.parse(['--clean-mix']), clean, gain) == ''   # the diagnostic's own page does not quote itself
