"""Stage 2: re-train the classifier of a stage-1 checkpoint on class-balanced batches with H2T fusion.

    python train_stage2.py --cfg config/cifar10/cifar10_imb001_stage2_ce_H2T.yaml resume saved/<run>/ckps/model_best.pth.tar

The backbone gets no gradient; with `shift_bn: True` it stays in train mode, so its BatchNorm
running statistics follow the stage-2 data. `H2T` is rho, the fraction of fused channels (0 = cRT).
To continue an interrupted stage-2 run: `resume saved/<stage-2 run>/ckps/current.pth.tar auto_resume True`.
"""
from utils import distributed
from utils.engine import fit, make_optimizer
from utils.errors import run_cli
from utils.setup import prepare


def main(argv=None):
    exp = prepare('Stage 2: classifier re-training', 'stage2', checkpoint='required', argv=argv)
    cfg = exp.cfg
    optimizer = make_optimizer(exp.backbone, exp.classifier, cfg)
    if exp.resume_state is None and exp.run:
        exp.logger.info(f'{exp.run.name}: {exp.data.description}, H2T rho={cfg.H2T}, '
                        f'shift_bn={cfg.shift_bn}, from {cfg.resume}, on {exp.device} ({exp.precision}) x '
                        f'{distributed.world_size()} process(es), run folder {exp.run.dir}')
    exp.classifier = distributed.wrap(exp.classifier, exp.device)  # the frozen backbone needs no DDP
    fit(exp, optimizer)


if __name__ == '__main__':
    run_cli(main)
