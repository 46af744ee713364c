"""Continuing runs: an interrupted run resumed ends bit-identical, and what auto_resume refuses; a run stopped
by a NaN loss keeps its last good checkpoint."""
import glob
import json
import os

import pytest
import torch

import train_stage1
import train_stage2
import utils.engine as engine
from conftest import STAGE1, STAGE2, args, only_run
from utils.errors import UserError


def interrupt_at_epoch(monkeypatch, stop_epoch):
    real = engine.train_one_epoch

    def train_one_epoch(*a, **kw):
        if a[7] == stop_epoch:  # the `epoch` argument, counted from 0
            raise KeyboardInterrupt
        return real(*a, **kw)
    monkeypatch.setattr(engine, 'train_one_epoch', train_one_epoch)


def assert_same_weights(path_a, path_b):
    a, b = torch.load(path_a, weights_only=True), torch.load(path_b, weights_only=True)
    for part in ('state_dict_model', 'state_dict_classifier'):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f'{part}.{k} differs'
    for k, v in a['optimizer']['state'].items():
        assert torch.equal(v['momentum_buffer'], b['optimizer']['state'][k]['momentum_buffer'])


def test_stage1_resumed_after_an_interruption_ends_bit_identical(cifar10_root, tmp_path, monkeypatch):
    straight, broken = tmp_path / 'straight', tmp_path / 'broken'
    train_stage1.main(args(STAGE1, cifar10_root, straight, 'num_epochs', '3'))
    interrupt_at_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train_stage1.main(args(STAGE1, cifar10_root, broken, 'num_epochs', '3'))
    monkeypatch.undo()
    run = only_run(broken)
    assert torch.load(f'{run}/ckps/current.pth.tar', weights_only=True)['epoch'] == 2
    train_stage1.main(args(STAGE1, cifar10_root, broken, 'num_epochs', '3', 'resume', f'{run}/ckps/current.pth.tar',
                           'auto_resume', 'True'))
    assert only_run(broken) == run  # continued in the same folder
    assert_same_weights(f'{only_run(straight)}/ckps/current.pth.tar', f'{run}/ckps/current.pth.tar')
    summary = json.load(open(f'{run}/summary.json'))
    assert [h['epoch'] for h in summary['history']] == [1, 2, 3]
    straight_summary = json.load(open(f'{only_run(straight)}/summary.json'))
    assert summary['best'] == straight_summary['best'] and summary['best_epoch'] == straight_summary['best_epoch']
    log = open(glob.glob(f'{run}/logs/*.txt')[0]).read()
    assert 'Epoch [1/3]' in log and 'continuing' in log and 'Epoch [3/3]' in log


def test_stage2_resumes_exactly_too(cifar10_root, tmp_path, monkeypatch):
    s1 = tmp_path / 's1'
    train_stage1.main(args(STAGE1, cifar10_root, s1, 'num_epochs', '1'))
    ckpt = f'{only_run(s1)}/ckps/model_best.pth.tar'
    straight, broken = tmp_path / 'straight', tmp_path / 'broken'
    train_stage2.main(args(STAGE2, cifar10_root, straight, 'num_epochs', '2', 'resume', ckpt))
    interrupt_at_epoch(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        train_stage2.main(args(STAGE2, cifar10_root, broken, 'num_epochs', '2', 'resume', ckpt))
    monkeypatch.undo()
    run = only_run(broken)
    train_stage2.main(args(STAGE2, cifar10_root, broken, 'num_epochs', '2', 'resume', f'{run}/ckps/current.pth.tar',
                           'auto_resume', 'True'))
    assert_same_weights(f'{only_run(straight)}/ckps/current.pth.tar', f'{run}/ckps/current.pth.tar')


def test_auto_resume_refuses_a_checkpoint_without_training_state(cifar10_root, tmp_path):
    path = tmp_path / 'weights_only.pth.tar'
    torch.save({'epoch': 200, 'state_dict_model': {}, 'state_dict_classifier': {}}, path)
    with pytest.raises(UserError, match='holds no stage1 training state'):
        train_stage1.main(args(STAGE1, cifar10_root, tmp_path / 's', 'resume', str(path), 'auto_resume', 'True'))
    assert not os.path.exists(tmp_path / 's')


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(cifar10_root, tmp_path, monkeypatch):
    real, calls = engine.stage1_loss, []

    def poisoned(*a, **kw):
        loss, out, y = real(*a, **kw)
        calls.append(1)
        return (loss * float('nan') if len(calls) == 14 else loss), out, y  # epoch 2, step 6 (8 steps an epoch)
    monkeypatch.setattr(engine, 'stage1_loss', poisoned)
    with pytest.raises(UserError, match='loss became nan/inf at epoch 2, step 6'):
        train_stage1.main(args(STAGE1, cifar10_root, tmp_path, 'num_epochs', '3'))
    run = only_run(tmp_path)
    assert torch.load(f'{run}/ckps/current.pth.tar', weights_only=True)['epoch'] == 1
