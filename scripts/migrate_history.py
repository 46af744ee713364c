"""One-off repair of run histories written before train_loss / test_loss were kept apart.

    python scripts/migrate_history.py results/*/metrics.json results/*/summary.json

Until then each epoch's `loss` in summary.json (and so in metrics.json) was the *test* NLL: the test
metrics overwrote the training loss. This renames it `test_loss` (also in the best/last metrics) and
takes each epoch's training loss from a console log (`Epoch [e/N] lr ... loss L ... test top1 T`
lines): the log beside the file, else any under results/, whichever matches most of the run's epochs
by epoch, epoch count and test top-1; where no line matches, `train_loss` is null. Files already in
the new form are left as they are.
"""
import glob
import json
import os
import re
import sys

LINE = re.compile(r'Epoch \[(\d+)/(\d+)\] lr \S+ loss (\S+) .*? test top1 (\S+)')


def logged_losses(path):
    """{(epoch, epochs, top1 as printed): training loss} from one console log."""
    found = {}
    for line in open(path):
        m = LINE.search(line)
        if m:
            epoch, epochs, loss, top1 = m.groups()
            found.setdefault((int(epoch), int(epochs), top1), float(loss))
    return found


def migrate_run(run, logs):
    """Rename the test loss and fill train_loss from the one log (of `logs`, in order of preference)
    that matches most of the run's epochs. Returns (epochs found, the log used)."""
    for which in ('best', 'last'):
        if run.get(which) and 'loss' in run[which]:
            run[which]['test_loss'] = run[which].pop('loss')
    history = [entry for entry in run.get('history', []) if 'loss' in entry]
    keys = [(entry['epoch'], run['epochs'], f"{entry['top1']:.2f}") for entry in history]
    best_path, best_hits = None, 0
    for path, losses in logs.items():
        hits = sum(k in losses for k in keys)
        if hits > best_hits:
            best_path, best_hits = path, hits
    for entry, key in zip(history, keys):
        entry['test_loss'] = entry.pop('loss')
        entry['train_loss'] = logs[best_path].get(key) if best_path else None
    return best_hits, best_path


def main(paths):
    all_logs = sorted(glob.glob('results/*/*.log'))
    for path in paths:
        data = json.load(open(path))
        runs = data['runs'] if 'runs' in data else [data]
        own = sorted(glob.glob(os.path.join(os.path.dirname(path), '*.log')))
        logs = {p: logged_losses(p) for p in own + [p for p in all_logs if p not in own]}
        report = []
        for run in runs:
            hits, log = migrate_run(run, logs)
            report.append(f"{run['name']} {hits}/{len(run.get('history', []))}" + (f' ({log})' if hits else ''))
        with open(path, 'w') as f:
            json.dump(data, f, indent=1)
        print(f'{path}: training losses found for ' + ', '.join(report))


if __name__ == '__main__':
    main(sys.argv[1:])
