"""Images per second of the list-dataset training loader alone (decode, RandomResizedCrop, flip, colour
jitter, normalise, collate), on generated JPEGs of ImageNet's typical size, for several worker counts.

    python -m benchmarks.loader [--images 1024] [--width 500 --height 375] [--workers 0 1 2] [--dir DIR]

A GPU needs the loader to keep up with its training step: ResNet-50 trains at roughly 1,000-3,000 images/s
on one modern GPU, so divide that by the per-worker rate printed here for the workers a GPU needs (the
`workers` key is per rank). The images are smooth colour fields with noise, which encode to about the
size of a natural photo at quality 90; decoding time grows with the file's pixel count.
"""
import argparse
import os
import tempfile
import time

import numpy as np
import torch

from datasets.image_list import ImageNet_LT
from utils.config import load_config

CONFIG = 'config/imagenet/imagenet_lt_resnet50_stage1_ce_mixup.yaml'


def write_images(root, n, width, height, classes=10):
    from PIL import Image
    rng = np.random.RandomState(0)
    yy, xx = np.mgrid[0:height, 0:width]
    lines = []
    os.makedirs(os.path.join(root, 'train'), exist_ok=True)
    for i in range(n):
        base = rng.randint(0, 256, 3)
        field = (base + 60 * np.sin(xx[..., None] / rng.uniform(5, 40) + yy[..., None] / rng.uniform(5, 40))
                 + rng.normal(0, 12, (height, width, 3)))
        path = f'train/{i}.jpg'
        Image.fromarray(field.clip(0, 255).astype(np.uint8)).save(os.path.join(root, path), quality=90)
        lines.append(f'{path} {i % classes}')
    for name in ('ImageNet_LT_train.txt', 'ImageNet_LT_test.txt'):
        with open(os.path.join(root, name), 'w') as f:
            f.write('\n'.join(lines) + '\n')
    return sum(os.path.getsize(os.path.join(root, f'train/{i}.jpg')) for i in range(n)) / n


def images_per_second(root, workers, batch_size, classes=10):
    cfg = load_config(CONFIG, ['data_path', root, 'num_classes', str(classes), 'workers', str(workers),
                               'batch_size', str(batch_size), 'device', 'cpu'])
    loader = ImageNet_LT(cfg, torch.device('cpu')).train_loader()
    start, seen = None, 0
    for step, (x, _) in enumerate(loader):
        if step == 1:  # the first batch pays for starting the workers
            start, seen = time.perf_counter(), 0
        seen += len(x)
    return seen / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--images', type=int, default=1024)
    parser.add_argument('--width', type=int, default=500)
    parser.add_argument('--height', type=int, default=375)
    parser.add_argument('--workers', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--dir', default=None, help='where to write the JPEGs (default: a temporary folder)')
    args = parser.parse_args()
    if args.images < 2 * args.batch_size:
        parser.error('--images must be at least twice --batch-size: the first batch, which starts the workers, '
                     'is not timed')
    with tempfile.TemporaryDirectory() as tmp:
        root = args.dir or tmp
        size = write_images(root, args.images, args.width, args.height)
        print(f'{args.images} JPEGs of {args.width}x{args.height}, {size / 1024:.0f} KiB each on average; '
              f'{os.cpu_count()} CPU cores; batches of {args.batch_size}')
        for workers in args.workers:
            rate = images_per_second(root, workers, args.batch_size)
            per = rate / max(workers, 1)
            print(f'workers {workers}: {rate:7.0f} images/s ({per:.0f} per worker process)')


if __name__ == '__main__':
    main()
