"Shared plumbing for the benchmark scripts: timing, mean ± std, and writing JSON + markdown results."
import json, os, sys, time, platform, shlex
from pathlib import Path
import numpy as np, torch

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
    return dict(python=platform.python_version(), torch=torch.__version__, cpu_threads=torch.get_num_threads(),
                device='cuda:' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu',
                processor=platform.processor() or platform.machine(), cores=os.cpu_count())

def md_table(rows:list, cols:list|None=None) -> str:
    "A markdown table from a list of dicts"
    cols = cols or list(rows[0])
    out = ['| ' + ' | '.join(cols) + ' |', '|' + '---|'*len(cols)]
    for r in rows: out.append('| ' + ' | '.join(str(r.get(c, '')) for c in cols) + ' |')
    return '\n'.join(out)

def write_result(name:str, summary:dict, details:dict, markdown:str, seconds:float|None=None):
    "Write benchmarks/results/{name}.json (summary, details, command, machine) and {name}.md"
    RESULTS.mkdir(parents=True, exist_ok=True)
    cmd = command_line()
    res = dict(name=name, summary=summary, details=details, command=cmd, machine=machine(),
               seconds=seconds, date=time.strftime('%Y-%m-%d'))
    (RESULTS/f'{name}.json').write_text(json.dumps(res, indent=2, default=float))
    (RESULTS/f'{name}.md').write_text(f"# {name}\n\nReproduce: `{cmd}`\n\n{markdown}\n")
    print(markdown); print(f"\nwrote {RESULTS/name}.json and .md")
    return res
