"The corsd-suite console script as a user runs it."
import subprocess, sys

def _run(*args, timeout=900):
    return subprocess.run(['corsd-suite', *args], capture_output=True, text=True, timeout=timeout)

def test_help_lists_commands():
    r = _run('--help')
    assert r.returncode == 0 and 'demo' in r.stdout

def test_unknown_command_fails():
    r = _run('frobnicate')
    assert r.returncode == 2 and "unknown command 'frobnicate'" in r.stdout

def test_demo_baseline_row():
    r = _run('demo', '--only', 'baseline')
    assert r.returncode == 0, r.stderr[-2000:]
    line = [l for l in r.stdout.splitlines() if l.strip().startswith('baseline')][-1]   # the table's row, after the progress line
    acc = float(line.split()[-3])           # baseline, result, seconds are the last three columns
    assert 0.85 < acc <= 1.0, r.stdout
    assert 'CORSD' not in r.stdout and 'MGNet' not in r.stdout   # --only filters the rows
