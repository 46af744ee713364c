import os
import pickle

import numpy as np
import pytest

from conftest import write_cifar
from datasets import IMBALANCECIFAR10, IMBALANCECIFAR100, img_num_per_cls
from common.errors import UserError

# SPEC 1: totals of the long-tailed training subsets
TOTALS = {('cifar100', 200): 9502, ('cifar100', 100): 10847, ('cifar100', 50): 12608, ('cifar100', 10): 19573,
          ('cifar10', 200): 11203, ('cifar10', 100): 12406, ('cifar10', 50): 13996, ('cifar10', 10): 20431}


@pytest.mark.parametrize('dataset,imb', sorted(TOTALS))
def test_exp_counts_match_published_totals(dataset, imb):
    num_classes = 10 if dataset == 'cifar10' else 100
    counts = img_num_per_cls(50000 / num_classes, num_classes, 'exp', 1 / imb)
    assert sum(counts) == TOTALS[dataset, imb]
    assert counts[0] == 50000 // num_classes and counts == sorted(counts, reverse=True)


def test_step_counts():
    assert img_num_per_cls(500, 100, 'step', 0.01) == [500] * 50 + [5] * 50


def reference_subset(targets, counts, seed=0):
    """SPEC 1 selection, written as the rule states it (global np.random)."""
    np.random.seed(seed)
    keep = []
    for c, n in enumerate(counts):
        idx = np.where(targets == c)[0]
        np.random.shuffle(idx)
        keep.extend(idx[:n])
    return keep


def raw_train(root, dataset_class):
    """The training images and labels in file order, read with plain pickle."""
    data, labels = [], []
    for name in dataset_class.train_files:
        with open(os.path.join(root, dataset_class.base_folder, name), 'rb') as f:
            entry = pickle.load(f, encoding='latin1')
        data.append(entry['data'].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels += entry[dataset_class.label_key]
    return np.concatenate(data), np.asarray(labels)


def original_index(data):
    return data[:, 0, 0, 0].astype(int) + 256 * data[:, 0, 0, 1].astype(int)  # written by write_cifar


@pytest.mark.parametrize('dataset_class,fixture', [(IMBALANCECIFAR10, 'cifar10_root'), (IMBALANCECIFAR100, 'cifar100_root')])
def test_long_tailed_subset_follows_the_rule(dataset_class, fixture, request):
    root = request.getfixturevalue(fixture)
    raw_data, raw_targets = raw_train(root, dataset_class)
    lt = dataset_class(root, imb_type='exp', imb_factor=0.1)
    num_classes = dataset_class.cls_num
    img_max = len(raw_targets) // num_classes
    expected_counts = img_num_per_cls(img_max, num_classes, 'exp', 0.1)
    assert lt.get_cls_num_list() == expected_counts
    assert lt.data.dtype == np.uint8 and lt.data.shape == (sum(expected_counts), 32, 32, 3)
    # the very images the rule picks, stacked class by class
    chosen = reference_subset(raw_targets, expected_counts)
    assert original_index(lt.data).tolist() == original_index(raw_data[chosen]).tolist()
    assert np.array_equal(lt.data, raw_data[chosen])
    assert lt.targets == sorted(lt.targets)
    # the global numpy generator is left alone (mixup draws from it)
    np.random.seed(123)
    a = np.random.rand()
    np.random.seed(123)
    dataset_class(root, imb_factor=0.1)
    assert np.random.rand() == a


def test_pixels_are_read_in_the_official_layout(cifar10_root):
    with open(os.path.join(cifar10_root, 'cifar-10-batches-py', 'test_batch'), 'rb') as f:
        raw = pickle.load(f, encoding='latin1')
    full = IMBALANCECIFAR10(cifar10_root, train=False)
    # row 0 of batch 1 holds R, G, B planes of 1024 bytes each
    assert np.array_equal(full.data[0], raw['data'][0].reshape(3, 32, 32).transpose(1, 2, 0))
    assert full.targets[0] == raw['labels'][0]


def test_test_set_is_full_and_balanced(cifar10_root, cifar100_root):
    test10 = IMBALANCECIFAR10(cifar10_root, imb_factor=0.01, train=False)
    assert test10.get_cls_num_list() == [10] * 10
    test100 = IMBALANCECIFAR100(cifar100_root, imb_factor=0.01, train=False)
    assert test100.get_cls_num_list() == [2] * 100


def test_getitem_gives_pil_through_transform(cifar10_root):
    ds = IMBALANCECIFAR10(cifar10_root, imb_factor=0.1, transform=lambda img: img.size)
    assert ds[0] == ((32, 32), 0)


def test_missing_folder_names_the_files_and_the_fix(tmp_path):
    with pytest.raises(UserError) as e:
        IMBALANCECIFAR10(str(tmp_path / 'nowhere'))
    msg = str(e.value)
    assert msg.startswith('CIFAR-10 not found') and 'cifar-10-batches-py' in msg and 'data_batch_1' in msg
    assert '`download True`' in msg and 'https://www.cs.toronto.edu/~kriz/cifar.html' in msg


def test_missing_cifar100_folder_names_cifar100(tmp_path):
    with pytest.raises(UserError) as e:
        IMBALANCECIFAR100(str(tmp_path / 'nowhere'))
    msg = str(e.value)
    assert msg.startswith('CIFAR-100 not found') and 'cifar-100-python/' in msg and 'CIFAR-10 ' not in msg
    assert '`download True`' in msg and 'lacks train, test, meta' in msg


def test_incomplete_folder_lists_what_is_missing(tmp_path):
    root = write_cifar(str(tmp_path), 'cifar100', train_per_class=2, test_per_class=1)
    os.remove(os.path.join(root, 'cifar-100-python', 'test'))
    with pytest.raises(UserError, match='lacks test'):
        IMBALANCECIFAR100(root)


def test_truncated_batch_file_is_reported(tmp_path):
    root = write_cifar(str(tmp_path), 'cifar10', train_per_class=5, test_per_class=1)
    path = os.path.join(root, 'cifar-10-batches-py', 'data_batch_3')
    with open(path, 'rb') as f:
        head = f.read(500)
    with open(path, 'wb') as f:
        f.write(head)
    with pytest.raises(UserError, match='data_batch_3.*corrupt or truncated'):
        IMBALANCECIFAR10(root)


REAL_CIFAR100 = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'data', 'cifar100')


@pytest.mark.skipif(not os.path.isfile(os.path.join(REAL_CIFAR100, 'cifar-100-python', 'train')),
                    reason='the official CIFAR-100 is not in data/cifar100 (`download True` fetches it)')
@pytest.mark.parametrize('imb', [200, 100, 50])
def test_real_cifar100_lt_subsets_have_the_published_totals(imb):
    train = IMBALANCECIFAR100(REAL_CIFAR100, imb_factor=1 / imb)
    assert len(train) == TOTALS['cifar100', imb] and len(train.data) == len(train.targets)
    assert train.get_cls_num_list() == img_num_per_cls(500, 100, 'exp', 1 / imb)
    test = IMBALANCECIFAR100(REAL_CIFAR100, train=False)
    assert len(test) == 10000 and set(test.get_cls_num_list()) == {100}
