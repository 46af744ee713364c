"""Long-tailed CIFAR-10 / CIFAR-100 read straight from the standard pickled python batches.

One class serves both datasets. The training subset follows the LDAM-DRW rule used by every
CIFAR-LT paper (see `img_num_per_cls` and `IMBALANCECIFAR10.__init__`); the test set is the full,
balanced one. Files are read here rather than through torchvision because torchvision refuses any
file whose MD5 differs from the official one (re-encoded copies, generated test data), and because it
unpickles them with plain pickle, which runs whatever a crafted file names: here they are unpickled
without running code (`_BatchUnpickler`) and checked for the layout of the official files.
"""
import contextlib
import os
import pickle
import shutil
import tempfile

import numpy as np
import torch
from PIL import Image

from common.errors import UserError

HOME = 'https://www.cs.toronto.edu/~kriz/cifar.html'  # the official files
_RECONSTRUCT = np.zeros(0).__reduce__()[0]  # numpy.core.multiarray._reconstruct (numpy._core... in numpy 2)


class _Refused(Exception):
    """A global that no official CIFAR file names."""


def _latin1_bytes(text, encoding):
    # Python 3 pickles bytes in protocol 2 as _codecs.encode(text, 'latin1'); no other codec is needed
    if not isinstance(text, str) or encoding not in ('latin1', 'latin-1'):
        raise _Refused(f'_codecs.encode with {type(text).__name__} and {encoding!r}')
    return text.encode('latin1')


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR python files without running code. Their dicts, lists, strings and numbers need
    no globals; the globals admitted are those the official files name (numpy's array reconstruction,
    ndarray and dtype), under numpy 1's and numpy 2's module names, and the latin-1 bytes of files pickled
    by Python 3 in protocol 2. Every other global is refused before anything is called."""
    admitted = {('numpy.core.multiarray', '_reconstruct'): _RECONSTRUCT,
                ('numpy._core.multiarray', '_reconstruct'): _RECONSTRUCT,
                ('numpy', 'ndarray'): np.ndarray,
                ('numpy', 'dtype'): np.dtype,
                ('_codecs', 'encode'): _latin1_bytes}

    def find_class(self, module, name):
        try:
            return self.admitted[module, name]
        except KeyError:
            raise _Refused(f'{module}.{name}') from None


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
    name = 'CIFAR-10'
    base_folder = 'cifar-10-batches-py'
    train_files = [f'data_batch_{i}' for i in range(1, 6)]
    test_files = ['test_batch']
    meta_file, meta_key = 'batches.meta', 'label_names'
    label_key = 'labels'
    torchvision_name = 'CIFAR10'

    def __init__(self, root, imb_type='exp', imb_factor=0.01, rand_number=0, train=True,
                 transform=None, target_transform=None, download=False):
        self.root, self.train = root, train
        self.transform, self.target_transform = transform, target_transform
        self._ensure_files(download)
        self.classes = self._read_class_names()
        data, targets = self._read(self.train_files if train else self.test_files)
        if train:
            self.img_num_list = img_num_per_cls(len(data) / self.cls_num, self.cls_num, imb_type, imb_factor)
            data, targets = self._long_tailed_subset(data, targets, self.img_num_list, rand_number)
        self.data, self.targets = data, targets.tolist()

    # -- fetching ----------------------------------------------------------------------------------
    @property
    def folder(self):
        return os.path.join(self.root, self.base_folder)

    def _missing_files(self):
        return [f for f in self.train_files + self.test_files + [self.meta_file]
                if not os.path.isfile(os.path.join(self.folder, f))]

    def _ensure_files(self, download):
        if download and self._missing_files():
            self._download()
        missing = self._missing_files()
        if missing:
            raise UserError(f'{self.name} not found: {self.folder} lacks {", ".join(missing)}; add `download True` '
                            f'to fetch it from the official site ({HOME}), or put the official {self.base_folder}/ '
                            f'folder in {self.root} (or set data_path to the folder holding it)')

    def _download(self):
        """The official archive (torchvision checks its MD5), unpacked in a temporary folder under data_path and
        moved into place only when complete: a failed download leaves nothing that was not there before."""
        import torchvision
        from torchvision.datasets.utils import download_and_extract_archive
        source = getattr(torchvision.datasets, self.torchvision_name)
        created, existing = [], os.path.abspath(self.root)
        while not os.path.isdir(existing):
            created.append(existing)  # deepest first
            existing = os.path.dirname(existing)
        try:
            os.makedirs(self.root, exist_ok=True)
            unpacked = tempfile.mkdtemp(prefix='.download-', dir=self.root)
            try:
                download_and_extract_archive(source.url, unpacked, filename=source.filename, md5=source.tgz_md5)
                with contextlib.suppress(OSError):  # the folder is there (another torchrun rank may have made it)
                    os.replace(os.path.join(unpacked, self.base_folder), self.folder)
                for name in self._missing_files():
                    os.replace(os.path.join(unpacked, self.base_folder, name), os.path.join(self.folder, name))
            finally:
                shutil.rmtree(unpacked, ignore_errors=True)
        except BaseException as e:
            for folder in created:
                with contextlib.suppress(OSError):
                    os.rmdir(folder)
            if not isinstance(e, Exception):
                raise
            reason = f'{type(e).__name__}: {getattr(e, "reason", None) or e}'.splitlines()[0]  # URLError: .reason
            raise UserError(f'could not download {self.name} to {self.root} ({reason}); no network? put the '
                            f'official {self.base_folder}/ folder there') from None

    # -- reading -----------------------------------------------------------------------------------
    def _fix(self):
        return (f'replace {self.folder} with the official files (delete it and add `download True`, which fetches '
                f'them from {HOME})')

    def _load(self, path, keys):
        """The dict pickled in `path`, unpickled without running code; it must hold `keys`."""
        try:
            with open(path, 'rb') as f:
                entry = _BatchUnpickler(f, encoding='latin1').load()
        except _Refused as e:
            raise UserError(f'{path} names {e}, which no official {self.name} file does, and was not loaded '
                            f'(unpickling it would run code); {self._fix()}') from None
        except Exception as e:
            detail = f'{type(e).__name__}: {e}'.splitlines()[0]
            raise UserError(f'cannot read {path} ({detail}); the file is corrupt or truncated: {self._fix()}') from None
        if not isinstance(entry, dict):
            raise UserError(f'{path} holds a {type(entry).__name__}, not the dict of a {self.name} file; {self._fix()}')
        missing = [k for k in keys if k not in entry]
        if missing:
            raise UserError(f'{path} has no {", ".join(missing)} (its keys: {", ".join(sorted(map(str, entry)))}), '
                            f'so it is no {self.name} file; {self._fix()}')
        return entry

    def _read_class_names(self):
        path = os.path.join(self.folder, self.meta_file)
        names = self._load(path, [self.meta_key])[self.meta_key]
        if not isinstance(names, list) or len(names) != self.cls_num or not all(isinstance(n, str) for n in names):
            raise UserError(f'{path}: {self.meta_key} is not a list of {self.cls_num} class names; {self._fix()}')
        return names

    def _read(self, files):
        data, targets = [], []
        for name in files:
            path = os.path.join(self.folder, name)
            entry = self._load(path, ['data', self.label_key])
            batch, labels = entry['data'], entry[self.label_key]
            if not (isinstance(batch, np.ndarray) and batch.dtype == np.uint8 and batch.shape[1:] == (3072,)):
                shape = f'{batch.dtype} {list(batch.shape)}' if isinstance(batch, np.ndarray) else type(batch).__name__
                raise UserError(f'{path}: data is {shape}, not uint8 [N, 3072] images (32x32 RGB); {self._fix()}')
            if not (isinstance(labels, list) and len(labels) == len(batch) and all(type(y) is int for y in labels)):
                raise UserError(f'{path}: {len(batch)} images but {self.label_key} is not a list of {len(batch)} '
                                f'integers; {self._fix()}')
            if labels and not 0 <= min(labels) <= max(labels) < self.cls_num:
                raise UserError(f'{path}: {self.label_key} run from {min(labels)} to {max(labels)}, outside '
                                f'0..{self.cls_num - 1} of {self.name}; {self._fix()}')
            data.append(batch.reshape(-1, 3, 32, 32))
            targets.append(np.asarray(labels, dtype=np.int64))
        data = np.concatenate(data).transpose(0, 2, 3, 1)  # NHWC, as torchvision
        return np.ascontiguousarray(data), np.concatenate(targets)

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
    name = 'CIFAR-100'
    base_folder = 'cifar-100-python'
    train_files = ['train']
    test_files = ['test']
    meta_file, meta_key = 'meta', 'fine_label_names'
    label_key = 'fine_labels'
    torchvision_name = 'CIFAR100'
