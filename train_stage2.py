"""Stage 2: re-train the classifier of a stage-1 checkpoint on class-balanced batches with H2T fusion.

    python train_stage2.py --cfg config/cifar10/cifar10_imb001_stage2_ce_H2T.yaml resume saved/<run>/ckps/model_best.pth.tar

The backbone gets no gradient; with `shift_bn: True` it stays in train mode, so its BatchNorm
running statistics follow the stage-2 data. `H2T` is rho, the fraction of fused channels (0 = cRT).
To continue an interrupted stage-2 run: `resume saved/<stage-2 run>/ckps/current.pth.tar auto_resume True`.
"""
from utils.engine import STAGE2, fit
from utils.setup import prepare, run_cli


def main(argv=None):
    fit(prepare(STAGE2, argv))


if __name__ == '__main__':
    run_cli(main)
