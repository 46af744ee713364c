"""Training throughput: the authors' data path against this project's fast path, in one process.

    python -m benchmarks.throughput [--data-path data/cifar10] [--steps 20] [--repeats 5]
                                      [--dataset cifar100 --data-path data/cifar100] [--stages stage1]
                                      [--compile-mode reduce-overhead]

(a) reference style: PIL transforms in a DataLoader (workers 0), fp32, NCHW, as the authors run it;
(b) fast path: data on the device, batched crop/flip, channels_last, precision 'auto', and
    torch.compile where the stage's config turns it on (stage 1); its compiling is part of the
    warm-up, whose time is printed.
Both run this project's stage-1 step (CE + mixup, full backward) and stage-2 step (frozen backbone,
two balanced/instance branches, H2T), batch 128, on CIFAR-10-LT IF=100 (or CIFAR-100-LT), after a warm-up of one epoch
(which meets the epoch's short last batch, a second compiled shape). The two paths alternate, one
repeat of each per round, so that a machine whose speed varies over minutes slows both
alike; the speed-up is the median of the per-round ratios. On CPU both paths run with
keep_freed_memory (process-wide, so it cannot differ between alternating rounds). Prints images per
second, peak memory, and the ratio b/a last.
"""
import argparse
import dataclasses
import os
import resource
import statistics
import time

import torch

from utils.engine import STAGES, make_optimizer, train_step
from utils.setup import prepare, run_cli

CONFIGS = {'stage1': 'config/{0}/{0}_imb001_stage1_ce_mixup.yaml', 'stage2': 'config/{0}/{0}_imb001_stage2_ce_H2T.yaml'}
# keep_freed_memory is process-wide: both paths get it so that their rounds can alternate
PATHS = {'reference': ['data_loader', 'torch', 'workers', 0, 'precision', 'fp32', 'channels_last', False,
                       'compile', False, 'keep_freed_memory', True],
         'fast': ['data_loader', 'device', 'precision', 'auto', 'channels_last', True, 'keep_freed_memory', True]}


def peak_memory_mb(device):
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class TrainingSteps:
    """One stage's training step on one path, fed from an endless stream of its own batches."""

    def __init__(self, stage, path, args):
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        overrides = ['data_path', args.data_path, 'device', args.device, *map(str, PATHS[path])]
        if args.no_compile:
            overrides += ['compile', 'False']
        if args.compile_mode:
            overrides += ['compile_mode', args.compile_mode]
        # the stage's steps from the stage's config, without a checkpoint (stage 2 on a random backbone) or a run folder
        timed = dataclasses.replace(STAGES[stage], needs_checkpoint=False)
        self.exp = prepare(timed, ['--cfg', os.path.join(root, CONFIGS[stage].format(args.dataset)), *overrides],
                           record=False)
        self.cfg, self.device = self.exp.cfg, self.exp.device
        self.optimizer = make_optimizer(self.exp)
        self.exp.stage.set_train_mode(self.exp)
        self.loader = self.exp.data.train_loader()
        self.stream = self._batches()
        self.mode = (f'{self.exp.precision}, compiled ({self.cfg.compile_mode})' if self.cfg.compile
                     else self.exp.precision)

    def _batches(self):
        while True:
            yield from self.loader

    def run(self, steps):
        """Images trained on and wall seconds of `steps` training steps, waiting for the device at the end
        (an epoch's short last batch counts its own images)."""
        images, loss, t = 0, None, time.perf_counter()
        for _ in range(steps):
            loss, _, y = train_step(self.exp, next(self.stream), self.optimizer)
            images += len(y)
        if loss is not None:
            loss.item()  # wait for the device
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
        return images, time.perf_counter() - t


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--data-path', default='data/cifar10')
    parser.add_argument('--device', default='auto')
    parser.add_argument('--steps', type=int, default=20, help='timed steps per repeat')
    parser.add_argument('--repeats', type=int, default=5, help='rounds, each timing both paths once')
    parser.add_argument('--warmup', type=int, default=None,
                        help='warm-up steps (default: one epoch, so the short last batch is compiled before timing)')
    parser.add_argument('--no-compile', action='store_true', help='the fast path without torch.compile')
    parser.add_argument('--compile-mode', default=None, help="torch.compile's mode (config key compile_mode), e.g. "
                        "reduce-overhead; default: the config's")
    parser.add_argument('--dataset', default='cifar10', choices=['cifar10', 'cifar100'],
                        help='the IF=100 configs of this dataset; --data-path holds its files')
    parser.add_argument('--stages', nargs='+', default=['stage1', 'stage2'], choices=['stage1', 'stage2'])
    args = parser.parse_args()
    if args.steps < 1 or args.repeats < 1 or (args.warmup or 0) < 0:
        parser.error('--steps and --repeats must be at least 1, --warmup at least 0')
    print(f'torch {torch.__version__}, {torch.get_num_threads()} CPU threads, device {args.device}, {args.dataset}, '
          f'{args.steps} steps x {args.repeats} alternating rounds after '
          f'{"one epoch of" if args.warmup is None else args.warmup} warm-up steps')
    speedups = {}
    for stage in args.stages:
        paths = {path: TrainingSteps(stage, path, args) for path in PATHS}
        device = paths['fast'].device
        if device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(device)
        warmup_s = {path: steps.run(len(steps.loader) if args.warmup is None else args.warmup)[1]
                    for path, steps in paths.items()}
        rates = {path: [] for path in paths}
        for _ in range(args.repeats):
            for path, steps in paths.items():
                images, seconds = steps.run(args.steps)
                rates[path].append(images / seconds)
        for path, steps in paths.items():
            rate, batch = statistics.median(rates[path]), steps.cfg.batch_size
            print(f'{stage} {path:9s} ({steps.mode}): {rate:7.1f} img/s  {batch / rate * 1000:6.1f} ms/step  '
                  f'(rounds {min(rates[path]):.0f}-{max(rates[path]):.0f})  warm-up {warmup_s[path]:5.1f} s',
                  flush=True)
        print(f'{stage} peak memory so far: {peak_memory_mb(device):.0f} MiB', flush=True)
        ratios = [fast / ref for fast, ref in zip(rates['fast'], rates['reference'])]
        speedups[stage] = statistics.median(ratios), min(ratios), max(ratios)
        del paths
    for stage, (median, low, high) in speedups.items():
        print(f'{stage} speed-up fast/reference: {median:.2f}x '
              f'(median of per-round ratios; rounds {low:.2f}-{high:.2f}x)')


if __name__ == '__main__':
    run_cli(main)
