"""Gather the runs of one reproduction into small committed files, and draw the plots.

    python scripts/collect_results.py --out results/cifar10_imb001 saved/<stage1 run> saved/<stage2 run> ...
    python scripts/collect_results.py --out results/cifar100_imb001 results/cifar100_imb001/metrics.json saved/<new run> ...

Each input is a run folder or a metrics.json written here before (its runs are taken as they are, so
runs whose folders are gone can be collected again with new ones; a folder replaces the entry of the
same run folder). Every run keeps the commit it was made with (`commit`: --commit or the checkout's
HEAD for run folders, the file's own for runs from a metrics.json). A stage-1 run is optional: stage 2
started from the model-zoo weights has none, and the plots that need one are then left out.

Writes metrics.json (every run: best and last epoch, config, wall time, per-epoch history),
metrics.csv, per_class.csv, history.csv (each run's epochs: lr, train_loss, train_acc, test_loss,
accuracies, ECE) and, where matplotlib is installed, per_class.png (stage 1 vs H2T), rho.png
(accuracy against rho for many/medium/few/all), reliability.png (the H2T checkpoint's reliability
diagram) and curves.png (training and test loss and test top-1 per epoch, each run). Stage-2 runs
are told apart by rho, seed and the stage-1 checkpoint they start from (`from`: best = model_best,
last = the last epoch); with several seeds, seeds.csv gives per (from, rho) the mean and spread of
top-1 and of the gain over rho 0 of the same seed.
"""
import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time

import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from utils.runtime import hardware_name  # noqa: E402


def git_commit():
    try:
        out = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ('-dirty' if dirty else '')
    except (OSError, subprocess.CalledProcessError):
        return 'unknown'


def machine():
    """Where the results were collected; each run's summary names the hardware it ran on."""
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    return {'hardware': hardware_name(device), 'torch': torch.__version__, 'python': platform.python_version()}


def start_of(checkpoint):
    """Which stage-1 checkpoint a stage-2 run started from: best (model_best, or the zoo's *_best) or last."""
    name = os.path.basename(checkpoint or '')
    if name == 'model_best.pth.tar' or name.endswith('_best.pth.tar'):
        return 'best'
    if name == 'current.pth.tar' or name.endswith('_last.pth.tar'):
        return 'last'
    return name


def load_run(run_dir):
    with open(os.path.join(run_dir, 'summary.json')) as f:
        summary = json.load(f)
    # runs written before train_loss/test_loss were kept apart: their `loss` is the test loss
    for entry in summary['history'] + [summary['best'], summary['last']]:
        if 'loss' in entry:
            entry['test_loss'] = entry.pop('loss')
    with open(os.path.join(run_dir, 'config.yaml')) as f:
        summary['config'] = f.read()
    cfg = yaml.safe_load(summary['config'])
    summary['seed'] = cfg.get('seed', 0)
    summary['from'] = start_of(cfg.get('resume')) if summary['stage'] == 'stage2' else ''
    summary['run_dir'] = run_dir
    return summary


def load_inputs(paths, commit):
    """Runs of run folders and earlier metrics.json files, one entry per run folder, in the order given."""
    runs = {}
    for path in paths:
        if os.path.isfile(path):
            with open(path) as f:
                collected = json.load(f)
            for run in collected['runs']:
                run.setdefault('commit', collected['meta']['commit'])
                runs[run['run_dir']] = run
        elif os.path.isfile(os.path.join(path, 'summary.json')):
            run = load_run(path)
            run['commit'] = commit
            runs.pop(run['run_dir'], None)
            runs[run['run_dir']] = run
        else:
            print(f'error: {path} is neither a run folder (with summary.json) nor a metrics.json; '
                  f'give saved/<run> folders or a metrics.json written by this script', file=sys.stderr)
            sys.exit(2)
    return list(runs.values())


# The H2T paper's rho ablation (CIFAR-100-LT IF=100, all classes, best epoch)
PAPER_RHO = {('cifar100', 0.01): {'top1': {0.0: 45.68, 0.2: 47.58, 0.3: 47.73, 0.5: 47.17, 1.0: 43.57}}}


def seed_statistics(runs):
    """Rows per (from, rho): top-1 mean/sd over seeds and the gain over rho 0 of the same seed and start."""
    stage2 = [r for r in runs if r['stage'] == 'stage2']
    base = {(r['from'], r['seed']): r for r in stage2 if r['H2T'] == 0}
    rows = []
    for start, rho in sorted({(r['from'], r['H2T']) for r in stage2}):
        group = [r for r in stage2 if (r['from'], r['H2T']) == (start, rho)]
        row = {'from': start, 'rho': rho, 'seeds': ' '.join(str(r['seed']) for r in group)}
        for which in ('best', 'last'):
            row.update(spread(f'{which}_top1', [r[which]['top1'] for r in group]))
            gains = [r[which]['top1'] - base[start, r['seed']][which]['top1'] for r in group if (start, r['seed']) in base]
            if rho != 0 and gains:
                row.update(spread(f'{which}_gain', gains))
        rows.append(row)
    return rows


def spread(name, values):
    mean = sum(values) / len(values)
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return {f'{name}_mean': round(mean, 3), f'{name}_sd': round(sd, 3), f'{name}_min': round(min(values), 3),
            f'{name}_max': round(max(values), 3)}


def plot(runs, out):
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print('matplotlib not installed: no plots (pip install matplotlib)')
        return
    stage1 = next((r for r in runs if r['stage'] == 'stage1'), None)
    stage2 = sorted((r for r in runs if r['stage'] == 'stage2'), key=lambda r: r['H2T'])
    # the shipped H2T setting (rho 0.25) where it was run, else the smallest rho that fuses anything
    fusing = [r for r in stage2 if r['H2T'] > 0]
    h2t = next((r for r in fusing if r['H2T'] == 0.25), fusing[0] if fusing else None)

    if stage1:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        classes = range(len(stage1['best']['per_class_acc']))
        ax.bar([c - 0.2 for c in classes], stage1['best']['per_class_acc'], 0.4, label='stage 1 (CE + mixup)')
        if h2t:
            ax.bar([c + 0.2 for c in classes], h2t['best']['per_class_acc'], 0.4,
                   label=f"stage 2, H2T rho={h2t['H2T']}")
        ax.set(xlabel='class (0 = most frequent)', ylabel='test accuracy (%)', title='Per-class accuracy')
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out, 'per_class.png'), dpi=120)
    else:
        print('no stage-1 run among the inputs: no per_class.png')

    by_rho = {}
    for r in stage2:
        if r['from'] in ('best', stage2[0]['from']):
            by_rho.setdefault(r['H2T'], []).append(r)
    if by_rho:
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        rhos = sorted(by_rho)
        for key, label in (('top1', 'all'), ('many', 'many'), ('medium', 'medium'), ('few', 'few')):
            means = [sum(r['best'][key] for r in by_rho[rho]) / len(by_rho[rho]) for rho in rhos]
            line, = ax.plot(rhos, means, 'o-', label=f'{label} (here)')
            paper = PAPER_RHO.get((stage2[0]['dataset'], stage2[0]['imb_factor']), {}).get(key)
            if paper:
                ax.plot(list(paper), list(paper.values()), 's--', color=line.get_color(), mfc='none',
                        label=f'{label} (paper)')
        counts = {rho: len(by_rho[rho]) for rho in rhos}
        if len(set(counts.values())) == 1:
            n = counts[rhos[0]]
            seeds = f', mean of {n} seeds)' if n > 1 else ')'
        else:  # a sweep of single runs beside rhos run with several seeds
            several = ', '.join(f'{rho:g}' for rho in rhos if counts[rho] > 1)
            seeds = f',\nmean of {max(counts.values())} seeds at rho {several}, one run elsewhere)'
        ax.set(xlabel='rho (fraction of fused channels)', ylabel='test accuracy (%)',
               title='Accuracy vs rho (best epoch' + seeds)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out, 'rho.png'), dpi=120)

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.5))
    for r in runs:
        epochs = [h['epoch'] for h in r['history']]
        label = r['name'] if r['stage'] == 'stage1' else f"rho {r['H2T']}"
        line, = ax_loss.plot(epochs, [h.get('train_loss') for h in r['history']], label=f'{label} train')
        ax_loss.plot(epochs, [h['test_loss'] for h in r['history']], '--', color=line.get_color(), label=f'{label} test')
        ax_acc.plot(epochs, [h['top1'] for h in r['history']], color=line.get_color(), label=label)
    ax_loss.set(xlabel='epoch', ylabel='loss', title='Training (solid) and test (dashed) loss')
    ax_acc.set(xlabel='epoch', ylabel='test top-1 (%)', title='Test accuracy')
    ax_acc.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, 'curves.png'), dpi=120)

    target = h2t or stage1
    if target is None:
        return
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
    parser.add_argument('runs', nargs='+', help='run folders (saved/<name>_<time>) and/or earlier metrics.json files')
    args = parser.parse_args()
    head = git_commit()
    runs = load_inputs(args.runs, args.commit or head)
    os.makedirs(args.out, exist_ok=True)
    commits = list(dict.fromkeys(r['commit'] for r in runs))
    meta = {'commit': commits[0] if len(commits) == 1 else 'per run (runs[i].commit)', 'collected_at': head,
            'machine': machine(), 'collected': time.strftime('%Y-%m-%d %H:%M')}
    with open(os.path.join(args.out, 'metrics.json'), 'w') as f:
        json.dump({'meta': meta, 'runs': runs}, f, indent=1)
    keys = ['top1', 'top5', 'many', 'medium', 'few', 'ece']
    with open(os.path.join(args.out, 'metrics.csv'), 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['run', 'stage', 'rho', 'from', 'seed', 'epochs', 'wall_time_s', 'best_epoch']
                   + [f'best_{k}' for k in keys] + [f'last_{k}' for k in keys] + ['commit'])
        for r in runs:
            w.writerow([r['name'], r['stage'], r['H2T'] if r['stage'] == 'stage2' else '', r['from'], r['seed'],
                        r['epochs'], r['wall_time_s'], r['best_epoch']]
                       + [round(r['best'][k], 4) for k in keys] + [round(r['last'][k], 4) for k in keys] + [r['commit']])
    stats = seed_statistics(runs)
    if stats:
        columns = list(dict.fromkeys(k for row in stats for k in row))
        with open(os.path.join(args.out, 'seeds.csv'), 'w', newline='') as f:
            w = csv.DictWriter(f, columns)
            w.writeheader()
            w.writerows(stats)
        for row in stats:
            gain = (f", gain over rho 0 {row['best_gain_mean']:+.2f} (sd {row['best_gain_sd']:.2f}, "
                    f"{row['best_gain_min']:+.2f} to {row['best_gain_max']:+.2f})" if 'best_gain_mean' in row else '')
            print(f"from {row['from']}, rho {row['rho']}, seeds {row['seeds']}: best top-1 {row['best_top1_mean']:.2f} "
                  f"(sd {row['best_top1_sd']:.2f}){gain}")
    with open(os.path.join(args.out, 'per_class.csv'), 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['run', 'epoch'] + [f'class_{c}' for c in range(len(runs[0]['best']['per_class_acc']))])
        for r in runs:
            w.writerow([r['name'], 'best'] + r['best']['per_class_acc'])
            w.writerow([r['name'], 'last'] + r['last']['per_class_acc'])
    history_keys = ['lr', 'train_loss', 'train_acc', 'test_loss', 'top1', 'top5', 'many', 'medium', 'few', 'ece']
    with open(os.path.join(args.out, 'history.csv'), 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['run', 'stage', 'rho', 'epoch'] + history_keys)
        for r in runs:
            for h in r['history']:
                w.writerow([r['name'], r['stage'], r['H2T'] if r['stage'] == 'stage2' else '', h['epoch']]
                           + [h.get(k) for k in history_keys])
    plot(runs, args.out)
    print(f'wrote {args.out}: metrics.json, metrics.csv, per_class.csv, history.csv, seeds.csv and plots')


if __name__ == '__main__':
    main()
