"""Stage 1: train the backbone and classifier with cross-entropy and mixup on instance-sampled batches.

    python train_stage1.py --cfg config/cifar10/cifar10_imb001_stage1_ce_mixup.yaml [KEY VALUE ...]
    torchrun --nproc_per_node=N train_stage1.py --cfg ...            (N processes, one global batch)
    python train_stage1.py --cfg ... resume saved/<run>/ckps/current.pth.tar auto_resume True   (continue)
"""
from utils import distributed
from utils.engine import fit, make_optimizer
from utils.errors import run_cli
from utils.setup import prepare


def main(argv=None):
    s = prepare('Stage 1: representation learning', 'stage1', argv=argv)
    cfg = s.cfg
    optimizer = make_optimizer(s.backbone, s.classifier, cfg, 'stage1')
    if s.resume_state is None and s.run:
        sizes = s.data.cls_num_list
        counts = sizes if len(sizes) <= 100 else f'({max(sizes)} to {min(sizes)} a class)'
        s.logger.info(f'{s.run.name}: {s.data.description}, {len(s.data.train_set)} training images '
                      f'{counts}, {cfg.backbone} on {s.device} ({s.precision}) x '
                      f'{distributed.world_size()} process(es), run folder {s.run.dir}')
    backbone, classifier = distributed.wrap(s.backbone, s.device), distributed.wrap(s.classifier, s.device)
    fit(backbone, classifier, s.data, optimizer, cfg, s.device, s.precision, s.run, s.logger, 'stage1', s.criterion,
        s.resume_state)


if __name__ == '__main__':
    run_cli(main)
