"""Gather the runs of one reproduction into small committed files, and draw the plots.

    python -m scripts.collect_results --out results/cifar10_imb001 saved/<stage1 run> saved/<stage2 run> ...
    python -m scripts.collect_results --out results/cifar100_imb001 results/cifar100_imb001/metrics.json \
        saved/<new run> ...

Each input is a run folder or a metrics.json written here before (its runs are taken as they are, so
runs whose folders are gone can be collected again with new ones; a folder replaces the entry of the
same run folder). Every run keeps the commit it was made with (`commit`: --commit or the checkout's
HEAD for run folders, the file's own for runs from a metrics.json). A stage-1 run is optional: stage 2
started from the model-zoo weights has none, and the plots that need one are then left out.

Writes metrics.json (every run: best and last epoch, config, wall time, per-epoch history),
metrics.csv, per_class.csv, history.csv (each run's epochs: lr, train_loss, train_acc, test_loss,
accuracies, ECE) and, where matplotlib is installed, the plots: per_class.png (stage 1, rho 0 and
H2T per class, the many/medium/few boundaries, the training images per class), rho.png (accuracy
against rho for many/medium/few/all, the paper's ablation beside it), curves.png (stage 1 and stage 2
on their own axes; stage-2 runs of one setting as their mean over seeds with the min-max band) and
reliability.png (the H2T checkpoint's reliability diagram). Stage-2 runs are told apart by rho, seed
and the stage-1 checkpoint they start from (`from`: best = model_best, last = the last epoch); with
several seeds, seeds.csv gives per (from, rho) the mean and spread of top-1 and of the gain over rho 0
of the same seed.

    python -m scripts.collect_results --table saved/table/results/*

prints the best-epoch top-1 of several results folders as one markdown table (stage 1; each rho as the mean
± sd over seeds).
"""
import argparse
import csv
import json
import os
import platform
import re
import subprocess
import sys
import time

import torch
import yaml

from datasets.cifar_lt import img_num_per_cls
from utils.runtime import hardware_name

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


# The H2T paper's rho ablation (CE + mixup stage 1, CE stage 2; CIFAR-100-LT IF=100, all classes, best epoch)
PAPER_RHO = {('cifar100', 0.01): {'top1': {0.0: 45.68, 0.2: 47.58, 0.3: 47.73, 0.5: 47.17, 1.0: 43.57}}}


def paper_rho(run):
    """The paper's ablation for this stage-2 run's dataset and IF, where it is the plain CE stage 2."""
    cfg = yaml.safe_load(run['config'])
    plain_ce = cfg['loss']['type'] == 'CrossEntropyLoss' and not cfg.get('lws') and not cfg.get('use_norm')
    return PAPER_RHO.get((run['dataset'], run['imb_factor']), {}) if plain_ce else {}


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
            gains = [r[which]['top1'] - base[start, r['seed']][which]['top1'] for r in group
                     if (start, r['seed']) in base]
            if rho != 0 and gains:
                row.update(spread(f'{which}_gain', gains))
        rows.append(row)
    return rows


def spread(name, values):
    return {f'{name}_mean': round(mean(values), 3), f'{name}_sd': round(sd(values), 3),
            f'{name}_min': round(min(values), 3), f'{name}_max': round(max(values), 3)}


def sd(values):
    """Sample standard deviation (n - 1); 0 for one value."""
    if len(values) < 2:
        return 0.0
    return (sum((v - mean(values)) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def training_counts(run):
    """Training images per class of a CIFAR-LT run (the subset rule), or None for other datasets."""
    cfg = yaml.safe_load(run['config'])
    if cfg['dataset'] not in ('cifar10', 'cifar100'):
        return None
    classes = len(run['best']['per_class_acc'])
    return img_num_per_cls(50000 / classes, classes, cfg['imb_type'], cfg['imb_factor'])


def rho_groups(stage2):
    """{(from, rho): runs}, the seeds of one setting together, best start first, rho ascending."""
    groups = {}
    for r in sorted(stage2, key=lambda r: (r['from'] != 'best', r['from'], r['H2T'], r['seed'])):
        groups.setdefault((r['from'], r['H2T']), []).append(r)
    return groups


def method_of(run):
    """The stage-2 method in the run names reproduce.sh gives (..._stage2_<method>[_fromlast]_rho<rho>), or ''."""
    found = re.search(r'_stage2_(.+?)(_fromlast)?_rho', run['name'])
    return found.group(1) if found else ''


def mean(values):
    return sum(values) / len(values)


def seeds_label(group):
    return f'{len(group)} seeds' if len(group) > 1 else 'seed ' + str(group[0]['seed'])


def plot(runs, out):
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print('matplotlib not installed: no plots (pip install matplotlib)')
        return
    stage1 = next((r for r in runs if r['stage'] == 'stage1'), None)
    groups = rho_groups([r for r in runs if r['stage'] == 'stage2'])
    first_start = next(iter(groups))[0] if groups else None
    main_groups = {rho: g for (start, rho), g in groups.items() if start == first_start}
    # the shipped H2T setting (rho 0.25) where it was run, else the smallest rho that fuses anything
    fusing = [rho for rho in main_groups if rho > 0]
    h2t_rho = 0.25 if 0.25 in main_groups else (fusing[0] if fusing else None)

    if stage1:
        plot_per_class(plt, stage1, main_groups, h2t_rho, out)
    else:
        print('no stage-1 run among the inputs: no per_class.png')
    if main_groups:
        plot_rho(plt, main_groups, first_start, out)
    plot_curves(plt, stage1, groups, out)
    target = main_groups[h2t_rho][0] if h2t_rho is not None else stage1
    if target is not None:
        plot_reliability(plt, target, out)


def plot_per_class(plt, stage1, main_groups, h2t_rho, out):
    """Per-class test accuracy (best epochs) of stage 1, rho 0 and H2T, each split's mean as a bar across
    its classes, the many/medium/few boundaries, and the training images per class behind them."""
    cfg = yaml.safe_load(stage1['config'])
    classes = list(range(len(stage1['best']['per_class_acc'])))
    series = [(f"stage 1 ({stage1['name'].split('_stage1_')[-1]})", [stage1])]
    for rho in (0.0, h2t_rho):
        if rho in main_groups:
            method = method_of(main_groups[rho][0])
            series.append((f"stage 2{' ' + method if method else ''}, {'rho 0' if rho == 0 else f'H2T rho {rho:g}'} "
                           f"({seeds_label(main_groups[rho])})", main_groups[rho]))
    fig, ax = plt.subplots(figsize=(9, 4))
    counts = training_counts(stage1)
    if counts:
        ax_n = ax.twinx()
        ax_n.fill_between(classes, counts, step='mid', color='0.85', zorder=0)
        ax_n.set_yscale('log')
        ax_n.set_ylabel('training images (log scale, grey)')
        ax.set_zorder(ax_n.get_zorder() + 1)
        ax.patch.set_visible(False)
    splits = [('many', cfg['head_class_idx']), ('medium', cfg['med_class_idx']), ('few', cfg['tail_class_idx'])]
    for label, group in series:
        acc = [mean([r['best']['per_class_acc'][c] for r in group]) for c in classes]
        line, = ax.plot(classes, acc, drawstyle='steps-mid', lw=0.8, alpha=0.7, label=label)
        for split, (lo, hi) in splits:
            ax.hlines(mean([r['best'][split] for r in group]), lo - 0.5, hi - 0.5, color=line.get_color(), lw=2.5)
    for split, (lo, hi) in splits:
        if lo > 0:
            ax.axvline(lo - 0.5, color='k', ls='--', lw=0.8)
        ax.text((lo + hi - 1) / 2, 1.01, split, transform=ax.get_xaxis_transform(), ha='center', va='bottom')
    ax.set(xlabel='class (0 = most training images)', ylabel='test accuracy (%), best epoch',
           xlim=(-0.5, len(classes) - 0.5), ylim=(0, 100))
    ax.set_title('Per-class accuracy (thick bars: mean of many / medium / few)', pad=18)
    ax.legend(loc='upper center', bbox_to_anchor=(0.5, -0.16), ncol=len(series), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(os.path.join(out, 'per_class.png'), dpi=120)
    plt.close(fig)


def plot_rho(plt, main_groups, start, out):
    """Best-epoch accuracy against rho (mean over seeds, min-max as error bars), the paper's ablation dashed."""
    some = next(iter(main_groups.values()))[0]
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    rhos = sorted(main_groups)
    handles = []
    for key, label in (('top1', 'all'), ('many', 'many'), ('medium', 'medium'), ('few', 'few')):
        values = [[r['best'][key] for r in main_groups[rho]] for rho in rhos]
        means = [mean(v) for v in values]
        errors = [[m - min(v) for m, v in zip(means, values)], [max(v) - m for m, v in zip(means, values)]]
        line = ax.errorbar(rhos, means, yerr=errors, fmt='o-', ms=4, capsize=2, label=f'{label} (here)')
        handles.append(line)
        paper = paper_rho(some).get(key)
        if paper:
            handles += ax.plot(list(paper), list(paper.values()), 's--', color=line[0].get_color(), mfc='none',
                               label=f'{label} (paper)')
    counts = sorted({len(main_groups[rho]) for rho in rhos})
    seeds = (f'mean of {counts[0]} seeds' if counts == [counts[0]] and counts[0] > 1 else
             'one seed' if counts == [1] else f'mean of {counts[-1]} seeds where run, else one seed')
    ax.set(xlabel='rho (fraction of fused channels)', ylabel='test accuracy (%)',
           title=f'Accuracy vs rho (best epoch, stage 2 from the stage-1 {start} checkpoint;\n'
                 f'{seeds}, bars: min-max)')
    ax.legend(handles=handles, loc='center left', bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(os.path.join(out, 'rho.png'), dpi=120)
    plt.close(fig)


def plot_curves(plt, stage1, groups, out):
    """Stage 1: test top-1 and the losses per epoch; stage 2: test top-1 per epoch, one line per (start, rho),
    the mean over seeds with its min-max band."""
    panels = (['stage1'] if stage1 else []) + (['stage2'] if groups else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
    axes = dict(zip(panels, axes[0]))
    if stage1:
        ax = axes['stage1']
        epochs = [h['epoch'] for h in stage1['history']]
        acc, = ax.plot(epochs, [h['top1'] for h in stage1['history']], color='C0', label='test top-1')
        ax_loss = ax.twinx()
        train, = ax_loss.plot(epochs, [h['train_loss'] for h in stage1['history']], color='C1', lw=0.9,
                              label='training loss (mixup objective)')
        test, = ax_loss.plot(epochs, [h['test_loss'] for h in stage1['history']], color='C1', ls=':', lw=0.9,
                             label='test loss')
        ax.set(xlabel='epoch', ylabel='test top-1 (%)', title=f"Stage 1: {stage1['name']}")
        ax_loss.set_ylabel('loss', color='C1')
        ax.legend(handles=[acc, train, test], loc='upper center', bbox_to_anchor=(0.5, -0.14), ncol=3,
                  fontsize=8, frameon=False)
    if groups:
        ax = axes['stage2']
        cmap = plt.get_cmap('viridis')
        rhos = sorted({rho for _, rho in groups})
        for (start, rho), group in groups.items():
            color = cmap(0.9 * rhos.index(rho) / max(len(rhos) - 1, 1))
            epochs = [h['epoch'] for h in group[0]['history']]
            per_epoch = list(zip(*[[h['top1'] for h in r['history']] for r in group]))
            style = '-' if start == 'best' else '--'
            ax.plot(epochs, [mean(v) for v in per_epoch], style, color=color, marker='o', ms=2.5,
                    lw=2 if len(group) > 1 else 1,
                    label=f"rho {rho:g}{'' if start == 'best' else ', from ' + start} ({seeds_label(group)})")
            if len(group) > 1:
                ax.fill_between(epochs, [min(v) for v in per_epoch], [max(v) for v in per_epoch], color=color,
                                alpha=0.2, lw=0)
        method = method_of(next(iter(groups.values()))[0])
        ax.set(xlabel='epoch', ylabel='test top-1 (%)',
               title=f"Stage 2{' ' + method if method else ''}, from the stage-1 checkpoint (solid: best, "
                     f"dashed: last);\nmean over seeds, band: min-max")
        ax.legend(loc='center left', bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(os.path.join(out, 'curves.png'), dpi=120)
    plt.close(fig)


def plot_reliability(plt, target, out):
    rel = target['best']['reliability']
    count, acc, conf = rel['count'], rel['accuracy'], rel['confidence']
    fig, ax = plt.subplots(figsize=(4.4, 4.8))
    centers = [(i + 0.5) / 15 for i in range(15)]
    ax.bar(centers, acc, width=1 / 15, edgecolor='k', label='accuracy')
    ax.bar(centers, [c - a if n else 0 for a, c, n in zip(acc, conf, count)], bottom=acc, width=1 / 15,
           color='r', alpha=0.3, label='gap to confidence')
    ax.plot([0, 1], [0, 1], 'k--')
    ax.set(xlabel='confidence', ylabel='accuracy', xlim=(0, 1), ylim=(0, 1),
           title=f"Reliability (best epoch), ECE {target['best']['ece'] * 100:.2f}%\n{target['name']}")
    ax.title.set_fontsize(9)
    ax.legend(loc='upper center', bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(os.path.join(out, 'reliability.png'), dpi=120)
    plt.close(fig)


def table(folders):
    """A markdown table of best-epoch top-1 over the results folders written here: stage 1, then each
    stage-2 rho as the mean ± sd over seeds (their number in brackets), a line per folder and stage-1 start."""
    collected = {}
    for folder in folders:
        path = os.path.join(folder, 'metrics.json')
        if not os.path.isfile(path):
            print(f'error: {folder} holds no metrics.json; give results folders written by this script',
                  file=sys.stderr)
            sys.exit(2)
        with open(path) as f:
            collected[os.path.basename(os.path.normpath(folder))] = json.load(f)['runs']
    rhos = sorted({r['H2T'] for runs in collected.values() for r in runs if r['stage'] == 'stage2'})
    lines = ['| results | from | stage 1 | ' + ' | '.join(f'rho {rho:g}' for rho in rhos) + ' |',
             '|---|---|---|' + '---|' * len(rhos)]
    for name, runs in collected.items():
        stage1 = next((f"{r['best']['top1']:.2f}" for r in runs if r['stage'] == 'stage1'), '-')
        groups = rho_groups([r for r in runs if r['stage'] == 'stage2'])
        for start in dict.fromkeys(start for start, _ in groups) or ['']:
            cells = []
            for rho in rhos:
                top1 = [r['best']['top1'] for r in groups.get((start, rho), [])]
                cells.append('-' if not top1 else f'{top1[0]:.2f} (1)' if len(top1) == 1 else
                             f'{mean(top1):.2f} ± {sd(top1):.2f} ({len(top1)})')
            lines.append(f'| {name} | {start} | {stage1} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', help='the results folder to write')
    parser.add_argument('--commit', help='the commit the runs were made with (default: the checkout\'s HEAD)')
    parser.add_argument('--table', action='store_true',
                        help='print a markdown table of the results folders given instead (top-1, mean ± sd over seeds)')
    parser.add_argument('runs', nargs='+', help='run folders (saved/<name>_<time>) and/or earlier metrics.json files')
    args = parser.parse_args()
    if args.table:
        print(table(args.runs))
        return
    if not args.out:
        parser.error('--out is required (or --table)')
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
                       + [round(r['best'][k], 4) for k in keys] + [round(r['last'][k], 4) for k in keys]
                       + [r['commit']])
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
