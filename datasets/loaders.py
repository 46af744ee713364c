"""Training and evaluation batches, two ways that compute the same thing.

- 'device' (default): the whole long-tailed training set is one uint8 tensor on the training device,
  pre-padded by 4 pixels; every batch is cropped and flipped with one gather (each sample its own
  offset and flip) and normalised there. Sampling is by index tensors drawn once per epoch.
- 'torch': the authors' way, PIL transforms in a torch DataLoader, kept for comparison.

Both yield batches already on the device: (x, y) for one branch, (x1, y1, x2, y2) for the stage-2
dual sampler, where branch 1 is class-balanced (it gives the labels) and branch 2 instance-sampled.
"""
import random

import numpy as np
import torch
import torchvision.transforms as T

from common import distributed

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
PAD = 4


def balanced_indices(targets, num_classes, num_samples, generator=None):
    """`num_samples` indices drawn as: class uniform over the classes present, image uniform within it."""
    targets = torch.as_tensor(targets)
    counts = torch.bincount(targets, minlength=num_classes)
    present = torch.nonzero(counts).flatten()
    by_class = torch.argsort(targets, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    cls = present[torch.randint(len(present), (num_samples,), generator=generator)]
    within = (torch.rand(num_samples, generator=generator) * counts[cls]).long().clamp_max_(counts[cls] - 1)
    return by_class[starts[cls] + within]


def instance_indices(num_items, generator=None):
    return torch.randperm(num_items, generator=generator)


def epoch_indices(targets, num_classes, sampling):
    """One epoch's sample order, len(targets) draws from torch's global generator: 'instance' (a
    permutation) or 'balanced'. Every rank draws the same numbers, so each can take its own share of
    the same global batches."""
    n = len(targets)
    return balanced_indices(targets, num_classes, n) if sampling == 'balanced' else instance_indices(n)


def num_global_batches(num_items, batch_size):
    """Steps of an epoch: a last global batch too small to give every rank a sample is dropped."""
    return num_items // batch_size + (num_items % batch_size >= distributed.world_size())


def global_batch_shards(num_items, batch_size):
    """This rank's slice of each global batch of `batch_size` over an epoch of `num_items` draws."""
    for step in range(num_global_batches(num_items, batch_size)):
        start = step * batch_size
        yield distributed.shard(start, min(start + batch_size, num_items))


def crop_flip(padded, index, top, left, flip, size=32):
    """One gather: sample `index[i]` of the padded batch, cropped at (top[i], left[i]), mirrored if flip[i]."""
    ar = torch.arange(size, device=padded.device)
    rows = top[:, None] + ar
    cols = torch.where(flip[:, None], left[:, None] + (size - 1) - ar, left[:, None] + ar)
    channels = torch.arange(padded.size(1), device=padded.device)
    return padded[index[:, None, None, None], channels[None, :, None, None], rows[:, None, :, None], cols[:, None, None, :]]


class Normalize:
    def __init__(self, device, channels_last):
        self.mean = torch.tensor(CIFAR_MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(CIFAR_STD, device=device).view(1, 3, 1, 1) * 255
        self.channels_last = channels_last

    def __call__(self, images_uint8):
        x = (images_uint8.float() - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


class DeviceTrainLoader:
    """Augmented training batches from device-resident data; `sampling` 'instance' or 'balanced'.

    Under torchrun every rank draws the same epoch indices and takes every world_size-th sample of
    each global batch of `batch_size`.
    """

    def __init__(self, data, targets, num_classes, batch_size, device, sampling='instance', dual=False,
                 channels_last=True):
        images = torch.from_numpy(np.ascontiguousarray(data)).permute(0, 3, 1, 2)  # NHWC -> NCHW
        self.padded = torch.nn.functional.pad(images, (PAD,) * 4).to(device)
        self.targets_cpu = torch.as_tensor(targets, dtype=torch.long)
        self.targets = self.targets_cpu.to(device)
        self.num_classes, self.batch_size, self.device = num_classes, batch_size, device
        self.sampling, self.dual = sampling, dual
        self.normalize = Normalize(device, channels_last)

    def __len__(self):
        return num_global_batches(len(self.targets), self.batch_size)

    def _augmented(self, index):
        # crop offsets and flips for the whole epoch come from torch's CPU generator: the same run
        # on CPU or GPU sees the same augmentation.
        n = len(index)
        top, left = torch.randint(0, 2 * PAD + 1, (2, n))
        flip = torch.rand(n) < 0.5
        return [t.to(self.device, non_blocking=True) for t in (index, top, left, flip)]

    def __iter__(self):
        streams = [self._augmented(epoch_indices(self.targets_cpu, self.num_classes, self.sampling))]
        if self.dual:
            streams.append(self._augmented(instance_indices(len(self.targets))))
        for s in global_batch_shards(len(self.targets), self.batch_size):
            batch = []
            for index, top, left, flip in streams:
                images = crop_flip(self.padded, index[s], top[s], left[s], flip[s])
                batch += [self.normalize(images), self.targets[index[s]]]
            yield tuple(batch)


def eval_batches(num_items, batch_size):
    """(start, stop) of each evaluation batch, in order; a last batch too small to give every rank an item
    joins the one before, so that all ranks run the same number of batches and none gets an empty one."""
    bounds = list(range(0, num_items, batch_size)) + [num_items]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < distributed.world_size():
        del bounds[-2]
    return list(zip(bounds, bounds[1:]))


class DeviceEvalLoader:
    """The test set in order, in batches of `batch_size` (each rank its share), normalised on the device."""

    def __init__(self, data, targets, batch_size, device, channels_last=True):
        self.images = torch.from_numpy(np.ascontiguousarray(data)).permute(0, 3, 1, 2).to(device)
        self.targets = torch.as_tensor(targets, dtype=torch.long).to(device)
        self.batches = eval_batches(len(self.targets), batch_size)
        self.normalize = Normalize(device, channels_last)

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for start, stop in self.batches:
            s = distributed.shard(start, stop)
            yield self.normalize(self.images[s]), self.targets[s]


# -- the authors' way: PIL transforms in a DataLoader ----------------------------------------------
def train_transform():
    return T.Compose([T.RandomCrop(32, padding=PAD), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(CIFAR_MEAN, CIFAR_STD)])


def eval_transform():
    return T.Compose([T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)])


class DualSample(torch.utils.data.Dataset):
    """Item i of `dataset` (picked by the balanced sampler) plus a uniformly drawn one (instance sampling)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        x1, y1 = self.dataset[index]
        x2, y2 = self.dataset[random.randrange(len(self.dataset))]
        return x1, y1, x2, y2


class TorchLoader:
    """A DataLoader whose batches are moved to the device (channels_last if asked)."""

    def __init__(self, loader, device, channels_last):
        self.loader, self.device, self.channels_last = loader, device, channels_last

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            moved = []
            for t in batch:
                t = t.to(self.device, non_blocking=True)
                if t.dim() == 4 and self.channels_last:
                    t = t.contiguous(memory_format=torch.channels_last)
                moved.append(t)
            yield tuple(moved)


def torch_train_loader(dataset, batch_size, device, workers, sampling='instance', dual=False,
                       channels_last=False):
    dataset.transform = train_transform()
    sampler = None
    if sampling == 'balanced':
        counts = np.bincount(dataset.targets)
        weights = 1.0 / counts[np.asarray(dataset.targets)]
        sampler = torch.utils.data.WeightedRandomSampler(torch.as_tensor(weights), len(dataset), replacement=True)
    source = DualSample(dataset) if dual else dataset
    loader = torch.utils.data.DataLoader(source, batch_size=batch_size, shuffle=sampler is None, sampler=sampler,
                                         num_workers=workers, pin_memory=str(device).startswith('cuda'))
    return TorchLoader(loader, device, channels_last)


def torch_eval_loader(dataset, batch_size, device, workers, channels_last=False):
    dataset.transform = eval_transform()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         pin_memory=str(device).startswith('cuda'))
    return TorchLoader(loader, device, channels_last)
