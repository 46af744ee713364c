"""The batch loaders: balanced and instance sampling, the dual sampler of stage 2, the device loader's
augmentation against the authors' PIL pipeline, and what a config's loaders draw through build_data."""
import json
import random

import numpy as np
import pytest
import torch

from conftest import STAGE1, STAGE2, args, only_run, run_main, write_cifar
from datasets import DeviceTrainLoader, balanced_indices, build_data, crop_flip, torch_train_loader
from datasets.loaders import CIFAR_MEAN, CIFAR_STD
from utils.config import load_config

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
    from common import distributed

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


# -- what a config's loaders draw and how they preprocess, through build_data ----------------------------
def tiny_config(root, config, *extra):
    return load_config(config, ['data_path', root, 'imb_factor', '0.1', 'batch_size', '16', 'device', 'cpu',
                                *[str(e) for e in extra]])


def label_counts(loader, epochs, branch):
    ys = torch.cat([batch[2 * branch + 1] for _ in range(epochs) for batch in loader])
    return torch.bincount(ys, minlength=10).double()


@pytest.mark.parametrize('data_loader', ['device', 'torch'])
def test_stage2_config_gives_balanced_labels_and_a_long_tailed_fusing_branch(data_loader, cifar10_root):
    """The shipped stage-2 config (sampler: weighted sampler, dual_sample) through build_data: over 40 epochs the
    labelled branch draws every class equally often, the fusing branch as often as the class has images. The
    class sizes come from the generated data (30 a class) and the LDAM-DRW rule at imb_factor 0.1."""
    cfg = tiny_config(cifar10_root, STAGE2, 'data_loader', data_loader)
    sizes = torch.tensor([int(30 * 0.1 ** (c / 9)) for c in range(10)], dtype=torch.float64)
    torch.manual_seed(0)
    random.seed(0)
    loader = build_data(cfg, torch.device('cpu')).train_loader()
    batch = next(iter(loader))
    assert len(batch) == 4 and batch[0].shape == batch[2].shape == (16, 3, 32, 32)
    epochs, draws = 40, 40 * int(sizes.sum())
    balanced, fusing = label_counts(loader, epochs, 0), label_counts(loader, epochs, 1)
    expected_balanced = torch.full((10,), draws / 10)
    expected_fusing = sizes / sizes.sum() * draws
    # binomial sd of a class count is under sqrt(expected): 4 sd either way
    assert ((balanced - expected_balanced).abs() < 4 * expected_balanced.sqrt()).all(), balanced
    assert ((fusing - expected_fusing).abs() < 4 * expected_fusing.sqrt()).all(), fusing
    if data_loader == 'device':  # a permutation each epoch: each image exactly once
        assert torch.equal(fusing, sizes * epochs)


def test_stage1_config_visits_each_image_once_an_epoch_and_rho_0_draws_no_fusing_branch(cifar10_root):
    sizes = torch.tensor([int(30 * 0.1 ** (c / 9)) for c in range(10)], dtype=torch.float64)
    loader = build_data(tiny_config(cifar10_root, STAGE1), torch.device('cpu')).train_loader()
    assert torch.equal(label_counts(loader, 3, 0), sizes * 3)
    plain = build_data(tiny_config(cifar10_root, STAGE2, 'H2T', 0), torch.device('cpu')).train_loader()
    assert all(len(batch) == 2 for batch in plain)


# the authors' training transform, written out: RandomCrop(32, padding=4) pads with zeros, then crops at
# (top, left); RandomHorizontalFlip; ToTensor; Normalize with the CIFAR mean and std, channel by channel (R, G, B)
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


def every_augmentation(images):
    """[N * 81 * 2, 3, 32, 32]: each image at each of the 9 x 9 crop offsets, unflipped and flipped, and the
    (image, top, left, flip) of each."""
    import torchvision.transforms.functional as TF
    from PIL import Image
    out, keys = [], []
    for i, array in enumerate(images):
        padded = TF.pad(Image.fromarray(array), 4)
        for top in range(9):
            for left in range(9):
                crop = TF.crop(padded, top, left, 32, 32)
                for flip in (False, True):
                    out.append(TF.normalize(TF.to_tensor(TF.hflip(crop) if flip else crop), MEAN, STD))
                    keys.append((i, top, left, flip))
    return torch.stack(out), keys


@pytest.mark.parametrize('data_loader', ['device', 'torch'])
def test_training_batches_are_the_authors_pil_pipeline(data_loader, tmp_path):
    """Every sample of a training batch is one of its image's 162 crops and flips through the authors' PIL
    transform, in all three channels; the device loader's offsets and flips vary from sample to sample."""
    root = write_cifar(str(tmp_path), 'cifar10', train_per_class=1, test_per_class=1)
    cfg = tiny_config(root, STAGE1, 'imb_factor', 1, 'batch_size', 10, 'data_loader', data_loader)
    data = build_data(cfg, torch.device('cpu'))
    reference, keys = every_augmentation(data.train_set.data)
    torch.manual_seed(0)
    seen = set()
    for _ in range(3):
        for x, y in data.train_loader():
            for sample, label in zip(x, y):
                distance = (reference - sample).abs().flatten(1).amax(1)
                match = int(distance.argmin())
                assert distance[match] < 1e-5, f'no crop and flip of any image gives this sample ({distance.min():.3g})'
                image = keys[match][0]
                assert data.train_set.targets[image] == label
                seen.add(keys[match])
    assert len({key[1:] for key in seen}) > 10  # offsets and flips drawn per sample


@pytest.mark.parametrize('data_loader', ['device', 'torch'])
def test_evaluation_batches_are_the_authors_transform(data_loader, tmp_path):
    """The test images in order, normalised and nothing else: no crop, no flip, with either loader."""
    root = write_cifar(str(tmp_path), 'cifar10', train_per_class=1, test_per_class=3)
    import torchvision.transforms.functional as TF
    from PIL import Image
    cfg = tiny_config(root, STAGE1, 'eval_batch_size', 30, 'data_loader', data_loader)
    data = build_data(cfg, torch.device('cpu'))
    next(iter(data.train_loader()))  # a training loader built first must not change the evaluation's transform
    expected = torch.stack([TF.normalize(TF.to_tensor(Image.fromarray(a)), MEAN, STD) for a in data.test_set.data])
    for _ in range(2):
        x, y = next(iter(data.eval_loader()))
        torch.testing.assert_close(x, expected, rtol=0, atol=1e-5)
        assert y.tolist() == data.test_set.targets


def test_the_torch_data_loader_trains_end_to_end(cifar10_root, tmp_path):
    code, _, err = run_main('train_stage1.py', *args(STAGE1, cifar10_root, tmp_path, 'num_epochs', '1',
                                                     'data_loader', 'torch'))
    assert code == 0, err[-2000:]
    assert json.load(open(f'{only_run(tmp_path)}/summary.json'))['epochs'] == 1
