"""Every notebook runs top to bottom as Jupyter's "Run all" runs it: every code cell, nbdev's directives ignored (`eval:
false`, `slow` and `notest` cells run too), `CORSD_DATA` unset, the install cells skipped (the package is installed here)
and the final `nbdev_export()` cell skipped (it would rewrite the package). Cells that need real data or hours of compute
open with a visible flag (`real_data`, `run_recipes`, a tutorial's `quick`): this test proves those flags guard them.
This pass stands in for `nbdev-test`, whose cells are a subset of these."""
import json, os, time
from pathlib import Path
import pytest
from execnb.shell import read_nb
from execnb.shell import CaptureShell

NBS = Path(__file__).resolve().parents[1]/'nbs'
NOTEBOOKS = sorted(p for p in NBS.rglob('*.ipynb') if not any(q.startswith(('_', '.')) for q in p.relative_to(NBS).parts))
MAX_SECONDS = 480   # the longest notebook (the your-own-model tutorial) takes ~4 minutes alone on 2 cores

def _skipped(i:int, src:str) -> bool:
    "The two install cells (the first two code cells) and the export cell"
    return i < 2 or 'nbdev_export()' in src

@pytest.mark.parametrize('nb', NOTEBOOKS, ids=lambda p: str(p.relative_to(NBS)))
def test_run_all(nb, monkeypatch, tmp_path):
    monkeypatch.delenv('CORSD_DATA', raising=False)
    monkeypatch.setenv('MPLBACKEND', 'Agg')
    monkeypatch.chdir(nb.parent)                  # where Jupyter starts a notebook's kernel
    book = read_nb(nb)
    code = [c for c in book.cells if c.cell_type == 'code']
    assert len(code) > 2, f"{nb.name}: no code beyond the install cells"
    shell, t0 = CaptureShell(), time.perf_counter()
    for i, c in enumerate(code):
        if _skipped(i, c.source): continue
        shell.run(c.source)
        if shell.exc: raise AssertionError(f"{nb.name}, code cell {i} failed under Run all:\n{c.source[:400]}") from shell.exc
    took = time.perf_counter() - t0
    assert took < MAX_SECONDS, f"{nb.name} took {took:.0f} s under Run all (bound {MAX_SECONDS} s)"
