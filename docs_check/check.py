#!/usr/bin/env python3
"""Docs check that runs where Quarto cannot: build the notebooks the way `nbdev-docs` would, render them to HTML with
nbconvert, open every page in headless Chromium and fail on a page whose outputs hold a Python traceback, on a missing
image, on a broken internal link, on maths that did not typeset (MathJax served from Debian's `libjs-mathjax`, offline),
or on a page with code cells but no output at all.

Steps (see docs_check/README.md):
1. stage a copy of `nbs/` (plus `pyproject.toml`) in `<out>/build/`, so the checkout is never modified;
2. outputs: `--outputs execute` (default) runs every notebook copy with nbdev's own cell filter (the cells `nbdev-test`
   runs; `slow`/`notest` cells are skipped) and stores the outputs, continuing past errors so that a failing cell shows
   up as a traceback on its page; `--outputs stored` keeps the outputs already in the notebooks (e.g. after
   `nbdev-test --save`, which costs no extra execution in CI);
3. `nbdev.serve.proc_nbs` on the copy (what `nbdev-proc-nbs`/`nbdev-docs` do, minus installing Quarto) -> `build/_proc/`;
4. nbconvert (`lab` template) renders each processed notebook to `<out>/site/<output-file>.html`, applying the Quarto
   cell options nbdev relies on (`echo`, `output`, `include`) and Quarto's link rewriting (`x.ipynb` -> its page), with
   the sidebar of `sidebar.yml` injected as a nav so that its entries are checked like any other link;
5. headless Chromium (driven over the DevTools protocol, no extra package) loads every page offline and reports
   tracebacks in output areas, images that did not load, and links to pages/anchors/files that do not exist (links
   into the site's own URL and into the repository's GitHub blob URL are checked against the local build/checkout);
6. screenshots of the home page and of one method page go to `<out>/`; a JSON report to `<out>/report.json`.
Exit status 1 when any page has a fault; warnings (e.g. markdown written as `# ` comment lines) never fail unless
`--strict`.
"""
from __future__ import annotations
import argparse, base64, html, json, os, re, shutil, subprocess, sys, tempfile, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse, unquote

HERE = Path(__file__).resolve().parent
SKIP_TOP = {'nbs', '_proc', '_docs', '_site', 'docs_check', '.git'}
FAULTS = ('traceback', 'missing-image', 'broken-link', 'execution', 'docs-build', 'no-output', 'maths')
MATHJAX = Path(os.environ.get('MATHJAX_JS', '/usr/share/javascript/mathjax/MathJax.js'))   # Debian's libjs-mathjax (2.7)
MATHJAX_CDN_RE = r'<script src="https://cdnjs\.cloudflare\.com/ajax/libs/mathjax/[^"?]+(\?[^"]*)?">'
TRACEBACK_RE = r'Traceback \(most recent call last\)|^\w*(Error|Exception)\s+Traceback'
CHROME_FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
                '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-default-apps',
                '--disable-extensions', '--mute-audio', '--hide-scrollbars',
                # offline by construction: every non-file host fails at once (CDN scripts simply do not load)
                '--host-resolver-rules=MAP * ~NOTFOUND']

def log(*a): print(*a, flush=True)

# ---------------------------------------------------------------- config

def read_config(root:Path) -> dict:
    "The nbdev config of the project at `root` (via nbdev, so it is the same as `nbdev-docs` sees)"
    from nbdev.config import get_config
    cfg = get_config(path=root)
    return dict(nbs_path=Path(cfg.nbs_path), site_url=(cfg.get('doc_host','') + cfg.get('doc_baseurl','')).rstrip('/'),
                git_url=cfg.get('git_url','').rstrip('/'), branch=cfg.get('branch','main'),
                tst_flags=cfg.get('tst_flags','').split(), cell_timeout=int(cfg.get('cell_timeout', 600) or 600))

def expected_nbdev_yml(root:Path) -> str|None:
    "The `nbdev.yml` that `nbdev-docs` would (re)write, or None if nbdev cannot tell"
    try:
        from nbdev.quarto import _nbdev_yml
        from nbdev.config import get_config
        cfg = get_config(path=root)
        vals = {k:cfg[k] for k in ['title','description','branch','git_url','doc_host','doc_baseurl']}
        vals['doc_path'] = cfg.doc_path.name
        return _nbdev_yml.format(**vals)
    except Exception: return None

def list_notebooks(nbs:Path) -> list[Path]:
    "Notebooks nbdev processes: skip files and folders starting with `_` or `.`"
    return sorted(p for p in nbs.rglob('*.ipynb')
                  if not any(part[0] in '_.' for part in p.relative_to(nbs).parts))

# ---------------------------------------------------------------- 1. stage

def stage(root:Path, nbs:Path, build:Path):
    "Copy `nbs/` and the config into `build/`; link the other top-level folders so relative paths keep working"
    if build.exists(): shutil.rmtree(build)
    build.mkdir(parents=True)
    shutil.copytree(nbs, build/'nbs', ignore=shutil.ignore_patterns('.ipynb_checkpoints', '_proc', '_docs'))
    for p in root.iterdir():
        if p.name in SKIP_TOP or p.name == nbs.name or p.name.startswith('.'): continue
        if p.is_file() and p.suffix in ('.toml', '.ini', '.cfg'): shutil.copy2(p, build/p.name)
        else: (build/p.name).symlink_to(p)
    return build/'nbs'

# ---------------------------------------------------------------- 2. outputs

def exec_one(fn:str, skip_flags:list, timeout:int) -> int:
    "Run the cells `nbdev-test` would run in notebook `fn` (continuing past errors) and save the outputs into it"
    from fastcore.nbio import read_nb, write_nb
    from execnb.shell import CaptureShell
    from nbdev.process import NBProcessor
    from nbdev.test import _skip_cell
    fn = Path(fn)
    os.environ['IN_TEST'] = '1'
    nb = NBProcessor(fn, rm_directives=False, process=True).nb
    skip = _skip_cell(nb, skip_flags)
    os.chdir(fn.parent)
    sys.path.insert(0, str(fn.parent))
    k = CaptureShell(fn)
    k.run_all(nb, exc_stop=False, preproc=skip, cell_timeout=timeout)
    # processed cells carry nbdev's parsed directives; write back the original sources with the new outputs
    raw = read_nb(fn)
    same = len(raw.cells) == len(nb.cells)      # ids of id-less cells are random per read: match by position then
    outs = {c.get('id'): c for c in nb.cells}
    for i, c in enumerate(raw.cells):
        new = nb.cells[i] if same else outs.get(c.get('id'))
        if c.cell_type == 'code' and new is not None:
            c['outputs'] = new.get('outputs', [])
            c['execution_count'] = new.get('execution_count')
    write_nb(raw, fn)
    return 1 if k.exc else 0

def run_workers(kind:str, items:list, n_workers:int, timeout:int, extra=()) -> dict:
    "Run `--_worker kind` over `items` split across `n_workers` subprocesses; returns {item: problem}"
    chunks = [items[i::max(1, n_workers)] for i in range(max(1, n_workers))]
    problems = {}
    def run(chunk):
        if not chunk: return
        cmd = [sys.executable, '-W', 'ignore', str(Path(__file__).resolve()), '--_worker', kind, *extra, '--', *map(str, chunk)]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, 'MPLBACKEND': 'Agg', 'PYTHONUNBUFFERED': '1'})
        try: out, err = p.communicate(timeout=timeout*len(chunk))
        except subprocess.TimeoutExpired:
            p.kill(); out, err = p.communicate(); err = f'timed out after {timeout*len(chunk)}s\n' + err
        done = {}
        for l in out.splitlines():
            if l.startswith('@@'):
                r = json.loads(l[2:]); done[r['item']] = r['problem']
                log(f"  {kind} {Path(r['item']).name}: {r['seconds']}s{' (problem)' if r['problem'] else ''}")
        for it in chunk:
            it = str(it)
            if it not in done: problems[it] = f'{kind} worker died before finishing it: {err.strip()[-1500:]}'
            elif done[it]: problems[it] = done[it]
    with ThreadPoolExecutor(max(1, n_workers)) as ex: list(ex.map(run, chunks))
    return problems

def worker(kind:str, items:list, skip_flags:list, cell_timeout:int) -> int:
    "Process `items` one by one in this process, printing one `@@{json}` line each"
    for it in items:
        t0, problem = time.time(), None
        cwd = os.getcwd()
        try:
            if kind == 'exec':
                if exec_one(it, skip_flags, cell_timeout): problem = 'a cell raised (its traceback is on the page)'
            else:
                import nbdev.serve_drv as drv
                from nbdev.processors import FilterDefaults
                src, dst = it.split('::')
                drv.main((Path(src), Path(dst), FilterDefaults))
        except BaseException as e:
            msg = str(e).strip()
            problem = f'{type(e).__name__}: {msg[-1500:]}'
        finally: os.chdir(cwd)
        print('@@' + json.dumps(dict(item=it, problem=problem, seconds=round(time.time()-t0, 1))), flush=True)
    return 0

# ---------------------------------------------------------------- 3. proc

def proc(build:Path, n_workers:int, timeout:int) -> tuple[Path, dict]:
    "nbdev's docs processing of the staged notebooks, one subprocess per notebook so that one failure names its notebook"
    from nbdev.serve import _proc_file
    nbs, cache = build/'nbs', build/'_proc'
    if cache.exists(): shutil.rmtree(cache)
    cache.mkdir()
    todo = []
    for s in sorted(p for p in nbs.rglob('*') if p.is_file()):
        rel = s.relative_to(nbs)
        if any(part[0] in '._' for part in rel.parts[:-1]) or (rel.name[0] in '._' and rel.name not in ('_quarto.yml', '_brand.yml')):
            continue
        r = _proc_file(s, cache=cache, path=nbs)          # copies assets; returns (src, dst, processor) for notebooks
        if r is not None and s.suffix == '.ipynb': todo.append(r)
        elif r is not None: shutil.copy2(s, r[1])
    res = run_workers('proc', [f'{src}::{dst}' for src, dst, _ in todo], n_workers, timeout)
    problems = {Path(k.split('::')[0]).relative_to(nbs).as_posix(): v for k, v in res.items()}
    return cache, problems

# ---------------------------------------------------------------- 4. render

_CELL_KEYS = dict(code={'cell_type','id','metadata','source','outputs','execution_count'},
                  markdown={'cell_type','id','metadata','source','attachments'},
                  raw={'cell_type','id','metadata','source','attachments'})

def _src(c): return ''.join(c['source']) if isinstance(c.get('source'), list) else c.get('source', '')

def _frontmatter(nb) -> dict:
    "YAML front matter of the processed notebook (nbdev writes it as the first raw cell)"
    import yaml
    for c in nb['cells']:
        if c['cell_type'] == 'raw':
            m = re.match(r'\s*---\n(.*?)\n---', _src(c), re.S)
            if m:
                try: return yaml.safe_load(m.group(1)) or {}
                except Exception: return {}
        break
    return {}

def _quarto_opts(src:str) -> dict:
    "Quarto cell options (`#| key: value`) at the top of a cell"
    opts = {}
    for l in src.splitlines():
        m = re.match(r'#\|\s*([\w-]+)\s*:\s*(.*)', l)
        if not m: break
        opts[m.group(1)] = m.group(2).strip().lower()
    return opts

def _strip_opts(src:str) -> str:
    lines = src.splitlines()
    while lines and lines[0].startswith('#|'): lines.pop(0)
    return '\n'.join(lines)

_PANDOC_ATTR = re.compile(r'\)\{(?:target|style|\.)[^}\n]*\}')

def clean_nb(d:dict):
    "Make a processed notebook nbconvert-valid and apply the Quarto cell options nbdev emits"
    import nbformat
    cells = []
    for c in d['cells']:
        if c['cell_type'] == 'raw' and _src(c).lstrip().startswith('---'): continue   # front matter
        for k in list(c):
            if k not in _CELL_KEYS[c['cell_type']]: del c[k]
        c['metadata'] = {}
        if c['cell_type'] == 'code':
            o = _quarto_opts(_src(c))
            if o.get('include') == 'false': continue
            if o.get('output') == 'false': c['outputs'] = []
            c['source'] = '' if o.get('echo') == 'false' else _strip_opts(_src(c))
            if not c['source'] and not c['outputs']: continue
            for out in c['outputs']:   # Pandoc link attributes (show_doc's `[source](...){target="_blank" ...}`): Quarto's, not markdown's
                md = out.get('data', {}).get('text/markdown')
                if md is not None: out['data']['text/markdown'] = _PANDOC_ATTR.sub(')', md if isinstance(md, str) else ''.join(md))
        elif c['cell_type'] == 'markdown': c['source'] = _PANDOC_ATTR.sub(')', _src(c))
        cells.append(c)
    d['cells'] = cells
    d['metadata'] = {k:v for k,v in d.get('metadata', {}).items() if k in ('kernelspec', 'language_info')}
    return nbformat.reads(json.dumps(d), as_version=4)

def _load_yaml(p:Path):
    import yaml
    return yaml.safe_load(p.read_text()) if p.exists() else {}

def sidebar_entries(proc_dir:Path) -> list:
    "(title or None, href) of every sidebar entry, in order"
    out = []
    def walk(items):
        for it in items or []:
            if isinstance(it, str): out.append((None, it))
            elif isinstance(it, dict):
                if 'href' in it: out.append((it.get('text'), it['href']))
                if 'section' in it: out.append((f"§ {it['section']}", None))
                walk(it.get('contents'))
    walk(((_load_yaml(proc_dir/'sidebar.yml').get('website') or {}).get('sidebar') or {}).get('contents'))
    return out

def render(proc_dir:Path, site:Path, cfg:dict) -> dict:
    "Render every processed notebook to `site/`; returns {page name: source notebook relative path}"
    from nbconvert import HTMLExporter
    if site.exists(): shutil.rmtree(site)
    site.mkdir(parents=True)
    for p in proc_dir.rglob('*'):   # assets (images, css, data) keep their relative place
        if p.is_file() and p.suffix not in ('.ipynb', '.yml', '.yaml'):
            (site/p.relative_to(proc_dir)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, site/p.relative_to(proc_dir))
    nbs = sorted(proc_dir.rglob('*.ipynb'))
    metas, heads = {}, {}
    for p in nbs:
        d = json.loads(p.read_text())
        fm = _frontmatter(d)
        rel = p.relative_to(proc_dir)
        out = rel.parent/(fm.get('output-file') or rel.with_suffix('.html').name)
        metas[rel.as_posix()] = (out.as_posix(), fm.get('title') or rel.stem, d)
        heads[rel.as_posix()] = (fm.get('title') or rel.stem, fm.get('description') or '')
    # Quarto maps links to sources (.ipynb/.qmd/.md) onto their pages
    page_of = {src: out for src, (out, _, _) in metas.items()}
    for src, out in list(page_of.items()):
        page_of[str(Path(src).with_suffix('.qmd'))] = out; page_of[str(Path(src).with_suffix('.md'))] = out
    exporter = HTMLExporter(template_name='lab', exclude_input_prompt=True, exclude_output_prompt=True)   # Quarto shows no prompts
    pages = {}
    for src, (out, title, d) in metas.items():
        body, _ = exporter.from_notebook_node(clean_nb(d), resources=dict(metadata=dict(name=title)))
        body = body.replace('<body', '<body data-docs-check="1"', 1)
        if MATHJAX.exists():   # the page's MathJax from the local copy: offline, the CDN script would never load
            body = re.sub(MATHJAX_CDN_RE, lambda m: f'<script src="{MATHJAX.resolve().as_uri()}{m.group(1) or ""}">', body, count=1)
        t, desc = heads[src]   # Quarto shows the front matter's title and description at the top of the page
        head = (f'<header style="padding:0 12px 0 104px"><h1 class="title">{html.escape(str(t))}</h1>'
                f'<p class="description"><em>{html.escape(str(desc))}</em></p></header>')
        nav = _nav_html(proc_dir, metas, '../'*len(Path(src).parent.parts))   # sidebar hrefs are relative to nbs/
        body = re.sub(r'(<body[^>]*>)', lambda m: m.group(1) + nav + head, body, count=1)
        body = _rewrite_links(body, Path(src).parent, page_of, cfg)
        dest = site/out
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(body)
        pages[out] = src
    return pages

def _nav_html(proc_dir:Path, metas:dict, up:str='') -> str:
    "The sidebar as a plain nav for a page `up` levels below nbs/ (links point at sources; rewritten like every other link)"
    items = []
    for text, href in sidebar_entries(proc_dir):
        if href is None: items.append(f'<li><b>{text[2:]}</b></li>'); continue
        title = text or (metas[href][1] if href in metas else href)
        items.append(f'<li><a class="docs-check-nav" href="{up}{href}">{title}</a></li>')
    return ('<nav id="docs-check-sidebar" style="font:13px sans-serif;border-bottom:1px solid #ccc;padding:4px 12px">'
            '<ul style="display:flex;flex-wrap:wrap;gap:4px 14px;list-style:none;margin:0;padding:0">' + ''.join(items) + '</ul></nav>')

def _rewrite_links(html:str, here:Path, page_of:dict, cfg:dict) -> str:
    "Quarto's link rewriting: a relative link to a source notebook goes to its page; site-url links become relative"
    def fix(m):
        attr, q, url = m.group(1), m.group(2), m.group(3)
        if cfg['site_url'] and url.startswith(cfg['site_url'] + '/'):
            rel = url[len(cfg['site_url'])+1:]
            depth = len(here.parts)
            url = '../'*depth + (rel or 'index.html')
        u = urlparse(url)
        if not u.scheme and u.path and not u.path.startswith('/'):
            target = os.path.normpath((here/unquote(u.path)).as_posix())
            if target in page_of:
                new = os.path.relpath(page_of[target], here.as_posix() or '.')
                url = new + (f'#{u.fragment}' if u.fragment else '')
        return f'{attr}={q}{url}{q}'
    return re.sub(r'(\bhref)=(["\'])([^"\']*)\2', fix, html)

# ---------------------------------------------------------------- 5. browser

class Chrome:
    "Minimal DevTools-protocol client over a websocket to a headless Chromium started here"
    def __init__(self, exe:str|None=None, timeout:float=30):
        exe = exe or shutil.which('chromium') or shutil.which('chromium-browser') or shutil.which('google-chrome')
        if not exe: raise SystemExit('Chromium not found: install it with `apt-get install -y chromium`')
        self.profile = tempfile.mkdtemp(prefix='docs-check-chrome-')
        self.proc = subprocess.Popen([exe, *CHROME_FLAGS, f'--user-data-dir={self.profile}', '--remote-debugging-port=0',
                                      'about:blank'], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        ws, t0 = None, time.time()
        while time.time() - t0 < timeout:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None: break
            m = re.search(r'DevTools listening on (ws://\S+)', line)
            if m: ws = m.group(1); break
        if not ws: self.close(); raise SystemExit('Chromium did not start (no DevTools endpoint)')
        # keep draining stderr so Chromium never blocks on a full pipe
        import threading
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()
        from websockets.sync.client import connect
        self.ws, self.n, self.timeout = connect(ws, max_size=None, open_timeout=timeout).__enter__(), 0, timeout
        tid = self.call('Target.createTarget', url='about:blank')['targetId']
        self.sid = self.call('Target.attachToTarget', targetId=tid, flatten=True)['sessionId']
        self.call('Page.enable', session=True)
        self.call('Emulation.setDeviceMetricsOverride', session=True, width=1280, height=900, deviceScaleFactor=1, mobile=False)

    def call(self, method, session=False, **params):
        self.n += 1
        msg = dict(id=self.n, method=method, params=params)
        if session: msg['sessionId'] = self.sid
        self.ws.send(json.dumps(msg))
        while True:
            r = json.loads(self.ws.recv(timeout=self.timeout))
            if r.get('id') == self.n:
                if 'error' in r: raise RuntimeError(f'{method}: {r["error"]}')
                return r.get('result', {})

    def goto(self, url:str):
        self.call('Page.navigate', session=True, url=url)
        t0 = time.time()
        while time.time() - t0 < self.timeout:
            r = json.loads(self.ws.recv(timeout=self.timeout))
            if r.get('method') == 'Page.loadEventFired': return
        raise TimeoutError(f'{url} did not load in {self.timeout}s')

    def js(self, expr:str):
        r = self.call('Runtime.evaluate', session=True, expression=expr, returnByValue=True, awaitPromise=True)
        if 'exceptionDetails' in r: raise RuntimeError(f'page script failed: {r["exceptionDetails"]}')
        return r['result'].get('value')

    def screenshot(self, dest:Path):
        dest.write_bytes(base64.b64decode(self.call('Page.captureScreenshot', session=True, format='png')['data']))

    def close(self):
        try: self.ws.close()
        except Exception: pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try: self.proc.wait(10)
            except subprocess.TimeoutExpired: self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)

PAGE_JS = r"""
(async () => {
  const imgs = Array.from(document.images);
  await Promise.all(imgs.map(i => i.complete ? 0 : new Promise(r => { i.onload = i.onerror = r; setTimeout(r, 3000); })));
  const maths = {checked: false, errors: [], raw: []};
  if (window.MathJax && window.MathJax.Hub) {          // wait until every equation is typeset (or 20 s)
    await new Promise(r => { window.MathJax.Hub.Queue(r); setTimeout(r, 20000); });
    maths.checked = true;
    maths.errors = Array.from(document.querySelectorAll('.noError, .mjx-noError, .merror, .mjx-merror, .MathJax_Error')).map(e => (e.textContent || '').slice(0, 200));
  }
  const rawRe = /\$\$?[^$\n]*\\[A-Za-z]+[^$\n]*\$|\\\([^\n]*?\\[A-Za-z]+/;   // TeX left as text: $..\cmd..$ or \(..\cmd
  for (const m of document.querySelectorAll('.jp-RenderedMarkdown, .jp-MarkdownOutput, .text_cell_render')) {
    const c = m.cloneNode(true);
    c.querySelectorAll('code, pre, script, .MathJax_Preview, .MathJax_CHTML, .mjx-chtml, .MathJax, .MathJax_Display').forEach(x => x.remove());
    const hit = (c.textContent || '').match(rawRe);
    if (hit) maths.raw.push(hit[0].slice(0, 200));
  }
  const outs = Array.from(document.querySelectorAll('.jp-OutputArea-output, .output_area, .output'));
  const tb = new RegExp(TB_RE, 'm');
  return {
    title: document.title,
    ids: Array.from(document.querySelectorAll('[id]')).map(e => e.id).concat(Array.from(document.querySelectorAll('a[name]')).map(e => e.name)),
    tracebacks: outs.filter(o => tb.test(o.innerText)).map(o => o.innerText.slice(0, 400)),
    images: imgs.map(i => ({src: i.getAttribute('src') || '', url: i.src, ok: i.complete && i.naturalWidth > 0})),
    links: Array.from(document.querySelectorAll('a[href]')).map(a => ({href: a.getAttribute('href'), url: a.href, text: a.innerText.slice(0, 60)})),
    maths: maths,
  };
})()
"""

def _norm_id(s:str) -> str: return re.sub(r'[^a-z0-9_.]+', '-', unquote(s).lower()).strip('-')

def check_pages(site:Path, pages:dict, root:Path, cfg:dict, chrome_exe, out:Path, timeout:float) -> dict:
    "Open every page, collect faults per page; take the screenshots"
    results, found = {}, {}
    chrome = Chrome(chrome_exe, timeout=timeout)
    try:
        for page in sorted(pages):
            chrome.goto((site/page).resolve().as_uri())
            found[page] = chrome.js(PAGE_JS.replace('TB_RE', json.dumps(TRACEBACK_RE)))
        shots = {}
        home = 'index.html' if 'index.html' in pages else (sorted(pages)[0] if pages else None)
        method = next((p for p in sorted(pages, key=lambda p: pages[p]) if re.match(r'[1-5]\d_', Path(pages[p]).name)), None)
        method = method or next((p for p in sorted(pages) if p != home), None)
        for name, page in (('home', home), ('method', method)):
            if page is None: continue
            chrome.goto((site/page).resolve().as_uri())
            chrome.screenshot(out/f'{name}.png'); shots[name] = f'{page} -> {out/name}.png'
    finally: chrome.close()
    ids = {p: {_norm_id(i) for i in f['ids']} for p, f in found.items()}
    for page, f in found.items():
        faults = []
        faults += [dict(kind='traceback', detail=t) for t in f['tracebacks']]
        m = f['maths']
        if m['checked']:
            faults += [dict(kind='maths', detail=f'TeX that did not typeset: {e}') for e in m['errors']]
            faults += [dict(kind='maths', detail=f'TeX left as text: {t}') for t in m['raw']]
        for im in f['images']:
            if urlparse(im['url']).scheme in ('http', 'https'): continue     # offline: external images are not checked
            if not im['ok']: faults.append(dict(kind='missing-image', detail=im['src'][:200] or '(empty src)'))
        for a in f['links']:
            bad = _bad_link(a, page, site, ids, root, cfg)
            if bad: faults.append(dict(kind='broken-link', detail=f"{a['href']} ({bad}) [{a['text'].strip()}]"))
        results[page] = dict(source=pages[page], title=f['title'], faults=faults,
                             n_images=len(f['images']), n_links=len(f['links']))
    return results, shots

def _bad_link(a, page, site, ids, root, cfg) -> str|None:
    "Why link `a` on `page` is broken, or None"
    href, u = a['href'], urlparse(a['url'])
    if href.startswith(('mailto:', 'javascript:', 'data:')): return None
    if cfg['git_url'] and href.startswith(cfg['git_url'] + '/blob/'):   # a file of this repository
        rest = href[len(cfg['git_url'] + '/blob/'):].split('#')[0]
        path = rest.split('/', 1)[1] if '/' in rest else ''
        return None if (root/unquote(path)).exists() else f'{path} is not in the repository'
    if u.scheme in ('http', 'https'): return None                      # external
    if u.scheme != 'file': return None
    target = Path(unquote(u.path))
    if target.is_dir(): target = target/'index.html'
    if not target.exists():
        try: rel = target.resolve().relative_to(site.resolve())
        except ValueError: return 'points outside the site'
        return f'no page {rel}'
    if u.fragment:
        try: rel = target.resolve().relative_to(site.resolve()).as_posix()
        except ValueError: return None
        if rel in ids and _norm_id(u.fragment) not in ids[rel]: return f'no anchor #{u.fragment} in {rel}'
    return None

def has_outputs(nb:dict) -> bool:
    "True when notebook `nb` has no code cell, or at least one code cell with an output"
    code = [c for c in nb['cells'] if c['cell_type'] == 'code']
    return not code or any(c.get('outputs') for c in code)

# ---------------------------------------------------------------- lints (warnings)

def commented_markdown(src:str) -> bool:
    "Markdown written as Python comment lines (`# ## Title`, `# text`): every line is `#` or starts with `# `"
    lines = [l for l in src.splitlines() if l.strip()]
    if not lines or not all(l.strip() == '#' or l.startswith('# ') for l in lines): return False
    return len(src.strip().splitlines()) > 1 or lines[0].startswith('# #')

def lint(root:Path, nbs_dir:Path, proc_dir:Path, sources:list[Path]) -> list[str]:
    warns = []
    want = expected_nbdev_yml(root)
    have = (nbs_dir/'nbdev.yml').read_text() if (nbs_dir/'nbdev.yml').exists() else None
    if want is not None and have != want: warns.append('nbs/nbdev.yml differs from what nbdev-docs writes from pyproject.toml (it would be rewritten)')
    listed = {h for _, h in sidebar_entries(proc_dir) if h}
    for p in sources:
        rel = p.relative_to(nbs_dir).as_posix()
        if rel not in listed: warns.append(f'{rel} is not in nbs/sidebar.yml')
        d = json.loads(p.read_text())
        n = sum(1 for c in d['cells'] if c['cell_type'] == 'markdown' and commented_markdown(_src(c)))
        if n: warns.append(f'{rel}: {n} markdown cell(s) written as `# ` comment lines (every line renders as a heading)')
    return warns

# ---------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--root', default=str(HERE.parent), help='project root (holds pyproject.toml and nbs/)')
    ap.add_argument('--out', default=None, help='output folder (default: <root>/docs_check/out)')
    ap.add_argument('--outputs', choices=('execute', 'stored'), default='execute',
                    help='execute the notebooks (nbdev-test cells) or keep their stored outputs')
    ap.add_argument('--n-workers', type=int, default=2)
    ap.add_argument('--nb-timeout', type=int, default=900, help='seconds per notebook when executing')
    ap.add_argument('--page-timeout', type=float, default=30)
    ap.add_argument('--only', default=None, help='regex on notebook names to execute (the others keep stored outputs)')
    ap.add_argument('--chromium', default=None, help='path of the Chromium binary')
    ap.add_argument('--strict', action='store_true', help='warnings fail too')
    ap.add_argument('--_worker', dest='worker', default=None, help=argparse.SUPPRESS)
    ap.add_argument('items', nargs='*', help=argparse.SUPPRESS)
    ap.add_argument('--skip-flags', default='', help=argparse.SUPPRESS)
    ap.add_argument('--cell-timeout', type=int, default=600, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker: return worker(a.worker, a.items, a.skip_flags.split(), a.cell_timeout)

    t0 = time.time()
    root = Path(a.root).resolve()
    out = Path(a.out).resolve() if a.out else root/'docs_check'/'out'
    out.mkdir(parents=True, exist_ok=True)
    cfg = read_config(root)
    log(f'== docs check of {root} (outputs: {a.outputs})')
    nbs = stage(root, cfg['nbs_path'], out/'build')
    sources = list_notebooks(nbs)
    problems = {}
    if a.outputs == 'execute':
        run = [p for p in sources if not a.only or re.search(a.only, p.name)]
        log(f'== executing {len(run)} notebooks ({a.n_workers} workers)')
        problems = {Path(k): v for k, v in run_workers('exec', run, a.n_workers, a.nb_timeout,
                    extra=('--skip-flags', ' '.join(cfg['tst_flags']), '--cell-timeout', str(cfg['cell_timeout']))).items()}
    log('== nbdev docs processing (nbdev-proc-nbs)'); proc_dir, proc_problems = proc(out/'build', a.n_workers, a.nb_timeout)
    for src, why in proc_problems.items():   # nbdev-docs would stop here: render the unprocessed notebook to locate it
        log(f'  processing failed for {src}')
        shutil.copy2(nbs/src, proc_dir/src)
    log('== nbconvert to HTML'); pages = render(proc_dir, out/'site', cfg)
    log(f'== Chromium: {len(pages)} pages')
    results, shots = check_pages(out/'site', pages, root, cfg, a.chromium, out, a.page_timeout)
    for p, why in problems.items():
        page = next((k for k, v in results.items() if v['source'] == p.relative_to(nbs).as_posix()), None)
        if page and not any(f['kind'] == 'traceback' for f in results[page]['faults']):
            results[page]['faults'].append(dict(kind='execution', detail=why))
    for src, why in proc_problems.items():
        page = next((k for k, v in results.items() if v['source'] == src), None)
        if page: results[page]['faults'].insert(0, dict(kind='docs-build', detail='nbdev-docs processing fails: ' + why))
    for page, r in results.items():   # nbdev-docs renders stored outputs and executes nothing: a page needs them
        if (proc_dir/r['source']).exists() and not has_outputs(json.loads((proc_dir/r['source']).read_text())):
            r['faults'].append(dict(kind='no-output', detail='code cells but no output cell: run tools/run_notebooks.py and commit the outputs'))
    warns = lint(root, cfg['nbs_path'], proc_dir, [cfg['nbs_path']/p.relative_to(nbs) for p in sources])
    n_bad = 0
    for page, r in sorted(results.items()):
        status = 'FAIL' if r['faults'] else 'ok  '
        n_bad += bool(r['faults'])
        log(f"{status} {page:32} <- {r['source']:28} {r['n_images']:3} images {r['n_links']:4} links")
        for f in r['faults']: log(f"       {f['kind']}: {f['detail']}")
    if not MATHJAX.exists(): warns.append(f'maths not checked: no MathJax at {MATHJAX} (apt-get install libjs-mathjax, or set MATHJAX_JS)')
    for w in warns: log(f'warn {w}')
    for k, v in shots.items(): log(f'screenshot {k}: {v}')
    report = dict(root=str(root), outputs=a.outputs, pages=results, warnings=warns, screenshots=shots,
                  seconds=round(time.time()-t0, 1), failed=n_bad)
    (out/'report.json').write_text(json.dumps(report, indent=1))
    fail = n_bad > 0 or (a.strict and bool(warns))
    log(f"== docs check {'FAILED' if fail else 'passed'}: {n_bad} of {len(results)} pages with faults, "
        f"{len(warns)} warnings, {report['seconds']}s (site: {out/'site'})")
    return 1 if fail else 0

if __name__ == '__main__': sys.exit(main())
