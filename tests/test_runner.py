"The resumable benchmark runner (benchmarks/runner.py): resume bit for bit, skip finished runs, the machine lock, reports"
import json, os, subprocess, sys, threading, time, textwrap, types
from pathlib import Path
import pytest, torch

BENCH = Path(__file__).resolve().parents[1]/'benchmarks'
sys.path.insert(0, str(BENCH))
import runner
from fastai.callback.core import Callback
from corsd_suite.data import digits_dls, CropFlip
from corsd_suite.models import zoo_learner

torch.set_num_threads(1)
FINAL, CALLS, INTERRUPT = {}, [], {'stage': None}

class Boom(Callback):
    "Simulate a killed process right after the first epoch's checkpoint of stage `INTERRUPT['stage']`"
    order = 99
    def __init__(self, stage): self.stage = stage
    def after_epoch(self):
        if INTERRUPT['stage'] == self.stage and self.epoch == 0: raise KeyboardInterrupt('simulated interruption')

class CountEpochs(Callback):
    "Count the epochs that really train (epochs skipped by `start_epoch` never reach `before_train`)"
    def before_train(self): CALLS.append(self.epoch)

def learner(ctx, stage, arch='resnet8', width=0.25):
    dls = digits_dls(16, bs=64, device=ctx.device, augment=CropFlip(2, True))   # augmentation draws from torch's RNG
    kw = dict(width=width) if arch == 'resnet8' else {}
    from corsd_suite.models import get_model
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from corsd_suite.optim import adam
    m = get_model(arch, n_in=1, n_out=10, stats=dls.stats, **({'size': 16} if arch == 'lenet5' else kw))
    return Learner(dls, m, loss_func=CrossEntropyLossFlat(), cbs=[Boom(stage), CountEpochs()], opt_func=adam())

def train_one(ctx):
    learn = learner(ctx, 'train', ctx.config['arch'], ctx.config.get('width', 0.25))
    ctx.fit(learn, ctx.config['epochs'], 5e-3)
    FINAL[ctx.run_id] = {k: v.clone() for k,v in learn.model.state_dict().items()}
    return dict(train_loss=float(learn.recorder.values[-1][0]))

def bench(tmp_path, cache='cache', results='results', **kw):
    "A benchmark 't' with its cache and results folders under `tmp_path` (subnormals kept: flushing is process-wide)"
    kw.setdefault('keep_denormals', True)
    return runner.Benchmark('t', runner.runner_args(cache=str(tmp_path/cache), device='cpu', **kw), results=tmp_path/results)

def same_state(a, b):
    assert a.keys() == b.keys()
    return all(torch.equal(a[k], b[k]) for k in a)

def test_resume_is_bit_identical(tmp_path):
    "Interrupt a 3-epoch run after epoch 1, run again: it resumes at epoch 2 and ends with the uninterrupted weights"
    kw = dict(arch='resnet8', width=0.75, epochs=3, seed=0)     # 12+ channels: trains in channels_last, as the benchmarks do
    b = bench(tmp_path, 'full', 'results-full'); b.add(train_one, 'r', **kw); b.run()
    full = FINAL.pop('r')
    b = bench(tmp_path, 'cut', 'results-cut'); b.add(train_one, 'r', **kw)
    INTERRUPT['stage'] = 'train'
    try:
        with pytest.raises(KeyboardInterrupt): b.run()
    finally: INTERRUPT['stage'] = None
    assert (tmp_path/'cut'/'t'/'r'/'train'/'epoch.pth').exists() and 'r' not in FINAL
    torch.manual_seed(123); torch.rand(7)                      # the interrupted process's RNG has moved on anyway
    CALLS.clear()
    res = bench(tmp_path, 'cut', 'results-cut'); res.add(train_one, 'r', **kw)
    runs = res.run()
    assert CALLS == [1, 2], CALLS                               # only epochs 2 and 3 were trained again
    assert same_state(full, FINAL['r'])
    r = runs['r']
    assert r['resumed'] == 1 and len(r['epoch_seconds']['train']) == 3 and len(r['segments']) == 2
    assert r['segments'][0]['interrupted'] and r['wall_seconds'] >= r['segments'][0]['seconds'] > 0
    assert r['result']['train_loss'] > 0 and r['threads'] == torch.get_num_threads() and r['device'] == 'cpu'
    assert not (tmp_path/'cut'/'t'/'r'/'train'/'epoch.pth').exists() and (tmp_path/'cut'/'t'/'r'/'train'/'final.pth').exists()
    on_disk = json.loads((tmp_path/'results-cut'/'runs'/'t'/'r.json').read_text())
    assert on_disk['settings'] == kw and 'commit' in on_disk['git']
    assert on_disk['train_format'] == dict(channels_last=True, bf16=False, optimiser='torch-foreach') and on_disk['contiguous_stages'] == {}
    assert {'load_start', 'load_end', 'torch', 'wall_seconds', 'sec_per_epoch'} <= set(on_disk)

def fmt_probe(ctx):
    "Fit one epoch; report the last 3×3 conv weight's memory format, its output dtype in training and the loss dtype"
    learn = learner(ctx, 'train', 'resnet8', ctx.config.get('width', 1.))
    seen = {}
    conv = [m for m in learn.model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1 and m.kernel_size != (1, 1)][-1]   # else both formats at once
    conv.register_forward_hook(lambda m, i, o: seen.update(conv_out=str(o.dtype)) if m.training else None)
    class Probe(Callback):
        order = 50
        def after_loss(self): seen['loss'] = str(self.loss.dtype)
    learn.add_cb(Probe())
    ctx.fit(learn, 1, 5e-3)
    w = conv.weight
    return dict(channels_last=w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous(), **seen)

def test_train_format(tmp_path):
    "channels_last by default, contiguous or bf16 on request; the format is part of the settings hash and of the run record"
    b = bench(tmp_path); b.add(fmt_probe, 'f', seed=0); r = b.run()['f']
    assert r['result'] == dict(channels_last=True, conv_out='torch.float32', loss='torch.float32')
    assert r['train_format'] == dict(channels_last=True, bf16=False, optimiser='torch-foreach')
    b = bench(tmp_path, channels_last=False, bf16=True); b.add(fmt_probe, 'f', seed=0)
    assert b.status()['runs'] == dict(f='stale')              # made in another format: not mixed in
    r = b.run()['f']
    assert r['result'] == dict(channels_last=False, conv_out='torch.bfloat16', loss='torch.float32')   # bf16 inside, fp32 loss
    assert r['train_format'] == dict(channels_last=False, bf16=True, optimiser='torch-foreach')
    assert 'contiguous+bf16' in runner.runs_table({'f': r})
    assert r['segments'][-1]['flush_denormal'] is False and runner.subnormal_mode(r) == 'kept'   # the fixture keeps them
    a = runner.add_args(__import__('argparse').ArgumentParser()).parse_args(['--no-channels_last', '--bf16'])
    assert runner.train_format(a) == dict(channels_last=False, bf16=True, optimiser='torch-foreach')
    b = bench(tmp_path, 'cache2', 'results2'); b.add(fmt_probe, 'f', seed=0); b.add(fmt_probe, 'g', seed=0, train_format=dict(bf16=True))
    r = b.run()                                                     # one invocation, two formats: each run keeps its own
    assert b.status()['runs'] == dict(f='done', g='done')
    assert r['f']['train_format'] == dict(channels_last=True, bf16=False, optimiser='torch-foreach') and r['g']['train_format'] == dict(channels_last=True, bf16=True, optimiser='torch-foreach')
    assert r['g']['result']['conv_out'] == 'torch.bfloat16'

def test_channels_last_hazards(tmp_path):
    "A model with a 1×1 strided conv on at most 8 input channels trains contiguous (torch's CPU backend corrupts the heap), and says so"
    C = torch.nn.Conv2d
    assert runner.channels_last_hazards(torch.nn.Sequential(C(4, 8, 1, stride=2), C(16, 32, 1, stride=2), C(4, 8, 3, stride=2), C(4, 8, 1))) == ['0']
    b = bench(tmp_path); b.add(fmt_probe, 'q', seed=0, width=0.25); r = b.run()['q']   # quarter width: shortcuts on 4 and 8 channels
    assert r['result']['channels_last'] is False and r['train_format'] == dict(channels_last=True, bf16=False, optimiser='torch-foreach')   # asked, not used
    assert r['contiguous_stages'] == {'train': ['stages.1.0.short.0', 'stages.2.0.short.0']}   # 4 and 8 channels in
    assert 'channels_last → contiguous' in runner.runs_table({'q': r}) and 'corrupts the heap' in runner.runs_section({'q': r}, [], {}, [])
    assert runner.set_train_format(learner(types.SimpleNamespace(device='cpu'), 'x', 'resnet8', 1.), dict(channels_last=True)) == dict(channels_last=True)

def opt_probe(ctx):
    "Fit one epoch; report the kernels the torch optimiser stepped with"
    learn = learner(ctx, 'train', 'lenet5')
    ctx.fit(learn, 1, 5e-3)
    return {k: bool(learn.opt.opt.defaults.get(k)) for k in ('foreach', 'fused')}

def test_optimiser_format(tmp_path):
    "The optimiser's kernels are part of the format: foreach by default, fused on request (a new run, not mixed in); fastai's own optimisers are refused by name"
    b = bench(tmp_path); b.add(opt_probe, 'o', seed=0); r = b.run()['o']
    assert r['result'] == dict(foreach=True, fused=False) and 'channels_last, torch-foreach' in runner.runs_table({'o': r})
    b = bench(tmp_path, opt_impl='fused'); b.add(opt_probe, 'o', seed=0)
    assert b.status()['runs'] == dict(o='stale')
    r = b.run()['o']
    assert r['result'] == dict(foreach=False, fused=True) and r['train_format']['optimiser'] == 'torch-fused'
    from fastai.optimizer import Adam
    learn = learner(types.SimpleNamespace(device='cpu'), 'x', 'lenet5'); learn.opt_func = Adam
    with pytest.raises(ValueError, match='corsd_suite.optim'): runner.set_train_format(learn, runner.train_format(runner.runner_args()))
    with pytest.raises(ValueError, match='optimiser must be one of'): runner.set_optimiser(learner(types.SimpleNamespace(device='cpu'), 'x', 'lenet5'), 'torch-magic')

def shared_stage(ctx):
    ctx.fit(learner(ctx, 'base', 'lenet5'), 1, 5e-3, stage='base', shared='base-s0'); return {}

def test_shared_stage_keeps_its_format(tmp_path):
    "A shared stage trained in one format is not silently reused by a run in another (its record would lie)"
    b = bench(tmp_path); b.add(shared_stage, 'a', seed=0); b.run()
    b = bench(tmp_path, bf16=True); b.add(shared_stage, 'b', seed=0)
    with pytest.raises(RuntimeError, match='other fit settings'): b.run()

def raise_in_forward(ctx):
    "Fit in bf16 with a model whose forward raises an ordinary exception (not one of fastai's cancel exceptions)"
    learn = learner(ctx, 'train', 'lenet5')
    def boom(m, i, o): raise ValueError('bad batch')
    learn.model.register_forward_hook(boom)
    ctx.fit(learn, 1, 5e-3)

def test_bf16_exception_leaves_autocast(tmp_path):
    "A batch that raises under --bf16 does not leave the process in autocast (fastai runs no event after it)"
    b = bench(tmp_path, bf16=True); b.add(raise_in_forward, 'r', seed=0)
    with pytest.raises(ValueError, match='bad batch'): b.run()
    assert not torch.is_autocast_enabled('cpu')
    assert torch.nn.Linear(2, 2)(torch.ones(1, 2)).dtype == torch.float32

def two_stages(ctx):
    base = learner(ctx, 'base', 'lenet5')
    ctx.fit(base, 1, 5e-3, stage='base', shared=f"base-s{ctx.seed}")
    tune = learner(ctx, 'tune', 'lenet5')
    tune.model.load_state_dict(base.model.state_dict())
    ctx.fit(tune, 2, 1e-3, stage='tune', kind='fit')
    FINAL[ctx.run_id] = {k: v.clone() for k,v in tune.model.state_dict().items()}
    return {}

def test_stages_resume_and_share(tmp_path):
    "A finished stage is loaded, not trained again (also by another run sharing it); an unfinished one resumes"
    b = bench(tmp_path, 'full', 'results-full'); b.add(two_stages, 'a', seed=0); b.run()
    full = FINAL.pop('a')
    b = bench(tmp_path, 'cut', 'results-cut'); b.add(two_stages, 'a', seed=0); b.add(two_stages, 'b', seed=0, arm='other')
    INTERRUPT['stage'] = 'tune'
    try:
        with pytest.raises(KeyboardInterrupt): b.run()
    finally: INTERRUPT['stage'] = None
    CALLS.clear(); b.run()
    assert CALLS == [1, 0, 1], CALLS            # a: base loaded, tune epoch 2 only; b: base shared, tune 2 epochs
    assert same_state(full, FINAL['a']) and same_state(full, FINAL['b'])

def quick(ctx):
    CALLS.append(ctx.run_id)
    return dict(x=ctx.config.get('x', 0) * 2)

def test_skip_finished_and_only(tmp_path):
    CALLS.clear()
    b = bench(tmp_path, only='a*'); b.add(quick, 'a1', x=1); b.add(quick, 'a2', x=2); b.add(quick, 'b', x=3)
    assert set(b.run()) == {'a1', 'a2'} and CALLS == ['a1', 'a2']
    b = bench(tmp_path); b.add(quick, 'a1', x=1); b.add(quick, 'a2', x=2); b.add(quick, 'b', x=3)
    CALLS.clear(); runs = b.run()
    assert CALLS == ['b'] and runs['b']['result'] == dict(x=6)       # finished runs are not run again
    CALLS.clear(); b.run(); assert CALLS == []
    b = bench(tmp_path, list=True); b.add(quick, 'a1', x=1); b.add(quick, 'c', x=5)
    assert set(b.run()) == {'a1'} and CALLS == []                    # --list runs nothing
    b = bench(tmp_path, fresh=True, only='a1'); b.add(quick, 'a1', x=1)
    CALLS.clear(); b.run(); assert CALLS == ['a1']                   # --fresh runs them again
    bb = bench(tmp_path, only='zz'); bb.add(quick, 'a1', x=1)
    with pytest.raises(ValueError, match='matches none'): bb.run()

def test_report_missing_stale_and_commits(tmp_path):
    b = bench(tmp_path, only='a'); b.add(quick, 'a', x=1); b.add(quick, 'b', x=2); b.add(quick, 'c', x=3); b.run()
    b = bench(tmp_path, only='c'); b.add(quick, 'a', x=1); b.add(quick, 'b', x=2); b.add(quick, 'c', x=3); b.run()
    f = tmp_path/'results'/'runs'/'t'/'c.json'                       # pretend c was made with other code
    r = json.loads(f.read_text()); r['git'] = dict(commit='0123456789abcdef', dirty=False); f.write_text(json.dumps(r))
    (tmp_path/'results'/'runs'/'t'/'old.json').write_text(f.read_text())
    b = bench(tmp_path); b.add(quick, 'a', x=99); b.add(quick, 'b', x=2); b.add(quick, 'c', x=3)   # a's settings changed
    assert b.status() == dict(runs=dict(a='stale', b='missing', c='done'), other=['old'])
    seen = {}
    def build(runs): seen.update(runs); return dict(n=len(runs)), 'my table'
    res = b.report(build)
    assert set(seen) == {'c'}                                        # the stale run is not used
    s = res['summary']['runs']
    assert s['missing'] == ['b'] and s['stale'] == ['a'] and s['done'] == ['c'] and s['other'] == ['old']
    md = (tmp_path/'results'/'t.md').read_text()
    assert 'my table' in md and '**Missing runs** (not run yet): b' in md and 'Not used' in md and 'a (settings' in md
    assert '0123456789' in md
    res = b.report(build, command='python x.py --part 1 && python x.py --part 2')   # a result made by several invocations
    assert res['command'] == json.loads((tmp_path/'results'/'t.json').read_text())['command'] == 'python x.py --part 1 && python x.py --part 2'
    assert 'Reproduce: `python x.py --part 1 && python x.py --part 2`' in (tmp_path/'results'/'t.md').read_text()
    before = (tmp_path/'results'/'t.json').read_text()
    assert bench(tmp_path, list=True).report(build) is None          # a listing writes no result: it reproduces nothing
    assert (tmp_path/'results'/'t.json').read_text() == before
    b.run()                                                          # the stale and missing runs are (re)made
    assert b.status()['runs'] == dict(a='done', b='done', c='done')
    assert 'different code' in runner.runs_section(b.finished(), [], {}, [])   # two commits among the runs used

def test_subnormal_mode():
    "The run table says how each CPU run treated subnormals, over all its segments"
    run = lambda *f, device='cpu': dict(device=device, segments=[dict() if v is None else dict(flush_denormal=v) for v in f])
    assert [runner.subnormal_mode(run(*f)) for f in [(True,), (False, False), (True, False), (None,), (None, True)]] == \
           ['flushed', 'kept', 'mixed', '?', '?']
    assert runner.subnormal_mode(run(False, device='cuda:0')) == 'n/a'
    full = lambda *f: dict(run(*f), git=dict(commit='abc', dirty=False), threads=2, load_start=1., load_end=1., overloaded=False,
                           resumed=len(f) - 1, sec_per_epoch=1., wall_seconds=3.)
    assert '| flushed |' in runner.runs_table(dict(a=full(True)))
    assert 'Subnormal floats' in runner.runs_section(dict(a=full(True), b=full(None)), [], {}, [])   # a page mixing the two says so
    assert 'Subnormal floats' not in runner.runs_section(dict(a=full(True), b=full(True)), [], {}, [])

def test_overloaded_flag():
    seg = lambda s, e: dict(segments=[dict(load_start=s, load_end=e)], threads=2)
    assert runner.overloaded(seg(1.0, 2.6)) and not runner.overloaded(seg(1.9, 2.4))
    rows = {'x': dict(git=dict(commit='abc', dirty=True), device='cpu', threads=2, load_start=3., load_end=3., overloaded=True,
                      resumed=0, sec_per_epoch=1.5, wall_seconds=3.)}
    assert 'not comparable' in runner.runs_table(rows)
    mk = lambda arm, spe, over: dict(settings=dict(arm=arm), result=dict(acc=spe), sec_per_epoch=spe, overloaded=over)
    runs = dict(a=mk('x', 1., False), b=mk('x', 3., False), c=mk('x', 9., True), d=mk('y', 5., True))
    assert runner.by(runs, 'arm') == dict(x=[dict(acc=1.), dict(acc=3.), dict(acc=9.)], y=[dict(acc=5.)])
    assert runner.sec_per_epoch(runs, 'arm') == dict(x=2., y=None)   # loaded runs are left out of the comparison

def hold_lock(cache):
    "Another process that holds the machine lock until it reads a line"
    code = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(BENCH)!r})
        import common                       # the lock needs no torch: the holder starts fast
        with common.MachineLock({str(cache)!r}, 'holder'):
            print('locked', flush=True); sys.stdin.readline()
        """)
    p = subprocess.Popen([sys.executable, '-c', code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == 'locked'
    return p

def test_lock_refuses_then_waits(tmp_path):
    "A second benchmark exits naming the holder; with --wait it runs once the holder has finished"
    p = hold_lock(tmp_path/'cache')
    try:
        b = bench(tmp_path); b.add(quick, 'a')
        with pytest.raises(SystemExit, match=f"pid {p.pid} \\(benchmark 'holder'"): b.run()
        assert not (tmp_path/'results'/'runs'/'t'/'a.json').exists()
        threading.Timer(1., lambda: (p.stdin.write('release\n'), p.stdin.flush())).start()
        t0 = time.time(); b = bench(tmp_path, wait=True); b.add(quick, 'a'); assert 'a' in b.run()
        assert time.time() - t0 > 0.9                               # it waited for the holder
        assert p.wait(30) == 0
    finally:
        if p.poll() is None: p.kill(); p.wait()

OTHER_RUNNER = """
import sys; sys.path.insert(0, {bench!r}); import runner
def slow(ctx):            # holds the machine lock until the test says go
    print('running', flush=True); sys.stdin.readline(); return dict(x='made by the other runner')
b = runner.Benchmark('t', runner.runner_args(cache={cache!r}, device='cpu', keep_denormals=True), results={results!r})
b.add(slow, 'a', x=1); b.run()
"""

def test_wait_skips_runs_finished_while_waiting(tmp_path):
    "A runner queued with --wait decides what is left once it holds the lock: a run the lock holder finished meanwhile is not made again"
    code = OTHER_RUNNER.format(bench=str(BENCH), cache=str(tmp_path/'cache'), results=str(tmp_path/'results'))
    p = subprocess.Popen([sys.executable, '-c', code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        lines = iter(lambda: p.stdout.readline().strip() or 'exited', 'exited')   # its output lines until it exits
        assert 'running' in lines                                   # it holds the lock, run 'a' unfinished
        b = bench(tmp_path, wait=True); b.add(quick, 'a', x=1); b.add(quick, 'b', x=2)
        assert b.status()['runs'] == dict(a='missing', b='missing')
        threading.Timer(1., lambda: (p.stdin.write('go\n'), p.stdin.flush())).start()
        CALLS.clear(); runs = b.run()                               # waits for the lock, then makes only 'b'
        assert p.wait(60) == 0
    finally:
        if p.poll() is None: p.kill(); p.wait()
    assert CALLS == ['b'], CALLS
    a = json.loads((tmp_path/'results'/'runs'/'t'/'a.json').read_text())
    assert a['result'] == runs['a']['result'] == dict(x='made by the other runner')
    assert a['resumed'] == 0 and len(a['segments']) == 1            # not reloaded and rewritten as a resumed run
    assert runs['b']['result'] == dict(x=4) and b.status()['runs'] == dict(a='done', b='done')

def test_truncated_checkpoint_is_refused(tmp_path):
    b = bench(tmp_path); b.add(train_one, 'r', arch='lenet5', epochs=2)
    INTERRUPT['stage'] = 'train'
    try:
        with pytest.raises(KeyboardInterrupt): b.run()
    finally: INTERRUPT['stage'] = None
    f = tmp_path/'cache'/'t'/'r'/'train'/'epoch.pth'
    f.write_bytes(f.read_bytes()[:f.stat().st_size//2])
    with pytest.raises(RuntimeError, match=str(f).replace('.', r'\.')): b.run()

def test_cached_keeps_rng_and_loads(tmp_path):
    b = bench(tmp_path); ctx = runner.RunContext(b, 'r', dict(seed=0), {})
    torch.manual_seed(0)
    x = ctx.cached('stats', lambda: dict(v=torch.rand(3)))
    after_build = torch.rand(1)
    torch.manual_seed(0)
    y = ctx.cached('stats', lambda: 1/0)                            # loaded, not built again
    assert torch.equal(x['v'], y['v']) and torch.equal(after_build, torch.rand(1))

def test_bad_input(tmp_path):
    b = bench(tmp_path)
    with pytest.raises(TypeError, match='JSON'): b.add(quick, 'a', x=object())
    b.add(quick, 'a')
    with pytest.raises(ValueError, match='twice'): b.add(quick, 'a')
    with pytest.raises(ValueError, match='run id'): b.add(quick, '../a')
    if torch.cuda.is_available(): assert runner.resolve_device('cuda').type == 'cuda'
    else:
        with pytest.raises(RuntimeError, match='CUDA'): runner.resolve_device('cuda')
    ctx = runner.RunContext(b, 'a', {}, {})
    learn = zoo_learner(digits_dls(16, device='cpu'), 'lenet5')
    learn.dls.valid.n = 0
    with pytest.raises(ValueError, match='valid'): ctx.fit(learn, 1, 1e-3)
    assert runner.run_id_of(dict(seed=1, arm='corsd')) == 'arm=corsd-seed=1'

def test_throughput_pieces():
    "throughput.py's measurements on a tiny setting: GEMM peak, Learner and bare-loop images/s, utilisation, overhead"
    import throughput
    a = throughput.get_args(['--quick', '--steps', '1', '--bs', '8'])
    cpu = torch.device('cpu')
    g = throughput.gemm_peak(cpu, sizes=(32, 64), repeats=1, min_seconds=0.01)
    assert g['gemm_gflops'] == max(r['gflops'] for r in g['by_size']) > 0
    r = throughput.measure_model('lenet5', a, cpu, g['gemm_gflops'])
    assert r['learner_img_s'] > 0 and r['bare_img_s'] > 0 and r['macs'] > 1e6 and r['input'] == [1, 28, 28]
    assert abs(r['overhead'] - (r['bare_img_s'] / r['learner_img_s'] - 1)) < 1e-9
    assert abs(r['utilisation'] - 6 * r['macs'] * r['bare_img_s'] / (g['gemm_gflops'] * 1e9)) < 1e-9
    with pytest.raises(SystemExit): throughput.get_args(['--models', 'vgg99'])

DENORMAL_RUN = """
import sys, numpy as np, torch; sys.path.insert(0, {bench!r}); import runner
def product(ctx):   # a subnormal times one, on every thread: 0 where subnormals are flushed
    return dict(nonzero=int(((runner.subnormals(1 << 20) * 1.0) != 0).sum()))
b = runner.Benchmark('t', runner.runner_args({argv}, cache={cache!r}, device='cpu', threads=2), results={results!r})
b.add(product, 'r'); r = b.run()['r']
print(r['result']['nonzero'], r['segments'][0]['flush_denormal'])
"""

@pytest.mark.parametrize('keep', [False, True])
def test_denormals_flushed_on_every_thread(tmp_path, keep):
    "On CPU a benchmark process flushes subnormal floats to zero on all its threads (they slow CPUs down), unless --keep-denormals"
    code = DENORMAL_RUN.format(bench=str(BENCH), argv=['--keep-denormals'] if keep else [], cache=str(tmp_path/'c'), results=str(tmp_path/'r'))
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout.split()
    assert out[-2:] == (['1048576', 'False'] if keep else ['0', 'True'])

def test_flush_denormals_warns_when_threads_started_first():
    "Threads copy the flag when they start: a pool started before the flag would keep computing on subnormals, and says so"
    code = ("import sys, warnings, torch; sys.path.insert(0, %r); import runner; torch.set_num_threads(2); torch.ones(1 << 20) * 2.0\n"
            "with warnings.catch_warnings(record=True) as w:\n    warnings.simplefilter('always'); ok = runner.flush_denormals()\n"
            "print(ok, any('main thread only' in str(x.message) for x in w))") % str(BENCH)
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout.split()
    assert out[-2:] == ['False', 'True']
