"""ImageNet-LT, Places-LT and iNaturalist 2018: JPEG files named in list files, decoded by worker processes.

A list file has one `relative/path.jpg label` a line (the Decoupling/MiSLAS/H2T `*_train.txt` files);
iNaturalist 2018 may instead be given by its official `train2018.json` / `val2018.json`. Paths are relative
to `data_path`. As in the authors' loaders, labels are renumbered by training-image count, most frequent
first (their `np.argsort(-counts)`), so class 0 is the head and the logits follow that order; the
evaluation list uses the same renumbering. Many/medium/few are the classes with more than 100, 20 to 100
and fewer than 20 training images.

Augmentation is MiSLAS's: RandomResizedCrop, horizontal flip, colour jitter 0.4/0.4/0.4, normalisation;
evaluation resizes to 256/224 of the crop and takes the centre crop. Sampling is drawn in the main process
as for CIFAR (instance, class-balanced, and the dual sampler of H2T), with a seed for each sample's
augmentation, and every rank takes its own share of each global batch.
"""
import json
import os

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image

from common import distributed
from common.errors import UserError
from .loaders import TorchLoader, epoch_indices, eval_batches, global_batch_shards, instance_indices, num_global_batches

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
INAT_MEAN, INAT_STD = (0.466, 0.471, 0.380), (0.195, 0.194, 0.192)
MANY_SHOT, FEW_SHOT = 100, 20  # many: > 100 training images; few: < 20


def count_splits(cls_num_list):
    """Many (> 100 training images), medium (20 to 100) and few-shot (< 20) classes."""
    counts = torch.tensor(cls_num_list)
    return {'many': torch.nonzero(counts > MANY_SHOT).flatten(),
            'medium': torch.nonzero((counts >= FEW_SHOT) & (counts <= MANY_SHOT)).flatten(),
            'few': torch.nonzero(counts < FEW_SHOT).flatten()}


def read_list(path, num_classes):
    """[(relative path, label)] of a `path label` list file, or of an iNaturalist-style JSON."""
    if not os.path.isfile(path):
        raise UserError(f'list file {path} not found; set train_list / eval_list (or data_path) to where the '
                        f'dataset\'s list files are (README: "Large datasets")')
    if path.endswith('.json'):
        return _read_coco_json(path, num_classes)
    items = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or not parts[1].lstrip('-').isdigit():
                raise UserError(f'{path}:{lineno}: expected "<image path> <label>", got {line.strip()!r}; fix the list')
            items.append((parts[0], _checked_label(int(parts[1]), num_classes, f'{path}:{lineno}')))
    if not items:
        raise UserError(f'list file {path} names no images; give a list with one "<image path> <label>" a line')
    return items


def _read_coco_json(path, num_classes):
    """iNaturalist 2018's official format: images[].{id, file_name}, annotations[].{image_id, category_id}."""
    try:
        with open(path) as f:
            data = json.load(f)
        files = {im['id']: im['file_name'] for im in data['images']}
        items = [(files[a['image_id']],
                  _checked_label(int(a['category_id']), num_classes, f'{path}: image {a["image_id"]}'))
                 for a in data['annotations']]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f'{path} is not an iNaturalist-style JSON ({type(e).__name__}: {e}); it needs images[].id/'
                        f'file_name and annotations[].image_id/category_id')
    if not items:
        raise UserError(f'{path} annotates no images')
    return items


def _checked_label(label, num_classes, where):
    if not 0 <= label < num_classes:
        raise UserError(f'{where}: label {label} is outside 0..{num_classes - 1}; fix the list or num_classes')
    return label


def check_files_exist(root, items, list_path):
    missing = [p for p, _ in items if not os.path.isfile(os.path.join(root, p))]
    if missing:
        raise UserError(f'{len(missing)} of the {len(items)} images of {list_path} are missing under {root}, e.g. '
                        f'{missing[0]}; set data_path to the folder the list\'s paths start from')


class LT_Dataset(torch.utils.data.Dataset):
    """Images of a list, labels already renumbered; item i is (transform(image), label).

    Training items are asked for as (index, seed): the transform's random draws then come from a
    generator seeded with `seed`, which the main process drew for that sample of the epoch. So the
    augmentation does not depend on which worker or rank loads the image: the ranks of a torchrun
    together load exactly the single-process batches, and a resumed run continues exactly.
    """

    def __init__(self, root, items, transform=None):
        self.root, self.transform = root, transform
        self.paths = [p for p, _ in items]
        self.targets = [t for _, t in items]

    def __len__(self):
        return len(self.paths)

    def load(self, index, seed=None):
        path = os.path.join(self.root, self.paths[index])
        try:
            with Image.open(path) as img:
                img = img.convert('RGB')
        except OSError as e:
            raise UserError(f'cannot decode image {path} ({e}); replace the file or drop it from the list')
        if self.transform is None:
            return img
        if seed is None:
            return self.transform(img)
        with torch.random.fork_rng(devices=[]):  # the CPU generator alone: CUDA's stay untouched
            torch.default_generator.manual_seed(seed)
            return self.transform(img)

    def __getitem__(self, item):
        if isinstance(item, int):  # evaluation: deterministic transform
            return self.load(item), self.targets[item]
        if isinstance(item[0], tuple):  # dual sampler: ((balanced index, seed), (instance index, seed))
            (i, si), (j, sj) = item
            return self.load(i, si), self.targets[i], self.load(j, sj), self.targets[j]
        i, seed = item
        return self.load(i, seed), self.targets[i]


class GlobalBatchSampler(torch.utils.data.Sampler):
    """This rank's items of each step. The epoch's order and a seed for each sample's augmentation are
    drawn in the main process from torch's global generator (every rank the same), as DeviceTrainLoader
    draws its crops; items are (index, seed), with `dual` pairs of them (class-balanced or instance
    sample, instance sample)."""

    def __init__(self, targets, num_classes, batch_size, sampling, dual):
        self.targets = torch.as_tensor(targets, dtype=torch.long)
        self.num_classes, self.batch_size, self.sampling, self.dual = num_classes, batch_size, sampling, dual

    def __len__(self):
        return num_global_batches(len(self.targets), self.batch_size)

    def _seeded(self, index):
        seeds = torch.randint(2 ** 62, (len(index),))
        return list(zip(index.tolist(), seeds.tolist()))

    def __iter__(self):
        order = self._seeded(epoch_indices(self.targets, self.num_classes, self.sampling))
        if self.dual:
            order = list(zip(order, self._seeded(instance_indices(len(self.targets)))))
        for s in global_batch_shards(len(order), self.batch_size):
            yield order[s]


class EvalBatchSampler(torch.utils.data.Sampler):
    """The evaluation list in order, in `eval_batches`, each rank its share of every batch."""

    def __init__(self, num_items, batch_size):
        self.batches = eval_batches(num_items, batch_size)
        self.num_items = num_items

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for start, stop in self.batches:
            yield list(range(self.num_items)[distributed.shard(start, stop)])


class ImageNet_LT:
    """The long-tailed training list, the balanced evaluation list, and their loaders."""
    train_list, eval_list = 'ImageNet_LT_train.txt', 'ImageNet_LT_test.txt'
    mean, std = IMAGENET_MEAN, IMAGENET_STD

    @staticmethod
    def check_config(cfg):
        """Any num_classes (a list may be a subset); the list's labels are checked against it when read."""

    def __init__(self, cfg, device):
        self.cfg, self.device = cfg, device
        train_path = cfg.train_list or os.path.join(cfg.data_path, self.train_list)
        eval_path = cfg.eval_list or os.path.join(cfg.data_path, self.eval_list)
        train_items = read_list(train_path, cfg.num_classes)
        eval_items = read_list(eval_path, cfg.num_classes)
        counts = np.bincount([t for _, t in train_items], minlength=cfg.num_classes)
        if (counts == 0).any():
            raise UserError(f'{train_path} has no image of class {int(np.flatnonzero(counts == 0)[0])} '
                            f'({int((counts == 0).sum())} empty classes of {cfg.num_classes}); '
                            f'fix the list or num_classes')
        check_files_exist(cfg.data_path, train_items, train_path)
        check_files_exist(cfg.data_path, eval_items, eval_path)
        # renumber by training-image count, most frequent first: the authors' class_map, the same numpy call
        # (numpy's default sort, so classes of equal count come in the order it gives them)
        order = np.argsort(-counts)
        self.class_map = np.empty_like(order)
        self.class_map[order] = np.arange(len(order))
        self.cls_num_list = counts[order].tolist()
        renumber = lambda items: [(p, int(self.class_map[t])) for p, t in items]  # noqa: E731
        size = cfg.image_size
        normalize = T.Normalize(self.mean, self.std)
        self.train_set = LT_Dataset(cfg.data_path, renumber(train_items), T.Compose([
            T.RandomResizedCrop(size), T.RandomHorizontalFlip(),
            T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0), T.ToTensor(), normalize]))
        self.test_set = LT_Dataset(cfg.data_path, renumber(eval_items), T.Compose([
            T.Resize(size * 256 // 224), T.CenterCrop(size), T.ToTensor(), normalize]))
        self.imb_factor = float(counts.min() / counts.max())  # measured: n_min / n_max of the list
        self.description = (f'{cfg.dataset} {os.path.basename(train_path)} (IF={counts.max() / counts.min():g}, '
                            f'{len(eval_items)} evaluation images)')
        self.class_splits = count_splits(self.cls_num_list)

    def _loader(self, dataset, batch_sampler, persistent):
        # The augmentation's randomness comes with each item (its seed), not from the workers' own seeds; a
        # private generator keeps the DataLoader's seed draws out of the global one the run checkpoints.
        cfg = self.cfg
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, num_workers=cfg.workers,
                                             pin_memory=self.device.type == 'cuda',
                                             persistent_workers=persistent and cfg.workers > 0,
                                             generator=torch.Generator())
        return TorchLoader(loader, self.device, cfg.channels_last)

    def train_loader(self):
        """Instance sampling; `sampler.type: weighted sampler` makes it class-balanced, and the dual sampler
        adds the instance-sampled fusing branch where H2T fuses (rho > 0), as for CIFAR."""
        cfg = self.cfg
        sampling = 'balanced' if cfg.sampler.type == 'weighted sampler' else 'instance'
        dual = cfg.sampler.dual_sample.enable and cfg.H2T > 0
        sampler = GlobalBatchSampler(self.train_set.targets, cfg.num_classes, cfg.batch_size, sampling, dual)
        return self._loader(self.train_set, sampler, persistent=True)

    def eval_loader(self):
        # workers for evaluation start at each evaluation: no idle processes (and their memory) while training
        return self._loader(self.test_set, EvalBatchSampler(len(self.test_set), self.cfg.eval_batch_size),
                            persistent=False)


class Places_LT(ImageNet_LT):
    train_list, eval_list = 'Places_LT_train.txt', 'Places_LT_test.txt'


class iNa2018(ImageNet_LT):
    train_list, eval_list = 'iNaturalist18_train.txt', 'iNaturalist18_val.txt'
    mean, std = INAT_MEAN, INAT_STD
