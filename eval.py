"""Evaluate a checkpoint on the balanced test set: top-1/5, many/medium/few, ECE (15 bins).

    python eval.py --cfg CONFIG.yaml resume saved/<run>/ckps/model_best.pth.tar [--out metrics.json]

Prints the metrics; `--out FILE` also writes them, with the per-class accuracies and the reliability
diagram's bins, as JSON.
"""
import json
import os
import sys

from common import distributed
from common.errors import UserError
from utils.engine import EVALUATION, evaluate, format_metrics
from utils.runtime import select_eval_precision
from utils.setup import prepare, run_cli


def split_out(argv):
    """(argv without `--out FILE`, FILE or None): the option may stand anywhere among the KEY VALUE pairs."""
    argv = list(argv)
    if '--out' not in argv:
        return argv, None
    i = argv.index('--out')
    if i + 1 >= len(argv) or argv[i + 1].startswith('--'):
        raise UserError('--out needs a file name; e.g. --out saved/eval/model_best.json')
    return argv[:i] + argv[i + 2:], argv[i + 1]


def main(argv=None):
    argv, out = split_out(sys.argv[1:] if argv is None else argv)
    if out and os.path.dirname(out) and not os.path.isdir(os.path.dirname(out)):
        raise UserError(f'--out {out}: folder {os.path.dirname(out)} does not exist; create it or write elsewhere')
    exp = prepare(EVALUATION, argv)
    cfg = exp.cfg
    precision = select_eval_precision(cfg, exp.precision)  # fp32 unless `eval_precision same`
    metrics = evaluate(exp, exp.data.eval_loader(), precision)
    if not distributed.is_main():
        return
    metrics.update(checkpoint=cfg.resume, checkpoint_epoch=exp.ckpt.get('epoch'), dataset=cfg.dataset,
                   imb_factor=exp.data.imb_factor, precision=precision)
    print(f'{cfg.resume} (epoch {exp.ckpt.get("epoch")}): {format_metrics(metrics)} | '
          f'confidence {metrics["confidence"] * 100:.2f}%')
    if out:
        tmp = f'{out}.{os.getpid()}.tmp'  # two evaluations writing one file at once each write a whole file
        with open(tmp, 'w') as f:
            json.dump(metrics, f, indent=1)
        os.replace(tmp, out)
        print(f'wrote {out}')


if __name__ == '__main__':
    run_cli(main)
