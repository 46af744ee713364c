import pytest
import numpy as np
import torch

from datasets import DeviceTrainLoader, IMBALANCECIFAR10, balanced_indices, crop_flip, torch_train_loader
from datasets.loaders import CIFAR_MEAN, CIFAR_STD

COUNTS = [500, 200, 80, 30, 10, 5]


def long_tailed_targets():
    return torch.cat([torch.full((n,), c) for c, n in enumerate(COUNTS)])


def test_balanced_sampling_is_uniform_over_classes_and_within_a_class():
    torch.manual_seed(0)
    targets = long_tailed_targets()
    idx = balanced_indices(targets, len(COUNTS), 60000)
    freq = torch.bincount(targets[idx], minlength=len(COUNTS)).double() / len(idx)
    assert torch.allclose(freq, torch.full_like(freq, 1 / len(COUNTS)), atol=0.01)
    # within the 5-image class every image is drawn about equally often
    tail = idx[targets[idx] == 5]
    per_image = torch.bincount(tail - tail.min(), minlength=5).double() / len(tail)
    assert torch.allclose(per_image, torch.full_like(per_image, 0.2), atol=0.03)
    assert set(tail.tolist()) == set(range(sum(COUNTS) - 5, sum(COUNTS)))


def make_loader(**kw):
    targets = long_tailed_targets()
    data = np.random.RandomState(0).randint(0, 256, (len(targets), 32, 32, 3), dtype=np.uint8)
    return DeviceTrainLoader(data, targets.tolist(), len(COUNTS), 100, torch.device('cpu'), channels_last=False, **kw)


def test_instance_sampling_visits_each_image_once_per_epoch():
    loader = make_loader(sampling='instance')
    ys = torch.cat([y for _, y in loader])
    assert len(loader) == 9 and len(ys) == sum(COUNTS)
    assert torch.bincount(ys).tolist() == COUNTS


def test_dual_sampler_balanced_fused_branch_and_instance_fusing_branch():
    torch.manual_seed(0)
    loader = make_loader(sampling='balanced', dual=True)
    y1, y2 = [], []
    for _ in range(40):
        for x1, a, x2, b in loader:
            assert x1.shape == x2.shape and len(a) == len(b)
            y1.append(a)
            y2.append(b)
    f1 = torch.bincount(torch.cat(y1)).double() / len(torch.cat(y1))
    f2 = torch.bincount(torch.cat(y2)).double() / len(torch.cat(y2))
    assert torch.allclose(f1, torch.full_like(f1, 1 / 6), atol=0.01)
    lt = torch.tensor(COUNTS).double() / sum(COUNTS)
    assert torch.allclose(f2, lt, atol=0.01)


def test_torch_loader_balanced_sampling_matches():
    torch.manual_seed(0)
    targets = long_tailed_targets().tolist()

    class Tiny(torch.utils.data.Dataset):
        transform = None

        def __len__(self):
            return len(targets)

        def __getitem__(self, i):
            return torch.zeros(1), targets[i]

    ds = Tiny()
    ds.targets = targets
    loader = torch_train_loader(ds, 100, torch.device('cpu'), 0, sampling='balanced')
    ys = torch.cat([y for _ in range(20) for _, y in loader])
    freq = torch.bincount(ys).double() / len(ys)
    assert torch.allclose(freq, torch.full_like(freq, 1 / 6), atol=0.015)


def test_crop_flip_matches_pad_crop_and_mirror():
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    index, top, left = torch.tensor([2, 0, 1]), torch.tensor([0, 8, 3]), torch.tensor([8, 0, 5])
    flip = torch.tensor([False, True, True])
    out = crop_flip(padded, index, top, left, flip)
    for i in range(3):
        expected = padded[index[i], :, top[i]:top[i] + 32, left[i]:left[i] + 32]
        assert torch.equal(out[i], expected.flip(-1) if flip[i] else expected)


def test_device_augmentation_gives_each_sample_its_own_offset_and_normalises():
    torch.manual_seed(0)
    data = np.full((256, 32, 32, 3), 200, dtype=np.uint8)
    loader = DeviceTrainLoader(data, [0] * 256, 1, 256, torch.device('cpu'), channels_last=True)
    x, _ = next(iter(loader))
    assert x.is_contiguous(memory_format=torch.channels_last)
    value = (200 / 255 - CIFAR_MEAN[0]) / CIFAR_STD[0]
    zero = (0 - CIFAR_MEAN[0]) / CIFAR_STD[0]
    inside = torch.isclose(x[:, 0], torch.tensor(value)).float().mean(dim=(1, 2))
    padding = torch.isclose(x[:, 0], torch.tensor(zero)).float().mean(dim=(1, 2))
    assert torch.allclose(inside + padding, torch.ones(256))
    # offsets 0..8 in each direction: the share of padding pixels differs from sample to sample
    assert len(set(padding.tolist())) > 10
    assert (padding == 0).any()  # offset (4, 4) keeps the whole image


@pytest.mark.parametrize('sampling', ['instance', 'balanced'])
def test_ranks_together_draw_the_single_process_batches(sampling, monkeypatch):
    """Under torchrun each rank takes every world_size-th sample of the same global batch."""
    from utils import distributed

    def batches(rank, world):
        monkeypatch.setattr(distributed, 'rank', lambda: rank)
        monkeypatch.setattr(distributed, 'world_size', lambda: world)
        torch.manual_seed(0)
        loader = make_loader(sampling=sampling, dual=True)
        return len(loader), list(loader)

    steps, single = batches(0, 1)
    steps0, rank0 = batches(0, 2)
    steps1, rank1 = batches(1, 2)
    assert steps == steps0 == steps1
    for whole, a, b in zip(single, rank0, rank1):
        for part in range(4):  # x1, y1, x2, y2
            merged = torch.empty_like(whole[part])
            merged[0::2], merged[1::2] = a[part], b[part]
            assert torch.equal(merged, whole[part])
