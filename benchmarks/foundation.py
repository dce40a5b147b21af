"""Foundation figures: FLOPs/MACs and parameter counts of the model zoo, and the PGD sanity check on a trained model.

PGD sanity check: a ResNet-8 trained on the embedded digits (16×16) for 8 epochs, 3 seeds; L∞ PGD (10 steps, step
2.5·eps/10, random start) over eps; accuracy must fall as eps grows and reach ~0 at a large eps; 40 steps with 3
restarts must not raise it (no gradient masking).
Usage: python benchmarks/foundation.py [--seeds 3] [--epochs 8]"""
import argparse, time, torch
from corsd_suite.models import MODELS, get_model, count_params
from corsd_suite.evaluate import count_flops, attack_accuracy, evaluate_accuracy
from corsd_suite.models import train_digits
from common import write_result, md_table, mean_std

p = argparse.ArgumentParser()
p.add_argument('--seeds', type=int, default=3); p.add_argument('--epochs', type=int, default=8)
a = p.parse_args()
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
md = ("## Model zoo (FLOPs counted by torch.utils.flop_counter; MACs = FLOPs/2)\n\n" + md_table(zoo) +
      f"\n\n## PGD sanity check (ResNet-8 on digits 16×16, {a.epochs} epochs, {a.seeds} seeds, mean ± std %)\n\n" +
      md_table(pgd_rows) + f"\n\nAccuracy falls monotonically with eps in every seed: **{mono}**. 40 steps × 3 restarts "
      f"at eps 0.02/0.05 give {[round(100*x,1) for x in map(lambda i: mean_std([s[i] for s in strong])['mean'], range(2))]}% "
      f"(≤ the 10-step figures + 1 point: **{no_mask}**).")
write_result('foundation', summary, dict(zoo=zoo, eps=eps, pgd_curves=curves, pgd_strong=strong, clean=clean), md, time.time()-t0)
