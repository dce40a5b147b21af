"Tests of the docs check (docs_check/check.py) on a tiny nbdev project with one deliberately broken page per fault"
import base64, io, json, shutil, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT/'docs_check'/'check.py'
pytestmark = pytest.mark.skipif(not (shutil.which('chromium') or shutil.which('chromium-browser')),
                                reason='the docs check needs Chromium: apt-get install -y chromium')

PYPROJECT = '''[project]
name = "fixpkg"
version = "0.0.1"
description = "docs check fixture"
[tool.nbdev]
lib_path = "fixpkg"
nbs_path = "nbs"
doc_path = "_docs"
branch = "main"
git_url = "https://github.com/example/fixpkg"
doc_host = "https://example.github.io"
doc_baseurl = "/fixpkg"
tst_flags = "notest"
custom_sidebar = true
jupyter_hooks = false
'''

def _nb(*cells):
    def cell(c):
        kind, src = c[0], c[1]
        d = dict(cell_type=kind, metadata={}, source=src)
        if kind == 'code': d.update(execution_count=None, outputs=list(c[2]) if len(c) > 2 else [])
        return d
    return dict(cells=[cell(c) for c in cells], nbformat=4, nbformat_minor=5,
                metadata=dict(kernelspec=dict(display_name='python3', language='python', name='python3')))

PLOT = "import matplotlib.pyplot as plt\nplt.plot([0, 1, 4]); plt.title('a plot')\nplt.show()"
ERROR_OUT = dict(output_type='error', ename='ValueError', evalue='boom',
                 traceback=['---------------------------------------------------------------------------',
                            'ValueError                                Traceback (most recent call last)',
                            'Cell In[1], line 1\n----> 1 raise ValueError("boom")', 'ValueError: boom'])

# each page: the cells that make it good, or broken in exactly one way
PAGES = dict(
    good=[('markdown', '# Good page\n\n> a page with a plot, an anchor link, a link to the home page and an equation'),
          ('markdown', 'The loss $\\mathcal{L}(W) = \\sum_i \\lVert W_i - Z_i \\rVert^2$ and $$\\Pi_S(W) = \\arg\\min_{Z \\in S} \\lVert W - Z \\rVert.$$'),
          ('markdown', '## Results\n\nBack [home](index.ipynb), see [results](#results) and '
                       '[the code](https://github.com/example/fixpkg/blob/main/pyproject.toml).'),
          ('code', PLOT)],
    traceback=[('markdown', '# Traceback page'), ('code', 'x = 1\nraise ValueError("boom")', [ERROR_OUT])],
    image=[('markdown', '# Image page'), ('markdown', '![a figure that is not there](images/missing.png)'), ('code', '1 + 1')],
    link=[('markdown', '# Link page'), ('markdown', 'See [the other page](no_such_page.ipynb).'), ('code', '1 + 1')],
    nooutput=[('markdown', '# Page without outputs'), ('code', 'x = 1')],
    maths=[('markdown', '# Maths page'), ('markdown', 'A good one, $\\mathcal{L} = \\sum_i x_i^2$, and a broken one: $\\frac{1}{$.'), ('code', '1 + 1')],
)
def _png():
    import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(2, 1.5)); ax.plot([0, 1, 4]); buf = io.BytesIO(); fig.savefig(buf, format='png'); plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()
PNG = _png()
STORED = {PLOT: dict(output_type='display_data', metadata={}, data={'image/png': PNG, 'text/plain': '<Figure>'}),
          '1 + 1': dict(output_type='execute_result', execution_count=1, metadata={}, data={'text/plain': '2'})}
FAULT_OF = dict(traceback='traceback', image='missing-image', link='broken-link', nooutput='no-output', maths='maths')
HAS_MATHJAX = Path('/usr/share/javascript/mathjax/MathJax.js').exists()

def make_project(root:Path, pages):
    "A minimal nbdev project whose sidebar lists the home page and `pages`"
    nbs = root/'nbs'; nbs.mkdir(parents=True)
    (root/'pyproject.toml').write_text(PYPROJECT)
    (nbs/'_quarto.yml').write_text('project:\n  type: website\nmetadata-files: [nbdev.yml, sidebar.yml]\n')
    (nbs/'sidebar.yml').write_text('website:\n  sidebar:\n    contents:\n      - index.ipynb\n'
                                  + ''.join(f'      - {p}.ipynb\n' for p in pages))
    links = ' '.join(f'[{p}]({p}.ipynb)' for p in pages)
    (nbs/'index.ipynb').write_text(json.dumps(_nb(('markdown', '# fixpkg\n\n> home page'), ('markdown', f'Pages: {links}'), ('code', PLOT))))
    for p in pages: (nbs/f'{p}.ipynb').write_text(json.dumps(_nb(*PAGES[p])))
    for f in nbs.glob('*.ipynb'):   # stored outputs, as committed notebooks have them (`x = 1` has none, executed or not)
        nb = json.loads(f.read_text())
        for c in nb['cells']:
            if c['cell_type'] == 'code' and not c['outputs'] and ''.join(c['source']) in STORED: c['outputs'] = [STORED[''.join(c['source'])]]
        f.write_text(json.dumps(nb))
    return root

def run_check(root:Path, *args):
    r = subprocess.run([sys.executable, str(CHECK), '--root', str(root), '--out', str(root/'out'), '--n-workers', '2', *args],
                       capture_output=True, text=True, timeout=300)
    rep = json.loads((root/'out'/'report.json').read_text()) if (root/'out'/'report.json').exists() else None
    return r, rep

def faults(rep, page): return {f['kind'] for f in rep['pages'][page]['faults']}

def test_clean_project_passes(tmp_path):
    "With stored outputs (an embedded PNG), a project without faults passes and the screenshots are taken"
    root = make_project(tmp_path, ['good'])
    r, rep = run_check(root, '--outputs', 'stored')
    assert r.returncode == 0, r.stdout + r.stderr
    assert rep['failed'] == 0 and set(rep['pages']) == {'index.html', 'good.html'}
    assert rep['pages']['good.html']['n_images'] == 1 and rep['pages']['good.html']['n_links'] >= 3
    for name in ('home', 'method'): assert (tmp_path/'out'/f'{name}.png').stat().st_size > 1000

def test_each_fault_is_found_when_executed(tmp_path):
    "Executed from scratch: each broken page fails with exactly its fault (a cell that raises -> traceback), the good pages pass"
    root = make_project(tmp_path, ['good', 'traceback', 'image', 'link', 'nooutput'])
    nb = json.loads((root/'nbs'/'traceback.ipynb').read_text())
    nb['cells'][-1]['outputs'] = []                          # no stored error: it must come from executing
    (root/'nbs'/'traceback.ipynb').write_text(json.dumps(nb))
    r, rep = run_check(root)
    assert r.returncode == 1, r.stdout + r.stderr
    for page in ('traceback', 'image', 'link', 'nooutput'): assert faults(rep, f'{page}.html') == {FAULT_OF[page]}, rep['pages'][f'{page}.html']
    assert faults(rep, 'good.html') == set() and faults(rep, 'index.html') == set()
    assert rep['pages']['good.html']['n_images'] == 1         # the executed matplotlib figure
    assert any('boom' in f['detail'] for f in rep['pages']['traceback.html']['faults'])

@pytest.mark.parametrize('page', ['traceback', 'image', 'link', 'nooutput', 'maths'])
def test_each_fault_alone_fails(tmp_path, page):
    if page == 'maths' and not HAS_MATHJAX: pytest.fail('the maths check needs MathJax: apt-get install -y libjs-mathjax')
    "A project whose only fault is one broken page fails (stored outputs: the traceback is a stored error output)"
    r, rep = run_check(make_project(tmp_path, ['good', page]), '--outputs', 'stored')
    assert r.returncode == 1, r.stdout + r.stderr
    assert faults(rep, f'{page}.html') == {FAULT_OF[page]}, rep['pages'][f'{page}.html']

def test_commented_markdown_lint():
    "The warning for markdown written as `# ` comment lines (which renders every line as a heading)"
    sys.path.insert(0, str(CHECK.parent))
    from check import commented_markdown
    assert commented_markdown('# # core\n#\n# > Seeding and devices') and commented_markdown('# ## A first model')
    assert not commented_markdown('# core\n\n> Seeding and devices') and not commented_markdown('## Panels\n\ntext')
    assert not commented_markdown('# core')
