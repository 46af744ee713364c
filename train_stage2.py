"""Stage 2: re-train the classifier of a stage-1 checkpoint on class-balanced batches with H2T fusion.

    python train_stage2.py --cfg config/cifar10/cifar10_imb001_stage2_ce_H2T.yaml resume saved/<run>/ckps/model_best.pth.tar

The backbone gets no gradient; with `shift_bn: True` it stays in train mode, so its BatchNorm
running statistics follow the stage-2 data. `H2T` is rho, the fraction of fused channels (0 = cRT).
"""
import torch

from utils.engine import fit
from utils.errors import run_cli
from utils.runtime import create_run_dir, get_logger
from utils.setup import prepare


def main():
    cfg, device, precision, data, backbone, classifier, _ = prepare(
        'Stage 2: classifier re-training', 'stage2', checkpoint='required')
    backbone.requires_grad_(False)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    run = create_run_dir(cfg)
    logger = get_logger(f'{run[1]}/{run[3]}.txt')
    logger.info(f'{run[3]}: {cfg.dataset} IF={1 / cfg.imb_factor:g}, H2T rho={cfg.H2T}, shift_bn={cfg.shift_bn}, '
                f'from {cfg.resume}, on {device} ({precision}), run folder {run[0]}')
    fit(backbone, classifier, data, optimizer, cfg, device, precision, run, logger, 'stage2')


if __name__ == '__main__':
    run_cli(main)
