"""Long runs: exact resume, safe checkpoints, stopping on NaN, multi-process training, logging."""
import glob
import json
import os
import pickle
import re
import subprocess
import sys

import pytest
import torch

import train_stage1
import train_stage2
import utils.engine as engine
from conftest import ROOT, STAGE1, STAGE2, args, only_run, run_script
from utils.checkpoint import load_checkpoint, save_checkpoint
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


def test_a_killed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = str(tmp_path / 'current.pth.tar')
    save_checkpoint({'epoch': 1, 'state_dict_model': {'w': torch.ones(3)}, 'state_dict_classifier': {}}, path)

    def dies_halfway(obj, f, *a, **kw):
        with open(f, 'wb') as fh:
            fh.write(b'PK\x03\x04 half a zip')
        raise KeyboardInterrupt  # the process is killed in the middle of writing
    monkeypatch.setattr(torch, 'save', dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({'epoch': 2, 'state_dict_model': {}, 'state_dict_classifier': {}}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)['epoch'] == 1


class Payload:
    def __reduce__(self):
        return (os.system, (f'touch {MARKER}',))


MARKER = ''


def test_a_checkpoint_carrying_code_is_refused_without_running_it(tmp_path):
    global MARKER
    MARKER = str(tmp_path / 'pwned')
    path = tmp_path / 'evil.pth.tar'
    torch.save({'epoch': 1, 'state_dict_model': {}, 'state_dict_classifier': {}, 'extra': Payload()}, path)
    with pytest.raises(UserError, match='holds objects other than tensors'):
        load_checkpoint(str(path))
    assert not os.path.exists(MARKER)
    # the same through the command line: exit 2, one line, nothing run
    result = run_script('eval.py', '--cfg', STAGE1, 'resume', str(path))
    assert result.returncode == 2 and result.stderr.count('\n') == 1 and not os.path.exists(MARKER)


def test_the_authors_checkpoint_format_loads(tmp_path):
    import numpy as np
    from models import Classifier, resnet32_fe
    backbone, classifier = resnet32_fe(), Classifier(64, 100)
    path = tmp_path / 'authors.pth.tar'
    torch.save({'epoch': 200, 'best_acc1': torch.tensor(39.5), 'its_ece': np.float64(0.12),
                'state_dict_model': {f'module.{k}': v for k, v in backbone.state_dict().items()},
                'state_dict_classifier': {f'module.{k}': v for k, v in classifier.state_dict().items()}}, path)
    ckpt = load_checkpoint(str(path))
    assert ckpt['its_ece'] == pytest.approx(0.12) and 'conv1.weight' in ckpt['state_dict_model']


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


def test_nan_loss_on_the_command_line_exits_2(cifar10_root, tmp_path):
    result = run_script('train_stage1.py', *args(STAGE1, cifar10_root, tmp_path, 'num_epochs', '1', 'lr', '1e30'))
    assert result.returncode == 2 and result.stderr.startswith('error: loss became nan/inf at epoch 1, step')


@pytest.mark.parametrize('key', ['batch_size', 'num_epochs'])
def test_batch_size_and_epochs_below_one(key, tmp_path):
    result = run_script('train_stage1.py', '--cfg', STAGE1, 'save_dir', str(tmp_path / 's'), key, '0')
    assert result.returncode == 2 and result.stderr == f'error: {key} 0 must be at least 1\n'
    assert not os.path.exists(tmp_path / 's')


def test_compile_without_a_cpp_compiler_stops_before_writing(cifar10_root, tmp_path):
    """In a process of its own: torch's inductor config is process-global, and patching it here left it
    broken for the compile test that followed (with a cold compile cache)."""
    env = {k: v for k, v in os.environ.items() if k != 'TORCH_INDUCTOR_INSTALL_GXX'}
    env['CXX'] = 'no-such-c++'  # inductor's compiler list is (conda's g++ if installing it, $CXX)
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'train_stage1.py'),
                             *args(STAGE1, cifar10_root, tmp_path / 's', 'compile', 'True')],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.count('\n') == 1, result.stderr[-2000:]
    assert re.match(r'error: compile True on CPU needs a C\+\+ compiler .*no-such-c\+\+.*add `compile False`',
                    result.stderr)
    assert not os.path.exists(tmp_path / 's')


def test_tensorboard_scalars_per_epoch(cifar10_root, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    train_stage1.main(args(STAGE1, cifar10_root, tmp_path, 'num_epochs', '2'))
    acc = EventAccumulator(f'{only_run(tmp_path)}/logs')
    acc.Reload()
    tags = set(acc.Tags()['scalars'])
    for tag in ('train/loss', 'train/lr', 'test/top1', 'test/many', 'test/medium', 'test/few', 'test/ece'):
        assert tag in tags and [e.step for e in acc.Scalars(tag)] == [1, 2]


def test_progress_bar_on_a_terminal_and_plain_lines_otherwise(cifar10_root, tmp_path):
    import fcntl
    import pty
    import select
    import struct
    import termios
    cmd = [sys.executable, os.path.join(ROOT, 'train_stage1.py'), *args(STAGE1, cifar10_root, tmp_path / 'tty', 'num_epochs', '1')]
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack('HHHH', 24, 100, 0, 0))  # a terminal 100 columns wide
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=slave, cwd=ROOT)
    os.close(slave)
    out = b''
    while True:
        ready, _, _ = select.select([master], [], [], 120)
        if not ready:
            break
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    proc.wait(timeout=120)
    assert proc.returncode == 0
    assert b'epoch 1/1' in out and (b'it/s' in out or b's/it' in out)  # tqdm's bar
    plain = run_script('train_stage1.py', *args(STAGE1, cifar10_root, tmp_path / 'pipe', 'num_epochs', '1'))
    assert 'epoch 1 step 5/8' in plain.stdout and 'it/s' not in plain.stderr


@pytest.mark.parametrize('ending', ['returns', 'user error'])
def test_scripts_leave_the_process_group_on_exit(ending, tmp_path):
    """A gloo group still alive when the interpreter exits can abort a rank with SIGABRT ('terminate called
    without an active exception'); run_cli destroys it however main() ends."""
    import torch.distributed as dist
    from utils.errors import run_cli
    dist.init_process_group('gloo', init_method=f'file://{tmp_path}/store', rank=0, world_size=1)

    def main():
        assert dist.is_initialized()
        if ending == 'user error':
            raise UserError('bad input; fix it')

    try:
        if ending == 'user error':
            with pytest.raises(SystemExit):
                run_cli(main)
        else:
            run_cli(main)
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_two_processes_with_torchrun(cifar10_root, tmp_path):
    """2 CPU ranks (gloo): one checkpoint from rank 0, identical weights on both ranks."""
    save = tmp_path / 'ddp'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_port=29517',
           os.path.join(ROOT, 'train_stage1.py'), *args(STAGE1, cifar10_root, save, 'num_epochs', '1')]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    run = only_run(save)
    assert 'weights identical on all 2 ranks' in open(glob.glob(f'{run}/logs/*.txt')[0]).read()
    assert result.stdout.count('Epoch [1/1]') == 1  # rank 1 logs nothing
    summary = json.load(open(f'{run}/summary.json'))
    assert summary['world_size'] == 2
    ckpt = torch.load(f'{run}/ckps/current.pth.tar', weights_only=True)
    assert not any(k.startswith('module.') for k in ckpt['state_dict_model'])
    # the 2 ranks together evaluate the whole test set once
    assert sum(summary['last']['reliability']['count']) == 100
    # stage 2 as well: DDP on the classifier, the frozen backbone's BN statistics averaged over the ranks
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_port=29518',
           os.path.join(ROOT, 'train_stage2.py'), *args(STAGE2, cifar10_root, tmp_path / 'ddp2', 'num_epochs', '1',
                                                        'resume', f'{run}/ckps/model_best.pth.tar')]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'weights identical on all 2 ranks' in result.stdout
