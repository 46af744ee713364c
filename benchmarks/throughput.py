"""Training throughput: the authors' data path against this project's fast path, in one process.

    python benchmarks/throughput.py [--data-path data/cifar10] [--steps 20] [--repeats 3]

(a) reference style: PIL transforms in a DataLoader (workers 0), fp32, NCHW, as the authors run it;
(b) fast path: data on the device, batched crop/flip, channels_last, precision 'auto', freed memory
    kept for reuse (keep_freed_memory), and torch.compile where the stage's config turns it on
    (stage 1); its compiling is part of the warm-up, whose time is printed.
Both run this project's stage-1 step (CE + mixup, full backward) and stage-2 step (frozen backbone,
two balanced/instance branches, H2T), batch 128, on CIFAR-10-LT IF=100, after warm-up; each figure is
the median over the repeats. Prints images per second, peak memory, and the ratio b/a last.
"""
import argparse
import os
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils.engine import make_optimizer, set_train_mode, train_step  # noqa: E402
from utils.errors import run_cli  # noqa: E402
from utils.setup import prepare  # noqa: E402

CONFIGS = {'stage1': 'config/cifar10/cifar10_imb001_stage1_ce_mixup.yaml',
           'stage2': 'config/cifar10/cifar10_imb001_stage2_ce_H2T.yaml'}
PATHS = {'reference': ['data_loader', 'torch', 'workers', 0, 'precision', 'fp32', 'channels_last', False,
                       'compile', False, 'keep_freed_memory', False],
         'fast': ['data_loader', 'device', 'precision', 'auto', 'channels_last', True, 'keep_freed_memory', True]}


def peak_memory_mb(device):
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def images_per_second(stage, path, args):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    overrides = ['data_path', args.data_path, 'device', args.device, *map(str, PATHS[path])]
    if args.no_compile:
        overrides += ['compile', 'False']
    s = prepare('Throughput', argv=['--cfg', os.path.join(root, CONFIGS[stage]), *overrides])
    cfg, device, precision, backbone, classifier = s.cfg, s.device, s.precision, s.backbone, s.classifier
    optimizer = make_optimizer(backbone, classifier, cfg, stage)
    set_train_mode(backbone, classifier, cfg, stage)
    loader = s.data.train_loader()

    def batches():
        while True:
            yield from loader

    stream = batches()

    def run(steps):
        images = 0
        for _ in range(steps):
            loss, _, y = train_step(backbone, classifier, next(stream), optimizer, cfg, device, precision, stage)
            images += len(y)
        loss.item()  # wait for the device
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        return images

    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    run(args.warmup)
    warmup_s = time.perf_counter() - t
    rates = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        n = run(args.steps)
        rates.append(n / (time.perf_counter() - t))
    mode = f'{precision}, compiled' if cfg.compile else precision
    return statistics.median(rates), mode, warmup_s, peak_memory_mb(device)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--data-path', default='data/cifar10')
    parser.add_argument('--device', default='auto')
    parser.add_argument('--steps', type=int, default=20, help='timed steps per repeat')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--warmup', type=int, default=5)
    parser.add_argument('--no-compile', action='store_true', help='the fast path without torch.compile')
    args = parser.parse_args()
    print(f'torch {torch.__version__}, {torch.get_num_threads()} CPU threads, device {args.device}, '
          f'batch 128, {args.steps} steps x {args.repeats} repeats after {args.warmup} warm-up steps')
    results = {}
    # the reference path first, with the C library's default allocator: keep_freed_memory, once on, stays on
    for path in ('reference', 'fast'):
        for stage in ('stage1', 'stage2'):
            rate, mode, warmup_s, peak = images_per_second(stage, path, args)
            results[stage, path] = rate
            print(f'{stage} {path:9s} ({mode}): {rate:7.1f} img/s  {128 / rate * 1000:6.1f} ms/step  '
                  f'warm-up {warmup_s:5.1f} s  peak memory so far {peak:.0f} MiB', flush=True)
    for stage in ('stage1', 'stage2'):
        print(f'{stage} speed-up fast/reference: {results[stage, "fast"] / results[stage, "reference"]:.2f}x')


if __name__ == '__main__':
    run_cli(main)
