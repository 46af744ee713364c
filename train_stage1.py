"""Stage 1: train the backbone and classifier with cross-entropy and mixup on instance-sampled batches.

    python train_stage1.py --cfg config/cifar10/cifar10_imb001_stage1_ce_mixup.yaml [KEY VALUE ...]
"""
import torch

from utils.engine import fit
from utils.errors import run_cli
from utils.runtime import create_run_dir, get_logger
from utils.setup import prepare


def main():
    cfg, device, precision, data, backbone, classifier, _ = prepare('Stage 1: representation learning', 'stage1')
    params = list(backbone.parameters()) + list(classifier.parameters())
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    run = create_run_dir(cfg)
    logger = get_logger(f'{run[1]}/{run[3]}.txt')
    logger.info(f'{run[3]}: {cfg.dataset} IF={1 / cfg.imb_factor:g}, {len(data.train_set)} training images '
                f'{data.cls_num_list}, {cfg.backbone} on {device} ({precision}), run folder {run[0]}')
    fit(backbone, classifier, data, optimizer, cfg, device, precision, run, logger, 'stage1')


if __name__ == '__main__':
    run_cli(main)
