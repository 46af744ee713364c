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
    exp = prepare('Stage 1: representation learning', 'stage1', argv=argv)
    optimizer = make_optimizer(exp.backbone, exp.classifier, exp.cfg)
    if exp.resume_state is None and exp.run:
        sizes = exp.data.cls_num_list
        counts = sizes if len(sizes) <= 100 else f'({max(sizes)} to {min(sizes)} a class)'
        exp.logger.info(f'{exp.run.name}: {exp.data.description}, {len(exp.data.train_set)} training images '
                        f'{counts}, {exp.cfg.backbone} on {exp.device} ({exp.precision}) x '
                        f'{distributed.world_size()} process(es), run folder {exp.run.dir}')
    exp.backbone = distributed.wrap(exp.backbone, exp.device)
    exp.classifier = distributed.wrap(exp.classifier, exp.device)
    fit(exp, optimizer)


if __name__ == '__main__':
    run_cli(main)
