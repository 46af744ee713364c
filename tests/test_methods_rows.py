"""The "+H2T" rows of the paper from config: MiSLAS (label-aware smoothing, learnable weight scaling) and
LDAM-DRW, each config loading and each method running end to end through scripts/reproduce.sh."""
import csv
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

import train_stage2
from conftest import ROOT, args, assert_one_line_error, only_run, run_main
from utils.config import load_config

METHOD_CONFIGS = sorted(glob.glob(os.path.join(ROOT, 'config/*/*_mislas*.yaml')) +
                        glob.glob(os.path.join(ROOT, 'config/*/*_ldam_drw*.yaml')))


def test_every_method_config_is_shipped_and_loads():
    names = {os.path.basename(p) for p in METHOD_CONFIGS}
    for ds, imbs in (('cifar100', ('0005', '001', '002')), ('cifar10', ('001', '002', '01'))):
        for imb in imbs:
            for suffix in ('stage2_mislas', 'stage2_mislas_H2T', 'stage1_ldam_drw', 'stage2_ldam_drw_H2T'):
                assert f'{ds}_imb{imb}_{suffix}.yaml' in names
    for path in METHOD_CONFIGS:
        cfg = load_config(path)
        if 'mislas' in path:
            assert cfg.loss.type == 'LabelAwareSmoothing' and cfg.lws and cfg.mode == 'stage2'
            assert cfg.sampler.dual_sample.enable == (cfg.H2T > 0) and cfg.H2T in (0.0, 0.25)
        else:
            assert cfg.loss.type == 'LDAMLoss' and cfg.use_norm
    mislas = load_config(os.path.join(ROOT, 'config/cifar100/cifar100_imb001_stage2_mislas.yaml'))
    settings = (mislas.smooth_head, mislas.smooth_tail, mislas.lr_scheduler.lr_factor, mislas.shift_bn)
    assert settings == (0.4, 0.1, 0.2, True)
    ldam = load_config(os.path.join(ROOT, 'config/cifar100/cifar100_imb001_stage1_ldam_drw.yaml'))
    assert (ldam.loss.LDAM.reweight_epoch, ldam.lr_scheduler.gamma, ldam.mixup) == (159, 0.01, False)


def test_lws_starts_at_one_learns_at_the_full_lr_and_is_saved(cifar10_root, stage1_checkpoint, tmp_path, monkeypatch):
    mislas = os.path.join(ROOT, 'config/cifar10/cifar10_imb001_stage2_mislas.yaml')
    lrs = []
    import utils.engine as engine
    real = engine.train_one_epoch

    def spy(exp, loader, optimizer, *a, **kw):
        lrs.append([g['lr'] for g in optimizer.param_groups])
        return real(exp, loader, optimizer, *a, **kw)
    monkeypatch.setattr(engine, 'train_one_epoch', spy)
    train_stage2.main(args(mislas, cifar10_root, tmp_path / 's2', 'num_epochs', '2', 'resume', stage1_checkpoint))
    monkeypatch.undo()
    # epoch 0: cosine lr 0.1, the classifier at lr_factor 0.5 of it, the scale at all of it (MiSLAS)
    assert lrs[0] == pytest.approx([0.05, 0.1]) and lrs[1] == pytest.approx([0.025, 0.05])
    state = torch.load(f'{only_run(tmp_path / "s2")}/ckps/current.pth.tar', weights_only=True)
    scale = state['state_dict_classifier']['lws.learned_norm']
    assert scale.shape == (1, 10) and not torch.equal(scale, torch.ones(1, 10))
    # a checkpoint with a learned scale does not fit a config without one
    plain = os.path.join(ROOT, 'config/cifar10/cifar10_imb001_stage2_ce_H2T.yaml')
    code, _, err = run_main('eval.py', '--cfg', plain, 'data_path', cifar10_root, 'resume',
                            f'{only_run(tmp_path / "s2")}/ckps/current.pth.tar')
    assert_one_line_error(code, err, 'lws.learned_norm')


@pytest.mark.slow
@pytest.mark.parametrize('method', ['mislas', 'ldam_drw'])
def test_reproduce_runs_a_method_row(method, cifar10_root, stage1_checkpoint, tmp_path):
    """LDAM-DRW trains its own stage 1; the MiSLAS row starts from a given CE + mixup checkpoint
    (STAGE1_CKPT, as from the model zoo), so its results hold the stage-2 runs only."""
    tiny = f'data_path {cifar10_root} num_epochs 1 batch_size 16 eval_batch_size 64 imb_factor 0.1 compile False'
    extra = ' loss.LDAM.reweight_epoch 0' if method == 'ldam_drw' else ''
    env = dict(os.environ, PYTHON=sys.executable, METHOD=method, STAGE1_OVERRIDES=tiny + extra, STAGE2_OVERRIDES=tiny,
               SAVE_DIR=str(tmp_path / 'saved'), RESULTS=str(tmp_path / 'results'))
    if method == 'mislas':
        zoo = tmp_path / 'weights' / 'stage1_ce_mixup_best.pth.tar'  # no run folder around it
        os.makedirs(zoo.parent)
        shutil.copy(stage1_checkpoint, zoo)
        env['STAGE1_CKPT'] = str(zoo)
    # `config`: the stage-2 config's own rho, 0.25 for both
    result = subprocess.run(['bash', 'scripts/reproduce.sh', 'config/cifar10/cifar10_imb001', '0', 'config'], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / 'results' / 'metrics.csv')))
    stage2 = [('stage2', '0.0'), ('stage2', '0.25')]
    if method == 'mislas':
        assert [(r['stage'], r['rho'], r['from']) for r in rows] == [s + ('best',) for s in stage2]
    else:
        assert [(r['stage'], r['rho']) for r in rows] == [('stage1', '')] + stage2
        assert rows[0]['run'] == 'cifar10_imb001_stage1_ldam_drw'
        # FROM=best (the default): stage 2 starts from the stage-1 run's model_best, the epoch of its best top-1
        runs = json.load(open(tmp_path / 'results' / 'metrics.json'))['runs']
        stage1 = glob.glob(str(tmp_path / 'saved' / 'cifar10_imb001_stage1_ldam_drw_2*'))[0]
        best = f'{stage1}/ckps/model_best.pth.tar'
        assert [yaml.safe_load(run['config'])['resume'] for run in runs[1:]] == [best, best]
        assert torch.load(best, weights_only=True)['epoch'] == int(rows[0]['best_epoch'])
    assert rows[-2]['run'] == f'cifar10_imb001_stage2_{method}_rho0'
