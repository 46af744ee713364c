"""Pack the CIFAR-LT data small enough to travel to a lent GPU machine (64 MiB in all), and unpack it there.

    python scripts/device_pack.py pack cifar100 data/cifar100 data/pack/cifar100_lt.xz
    python scripts/device_pack.py unpack data/pack/cifar100_lt.xz data/cifar100      (on the GPU machine)

The pack holds every training label, the training images of the exp long-tailed subsets of the shipped
configs (`--imb-factors`; drawn from one seed, they nest, so their union is the largest one), and the
whole test set, xz-compressed. `unpack` writes the official file layout with zeros for the training images
no subset uses: the subset rule picks images by label and seed only, so every run reads exactly the
pixels of the official files; a marker file makes any other subset an error rather than blank images.
The shipped CIFAR-100-LT IFs (200 / 100 / 50) pack into 50.4 MiB.
"""
import argparse
import io
import json
import lzma
import os
import pickle
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from datasets.cifar_lt import PACK_MARKER, IMBALANCECIFAR10, IMBALANCECIFAR100, img_num_per_cls  # noqa: E402
from utils.errors import UserError, run_cli  # noqa: E402

DATASETS = {'cifar10': IMBALANCECIFAR10, 'cifar100': IMBALANCECIFAR100}
SHIPPED_IMB_FACTORS = {'cifar10': [0.01, 0.02, 0.1], 'cifar100': [0.005, 0.01, 0.02]}


def subset_union(targets, cls_num, imb_factors, seed=0):
    """Indices (into the official training order) of every image an exp subset of `imb_factors` keeps."""
    keep = np.zeros(len(targets), dtype=bool)
    for factor in imb_factors:
        counts = img_num_per_cls(len(targets) / cls_num, cls_num, 'exp', factor)
        rng = np.random.RandomState(seed)
        for c, n in enumerate(counts):  # the subset rule of IMBALANCECIFAR10._long_tailed_subset
            idx = np.where(targets == c)[0]
            rng.shuffle(idx)
            keep[idx[:n]] = True
    return np.flatnonzero(keep)


def pack(dataset, root, out, imb_factors):
    cls = DATASETS[dataset]
    reader = cls.__new__(cls)
    reader.root = root
    if reader._missing_files():
        raise UserError(f'{reader.folder} lacks {", ".join(reader._missing_files())}; write the data first '
                        f'(README: Data)')
    train_x, train_y = reader._read(cls.train_files)
    test_x, test_y = reader._read(cls.test_files)
    kept = subset_union(train_y, cls.cls_num, imb_factors)
    buffer = io.BytesIO()
    np.savez(buffer, dataset=dataset, imb_factors=imb_factors, train_labels=train_y, kept=kept,
             kept_images=train_x[kept], test_images=test_x, test_labels=test_y)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with lzma.open(out, 'wb', preset=6) as f:
        f.write(buffer.getvalue())
    ifs = ', '.join(f'{1 / f:g}' for f in imb_factors)
    print(f'wrote {out}: {len(kept)} of {len(train_y)} training images (exp IF {ifs}) and {len(test_y)} test images, '
          f'{os.path.getsize(out) / 2 ** 20:.1f} MiB')


def unpack(path, root):
    if not os.path.isfile(path):
        raise UserError(f'pack {path} not found; make it with `python scripts/device_pack.py pack ...`')
    with lzma.open(path, 'rb') as f:
        data = np.load(io.BytesIO(f.read()))
    dataset = str(data['dataset'])
    cls = DATASETS[dataset]
    train = np.zeros((len(data['train_labels']), 32, 32, 3), dtype=np.uint8)
    train[data['kept']] = data['kept_images']
    folder = os.path.join(root, cls.base_folder)
    existing = [f for f in cls.train_files + cls.test_files if os.path.exists(os.path.join(folder, f))]
    if existing:
        raise UserError(f'{folder} already holds {", ".join(existing)}; unpack into a folder without CIFAR files')
    os.makedirs(folder, exist_ok=True)

    def write(name, images, labels):
        flat = np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(len(images), -1)
        with open(os.path.join(folder, name), 'wb') as f:
            pickle.dump({'data': flat, cls.label_key: labels.tolist()}, f, protocol=4)

    if dataset == 'cifar10':  # five training batches in the official order
        for i, part in enumerate(np.array_split(np.arange(len(train)), 5)):
            write(cls.train_files[i], train[part], data['train_labels'][part])
    else:
        write(cls.train_files[0], train, data['train_labels'])
    write(cls.test_files[0], data['test_images'], data['test_labels'])
    with open(os.path.join(folder, PACK_MARKER), 'w') as f:  # IMBALANCECIFAR10 refuses other subsets
        json.dump({'imb_type': 'exp', 'imb_factors': [float(x) for x in data['imb_factors']]}, f)
    print(f'wrote {folder}: {len(data["kept"])} training images of the long-tailed subsets (the others zero), '
          f'{len(data["test_labels"])} test images')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest='command', required=True)
    p = sub.add_parser('pack')
    p.add_argument('dataset', choices=sorted(DATASETS))
    p.add_argument('root', help='data_path of the dataset (the folder holding cifar-*-py*/)')
    p.add_argument('out')
    p.add_argument('--imb-factors', type=float, nargs='+', help='default: those of the shipped configs')
    u = sub.add_parser('unpack')
    u.add_argument('pack')
    u.add_argument('root')
    args = parser.parse_args(argv)
    if args.command == 'pack':
        pack(args.dataset, args.root, args.out, args.imb_factors or SHIPPED_IMB_FACTORS[args.dataset])
    else:
        unpack(args.pack, args.root)


if __name__ == '__main__':
    run_cli(main)
