"""Evaluate a checkpoint on the balanced test set: top-1/5, many/medium/few, ECE (15 bins).

    python eval.py --cfg CONFIG.yaml resume saved/<run>/ckps/model_best.pth.tar

Prints the metrics and writes them as JSON beside the checkpoint (<checkpoint>.eval.json).
"""
import json
import os

from utils import distributed
from utils.engine import evaluate, format_metrics
from utils.errors import run_cli
from utils.runtime import select_eval_precision
from utils.setup import prepare


def main(argv=None):
    exp = prepare('Evaluation', checkpoint='required', argv=argv, compile_model=False)  # one pass never pays back
    cfg, data = exp.cfg, exp.data
    precision = select_eval_precision(cfg, exp.precision)  # fp32 unless `eval_precision same`
    metrics = evaluate(exp.backbone, exp.classifier, data.eval_loader(), data.class_splits, exp.device, precision)
    if not distributed.is_main():
        return
    metrics.update(checkpoint=cfg.resume, checkpoint_epoch=exp.ckpt.get('epoch'), dataset=cfg.dataset,
                   imb_factor=data.imb_factor, precision=precision)
    print(f'{cfg.resume} (epoch {exp.ckpt.get("epoch")}): {format_metrics(metrics)} | '
          f'confidence {metrics["confidence"] * 100:.2f}%')
    out = cfg.resume.removesuffix('.pth.tar').removesuffix('.pth') + '.eval.json'
    tmp = f'{out}.{os.getpid()}.tmp'  # two evaluations of one checkpoint at once each write a whole file
    with open(tmp, 'w') as f:
        json.dump(metrics, f, indent=1)
    os.replace(tmp, out)
    print(f'wrote {out}')


if __name__ == '__main__':
    run_cli(main)
