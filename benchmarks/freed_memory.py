"""Page faults a CPU training step pays with glibc's default malloc settings, and with `keep_freed_memory`
(utils/runtime.py; config key `keep_freed_memory`, off by default).

    python -m benchmarks.freed_memory [--rounds 5]

Each measurement runs in a fresh process (the malloc settings are process-wide): a stack of conv + ReLU
layers on a 256 x 16 x 32 x 32 batch, 16 MiB blocks allocated and freed as in a forward pass, counting the
minor page faults of each round after two warm-up rounds. With glibc's defaults every round maps its blocks
afresh and the kernel zeroes them page by page; with the freed memory kept, a round reuses the last one's.
"""
import argparse
import os
import resource
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def faults_per_round(keep, rounds):
    import torch
    import torch.nn.functional as F
    if keep:
        from utils.runtime import keep_freed_memory
        if not keep_freed_memory():
            raise SystemExit('this C library has no mallopt: nothing to measure')
    x = torch.randn(256, 16, 32, 32).contiguous(memory_format=torch.channels_last)
    w = torch.randn(16, 16, 3, 3)

    def one_round():
        y = x
        for _ in range(6):
            y = F.relu(F.conv2d(y, w, padding=1))

    for _ in range(2):
        one_round()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        one_round()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // rounds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--child', choices=['default', 'keep'], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(faults_per_round(args.child == 'keep', args.rounds))
        return
    for mode in ('default', 'keep'):
        out = subprocess.run([sys.executable, '-m', 'benchmarks.freed_memory', '--child', mode, '--rounds',
                              str(args.rounds)], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        print(f'{mode:>8}: {int(out)} minor page faults a round')


if __name__ == '__main__':
    main()
