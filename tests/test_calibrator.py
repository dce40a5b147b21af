"Calibrator: state in one module (save/load, export, deepcopy, resume), interrupts, 2-process DDP, mixed precision, bad input, demo row."
import copy, pytest, torch
from torch import nn
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.callback.core import Callback, CancelFitException
from fastai.data.core import DataLoaders
from fastai.torch_core import params
from helpers import run_ddp, params_digest, TRAIN_EVENTS, RaiseAt, bench_module
from corsd_suite.core import seed_everything, DEMO_ROWS, save_checkpoint, load_checkpoint
from corsd_suite.data import TensorDL, image_dls, ImageSet
from corsd_suite.models import dtn, lenet5
from corsd_suite.calibration import Calibrator, CalibratedModel, bn_state
from corsd_suite.calibrator import (CalibratorCallback, CalibratorModule, calibrator_learner, shifted_digits, calibrator_row,
                                    PixelDiscriminator)

def _setup(n=128, bs=32, seed=0):
    seed_everything(seed)
    pair = shifted_digits(16)
    dls = image_dls(pair.source_train.subset(range(n)), pair.target_eval.subset(range(64)), bs=bs, device='cpu')
    clf = dtn(1, 10, dls.stats, width=0.25, size=16).eval()
    return pair, dls, clf, TensorDL(pair.target_adapt, bs, shuffle=True, drop_last=True, device='cpu')

def _learner(seed=0, n=128, **kw):
    pair, dls, clf, tdl = _setup(n=n, seed=seed)
    return calibrator_learner(dls, clf, tdl, cal=Calibrator(1, n_blocks=1), **kw)

def _cb(learn): return learn.cbs.filter(lambda c: isinstance(c, CalibratorCallback))[0]

def _fit(learn, n=1, lr=1e-3, **kw):
    with learn.no_bar(), learn.no_logging(): learn.fit(n, lr, **kw)
    return learn

def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys(), set(sa) ^ set(sb)
    return [k for k in sa if not torch.equal(sa[k].cpu(), sb[k].cpu())]

def test_state_lives_in_the_module(tmp_path):
    learn = _fit(_learner())
    m = learn.model
    assert isinstance(m, CalibratorModule) and int(m.d_steps) == 4
    sd = m.state_dict()
    assert sd['d_state.exp_avg_0'].abs().sum() > 0 and float(sd['d_state.step_0']) == 4   # the discriminators' Adam moments
    assert int(sd['tgt_state'][1]) >= 1 and int(sd['tgt_state'][2]) > 0                     # the target stream's position
    learn.path, learn.model_dir = tmp_path, 'models'
    sd_file = learn.save('cal_model', with_opt=False)
    assert 'd_state.exp_avg_0' in torch.load(sd_file, weights_only=True)   # a plain state dict, read weights-only
    learn.save('cal', with_opt=True)
    new = _learner(seed=1)
    new.path, new.model_dir = tmp_path, 'models'
    new.load('cal', with_opt=True)
    assert _same_state(learn.model, new.model) == []
    assert len(new.opt.state_dict()['state']) > 0                  # the calibrator's optimiser came back too
    _fit(new)
    assert int(new.model.d_steps) == 8                             # training resumes from the loaded state

def test_pickle_and_deepcopy_carry_the_state():
    "What `learn.export` does (pickling the whole learner) keeps the state; `copy.deepcopy` too"
    import pickle
    learn = _fit(_learner())
    back = pickle.loads(pickle.dumps(learn))
    assert _same_state(learn.model, back.model) == []
    _fit(back)
    assert int(back.model.d_steps) == 8
    cp = copy.deepcopy(learn)
    assert _same_state(learn.model, cp.model) == [] and int(cp.model.d_steps) == 4
    _fit(cp)                                                       # a copy trains, from the target position of its buffer
    assert int(cp.model.d_steps) == 8

def test_resume_equals_uninterrupted(tmp_path):
    "3 epochs straight == 1 epoch, save_checkpoint, a NEW learner, load_checkpoint, 2 more epochs: bit-identical on CPU"
    a = _fit(_learner(n=64), 3)
    b = _fit(_learner(n=64), 1)
    save_checkpoint(b, tmp_path/'ck.pth')
    c = _learner(n=64, seed=7)                                     # other seed: other init and other shuffle states
    load_checkpoint(c, tmp_path/'ck.pth')
    _fit(c, 3, start_epoch=1)
    assert _same_state(a.model, c.model) == []
    assert int(c.model.d_steps) == 6

@pytest.mark.parametrize('ex', [KeyboardInterrupt, CancelFitException])
def test_interrupt_at_every_event(ex):
    learn = _learner(n=64)
    mets = list(learn.metrics)
    for ev in TRAIN_EVENTS:
        try: _fit(learn, cbs=RaiseAt(ev, ex, order=1))
        except (KeyboardInterrupt, CancelFitException): pass
        assert len(learn.metrics) == len(mets) and all(a is b for a,b in zip(learn.metrics, mets)), ev   # metric list unchanged
        assert all(p.requires_grad for p in learn.model.d_params()), ev                                  # discriminators trainable
        copy.deepcopy(learn.model)                                     # nothing left on the model from the interrupted batch
    steps = int(learn.model.d_steps)
    _fit(learn)                                                        # trains again
    assert int(learn.model.d_steps) == steps + 2
    preds, _ = learn.get_preds()                                       # and predicts through the deployment path
    x = learn.dls.valid_ds.x.float() / 255
    m = learn.model.eval()
    with torch.no_grad(): ref = torch.softmax(m.clf(m.cal(x)), 1)
    assert torch.allclose(preds, ref, atol=1e-6)
    assert len(learn.recorder.metric_names) == len(['epoch', 'train_loss', 'valid_loss']) + len(mets) + 1

def _ddp_rank(rank):
    from helpers import ddp_fit
    seed_everything(0)
    learn = _learner()
    clf0 = copy.deepcopy(learn.model.clf.state_dict())
    ddp_fit(learn, 1, 1e-3)
    m = learn.model.module if hasattr(learn.model, 'module') else learn.model
    same = all(torch.equal(v, clf0[k]) for k,v in m.clf.state_dict().items())
    return dict(cal=params_digest(m.cal), d=params_digest(m.d_out) + params_digest(m.d_pix), iters=int(m.d_steps), clf_same=same,
                adam=float(sum(b.double().sum() for b in m.d_state.buffers())))

def test_ddp_two_ranks():
    r0, r1 = run_ddp(_ddp_rank)
    assert r0['iters'] == r1['iters'] == 2                         # 4 source batches shared by 2 ranks
    assert abs(r0['cal'] - r1['cal']) < 1e-6 and abs(r0['d'] - r1['d']) < 1e-6   # replicas agree (calibrator by DDP, discriminators by the engine)
    assert abs(r0['adam'] - r1['adam']) < 1e-6
    assert r0['clf_same'] and r1['clf_same']
    seed_everything(0)
    assert abs(params_digest(_learner().model.cal) - r0['cal']) > 1e-6   # and they trained

@pytest.mark.parametrize('mode', ['fp16', 'bf16'])
def test_mixed_precision(mode):
    learn = _learner()
    clf0 = copy.deepcopy(learn.model.clf.state_dict())
    learn = learn.to_fp16() if mode == 'fp16' else learn.to_bf16()
    _fit(learn)
    cb = _cb(learn)
    assert len(cb.history) == 4 and all(torch.isfinite(torch.tensor([h['g_loss'], h['d_loss']])).all() for h in cb.history)
    assert all(torch.equal(v, clf0[k]) for k,v in learn.model.clf.state_dict().items())

def _cl(dls, clf, tdl, **kw): return calibrator_learner(dls, copy.deepcopy(clf), tdl, cal=Calibrator(1, n_blocks=1), **kw)

def test_bad_input():
    pair, dls, clf, tdl = _setup()
    small = TensorDL(pair.target_adapt.resize(12), 32, shuffle=True, drop_last=True)
    with pytest.raises(ValueError, match='target images'): _fit(_cl(dls, clf, small))
    rgb = TensorDL(pair.target_adapt.to_channels(3), 32, shuffle=True, drop_last=True)
    with pytest.raises(ValueError, match='target images'): _fit(_cl(dls, clf, rgb))
    few = TensorDL(pair.target_adapt.subset(range(10)), 32, shuffle=True, drop_last=True)   # fewer images than a batch
    with pytest.raises(ValueError, match='yielded no images'): _fit(_cl(dls, clf, few))
    with pytest.raises(ValueError, match='class count'): _cl(dls, dtn(1, 7, dls.stats, width=0.25, size=16), tdl)
    bad = Learner(dls, CalibratorModule(Calibrator(1, n_blocks=1), copy.deepcopy(clf)), loss_func=CrossEntropyLossFlat(),
                  splitter=lambda m: [params(m)], cbs=CalibratorCallback(tdl))
    with pytest.raises(ValueError, match='optimiser'): _fit(bad)    # a splitter that hands the classifier to the optimiser
    with pytest.raises(ValueError, match='channels'): Calibrator(1)(torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match='mode'): Calibrator(1, mode='both')

def test_bad_hyper_parameters():
    pair, dls, clf, tdl = _setup()
    with pytest.raises(ValueError, match='lam_t'): _cl(dls, clf, tdl, cb_kw=dict(lam_t=-1.))
    with pytest.raises(ValueError, match='lam_s'): _cl(dls, clf, tdl, cb_kw=dict(lam_s=-0.1))
    with pytest.raises(ValueError, match='d_lr'): _cl(dls, clf, tdl, cb_kw=dict(d_lr=0.))
    with pytest.raises(ValueError, match='box'): Calibrator(1, box=(1, 0))
    with pytest.raises(ValueError, match='patch'): _cl(dls, clf, tdl, model_kw=dict(patch=0))
    with pytest.raises(ValueError, match='patch'): PixelDiscriminator(1, patch=0)
    with pytest.raises(ValueError, match='bound'): Calibrator(1, bound=-0.2)

def test_bad_batches():
    pair, dls, clf, tdl = _setup()
    u8 = torch.utils.data.DataLoader(pair.target_adapt.x, batch_size=32, shuffle=True, drop_last=True)   # uint8 images, 0-255
    with pytest.raises(ValueError, match='uint8'): _fit(_cl(dls, clf, u8))
    d64 = DataLoaders(*[dl.new(after_batch=lambda b: (b[0].double(), b[1])) for dl in (dls.train, dls.valid)])
    d64.c, d64.n_channels, d64.size = dls.c, dls.n_channels, dls.size
    with pytest.raises(ValueError, match='float64'): _fit(_cl(d64, clf, tdl))
    with pytest.raises(ValueError, match='expects 28×28'): _cl(dls, dtn(1, 10, dls.stats, width=0.25, size=28), tdl)   # built for 28, data 16
    plain = DataLoaders(dls.train, dls.valid)                         # no `size`: caught at the first batch instead
    plain.c, plain.n_channels = 10, 1
    with pytest.raises(ValueError, match='expects 28×28'): _fit(_cl(plain, dtn(1, 10, dls.stats, width=0.25, size=28), tdl))

def test_empty_data():
    pair, dls, clf, tdl = _setup()
    empty_valid = DataLoaders(dls.train, TensorDL(pair.target_eval.subset([]), 32))
    with pytest.raises(ValueError, match='validation set'): _cl(empty_valid, clf, tdl)
    empty_train = DataLoaders(TensorDL(pair.source_train.subset([]), 32), dls.valid)
    with pytest.raises(ValueError, match='training set'): _cl(empty_train, clf, tdl)
    with pytest.raises(ValueError, match='target DataLoader is empty'): _cl(dls, clf, TensorDL(pair.target_adapt.subset([]), 32))

def test_frozen_bn_buffers_identical_and_code_faithful_moves():
    learn = _learner()
    bn0 = bn_state(learn.model.clf)
    _fit(learn, 2)
    assert all(torch.equal(v, bn0[k]) for k,v in bn_state(learn.model.clf).items())
    cf = _fit(_learner(model_kw=dict(code_faithful_bn=True)))
    assert not all(torch.equal(v, bn0[k]) for k,v in bn_state(cf.model.clf).items())

def test_deployable_shares_and_matches():
    learn = _fit(_learner())
    dep = learn.model.deployable()
    assert isinstance(dep, CalibratedModel) and dep.cal is learn.model.cal and not hasattr(dep, 'd_out')
    x = learn.dls.valid.one_batch()[0]
    learn.model.eval()
    with torch.no_grad(): assert torch.equal(dep(x), learn.model(x))

def test_demo_row_registered():
    order, f = DEMO_ROWS['Calibrator']
    assert order == 30 and f is calibrator_row

def test_erode_images_checks():
    from corsd_suite.calibrator import erode_images
    x = torch.zeros(1, 1, 5, 5, dtype=torch.uint8); x[0, 0, 1:4, 1:4] = 200
    assert erode_images(x)[0, 0].nonzero().tolist() == [[2, 2]]
    with pytest.raises(ValueError, match='uint8'): erode_images(x.float())
    with pytest.raises(ValueError, match='odd'): erode_images(x, k=2)

def test_benchmark_summary_keys(tmp_path):
    "The benchmark's summary has the issue's keys for MNIST→USPS, plus `usps_to_mnist`; the figure is drawn from the JSON"
    import json
    m = bench_module('calibrator')
    a = m.parse(['--seeds', '2'])
    assert (a.size, a.bs, a.iters, a.lr, a.n_blocks) == (16, 128, None, 1e-4, 9)   # the authors' protocol at USPS's own size
    class Plan:                                                    # what `plan` adds to a benchmark
        def __init__(self): self.runs = {}
        def add(self, fn, rid, **kw): self.runs[rid] = kw
    for argv, its in (([], (11400, 2850)), (['--iters', '100'], (100, 100))):   # the code's length per direction, or --iters
        b = Plan(); m.plan(b, m.parse(argv))
        assert (b.runs['mnist_to_usps-cal-s0']['iters'], b.runs['usps_to_mnist-cal-s0']['iters']) == its
        assert (b.runs['mnist_to_usps-cal-s0']['ngf'], b.runs['usps_to_mnist-cal-s0']['bound']) == (8, 0.45)
    assert m.parse(['--size', '28']).size == 28
    with pytest.raises(SystemExit): m.parse(['--arms', 'cal,nope'])
    runs = {}
    for d in m.DIRS:
        for seed in (0, 1):
            for i, arm in enumerate(m.ARMS):
                res = dict(adapt_images=7291 if d == 'mnist_to_usps' else 60000, eval_images=2007, protocol='p', clf_params=1000,
                           iterations=0 if arm in ('source_only', 'adabn') else 11232, target_acc=0.7 + 0.05*i + 0.01*seed,
                           source_acc=0.99 - 0.001*i, **({'cal_params': 50} if arm.startswith('cal') else {}))
                if arm.startswith('cal'): res['target_acc_per_epoch'] = [0.6, res['target_acc'] + 0.02, res['target_acc']]
                runs[f'{d}-{arm}-s{seed}'] = dict(settings=dict(direction=d, arm=arm, seed=seed, size=16, bs=128, lr=1e-4, ngf=8,
                                                                n_blocks=9, bound=0.2), result=res, overloaded=False)
    m.OUT_PNG = tmp_path/'c.png'
    s, md = m.summarise(runs)
    for k in ('source_only_acc', 'adabn_acc', 'calibrated_acc', 'calibrated_code_bn_acc', 'dann_acc', 'source_acc_plain',
              'source_acc_calibrated', 'calibrator_param_ratio', 'seeds', 'command', 'adapt_images', 'iterations', 'size'):
        assert k in s, k
    assert s['adapt_images'] == 7291 and s['iterations'] == 11232 and s['size'] == 16 and s['seeds'] == 2
    assert abs(s['calibrated_acc'] - 0.805) < 1e-9 and abs(s['calibrator_param_ratio'] - 0.05) < 1e-9
    for k in ('source_only_acc', 'adabn_acc', 'calibrated_acc', 'calibrated_code_bn_acc', 'dann_acc', 'source_acc_plain', 'source_acc_calibrated'):
        assert k in s['usps_to_mnist'], k
    assert s['usps_to_mnist']['adapt_images'] == 60000
    assert 'MNIST→USPS' in md and 'USPS→MNIST' in md and 'target evaluation labels' in md and 's0: ' in md
    assert "USPS's own resolution" in md                                      # the size's reason is on the page
    assert 'best epoch of each run' in md and 'averages 82.5% for the frozen-BN calibrator (+12.0' in md   # the bound, from the epochs
    assert 'would not give it +10' not in md                                  # said only when even the bound misses +10
    (tmp_path/'c.json').write_text(json.dumps(dict(summary=s)))
    m.plot(tmp_path/'c.json', tmp_path/'c.png')
    assert (tmp_path/'c.png').stat().st_size > 1000
