"The corsd-suite console script as a user runs it: fast start-up, clear errors, a table that survives Ctrl-C."
import os, signal, subprocess, sys, threading, time
import corsd_suite

def _run(*args, timeout=900):
    return subprocess.run(['corsd-suite', *args], capture_output=True, text=True, timeout=timeout)

def test_help_lists_commands():
    r = _run('--help')
    assert r.returncode == 0 and 'demo' in r.stdout and '--version' in r.stdout

def test_version():
    r = _run('--version')
    assert r.returncode == 0 and r.stdout.strip() == f"corsd_suite {corsd_suite.__version__}"

def test_cli_module_imports_nothing_heavy():
    code = "import sys, corsd_suite.cli; print(sorted(m for m in ('torch', 'fastai', 'pandas', 'corsd_suite.core') if m in sys.modules))"
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == '[]', r.stdout + r.stderr

def test_help_and_version_are_fast():
    for arg in ('--help', '--version'):
        best = min(_timed(arg) for _ in range(3))   # best of 3: other jobs share these cores
        assert best < 2.0, f"corsd-suite {arg} took {best:.2f}s"

def _timed(arg):
    t0 = time.perf_counter(); r = _run(arg); dt = time.perf_counter() - t0
    assert r.returncode == 0
    return dt

def test_unknown_command_fails():
    r = _run('frobnicate')
    assert r.returncode == 2 and "unknown command 'frobnicate'" in r.stdout

def test_negative_threads_is_a_clear_error():
    r = _run('demo', '--threads', '-1')
    assert r.returncode == 2 and '--threads must be 0' in r.stderr and 'Traceback' not in r.stderr

def test_only_matching_nothing_lists_the_rows():
    r = _run('demo', '--only', 'nonsense')
    assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr[-2000:]
    assert "no demo row matches --only 'nonsense'" in r.stderr
    for row in ('baseline', 'CORSD', 'MGNet', 'Calibrator', 'ADMM'): assert row in r.stderr

_ROWS = '''
import sys, time
from corsd_suite.cli import main, load_method_modules
from corsd_suite.core import DEMO_ROWS
load_method_modules()
DEMO_ROWS['zz_fast'] = (98, lambda quick: dict(method='zz fast row', metric='m', baseline=0.5, result=0.75))
DEMO_ROWS['zz_slow'] = (99, lambda quick: time.sleep(120))
sys.exit(main(['demo', '--only', 'zz_']))
'''

def test_ctrl_c_keeps_finished_rows():
    "SIGINT while the second row runs: the first row's table is printed, exit status 130, no traceback"
    p = subprocess.Popen([sys.executable, '-u', '-c', _ROWS], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(300, p.kill); watchdog.start()   # never hang the suite
    out = []
    for line in p.stdout:                                  # wait until the first row is done
        out.append(line)
        if 'zz fast row: done' in line: break
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    rest, err = p.communicate(timeout=60)
    watchdog.cancel()
    stdout = ''.join(out) + rest
    assert p.returncode == 130, (stdout, err)
    assert 'Traceback' not in err, err
    assert "interrupted (Ctrl-C) during 'zz_slow': 1 of 2 rows finished" in stdout
    table = [l for l in stdout.splitlines() if l.strip().startswith('zz fast row')]
    assert table and table[-1].split()[-3:-1] == ['0.5000', '0.7500'], stdout

def test_demo_baseline_row():
    r = _run('demo', '--only', 'baseline')
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'estimated time on 2 CPU cores: ~' in r.stdout
    line = [l for l in r.stdout.splitlines() if l.strip().startswith('baseline')][-1]   # the table's row, after the progress line
    acc = float(line.split()[-3])           # baseline, result, seconds are the last three columns
    assert 0.85 < acc <= 1.0, r.stdout
    assert 'CORSD' not in r.stdout and 'MGNet' not in r.stdout   # --only filters the rows
    assert 'FutureWarning' not in r.stderr and 'torch.jit.script' not in r.stderr, r.stderr   # no third-party noise
