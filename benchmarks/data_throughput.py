"""Throughput of the in-memory data pipeline on CIFAR-size images (3×32×32) with batched crop+flip augmentation.

The images are random uint8 tensors of CIFAR's shape and count: the pipeline's cost (gather by index, device
transfer, float conversion, pad+crop+flip) does not depend on content, and no data folder is needed.
Usage: python benchmarks/data_throughput.py [--n 50000] [--bs 256] [--epochs 3] [--threads 1]
       python benchmarks/data_throughput.py --plot   # redraw the figure from the JSON
The loader needs one thread; on 2 cores the other is left to the model."""
import argparse, json, time
from pathlib import Path
from common import write_result, md_table, save_figure, link_figure, RESULTS

def figure(per_epoch:list, target:float) -> Path:
    "The loader's images/s per epoch against the target and the training rates of throughput.json (when measured)"
    import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot as plt
    tp = RESULTS/'throughput.json'
    train = json.loads(tp.read_text())['summary']['models'] if tp.exists() else {}
    rows = [(f'loader, epoch {i+1}', r) for i, r in enumerate(per_epoch)] + \
           [(f'training {m} (Learner)', train[m]['learner_img_s']) for m in ('resnet8', 'resnet20') if m in train]
    fig, ax = plt.subplots(figsize=(6.5, 2.8))
    ax.barh([r[0] for r in rows], [r[1] for r in rows], color=['C0'] * len(per_epoch) + ['C1'] * (len(rows) - len(per_epoch)))
    ax.axvline(target, color='k', lw=.7, ls='--', label=f'target {target:,.0f} img/s'); ax.legend(fontsize=8)
    ax.set_xlabel('CIFAR-size images per second (wall clock)'); ax.invert_yaxis()
    plt.tight_layout()
    return save_figure(fig, RESULTS/'data_throughput.png')

p = argparse.ArgumentParser()
p.add_argument('--n', type=int, default=50_000); p.add_argument('--bs', type=int, default=256)
p.add_argument('--epochs', type=int, default=3); p.add_argument('--threads', type=int, default=1)
p.add_argument('--plot', action='store_true', help='only redraw the figure from the existing results')
a = p.parse_args()
if a.plot:
    r = json.loads((RESULTS/'data_throughput.json').read_text())
    link_figure(RESULTS/'data_throughput.md', figure(r['details']['per_epoch'], r['summary']['target']))
    raise SystemExit(0)
import torch
from corsd_suite.data import ImageSet, image_dls, CropFlip
torch.set_num_threads(a.threads)
g = torch.Generator().manual_seed(0)
x = torch.randint(0, 256, (a.n, 3, 32, 32), dtype=torch.uint8, generator=g)
y = torch.randint(0, 10, (a.n,), generator=g)
ds = ImageSet(x, y, name='cifar-shaped')
dls = image_dls(ds, ds.subset(range(1000)), bs=a.bs, augment=CropFlip(4, True), device='cpu')
rates, cpu_rates = [], []
for ep in range(a.epochs + 1):                 # epoch 0 warms up
    t0, c0, n = time.perf_counter(), time.process_time(), 0
    for xb, yb in dls.train: n += len(xb)
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    if ep: rates.append(n / dt); cpu_rates.append(n / dc)
    assert xb.dtype == torch.float32 and xb.shape[1:] == (3, 32, 32)
mean, cpu_mean = sum(rates)/len(rates), sum(cpu_rates)/len(cpu_rates)
rows = [dict(epoch=i+1, images_per_s_wall=round(r), images_per_cpu_second=round(c)) for i, (r, c) in enumerate(zip(rates, cpu_rates))]
md = (f"CIFAR-size (3×32×32) training batches of {a.bs} with pad-4 random crop + flip and float conversion, on the CPU "
      f"with {a.threads} thread(s): **{mean:,.0f} images/s** wall clock, {cpu_mean:,.0f} images per CPU-second "
      f"(means of {a.epochs} epochs after a warm-up epoch; target ≥ 5,000 images/s on 2 cores). Wall-clock figures "
      f"fall when other processes share the cores; images per CPU-second do not.\n\n" + md_table(rows) +
      f"\n\n![data_throughput.png]({figure(rates, 5000).name})")
write_result('data_throughput', dict(images_per_s=mean, images_per_cpu_second=cpu_mean, target=5000,
             meets_target=mean >= 5000, batch_size=a.bs, threads=a.threads), dict(per_epoch=rates, per_epoch_cpu=cpu_rates, n_images=a.n), md)
