"""Several processes: training under torchrun (each rank its share of every batch, one checkpoint, identical
weights), and the process group left however a script ends. torchrun's --standalone rendezvous takes a free port."""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, STAGE1, STAGE2, args, only_run
from common.errors import UserError


@pytest.mark.parametrize('ending', ['returns', 'user error'])
def test_scripts_leave_the_process_group_on_exit(ending, tmp_path):
    """A gloo group still alive when the interpreter exits can abort a rank with SIGABRT ('terminate called
    without an active exception'); run_cli destroys it however main() ends."""
    import torch.distributed as dist
    from utils.setup import run_cli
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


@pytest.mark.slow
def test_two_processes_with_torchrun(cifar10_root, tmp_path):
    """2 CPU ranks (gloo): one checkpoint from rank 0, identical weights on both ranks."""
    save = tmp_path / 'ddp'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--standalone',
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
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--standalone',
           os.path.join(ROOT, 'train_stage2.py'), *args(STAGE2, cifar10_root, tmp_path / 'ddp2', 'num_epochs', '1',
                                                        'resume', f'{run}/ckps/model_best.pth.tar')]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'weights identical on all 2 ranks' in result.stdout
