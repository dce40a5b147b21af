"""Foundation figures: FLOPs/MACs and parameter counts of the model zoo, and the PGD sanity check on a trained model.

PGD sanity check: a ResNet-8 trained on the embedded digits (16×16) for 8 epochs, 3 seeds; L∞ PGD (10 steps, step
2.5·eps/10, random start) over eps; accuracy must fall as eps grows and reach ~0 at a large eps; 40 steps with 3
restarts must not raise it (no gradient masking).
CLI start-up: wall time of `corsd-suite --help` and `corsd-suite --version` (median of --cli-runs runs; target < 2 s).
Usage: python benchmarks/foundation.py [--seeds 3] [--epochs 8]
       python benchmarks/foundation.py --cli-only   # measure only the CLI start-up, merged into the existing results
       python benchmarks/foundation.py --plot       # redraw the PGD figure from the JSON"""
import argparse, json, os, statistics, subprocess, time
from pathlib import Path
from common import RESULTS, atomic_write, save_figure, link_figure   # the script's folder is on sys.path; common imports no torch

def cli_startup(runs:int) -> dict:
    "Median and all wall times (s) of `corsd-suite --help` and `--version`, each run in a fresh process"
    out = {}
    for arg in ('help', 'version'):
        ts = []
        for _ in range(runs):
            t0 = time.perf_counter()
            subprocess.run(['corsd-suite', f'--{arg}'], check=True, capture_output=True)
            ts.append(round(time.perf_counter() - t0, 3))
        out[arg] = dict(median=statistics.median(ts), max=max(ts), runs=ts)
    return out

def cli_markdown(cli:dict, runs:int) -> str:
    return (f"## CLI start-up (wall time of a fresh process, median of {runs} runs; target < 2 s)\n\n"
            "Reproduce this part alone: `python benchmarks/foundation.py --cli-only`\n\n"
            f"| command | median s | max s |\n|---|---|---|\n" +
            ''.join(f"| `corsd-suite --{k}` | {v['median']:.2f} | {v['max']:.2f} |\n" for k,v in cli.items()))

def merge_cli(cli:dict, runs:int):
    "Write the CLI figures into the existing foundation.json/.md, keeping every other key and section"
    jf, mf = RESULTS/'foundation.json', RESULTS/'foundation.md'
    res = json.loads(jf.read_text())
    res['summary'].update(cli_help_seconds=cli['help']['median'], cli_version_seconds=cli['version']['median'])
    res['details']['cli_startup'] = dict(cli, command='python benchmarks/foundation.py --cli-only', date=time.strftime('%Y-%m-%d'),
                                         cores=os.cpu_count())
    atomic_write(jf, json.dumps(res, indent=2, default=float))
    md = mf.read_text().split('\n## CLI start-up')[0].rstrip('\n')
    atomic_write(mf, md + '\n\n' + cli_markdown(cli, runs))
    print(cli_markdown(cli, runs)); print(f"merged into {jf} and {mf}")

def pgd_figure(eps:list, curves:list, strong:list) -> Path:
    "PGD accuracy against eps, mean ± std over seeds, with the stronger attack's points"
    import numpy as np, matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot as plt
    c, st = 100 * np.array(curves), 100 * np.array(strong)
    fig, ax = plt.subplots(figsize=(5.5, 3.3))
    ax.errorbar(eps, c.mean(0), yerr=c.std(0), marker='o', capsize=3, label='PGD 10 steps')
    ax.errorbar([0.02, 0.05], st.mean(0), yerr=st.std(0), marker='x', ls='none', capsize=3, label='PGD 40 steps × 3 restarts')
    ax.set_xlabel('eps (L∞, pixel units)'); ax.set_ylabel('accuracy (%)'); ax.legend(fontsize=8)
    ax.set_title(f'ResNet-8 on the digits, {len(curves)} seeds (mean ± std)', fontsize=9)
    plt.tight_layout()
    return save_figure(fig, RESULTS/'foundation_pgd.png')

p = argparse.ArgumentParser()
p.add_argument('--seeds', type=int, default=3); p.add_argument('--epochs', type=int, default=8)
p.add_argument('--cli-only', action='store_true', help='measure only the CLI start-up and merge it into the existing results')
p.add_argument('--cli-runs', type=int, default=5)
p.add_argument('--plot', action='store_true', help='only redraw the PGD figure from the existing results')
a = p.parse_args()
if a.plot:
    d = json.loads((RESULTS/'foundation.json').read_text())['details']
    link_figure(RESULTS/'foundation.md', pgd_figure(d['eps'], d['pgd_curves'], d['pgd_strong']), before='## CLI start-up')
    raise SystemExit(0)
if a.cli_only:
    merge_cli(cli_startup(a.cli_runs), a.cli_runs)
    raise SystemExit(0)

import torch
from corsd_suite.models import MODELS, get_model, count_params, train_digits
from corsd_suite.evaluate import count_flops, attack_accuracy, evaluate_accuracy
from common import write_result, md_table, mean_std
torch.set_num_threads(1)
t0 = time.time()
zoo = []
for name in MODELS:
    shape = (1,28,28) if name == 'lenet5' else (3,32,32)
    m = get_model(name, n_in=shape[0], n_out=10)
    f = count_flops(m, shape)
    zoo.append(dict(model=name, input='×'.join(map(str, shape)), params=count_params(m),
                    conv_linear_weights=count_params(m, weights_only=True), MMACs=round(f['macs']/1e6, 2)))
eps = [0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3]
curves, strong, clean = [], [], []
for seed in range(a.seeds):
    learn = train_digits('resnet8', epochs=a.epochs, seed=seed)
    m = learn.model.eval()
    clean.append(evaluate_accuracy(m, learn.dls.valid, show=False))
    curves.append(attack_accuracy(m, learn.dls.valid, eps, steps=10, show=False).accuracy.tolist())
    strong.append(attack_accuracy(m, learn.dls.valid, [0.02, 0.05], steps=40, restarts=3, show=False).accuracy.tolist())
pgd_rows = [dict(eps=e, accuracy=f"{mean_std([c[i] for c in curves])['mean']*100:.1f} ± {mean_std([c[i] for c in curves])['std']*100:.1f}") for i, e in enumerate(eps)]
mono = all(all(c[i+1] <= c[i] + 1e-9 for i in range(len(eps)-1)) for c in curves)
no_mask = all(s[j] <= c[eps.index(e)] + 0.01 for c, s in zip(curves, strong) for j, e in enumerate([0.02, 0.05]))
le = next(r for r in zoo if r['model'] == 'lenet5'); r20 = next(r for r in zoo if r['model'] == 'resnet20')
summary = dict(lenet5_macs=le['MMACs']*1e6, lenet5_weights=le['conv_linear_weights'], resnet20_macs=r20['MMACs']*1e6,
               pgd_clean_acc=mean_std(clean)['mean'], pgd_acc_at_eps_0_3=mean_std([c[-1] for c in curves])['mean'],
               pgd_monotone=mono, pgd_more_steps_restarts_not_higher=no_mask)
cli = cli_startup(a.cli_runs)
summary.update(cli_help_seconds=cli['help']['median'], cli_version_seconds=cli['version']['median'])
md = ("## Model zoo (FLOPs counted by torch.utils.flop_counter; MACs = FLOPs/2)\n\n" + md_table(zoo) +
      f"\n\n## PGD sanity check (ResNet-8 on digits 16×16, {a.epochs} epochs, {a.seeds} seeds, mean ± std %)\n\n" +
      md_table(pgd_rows) + f"\n\nAccuracy falls monotonically with eps in every seed: **{mono}**. 40 steps × 3 restarts "
      f"at eps 0.02/0.05 give {[round(100*x,1) for x in map(lambda i: mean_std([s[i] for s in strong])['mean'], range(2))]}% "
      f"(≤ the 10-step figures + 1 point: **{no_mask}**).\n\n![foundation_pgd.png]({pgd_figure(eps, curves, strong).name})\n\n" +
      cli_markdown(cli, a.cli_runs))
write_result('foundation', summary, dict(zoo=zoo, eps=eps, pgd_curves=curves, pgd_strong=strong, clean=clean,
                                         cli_startup=dict(cli, command='python benchmarks/foundation.py --cli-only')), md, time.time()-t0)
