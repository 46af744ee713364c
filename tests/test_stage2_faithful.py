"""Stage 2 computes what the authors' train_stage2.py computes: the rho-0 baseline, mixup of the
balanced branch, no silent fallback, and both losses kept in the run history."""
import glob
import json
import os
import re

import numpy as np
import pytest
import torch
from torch.nn.functional import cross_entropy

import train_stage2
from conftest import ROOT, STAGE2, args, only_run, stage_loss
from models import Classifier, resnet32_fe
from test_training import DualBatches, stage2_cfg



def stage2_state(cifar10_root, ckpt, save, *extra):
    train_stage2.main(args(STAGE2, cifar10_root, save, 'num_epochs', '2', 'resume', ckpt, *extra))
    return torch.load(f'{only_run(save)}/ckps/current.pth.tar', weights_only=True)


def test_rho_zero_is_the_authors_baseline_with_balanced_batches_only(cifar10_root, stage1_checkpoint, tmp_path):
    """At rho 0 the authors run only the balanced batch through the train-mode backbone: the BN running
    statistics (and everything else) equal those of a run with dual sampling switched off."""
    dual = stage2_state(cifar10_root, stage1_checkpoint, tmp_path / 'dual', 'H2T', '0')
    single = stage2_state(cifar10_root, stage1_checkpoint, tmp_path / 'single', 'H2T', '0',
                          'sampler.dual_sample.enable', 'False')
    start = torch.load(stage1_checkpoint, weights_only=True)['state_dict_model']
    assert not torch.equal(dual['state_dict_model']['layer3.4.bn2.running_mean'], start['layer3.4.bn2.running_mean'])
    for part in ('state_dict_model', 'state_dict_classifier'):
        for key, value in single[part].items():
            assert torch.equal(dual[part][key], value), f'{part}.{key} differs'
    # two balanced-only epochs of 8 steps each: one BN update per step, none from an instance branch
    steps = start['bn1.num_batches_tracked'].item()
    assert dual['state_dict_model']['bn1.num_batches_tracked'].item() == steps + 16


def test_h2t_runs_the_instance_branch_through_the_backbone(cifar10_root, stage1_checkpoint, tmp_path):
    start = torch.load(stage1_checkpoint, weights_only=True)['state_dict_model']['bn1.num_batches_tracked'].item()
    fused = stage2_state(cifar10_root, stage1_checkpoint, tmp_path, 'H2T', '0.25')
    assert fused['state_dict_model']['bn1.num_batches_tracked'].item() == start + 2 * 16


def test_stage2_mixup_mixes_the_balanced_images_before_the_backbone_and_fusion():
    """The authors' order: mixup_data on the balanced images (np.random.beta, then torch.randperm),
    both branches through the backbone, H2T's channel draw, then lam * CE(y_a) + (1 - lam) * CE(y_b)."""
    torch.manual_seed(0)
    backbone, classifier = resnet32_fe().eval(), Classifier(64, 10)
    x1, y1, x2, y2 = DualBatches(steps=1).batches[0]
    cfg = stage2_cfg(shift_bn=False, rho=0.25)
    cfg.mixup = True
    np.random.seed(3)
    torch.manual_seed(3)
    loss, _, y = stage_loss(backbone, classifier, (x1, y1, x2, y2), cfg, cross_entropy)
    np.random.seed(3)
    torch.manual_seed(3)
    lam = np.random.beta(1.0, 1.0)
    perm = torch.randperm(len(y1))
    with torch.no_grad():
        f1, f2 = backbone(lam * x1 + (1 - lam) * x1[perm]), backbone(x2)
    channels = torch.randperm(64)[:16]
    f1[:, channels] = f2[:, channels]
    out = classifier(f1)
    expected = lam * cross_entropy(out, y1) + (1 - lam) * cross_entropy(out, y1[perm])
    assert 0.01 < lam < 0.99
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.equal(y, y1)
    cfg.mixup = False
    np.random.seed(3)
    torch.manual_seed(3)
    plain, _, _ = stage_loss(backbone, classifier, (x1, y1, x2, y2), cfg, cross_entropy)
    assert abs(plain.item() - loss.item()) > 1e-3


def test_stage2_with_mixup_runs_end_to_end(cifar10_root, stage1_checkpoint, tmp_path):
    state = stage2_state(cifar10_root, stage1_checkpoint, tmp_path, 'mixup', 'True')
    assert state['epoch'] == 2 and 'mixup: true' in state['config']


def test_history_keeps_the_training_and_the_test_loss(cifar10_root, stage1_checkpoint, tmp_path):
    train_stage2.main(args(STAGE2, cifar10_root, tmp_path, 'num_epochs', '2', 'resume', stage1_checkpoint))
    run = only_run(tmp_path)
    summary = json.load(open(f'{run}/summary.json'))
    log = open(glob.glob(f'{run}/logs/*.txt')[0]).read()
    logged = [float(v) for v in re.findall(r'Epoch \[\d/2\] lr \S+ loss (\S+)', log)]
    history = summary['history']
    assert [round(h['train_loss'], 4) for h in history] == logged and len(logged) == 2
    assert 'loss' not in history[0]
    assert history[-1]['test_loss'] == summary['last']['test_loss']
    assert all(h['train_loss'] != h['test_loss'] for h in history)


@pytest.mark.slow
def test_reproduce_uses_the_interpreter_it_is_given(cifar10_root, stage1_checkpoint, tmp_path):
    """A `python` first on PATH that is not the one running the tests must not be used: with a real stage-1
    checkpoint, the interpreter given evaluates it (its eval.json appears beside it) and starts stage 2, whose
    config error (num_epochs 0) ends the script."""
    import shutil
    import subprocess
    import sys
    fake = tmp_path / 'bin'
    fake.mkdir()
    (fake / 'python').write_text('#!/bin/sh\necho "wrong python" >&2\nexit 97\n')
    (fake / 'python').chmod(0o755)
    ckpt = tmp_path / 'weights' / 'stage1_ce_mixup_best.pth.tar'
    ckpt.parent.mkdir()
    shutil.copy(stage1_checkpoint, ckpt)
    tiny = f'data_path {cifar10_root} batch_size 16 eval_batch_size 64 imb_factor 0.1 compile False device cpu'
    env = dict(os.environ, PATH=f'{fake}:{os.environ["PATH"]}', PYTHON=sys.executable, STAGE1_CKPT=str(ckpt),
               STAGE1_OVERRIDES=tiny, STAGE2_OVERRIDES=f'{tiny} num_epochs 0', SAVE_DIR=str(tmp_path / 'saved'),
               RESULTS=str(tmp_path / 'results'))
    result = subprocess.run(['bash', 'scripts/reproduce.sh', 'config/cifar10/cifar10_imb001', '0'], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert 'wrong python' not in result.stderr
    assert json.load(open(tmp_path / 'weights' / 'stage1_ce_mixup_best.eval.json'))['checkpoint_epoch'] == 1
    assert result.returncode == 2 and result.stderr.endswith('error: num_epochs 0 must be at least 1\n'), result.stderr
