"""Long-tailed CIFAR-10 / CIFAR-100 read straight from the standard pickled python batches.

One class serves both datasets. The training subset follows the LDAM-DRW rule used by every
CIFAR-LT paper (see `img_num_per_cls` and `IMBALANCECIFAR10.__init__`); the test set is the full,
balanced one. Files are read here rather than through torchvision because torchvision refuses any
file whose MD5 differs from the official one (re-encoded copies, generated test data).
"""
import json
import os
import pickle

import numpy as np
import torch
from PIL import Image

from utils.errors import UserError

PACK_MARKER = 'device_pack.json'  # written by scripts/device_pack.py: the folder holds only these subsets
OFFLINE_HINT = ('on a machine without internet, `python ../shared/data/make_cifar10.py DATA_PATH` '
                'writes CIFAR-10 there; otherwise set download True')


def img_num_per_cls(img_max, cls_num, imb_type, imb_factor):
    """Training images kept per class; class 0 is the most frequent."""
    if imb_type == 'exp':
        return [int(img_max * imb_factor ** (c / (cls_num - 1))) for c in range(cls_num)]
    if imb_type == 'step':
        return [int(img_max) if c < cls_num // 2 else int(img_max * imb_factor) for c in range(cls_num)]
    raise ValueError(f'unknown imb_type {imb_type!r}')


class IMBALANCECIFAR10(torch.utils.data.Dataset):
    """CIFAR-10 with a long-tailed training subset.

    `.data` is uint8 [N, 32, 32, 3], `.targets` a list of ints, stacked class by class. Items are
    (image, target) with `transform` applied to a PIL image, as torchvision's CIFAR datasets give.
    """
    cls_num = 10
    base_folder = 'cifar-10-batches-py'
    train_files = [f'data_batch_{i}' for i in range(1, 6)]
    test_files = ['test_batch']
    label_key = 'labels'
    torchvision_name = 'CIFAR10'

    def __init__(self, root, imb_type='exp', imb_factor=0.01, rand_number=0, train=True,
                 transform=None, target_transform=None, download=False):
        self.root, self.train = root, train
        self.transform, self.target_transform = transform, target_transform
        self._ensure_files(download)
        data, targets = self._read(self.train_files if train else self.test_files)
        if train:
            self._check_packed_subsets(imb_type, imb_factor)
            self.img_num_list = img_num_per_cls(len(data) / self.cls_num, self.cls_num, imb_type, imb_factor)
            data, targets = self._long_tailed_subset(data, targets, self.img_num_list, rand_number)
        self.data, self.targets = data, targets.tolist()

    # -- reading -----------------------------------------------------------------------------------
    @property
    def folder(self):
        return os.path.join(self.root, self.base_folder)

    def _check_packed_subsets(self, imb_type, imb_factor):
        marker = os.path.join(self.folder, PACK_MARKER)
        if not os.path.isfile(marker):
            return
        with open(marker) as f:
            packed = json.load(f)
        if imb_type != packed['imb_type'] or not any(abs(imb_factor - f) < 1e-12 for f in packed['imb_factors']):
            raise UserError(f'{self.folder} was unpacked by scripts/device_pack.py and holds only the '
                            f'{packed["imb_type"]} subsets of imb_factor {packed["imb_factors"]}; {imb_type} '
                            f'{imb_factor} would train on blank images: use the full data (README: Data)')

    def _missing_files(self):
        return [f for f in self.train_files + self.test_files if not os.path.isfile(os.path.join(self.folder, f))]

    def _ensure_files(self, download):
        if download and self._missing_files():
            import torchvision
            getattr(torchvision.datasets, self.torchvision_name)(self.root, train=True, download=True)
        missing = self._missing_files()
        if missing:
            files = ', '.join(self.train_files + self.test_files)
            raise UserError(f'{self.torchvision_name} data not found: {self.folder} lacks {", ".join(missing)} '
                            f'(expected {files}); set data_path to the folder holding {self.base_folder}/, '
                            f'or {OFFLINE_HINT}')

    def _read(self, files):
        data, targets = [], []
        for name in files:
            path = os.path.join(self.folder, name)
            try:
                with open(path, 'rb') as f:
                    entry = pickle.load(f, encoding='latin1')
                batch = np.asarray(entry['data'], dtype=np.uint8).reshape(-1, 3, 32, 32)
                labels = np.asarray(entry[self.label_key], dtype=np.int64)
                if len(labels) != len(batch):
                    raise ValueError(f'{len(batch)} images but {len(labels)} labels')
            except Exception as e:
                raise UserError(f'cannot read {path} ({type(e).__name__}: {e}); the file is corrupt or '
                                f'truncated: delete {self.folder} and create it again ({OFFLINE_HINT})')
            data.append(batch)
            targets.append(labels)
        data = np.concatenate(data).transpose(0, 2, 3, 1)  # NHWC, as torchvision
        targets = np.concatenate(targets)
        if targets.min() < 0 or targets.max() >= self.cls_num:
            raise UserError(f'labels in {self.folder} fall outside 0..{self.cls_num - 1}; '
                            f'is data_path pointing at the other CIFAR?')
        return np.ascontiguousarray(data), targets

    @staticmethod
    def _long_tailed_subset(data, targets, img_num_list, seed):
        # The LDAM-DRW rule (np.random.seed(seed), then one shuffle per class), kept bit-exact so that
        # every paper's subset is the same; a private RandomState draws the same numbers without
        # resetting the global generator that mixup uses.
        rng = np.random.RandomState(seed)
        keep = []
        for c, n in enumerate(img_num_list):
            idx = np.where(targets == c)[0]
            rng.shuffle(idx)
            keep.append(idx[:n])
        keep = np.concatenate(keep)
        return data[keep], targets[keep]

    # -- the Dataset interface ---------------------------------------------------------------------
    def get_cls_num_list(self):
        return np.bincount(np.asarray(self.targets), minlength=self.cls_num).tolist()

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        img, target = Image.fromarray(self.data[index]), self.targets[index]
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target


class IMBALANCECIFAR100(IMBALANCECIFAR10):
    cls_num = 100
    base_folder = 'cifar-100-python'
    train_files = ['train']
    test_files = ['test']
    label_key = 'fine_labels'
    torchvision_name = 'CIFAR100'
