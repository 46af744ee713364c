"""Stage 1: train the backbone and classifier with cross-entropy and mixup on instance-sampled batches.

    python train_stage1.py --cfg config/cifar10/cifar10_imb001_stage1_ce_mixup.yaml [KEY VALUE ...]
    torchrun --nproc_per_node=N train_stage1.py --cfg ...            (N processes, one global batch)
    python train_stage1.py --cfg ... resume saved/<run>/ckps/current.pth.tar auto_resume True   (continue)
"""
from utils.engine import STAGE1, fit
from utils.setup import prepare, run_cli


def main(argv=None):
    fit(prepare(STAGE1, argv))


if __name__ == '__main__':
    run_cli(main)
