"""What a run does over several epochs: model_best is the epoch of the highest test top-1 (the earliest of a
tie, as the authors' `acc1 > best_acc1`), summary.json's best and last agree with the history, and DRW switches
its class weights on at epoch reweight_epoch + 1."""
import json

import numpy as np
import pytest
import torch

import loss
import train_stage1
from conftest import STAGE1, args, only_run, run_main, script_test_top1

METRICS = ('top1', 'top5', 'many', 'medium', 'few', 'ece', 'test_loss')


def load(path):
    return torch.load(path, weights_only=True)


def test_model_best_is_the_epoch_of_the_highest_top1_and_eval_gives_its_figure(cifar10_root, tmp_path):
    train_stage1.main(args(STAGE1, cifar10_root, tmp_path, 'num_epochs', '4'))
    run = only_run(tmp_path)
    summary = json.load(open(f'{run}/summary.json'))
    history = summary['history']
    top1 = [h['top1'] for h in history]
    best = top1.index(max(top1)) + 1  # the first epoch with the highest top-1
    assert [h['epoch'] for h in history] == [1, 2, 3, 4] and summary['best_epoch'] == best
    assert all(summary['best'][k] == history[best - 1][k] for k in METRICS)
    assert all(summary['last'][k] == history[-1][k] for k in METRICS)
    ckpt = load(f'{run}/ckps/model_best.pth.tar')
    assert ckpt['epoch'] == best and ckpt['best_acc1'] == max(top1)
    assert load(f'{run}/ckps/current.pth.tar')['epoch'] == 4
    # the weights saved as model_best are that epoch's: evaluated again, they give its figure
    code, _, err = run_main('eval.py', *args(STAGE1, cifar10_root, tmp_path, 'resume',
                                             f'{run}/ckps/model_best.pth.tar'), '--out',
                            f'{run}/ckps/model_best.eval.json')
    assert code == 0, err
    assert json.load(open(f'{run}/ckps/model_best.eval.json'))['top1'] == pytest.approx(max(top1), abs=1e-9)


def test_model_best_takes_the_earliest_of_tied_epochs(cifar10_root, tmp_path, monkeypatch):
    top1, best = [20, 50, 30, 50], 2  # not the first epoch, nor the last, nor the last of the tie
    script_test_top1(monkeypatch, top1)
    train_stage1.main(args(STAGE1, cifar10_root, tmp_path, 'num_epochs', '4'))
    run = only_run(tmp_path)
    summary = json.load(open(f'{run}/summary.json'))
    assert [h['top1'] for h in summary['history']] == top1
    assert summary['best_epoch'] == best and summary['best']['top1'] == max(top1)
    assert summary['last']['top1'] == top1[-1]
    ckpt = load(f'{run}/ckps/model_best.pth.tar')
    assert (ckpt['epoch'], ckpt['best_acc1'], ckpt['best_epoch']) == (best, max(top1), best)


def test_drw_switches_class_balanced_weights_on_after_reweight_epoch(cifar10_root, tmp_path, monkeypatch):
    """LDAM-DRW with reweight_epoch 1 over 3 epochs: the loss of epochs 1 and 2 (from 1) is unweighted, that of
    epoch 3 weighted by (1 - b) / (1 - b ** n_c), b = 0.9999, scaled to sum to the class count."""
    seen, epoch = [], [None]
    real_before, real_forward = loss.LDAMLoss.before_epoch, loss.LDAMLoss.forward

    def before_epoch(self, e):
        epoch[0] = e
        return real_before(self, e)

    def forward(self, logits, target):
        seen.append((epoch[0], None if self.weight is None else self.weight.clone()))
        return real_forward(self, logits, target)
    monkeypatch.setattr(loss.LDAMLoss, 'before_epoch', before_epoch)
    monkeypatch.setattr(loss.LDAMLoss, 'forward', forward)
    train_stage1.main(args(STAGE1, cifar10_root, tmp_path, 'num_epochs', '3', 'loss.type', 'LDAMLoss', 'use_norm',
                           'True', 'mixup', 'False', 'loss.LDAM.reweight_epoch', '1'))
    counts = np.array([int(30 * 0.1 ** (c / 9)) for c in range(10)], dtype=np.float64)  # the generated data
    weights = (1 - 0.9999) / (1 - 0.9999 ** counts)
    weights = weights / weights.sum() * 10
    assert sorted({e for e, _ in seen}) == [0, 1, 2]
    for e, w in seen:
        if e < 2:
            assert w is None, f'epoch {e + 1} is weighted'
        else:
            assert w is not None and np.allclose(w.numpy(), weights, rtol=1e-5), f'epoch {e + 1}: {w}'
