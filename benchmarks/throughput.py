"""Training throughput: the authors' data path against this project's fast path, in one process.

    python benchmarks/throughput.py [--data-path data/cifar10] [--steps 20] [--repeats 3]

(a) reference style: PIL transforms in a DataLoader (workers 0), fp32, NCHW, as the authors run it;
(b) fast path: data on the device, batched crop/flip, channels_last, precision 'auto'.
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
from datasets import build_data  # noqa: E402
from models import build_model  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.engine import stage1_loss, stage2_loss  # noqa: E402
from utils.errors import run_cli  # noqa: E402
from utils.runtime import select_device, select_precision  # noqa: E402

CONFIGS = {'stage1': 'config/cifar10/cifar10_imb001_stage1_ce_mixup.yaml',
           'stage2': 'config/cifar10/cifar10_imb001_stage2_ce_H2T.yaml'}
PATHS = {'reference': ['data_loader', 'torch', 'workers', 0, 'precision', 'fp32', 'channels_last', False],
         'fast': ['data_loader', 'device', 'precision', 'auto', 'channels_last', True]}


def peak_memory_mb(device):
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def images_per_second(stage, path, args):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(root, CONFIGS[stage]), ['data_path', args.data_path, 'device', args.device,
                                                           *map(str, PATHS[path])])
    device = select_device(cfg)
    precision = select_precision(cfg, device)
    torch.manual_seed(0)
    backbone, classifier = build_model(cfg)
    backbone.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
    classifier.to(device)
    if stage == 'stage1':
        params = list(backbone.parameters()) + list(classifier.parameters())
        backbone.train()
    else:
        backbone.requires_grad_(False)
        params = list(classifier.parameters())
        backbone.train(cfg.shift_bn)
    classifier.train()
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    step_fn = stage1_loss if stage == 'stage1' else stage2_loss
    loader = build_data(cfg, device).train_loader()

    def batches():
        while True:
            yield from loader

    stream = batches()

    def run(steps):
        images = 0
        for _ in range(steps):
            loss, _, y = step_fn(backbone, classifier, next(stream), cfg, device, precision)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            images += len(y)
        loss.item()  # wait for the device
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        return images

    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    run(args.warmup)
    rates = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        n = run(args.steps)
        rates.append(n / (time.perf_counter() - t))
    return statistics.median(rates), precision, peak_memory_mb(device)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--data-path', default='data/cifar10')
    parser.add_argument('--device', default='auto')
    parser.add_argument('--steps', type=int, default=20, help='timed steps per repeat')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--warmup', type=int, default=5)
    args = parser.parse_args()
    print(f'torch {torch.__version__}, {torch.get_num_threads()} CPU threads, device {args.device}, '
          f'batch 128, {args.steps} steps x {args.repeats} repeats after {args.warmup} warm-up steps')
    results = {}
    for stage in ('stage1', 'stage2'):
        for path in ('reference', 'fast'):
            rate, precision, peak = images_per_second(stage, path, args)
            results[stage, path] = rate
            print(f'{stage} {path:9s} ({precision}): {rate:7.1f} img/s  {128 / rate * 1000:6.1f} ms/step  '
                  f'peak memory so far {peak:.0f} MiB', flush=True)
    for stage in ('stage1', 'stage2'):
        print(f'{stage} speed-up fast/reference: {results[stage, "fast"] / results[stage, "reference"]:.2f}x')


if __name__ == '__main__':
    run_cli(main)
