"""Write README.md from nbs/index.ipynb (nbdev-readme needs Quarto, which these machines cannot install).

The index notebook is executed in a temporary copy (so the README shows real outputs), nbdev's `#|` directives
are dropped, and the result is converted to Markdown with nbconvert. Usage: python tools/make_readme.py"""
import copy, re, sys, tempfile
from pathlib import Path
import nbformat
from nbclient import NotebookClient
from nbconvert import MarkdownExporter

root = Path(__file__).resolve().parents[1]

def _plain(o):
    "Keep an output as plain text (Markdown has no use for fastprogress' HTML or DataFrame styling)"
    if 'data' not in o: return o
    txt = o['data'].get('text/plain', '')
    if not txt or txt.startswith(('<IPython.core.display', '<div>')): return None   # progress bars and tables
    o['data'] = {'text/plain': txt}
    return o
nb = nbformat.read(root/'nbs'/'index.ipynb', as_version=4)
NotebookClient(nb, timeout=1800, kernel_name='python3', resources={'metadata': {'path': str(root/'nbs')}}).execute()
cells = []
for c in nb.cells:
    src = c.source
    if c.cell_type == 'code':
        if re.search(r'^#\|\s*hide', src, re.M): continue
        c.source = '\n'.join(l for l in src.splitlines() if not l.startswith('#|'))
        c.outputs = [_plain(o) for o in c.outputs if o.get('output_type') != 'stream' or o.get('name') != 'stderr']
        c.outputs = [o for o in c.outputs if o is not None]
    cells.append(c)
nb.cells = cells
# the first markdown cell holds the title and the "> summary" line, as nbdev writes it
body, _ = MarkdownExporter().from_notebook_node(nb)
body = re.sub(r'\n{3,}', '\n\n', body)
body = re.sub(r'\]\((?!https?:|#|/)([^)]+\.ipynb)\)', r'](nbs/\1)', body)   # notebook links from the repository root
(root/'README.md').write_text('<!-- generated from nbs/index.ipynb by tools/make_readme.py; edit the notebook -->\n\n' + body)
print(f"wrote README.md ({len(body):,} characters)")
