"""Continuing runs: an interrupted run resumed ends bit-identical, and what auto_resume refuses; a run stopped
by a NaN loss keeps its last good checkpoint."""
import glob
import json
import os
import shutil

import pytest
import torch

import train_stage1
import train_stage2
import utils.engine as engine
from conftest import STAGE1, STAGE2, args, assert_one_line_error, only_run, run_main
from common.errors import UserError


def interrupt_at_epoch(monkeypatch, stop_epoch):
    real = engine.train_one_epoch

    def train_one_epoch(*a, **kw):
        if a[3] == stop_epoch:  # train_one_epoch(exp, loader, optimizer, epoch): epoch counted from 0
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


def stage1_straight_and_resumed(cfg, root, tmp_path, monkeypatch, epochs, stop_epoch):
    """A stage-1 run of `epochs` epochs, and one interrupted at `stop_epoch` (counted from 0), then continued
    with auto_resume: returns their run folders (straight, resumed)."""
    straight, broken = tmp_path / 'straight', tmp_path / 'broken'
    train_stage1.main(args(cfg, root, straight, 'num_epochs', str(epochs)))
    interrupt_at_epoch(monkeypatch, stop_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_stage1.main(args(cfg, root, broken, 'num_epochs', str(epochs)))
    monkeypatch.undo()
    run = only_run(broken)
    assert torch.load(f'{run}/ckps/current.pth.tar', weights_only=True)['epoch'] == stop_epoch
    train_stage1.main(args(cfg, root, broken, 'num_epochs', str(epochs), 'resume', f'{run}/ckps/current.pth.tar',
                           'auto_resume', 'True'))
    assert only_run(broken) == run  # continued in the same folder
    return only_run(straight), run


def test_stage1_resumed_after_an_interruption_ends_bit_identical(cifar10_root, tmp_path, monkeypatch):
    straight, run = stage1_straight_and_resumed(STAGE1, cifar10_root, tmp_path, monkeypatch, 3, 2)
    assert_same_weights(f'{straight}/ckps/current.pth.tar', f'{run}/ckps/current.pth.tar')
    summary = json.load(open(f'{run}/summary.json'))
    assert [h['epoch'] for h in summary['history']] == [1, 2, 3]
    straight_summary = json.load(open(f'{straight}/summary.json'))
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
    real, calls = engine.STAGE1.loss, []

    def poisoned(*a, **kw):
        loss, out, y = real(*a, **kw)
        calls.append(1)
        return (loss * float('nan') if len(calls) == 14 else loss), out, y  # epoch 2, step 6 (8 steps an epoch)
    monkeypatch.setattr(engine.STAGE1, 'loss', poisoned)
    with pytest.raises(UserError, match='loss became nan/inf at epoch 2, step 6'):
        train_stage1.main(args(STAGE1, cifar10_root, tmp_path, 'num_epochs', '3'))
    run = only_run(tmp_path)
    assert torch.load(f'{run}/ckps/current.pth.tar', weights_only=True)['epoch'] == 1


# -- auto_resume under a config that would compute something else ----------------------------------------
@pytest.fixture(scope='module')
def stage2_current(cifar10_root, stage1_checkpoint, tmp_path_factory):
    """ckps/current.pth.tar of a one-epoch stage 2 (read only)."""
    save = tmp_path_factory.mktemp('s2')
    train_stage2.main(args(STAGE2, cifar10_root, save, 'num_epochs', '1', 'resume', stage1_checkpoint))
    return f'{only_run(save)}/ckps/current.pth.tar'


@pytest.mark.parametrize('stage,change,named', [
    ('stage1', ['lr', '0.05'], 'lr 0.1, not 0.05'),
    ('stage1', ['batch_size', '8'], 'batch_size 16, not 8'),
    ('stage1', ['weight_decay', '5e-4'], 'weight_decay 0.0002, not 0.0005'),
    ('stage1', ['imb_factor', '0.2'], 'imb_factor 0.1, not 0.2'),
    ('stage1', ['loss.type', 'LDAMLoss'], 'loss.type CrossEntropyLoss, not LDAMLoss'),
    ('stage1', ['mixup', 'False'], 'mixup True, not False'),
    ('stage1', ['lr_scheduler.milestones', '[100, 150]'], 'lr_scheduler.milestones [160, 180], not [100, 150]'),
    ('stage1', ['seed', '1'], 'seed 0, not 1'),
    ('stage1', ['dataset', 'cifar100', 'num_classes', '100'], 'dataset cifar10, not cifar100'),
    ('stage2', ['H2T', '0.5'], 'H2T 0.25, not 0.5'),
    ('stage2', ['shift_bn', 'False'], 'shift_bn True, not False'),
    ('stage2', ['lr_scheduler.lr_factor', '0.1'], 'lr_scheduler.lr_factor 0.2, not 0.1')])
def test_auto_resume_under_a_changed_config_names_the_key(stage, change, named, cifar10_root, stage1_checkpoint,
                                                         tmp_path, request):
    """Continuing a run with a value that changes what it computes would record two runs as one exact run: one
    line naming the key and both values, exit 2, the run's folder untouched."""
    current = (os.path.join(os.path.dirname(stage1_checkpoint), 'current.pth.tar') if stage == 'stage1'
               else request.getfixturevalue('stage2_current'))
    run = os.path.dirname(os.path.dirname(current))
    before = sorted(os.listdir(run)), os.path.getmtime(current)
    script, cfg = ('train_stage1.py', STAGE1) if stage == 'stage1' else ('train_stage2.py', STAGE2)
    code, _, err = run_main(script, *args(cfg, cifar10_root, tmp_path, 'num_epochs', '2', 'resume', current,
                                          'auto_resume', 'True', *change))
    line = assert_one_line_error(code, err, f'was trained with {named}; auto_resume continues a run with its own')
    assert current in line
    assert (sorted(os.listdir(run)), os.path.getmtime(current)) == before


def test_auto_resume_with_more_epochs_continues(cifar10_root, stage1_checkpoint, tmp_path):
    run = tmp_path / 'run_202601010000'
    shutil.copytree(os.path.dirname(os.path.dirname(stage1_checkpoint)), run)
    train_stage1.main(args(STAGE1, cifar10_root, tmp_path, 'num_epochs', '2', 'resume',
                           str(run / 'ckps' / 'current.pth.tar'), 'auto_resume', 'True'))
    summary = json.load(open(run / 'summary.json'))
    assert [h['epoch'] for h in summary['history']] == [1, 2]


def test_auto_resume_of_a_checkpoint_older_than_a_config_key_keeps_the_keys_default():
    """A run written before a key existed (its stored config lacks it) continues under that key's default; a key it
    does store is still compared."""
    import yaml
    from utils.config import load_config
    from common.errors import UserError
    from utils.setup import check_resume_config
    cfg = load_config(STAGE1)
    stored = yaml.safe_load(cfg.dump())
    del stored['loss']['LDAM'], stored['shift_bn']
    check_resume_config(cfg, {'config': yaml.safe_dump(stored)})
    stored['lr'] = 0.05
    with pytest.raises(UserError, match='was trained with lr 0.05, not 0.1'):
        check_resume_config(cfg, {'config': yaml.safe_dump(stored)})
