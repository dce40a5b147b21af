"Shared plumbing for the benchmark scripts: mean ± std, writing JSON + markdown results, the machine lock (no torch import)."
import fcntl, json, os, sys, time, platform, shlex
from pathlib import Path
import numpy as np

RESULTS = Path(__file__).parent/'results'

def command_line() -> str:
    "The command that reproduces this run, from the repository root"
    env = "CORSD_DATA=../shared/data " if os.environ.get('CORSD_DATA') else ''
    script = os.path.relpath(os.path.abspath(sys.argv[0]), Path(__file__).resolve().parents[1])
    return env + 'python ' + ' '.join(shlex.quote(a) for a in [script] + sys.argv[1:])

def mean_std(xs) -> dict:
    "Mean, sample std and the values themselves"
    xs = [float(x) for x in xs]
    return dict(mean=float(np.mean(xs)), std=float(np.std(xs, ddof=1)) if len(xs) > 1 else 0., values=xs)

def fmt_ms(d, scale=100., nd=2) -> str:
    "'mean ± std' of a `mean_std` dict, scaled (default: fractions to percent)"
    return f"{d['mean']*scale:.{nd}f} ± {d['std']*scale:.{nd}f}"

def machine() -> dict:
    "Where the numbers were measured"
    import torch
    return dict(python=platform.python_version(), torch=torch.__version__, cpu_threads=torch.get_num_threads(),
                device='cuda:' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu',
                processor=platform.processor() or platform.machine(), cores=os.cpu_count())

def md_table(rows:list, cols:list|None=None) -> str:
    "A markdown table from a list of dicts"
    cols = cols or list(rows[0])
    out = ['| ' + ' | '.join(cols) + ' |', '|' + '---|'*len(cols)]
    for r in rows: out.append('| ' + ' | '.join(str(r.get(c, '')) for c in cols) + ' |')
    return '\n'.join(out)

def _atomic(path:Path, write, suffix:str='.tmp') -> Path:
    "Call `write(tmp)` on a temporary path beside `path`, then rename it into place (never a half-written result)"
    path = Path(path); path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.stem}.{os.getpid()}{suffix}')
    try: write(tmp); os.replace(tmp, path)
    finally:
        if tmp.exists(): tmp.unlink()
    return path

def atomic_write(path:Path, text:str):
    "Write `text` to `path` atomically"
    def w(tmp):
        with open(tmp, 'w') as f: f.write(text); f.flush(); os.fsync(f.fileno())
    return _atomic(path, w)

def save_figure(fig, path:Path, dpi:int=110) -> Path:
    "Save a matplotlib figure as PNG atomically and close it"
    import matplotlib.pyplot as plt
    try: return _atomic(path, lambda tmp: fig.savefig(tmp, dpi=dpi), '.tmp.png')
    finally: plt.close(fig)

def link_figure(md_path:Path, png:Path, before:str|None=None) -> str:
    "Make sure the page `md_path` shows the figure `png`: its link added once, at the end or just `before` a heading"
    link = f"![{png.name}]({png.name})"
    md = Path(md_path).read_text()
    if link in md: return link
    head, sep, tail = md.partition(before) if before else (md, '', '')
    if not sep: head, tail = md, ''
    atomic_write(Path(md_path), head.rstrip('\n') + f"\n\n{link}\n" + ('\n' + sep + tail if sep else ''))
    return link

def write_result(name:str, summary:dict, details:dict, markdown:str, seconds:float|None=None, results:Path|None=None,
                 command:str|None=None):
    """Write {results}/{name}.json (summary, details, command, machine) and {name}.md; `results` defaults to
    benchmarks/results, `command` to this process's command line"""
    out = Path(results or RESULTS)
    cmd = command or command_line()
    res = dict(name=name, summary=summary, details=details, command=cmd, machine=machine(),
               seconds=seconds, date=time.strftime('%Y-%m-%d'))
    atomic_write(out/f'{name}.json', json.dumps(res, indent=2, default=float))
    atomic_write(out/f'{name}.md', f"# {name}\n\nReproduce: `{cmd}`\n\n{markdown}\n")
    print(markdown); print(f"\nwrote {out/name}.json and .md")
    return res

def default_cache() -> Path:
    "Where checkpoints live: `$CORSD_CACHE`, else `~/.cache/corsd_suite/bench` (outside the work tree)"
    return Path(os.environ.get('CORSD_CACHE') or Path.home()/'.cache'/'corsd_suite'/'bench').expanduser()

LOCK_NAME = 'bench.lock'

class MachineLock:
    "One benchmark at a time per machine: an exclusive `fcntl.flock` on `<cache>/bench.lock`, which names its holder (pid, benchmark, since, command)"
    def __init__(self,
                 cache:Path, # the cache folder (one per machine; `default_cache()`)
                 benchmark:str, # the name recorded for the holder
                 wait:bool=False, # wait for the holder to finish instead of exiting
                 poll:float=1.): # seconds between tries while waiting
        self.file, self.benchmark, self.wait, self.poll = Path(cache)/LOCK_NAME, benchmark, wait, poll
    def holder(self) -> str:
        try: h = json.loads(self.file.read_text() or '{}')
        except (OSError, json.JSONDecodeError): h = {}
        if not h: return 'an unknown process'
        return f"pid {h.get('pid')} (benchmark {h.get('benchmark')!r}, since {h.get('since')}, `{h.get('command')}`)"
    def __enter__(self):
        self.file.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
        announced = False
        while True:
            try: fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB); break
            except BlockingIOError:
                if not self.wait:
                    os.close(self.fd)
                    raise SystemExit(f"another benchmark holds the machine lock {self.file}: {self.holder()}. "
                                     f"Run with --wait to queue behind it (one benchmark at a time keeps timings honest).")
                if not announced: print(f"waiting for the machine lock held by {self.holder()}", flush=True); announced = True
                time.sleep(self.poll)
        info = dict(pid=os.getpid(), benchmark=self.benchmark, since=time.strftime('%Y-%m-%d %H:%M:%S %Z'), command=command_line())
        os.ftruncate(self.fd, 0); os.pwrite(self.fd, json.dumps(info).encode(), 0)
        return self
    def __exit__(self, *exc):
        os.ftruncate(self.fd, 0)
        fcntl.flock(self.fd, fcntl.LOCK_UN); os.close(self.fd)
