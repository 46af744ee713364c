"""Gather the runs of one reproduction into small committed files, and draw the plots.

    python scripts/collect_results.py --out results/cifar10_imb001 saved/<stage1 run> saved/<stage2 run> ...

Writes metrics.json (every run: best and last epoch, config, wall time), metrics.csv, per_class.csv,
and, where matplotlib is installed, per_class.png (stage 1 vs H2T), rho.png (accuracy against rho
for many/medium/few/all) and reliability.png (the H2T checkpoint's reliability diagram).
"""
import argparse
import csv
import json
import os
import platform
import subprocess
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_commit():
    try:
        out = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ('-dirty' if dirty else '')
    except (OSError, subprocess.CalledProcessError):
        return 'unknown'


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {'cpu': cpu, 'cores': os.cpu_count(), 'gpu': gpu, 'torch': torch.__version__, 'python': platform.python_version()}


def load_run(run_dir):
    with open(os.path.join(run_dir, 'summary.json')) as f:
        summary = json.load(f)
    with open(os.path.join(run_dir, 'config.yaml')) as f:
        summary['config'] = f.read()
    summary['run_dir'] = run_dir
    return summary


def plot(runs, out):
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print('matplotlib not installed: no plots (pip install matplotlib)')
        return
    stage1 = next(r for r in runs if r['stage'] == 'stage1')
    stage2 = sorted((r for r in runs if r['stage'] == 'stage2'), key=lambda r: r['H2T'])
    # the shipped H2T setting (rho 0.25) where it was run, else the smallest rho that fuses anything
    fusing = [r for r in stage2 if r['H2T'] > 0]
    h2t = next((r for r in fusing if r['H2T'] == 0.25), fusing[0] if fusing else None)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    classes = range(len(stage1['best']['per_class_acc']))
    ax.bar([c - 0.2 for c in classes], stage1['best']['per_class_acc'], 0.4, label='stage 1 (CE + mixup)')
    if h2t:
        ax.bar([c + 0.2 for c in classes], h2t['best']['per_class_acc'], 0.4, label=f"stage 2, H2T rho={h2t['H2T']}")
    ax.set(xlabel='class (0 = most frequent)', ylabel='test accuracy (%)', title='Per-class accuracy')
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, 'per_class.png'), dpi=120)

    if stage2:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        rhos = [r['H2T'] for r in stage2]
        for key, label in (('top1', 'all'), ('many', 'many'), ('medium', 'medium'), ('few', 'few')):
            ax.plot(rhos, [r['best'][key] for r in stage2], 'o-', label=label)
        ax.set(xlabel='rho (fraction of fused channels)', ylabel='test accuracy (%)', title='Accuracy vs rho (best epoch)')
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out, 'rho.png'), dpi=120)

    target = h2t or stage1
    if 'reliability' not in target['best']:
        print(f"{target['run_dir']} predates per-bin reliability in summary.json: no reliability plot")
        return
    rel = target['best']['reliability']
    count, acc, conf = rel['count'], rel['accuracy'], rel['confidence']
    fig, ax = plt.subplots(figsize=(4, 4))
    centers = [(i + 0.5) / 15 for i in range(15)]
    ax.bar(centers, acc, width=1 / 15, edgecolor='k', label='accuracy')
    ax.bar(centers, [c - a if n else 0 for a, c, n in zip(acc, conf, count)], bottom=acc, width=1 / 15,
           color='r', alpha=0.3, label='gap to confidence')
    ax.plot([0, 1], [0, 1], 'k--')
    ax.set(xlabel='confidence', ylabel='accuracy', xlim=(0, 1), ylim=(0, 1),
           title=f"Reliability, {target['name']}\nECE {target['best']['ece'] * 100:.2f}%")
    ax.legend(loc='upper left')
    fig.tight_layout()
    fig.savefig(os.path.join(out, 'reliability.png'), dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', required=True)
    parser.add_argument('--commit', help='the commit the runs were made with (default: the checkout\'s HEAD)')
    parser.add_argument('runs', nargs='+', help='run folders (saved/<name>_<time>)')
    args = parser.parse_args()
    runs = [load_run(r) for r in args.runs]
    os.makedirs(args.out, exist_ok=True)
    meta = {'commit': args.commit or git_commit(), 'machine': machine(), 'collected': time.strftime('%Y-%m-%d %H:%M')}
    with open(os.path.join(args.out, 'metrics.json'), 'w') as f:
        json.dump({'meta': meta, 'runs': runs}, f, indent=1)
    keys = ['top1', 'top5', 'many', 'medium', 'few', 'ece']
    with open(os.path.join(args.out, 'metrics.csv'), 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['run', 'stage', 'rho', 'epochs', 'wall_time_s', 'best_epoch'] + [f'best_{k}' for k in keys]
                   + [f'last_{k}' for k in keys])
        for r in runs:
            w.writerow([r['name'], r['stage'], r['H2T'] if r['stage'] == 'stage2' else '', r['epochs'], r['wall_time_s'],
                        r['best_epoch']] + [round(r['best'][k], 4) for k in keys] + [round(r['last'][k], 4) for k in keys])
    with open(os.path.join(args.out, 'per_class.csv'), 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['run', 'epoch'] + [f'class_{c}' for c in range(len(runs[0]['best']['per_class_acc']))])
        for r in runs:
            w.writerow([r['name'], 'best'] + r['best']['per_class_acc'])
            w.writerow([r['name'], 'last'] + r['last']['per_class_acc'])
    plot(runs, args.out)
    print(f'wrote {args.out}: metrics.json, metrics.csv, per_class.csv and plots')


if __name__ == '__main__':
    main()
