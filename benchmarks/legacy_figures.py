"""Figures for the results pages whose benchmark has moved on: earlier, reduced protocols kept for reference.

Their scripts now run other protocols (issues 18 and 19 replace the calibrator's and the reverse adversarial
examples' pages; `corsd_light` was a one-arm pilot), so these pages cannot be redrawn by their benchmark. This
script draws each one's figure from its JSON alone (nothing is trained) and links it once in the page, before its
first section heading (or at the end). A page whose JSON is not in the old format is skipped with a message, so
running it after a benchmark has replaced a page changes nothing there.

    python benchmarks/legacy_figures.py                  # every legacy page
    python benchmarks/legacy_figures.py corsd_light      # some of them
"""
import sys, json, argparse
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parent))
import numpy as np
from common import RESULTS, save_figure, link_figure, mean_std

CAL_ARMS = {'source_only': 'source only', 'adabn': 'AdaBN', 'cal': 'calibrator,\nfrozen BN',
            'cal_code_bn': "calibrator,\ncode's BN", 'dann': 'DANN'}
RA_ARMS = {'frozen': 'frozen model', 'calibrated': 'calibrator', 'finetune': 'fine-tuned'}
RA_PAGES = ['reverse_adversarial'] + [f'reverse_adversarial_{k}{d}' for k in ('lr', 'mbv2', 'r8') for d in ('', '_fmnist')]
PAGES = ['calibrator', 'calibrator_old_protocol', 'calibrator_code_lr', 'corsd_light'] + RA_PAGES

def mean_sd(xs) -> tuple:
    "Mean and sample std (0 for one value) of `xs`, in percent"
    m = mean_std(xs)
    return 100*m['mean'], 100*m['std']

def bars(ax, labels:list, groups:dict, ylabel:str):
    "Grouped bars: `groups` maps a legend label to a list of (mean, std), one per label"
    w = 0.8/len(groups)
    for i, (g, ms) in enumerate(groups.items()):
        ax.bar(np.arange(len(labels)) + (i - (len(groups)-1)/2)*w, [m for m,_ in ms], w,
               yerr=[s for _,s in ms] if any(s for _,s in ms) else None, capsize=2, label=g if len(groups) > 1 else None)
    ax.set_xticks(np.arange(len(labels)), labels, fontsize=8); ax.set_ylabel(ylabel); ax.grid(axis='y', alpha=.3)
    if len(groups) > 1: ax.legend(fontsize=8)

def calibrator_fig(d:dict, plt):
    "Target accuracy per arm, mean ± std over seeds (MNIST→USPS, the old protocol's one direction)"
    rows = d['details'].get('per_seed')
    if not rows or 'cal' not in rows[0]: return None
    fig, ax = plt.subplots(figsize=(7, 3.4))
    bars(ax, list(CAL_ARMS.values()), {'USPS': [mean_sd([r[a] for r in rows]) for a in CAL_ARMS]}, 'USPS accuracy (%)')
    ax.set_ylim(50, 100)
    ax.set_title(f"Old protocol: MNIST→USPS, {d['summary']['iterations']} iterations, lr {d['summary'].get('lr', 1e-4)}, "
                 f"{len(rows)} seeds (mean ± std)", fontsize=9)
    return fig

def corsd_light_fig(d:dict, plt):
    "Test accuracy per exit of the one-arm CORSD pilot, mean ± std over seeds"
    runs = d['details'].get('results', {}).get('corsd')
    if not runs: return None
    exits = list(runs[0]['test'])
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    bars(ax, exits, {'CORSD': [mean_sd([r['test'][e] for r in runs]) for e in exits]}, 'test accuracy (%)')
    ax.set_ylim(60, 85)
    a = d['details']['args']
    ax.set_title(f"Pilot: {a['arch']} on Fashion-MNIST {a['size']}×{a['size']}, {a['n_per_class']}/class, "
                 f"{len(runs)} seeds (mean ± std)", fontsize=9)
    return fig

def reverse_fig(d:dict, plt):
    "Accuracy per transformation of the frozen model, through the calibrator and fine-tuned; one panel per model"
    rows = d['details'].get('rows')
    if not rows or 'frozen' not in rows[0]: return None
    models = sorted({(r['arch'], r['dataset']) for r in rows})
    tfms = list(dict.fromkeys(r['transformation'] for r in rows))
    fig, axs = plt.subplots(len(models), 1, figsize=(10, 2.6*len(models)), squeeze=False)
    for ax, (arch, ds) in zip(axs[:, 0], models):
        sel = [r for r in rows if (r['arch'], r['dataset']) == (arch, ds)]
        groups = {lab: [mean_sd([r[k] for r in sel if r['transformation'] == t]) for t in tfms] for k, lab in RA_ARMS.items()}
        bars(ax, tfms, groups, 'accuracy (%)')
        ax.set_ylim(0, 100); ax.set_title(f"{arch}@{ds}, {len({r['seed'] for r in sel})} seed(s), severity {sel[0]['severity']}", fontsize=9)
    fig.suptitle('Old reduced protocol: weak base models (300 images/class, 3 epochs)', fontsize=10)
    return fig

FIGS = {'calibrator': calibrator_fig, 'corsd_light': corsd_light_fig, 'reverse_adversarial': reverse_fig}

def draw(name:str, results:Path=RESULTS) -> Path|None:
    "Draw `name`'s figure from `results/name.json` and link it in its page; None if the JSON is not legacy"
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    f = Path(results)/f'{name}.json'
    if not f.exists(): raise SystemExit(f"{f} not found")
    kind = next(k for k in FIGS if name.startswith(k))
    fig = FIGS[kind](json.loads(f.read_text()), plt)
    if fig is None: print(f"{name}: not in the old format (its benchmark has rewritten it): skipped"); return None
    fig.tight_layout()
    png = save_figure(fig, Path(results)/f'{name}.png', dpi=90)
    link_figure(Path(results)/f'{name}.md', png, before='## ')
    print(f"wrote {png}")
    return png

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('names', nargs='*', default=PAGES, help=f'pages to draw (default: all of {PAGES})')
    a = p.parse_args()
    bad = [n for n in a.names if n not in PAGES]
    if bad: raise SystemExit(f"not a legacy page: {bad}; choose from {PAGES}")
    for n in a.names: draw(n)
