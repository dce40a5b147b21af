"Every notebook works outside the repository (Colab install cell first) and is reachable from the docs sidebar"
import json, re
from pathlib import Path
import pytest

NBS = Path(__file__).resolve().parents[1]/'nbs'
NOTEBOOKS = sorted(p for p in NBS.rglob('*.ipynb') if not any(q.startswith(('_', '.')) for q in p.relative_to(NBS).parts))

def _code(nb): return [''.join(c['source']) for c in json.loads(nb.read_text())['cells'] if c['cell_type'] == 'code']

def test_found_notebooks(): assert len(NOTEBOOKS) >= 12

@pytest.mark.parametrize('nb', NOTEBOOKS, ids=lambda p: str(p.relative_to(NBS)))
def test_colab_install_cell_first(nb):
    first, second = _code(nb)[:2]
    assert first.startswith('#| hide') and 'import importlib.util, subprocess, sys' in first, f'{nb.name}: first code cell is not the install cell'
    assert "'corsd_suite':" in second and "'nbdev':" in second and "find_spec(mod) is None" in second and "'pip', 'install'" in second, \
        f'{nb.name}: second code cell does not install the package and nbdev (its show_doc) where they are missing'

def test_sidebar_lists_every_notebook():
    listed = set(re.findall(r'^\s*-\s*([\w/.-]+\.ipynb)\s*$', (NBS/'sidebar.yml').read_text(), re.M))
    missing = {str(p.relative_to(NBS)) for p in NOTEBOOKS} - listed
    assert not missing, f'notebooks missing from nbs/sidebar.yml: {sorted(missing)}'
    assert all((NBS/p).exists() for p in listed), 'sidebar.yml names a notebook that does not exist'

@pytest.mark.parametrize('nb', NOTEBOOKS, ids=lambda p: str(p.relative_to(NBS)))
def test_committed_with_outputs(nb):
    "Notebooks are committed with their outputs (`python tools/run_notebooks.py`): GitHub and `nbdev-docs` show them, executing nothing"
    cells = [c for c in json.loads(nb.read_text())['cells'] if c['cell_type'] == 'code']
    assert any(c.get('outputs') for c in cells), f'{nb.name} has no saved output: run `python tools/run_notebooks.py {nb.stem}` and commit it'
