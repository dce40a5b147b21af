#!/usr/bin/env python3
"""Execute every notebook in `nbs/` on the CPU and save it with its outputs, so that GitHub, Jupyter and the site
built by `nbdev-docs` (which renders stored outputs and executes nothing) show the plots, tables and numbers.

    python tools/run_notebooks.py                 # every notebook, one at a time
    python tools/run_notebooks.py 20_mgnet repro  # only notebooks whose path contains one of these words

Each notebook runs the cells `nbdev-test` runs (cells flagged `slow`/`notest` are skipped and keep no output), with
`CORSD_DATA` as set in the environment (default `../shared/data` beside the checkout). A notebook whose cell raises
is left as it was and makes the script exit 1. Progress bars keep only their final state. Afterwards `nbdev-clean` tidies metadata and keeps the outputs, and each
notebook's size is checked against `--max-mb` (figures are PNG; keep each notebook's outputs small).
"""
from __future__ import annotations
import argparse, json, os, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT/'docs_check'))
from check import list_notebooks, read_config   # exec_one (the docs check's executor) runs in a subprocess per notebook

def collapse_cr(nb:Path) -> bool:
    "Keep what a terminal would show of `nb`'s stream outputs: each line's text after its last carriage return (progress bars)"
    d, changed = json.loads(nb.read_text()), False
    for c in d['cells']:
        for o in c.get('outputs', []):
            if o.get('output_type') != 'stream': continue
            text = ''.join(o['text'])
            new = '\n'.join(l.rsplit('\r', 1)[-1] for l in text.split('\n'))
            if new != text: o['text'], changed = new.splitlines(keepends=True), True
    if changed: nb.write_text(json.dumps(d, indent=1, ensure_ascii=False) + '\n')
    return changed

def run_one(nb:Path, skip_flags:list, timeout:int) -> str|None:
    "Execute `nb` in place in a subprocess (in its own folder); a notebook that raises is restored as it was"
    backup = nb.read_bytes()
    code = f"import sys; sys.path.insert(0, {str(ROOT/'docs_check')!r}); from check import exec_one; sys.exit(exec_one({str(nb)!r}, {skip_flags!r}, {timeout}))"
    env = {**os.environ, 'MPLBACKEND': 'Agg', 'PYTHONWARNINGS': 'ignore'}
    env['CORSD_DATA'] = str(Path(env.get('CORSD_DATA') or ROOT.parent/'shared'/'data').resolve())   # notebooks run in their own folder
    try: r = subprocess.run([sys.executable, '-c', code], cwd=nb.parent, env=env, capture_output=True, text=True)
    except BaseException: nb.write_bytes(backup); raise
    if r.returncode:
        nb.write_bytes(backup)
        return (r.stdout + r.stderr).strip()[-3000:] or f'a cell raised (exit {r.returncode})'
    errors = [o.get('ename') for c in json.loads(nb.read_text())['cells'] for o in c.get('outputs', []) if o.get('output_type') == 'error']
    if errors:
        nb.write_bytes(backup)
        return f'cells raised {errors}'
    collapse_cr(nb)
    return None

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('only', nargs='*', help='run only notebooks whose path contains one of these words')
    ap.add_argument('--max-mb', type=float, default=1.0, help='largest size of a saved notebook, in MB')
    a = ap.parse_args(argv)
    cfg = read_config(ROOT)
    nbs = [p for p in list_notebooks(cfg['nbs_path']) if not a.only or any(w in str(p) for w in a.only)]
    failed, big = {}, []
    for nb in nbs:
        t0 = time.time()
        why = run_one(nb, cfg['tst_flags'], cfg['cell_timeout'])
        if why: failed[nb] = why
        print(f"{'FAIL' if why else 'ok  '} {nb.relative_to(ROOT)} ({time.time()-t0:.0f}s)", flush=True)
    for nb in nbs: subprocess.run(['nbdev-clean', '--fname', str(nb)], cwd=ROOT, check=True)
    for nb in nbs:
        mb = nb.stat().st_size / 2**20
        if mb > a.max_mb: big.append(f'{nb.relative_to(ROOT)}: {mb:.2f} MB')
    for nb, why in failed.items(): print(f'\n== {nb.relative_to(ROOT)} raised (not saved):\n{why}')
    for b in big: print(f'too large (over {a.max_mb} MB): {b}')
    print(f"{len(nbs) - len(failed)} of {len(nbs)} notebooks saved with outputs")
    return 1 if failed or big else 0

if __name__ == '__main__': sys.exit(main())
