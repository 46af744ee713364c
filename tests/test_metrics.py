import pytest
import torch

from utils.config import get_default_config
from common.metrics import classification_metrics, expected_calibration_error


def test_ece_hand_computed():
    # bins of width 1/15, right-inclusive: 0.2 = 3/15 falls in bin 2 ((2/15, 3/15]), with 0.19
    conf = torch.tensor([0.19, 0.2, 0.9, 0.95, 1.0, 0.5])
    correct = torch.tensor([False, True, True, False, True, True])
    # bin 2: conf 0.19, 0.2 -> acc 0.5, conf 0.195 -> |0.5 - 0.195| * 2 = 0.61
    # bin 13 ((13/15, 14/15] = (0.867, 0.933]): 0.9 correct -> |1 - 0.9| = 0.1
    # bin 14 ((0.933, 1]): 0.95 wrong, 1.0 right -> |1 - 1.95| = 0.95
    # bin 7 ((0.467, 0.533]): 0.5 right -> 0.5
    expected = (0.61 + 0.1 + 0.95 + 0.5) / 6
    assert expected_calibration_error(conf, correct) == pytest.approx(expected)


def test_ece_takes_15_bins_in_evaluation():
    """0.62 and 0.68 share a bin of width 1/10 but not of width 1/15: with 15 bins each is its own bin."""
    conf = torch.tensor([0.62, 0.68])
    correct = torch.tensor([True, False])
    expected = (abs(1 - 0.62) + abs(0 - 0.68)) / 2  # 10 bins would give |0.5 - 0.65| = 0.15
    assert expected_calibration_error(conf, correct) == pytest.approx(expected)
    probs = torch.tensor([[0.62, 0.38], [0.68, 0.32]])  # the evaluation's path: softmax outputs, labels
    metrics = classification_metrics(probs, torch.tensor([0, 1]), get_default_config())
    assert metrics['ece'] == pytest.approx(expected)
    assert len(metrics['reliability']['count']) == 15


def test_ece_of_a_perfectly_calibrated_set_is_zero():
    conf = torch.full((10,), 0.7)
    correct = torch.tensor([True] * 7 + [False] * 3)
    assert expected_calibration_error(conf, correct) == pytest.approx(0.0, abs=1e-6)


def test_top1_top5_and_splits():
    cfg = get_default_config()
    cfg.head_class_idx, cfg.med_class_idx, cfg.tail_class_idx = [0, 3], [3, 7], [7, 10]
    targets = torch.arange(10).repeat(2)  # 2 test images a class
    probs = torch.full((20, 10), 0.01)
    pred = targets.clone()
    pred[10:] = (targets[10:] + 1) % 10  # second image of each class wrong
    pred[[10, 11, 12]] = targets[[10, 11, 12]]  # ... except for classes 0, 1, 2
    probs[torch.arange(20), pred] = 0.91
    probs[[13, 14, 15, 16], targets[[13, 14, 15, 16]]] = 0.02  # wrong, but second: in the top 5
    probs[[17, 18, 19], targets[[17, 18, 19]]] = 0.0  # wrong and last: not in the top 5
    m = classification_metrics(probs, targets, cfg)
    assert m['top1'] == pytest.approx(65.0)
    assert m['many'] == pytest.approx(100.0) and m['medium'] == pytest.approx(50.0) and m['few'] == pytest.approx(50.0)
    assert m['per_class_acc'] == [100.0] * 3 + [50.0] * 7
    assert m['top5'] == pytest.approx(85.0)
    assert m['confidence'] == pytest.approx(0.91)


def test_reported_ece_is_the_hand_computed_one():
    cfg = get_default_config()
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
    targets = torch.tensor([0, 1, 1, 0])  # right (0.9), wrong (0.6), right (0.7), wrong (0.8)
    # bins: 0.6 -> (8/15, 9/15], 0.7 -> (10/15, 11/15], 0.8 -> (11/15, 12/15], 0.9 -> (13/15, 14/15]
    expected = (0.1 + 0.6 + 0.3 + 0.8) / 4
    assert classification_metrics(probs, targets, cfg)['ece'] == pytest.approx(expected)
