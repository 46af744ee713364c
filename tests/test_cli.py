"""The three commands as a user runs them, on tiny generated data: the files and metrics they
write, and the one-line errors they give on bad input."""
import glob
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run_script
from models import build_model
from utils.checkpoint import load_checkpoint, load_weights
from utils.config import load_config

STAGE1 = 'config/cifar10/cifar10_imb001_stage1_ce_mixup.yaml'
STAGE2 = 'config/cifar10/cifar10_imb001_stage2_ce_H2T.yaml'
# compile False: the stage-1 configs compile, which a one-epoch run on tiny data never pays back;
# test_training checks the compiled step against the eager one.
TINY = ['num_epochs', '1', 'batch_size', '16', 'eval_batch_size', '64', 'print_freq', '5', 'imb_factor', '0.1',
        'compile', 'False']


def ok(result):
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope='module')
def pipeline(cifar10_root, tmp_path_factory):
    """stage 1 -> stage 2 -> eval, one short epoch each, as the README runs them."""
    save = str(tmp_path_factory.mktemp('saved'))
    common = ['data_path', cifar10_root, 'save_dir', save, *TINY]
    s1 = ok(run_script('train_stage1.py', '--cfg', STAGE1, *common))
    run1 = glob.glob(f'{save}/cifar10_imb001_stage1_ce_mixup_*')[0]
    s2 = ok(run_script('train_stage2.py', '--cfg', STAGE2, *common, 'resume', f'{run1}/ckps/model_best.pth.tar'))
    run2 = glob.glob(f'{save}/cifar10_imb001_stage2_ce_h2t_*')[0]
    ev = ok(run_script('eval.py', '--cfg', STAGE2, *common, 'resume', f'{run2}/ckps/model_best.pth.tar'))
    return dict(save=save, run1=run1, run2=run2, s1=s1, s2=s2, ev=ev, common=common)


def test_runs_write_logs_checkpoints_and_summary(pipeline):
    for run, name in ((pipeline['run1'], 'cifar10_imb001_stage1_ce_mixup'), (pipeline['run2'], 'cifar10_imb001_stage2_ce_h2t')):
        assert os.path.basename(run).startswith(name + '_') and len(os.path.basename(run)) == len(name) + 13
        for f in (f'logs/{name}.txt', 'ckps/current.pth.tar', 'ckps/model_best.pth.tar', 'summary.json', 'config.yaml'):
            assert os.path.isfile(os.path.join(run, f)), f
        assert glob.glob(f'{run}/logs/events.out.tfevents.*')
        log = open(f'{run}/logs/{name}.txt').read()
        assert 'Epoch [1/1]' in log and 'Best' in log and 'Last' in log
        ckpt = torch.load(f'{run}/ckps/current.pth.tar', weights_only=True)
        assert {'epoch', 'state_dict_model', 'state_dict_classifier', 'best_acc1', 'its_ece'} <= set(ckpt)
        assert ckpt['epoch'] == 1 and ckpt['state_dict_classifier']['fc.weight'].shape == (10, 64)


def test_summary_reports_best_and_last_epoch(pipeline):
    summary = json.load(open(f"{pipeline['run2']}/summary.json"))
    assert summary['stage'] == 'stage2' and summary['H2T'] == 0.25
    for which in ('best', 'last'):
        m = summary[which]
        assert 0 <= m['top1'] <= 100 and m['top1'] <= m['top5'] and 0 <= m['ece'] <= 1
        assert len(m['per_class_acc']) == 10


def test_stage2_starts_from_the_stage1_backbone(pipeline):
    s1 = torch.load(f"{pipeline['run1']}/ckps/model_best.pth.tar", weights_only=True)['state_dict_model']
    s2 = torch.load(f"{pipeline['run2']}/ckps/current.pth.tar", weights_only=True)['state_dict_model']
    learned = [k for k in s1 if not k.endswith(('running_mean', 'running_var', 'num_batches_tracked'))]
    assert all(torch.equal(s1[k], s2[k]) for k in learned)
    assert not torch.equal(s1['bn1.running_mean'], s2['bn1.running_mean'])  # shift_bn: True


def test_eval_prints_and_writes_metrics_beside_the_checkpoint(pipeline):
    out = f"{pipeline['run2']}/ckps/model_best.eval.json"
    metrics = json.load(open(out))
    for key in ('top1', 'top5', 'many', 'medium', 'few', 'ece', 'confidence', 'per_class_acc'):
        assert key in metrics
    summary = json.load(open(f"{pipeline['run2']}/summary.json"))
    assert metrics['top1'] == pytest.approx(summary['best']['top1'])  # same checkpoint, same numbers
    assert 'top1' in pipeline['ev'].stdout and 'ECE' in pipeline['ev'].stdout


def test_eval_loads_dataparallel_checkpoints(pipeline, tmp_path):
    ckpt = torch.load(f"{pipeline['run1']}/ckps/model_best.pth.tar", weights_only=True)
    authors = {'epoch': ckpt['epoch'], 'best_acc1': torch.tensor(ckpt['best_acc1']), 'its_ece': ckpt['its_ece'],
               'state_dict_model': {f'module.{k}': v for k, v in ckpt['state_dict_model'].items()},
               'state_dict_classifier': {f'module.{k}': v for k, v in ckpt['state_dict_classifier'].items()}}
    path = str(tmp_path / 'authors.pth.tar')
    torch.save(authors, path)
    ev = ok(run_script('eval.py', '--cfg', STAGE1, *pipeline['common'], 'resume', path))
    assert json.load(open(str(tmp_path / 'authors.eval.json')))['top1'] >= 0
    assert 'top1' in ev.stdout


def test_model_zoo_weights_reproduce_the_checkpoints_figures(pipeline, tmp_path):
    """scripts.export_weights: fp32 weights under the authors' keys only, small, and eval.py gives the same metrics."""
    out = tmp_path / 'zoo' / 'weights' / 'stage2.pth.tar'
    ok(subprocess.run([sys.executable, '-m', 'scripts.export_weights', f"{pipeline['run2']}/ckps/model_best.pth.tar",
                       str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600))
    zoo = torch.load(out, weights_only=True)
    assert set(zoo) == {'epoch', 'state_dict_model', 'state_dict_classifier', 'best_acc1', 'its_ece'}
    assert all(v.dtype in (torch.float32, torch.int64) for part in ('state_dict_model', 'state_dict_classifier')
               for v in zoo[part].values())
    assert out.stat().st_size < 2e6
    ok(run_script('eval.py', '--cfg', STAGE2, *pipeline['common'], 'resume', str(out)))
    ours = json.load(open(out.with_name('stage2.eval.json')))
    original = json.load(open(f"{pipeline['run2']}/ckps/model_best.eval.json"))
    assert {k: ours[k] for k in ('top1', 'per_class_acc', 'ece')} == {k: original[k] for k in ('top1', 'per_class_acc', 'ece')}


ZOO = sorted(glob.glob(os.path.join(ROOT, 'results', '*', 'weights', '*.pth.tar')))


@pytest.mark.parametrize('path', ZOO, ids=[os.path.basename(p) for p in ZOO])
def test_committed_model_zoo_loads_into_the_model_of_its_config(path):
    """Each committed weights file fits the model its config builds, and its eval.json is of that file."""
    table = os.path.basename(os.path.dirname(os.path.dirname(path)))
    stage = re.sub(r'(_rho[0-9.]+)?_(best|last)\.pth\.tar$', '', os.path.basename(path))
    cfg_file = os.path.join(ROOT, 'config', table.split('_')[0], f'{table}_{stage}.yaml')
    cfg = load_config(cfg_file)
    backbone, classifier = build_model(cfg)
    ckpt = load_checkpoint(path)
    load_weights(backbone, ckpt['state_dict_model'], path, 'backbone', cfg)
    load_weights(classifier, ckpt['state_dict_classifier'], path, 'classifier', cfg)
    evaluated = json.load(open(path.replace('.pth.tar', '.eval.json')))
    assert evaluated['checkpoint_epoch'] == ckpt['epoch'] and os.path.getsize(path) < 2e6


def test_cifar100_runs(cifar100_root, tmp_path):
    save = str(tmp_path / 'saved')
    ok(run_script('train_stage1.py', '--cfg', 'config/cifar100/cifar100_imb001_stage1_ce_mixup.yaml',
                  'data_path', cifar100_root, 'save_dir', save, *TINY))
    run = glob.glob(f'{save}/cifar100_imb001_stage1_ce_mixup_*')[0]
    summary = json.load(open(f'{run}/summary.json'))
    assert len(summary['last']['per_class_acc']) == 100


# -- bad input: one line, exit status 2, nothing written ---------------------------------------------
def bad(script, cfg, *args, tmp_path, match):
    save = str(tmp_path / 'saved')
    result = run_script(script, '--cfg', cfg, 'save_dir', save, *args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr[-2000:]
    assert match in lines[0], lines[0]
    assert not os.path.exists(save)
    return lines[0]


def test_missing_data_folder(tmp_path):
    msg = bad('train_stage1.py', STAGE1, 'data_path', str(tmp_path / 'none'), tmp_path=tmp_path, match='not found')
    assert 'make_cifar10.py' in msg and 'data_batch_1' in msg


def test_incomplete_data_folder(cifar10_root, tmp_path):
    import shutil
    partial = tmp_path / 'partial'
    shutil.copytree(cifar10_root, partial)
    os.remove(partial / 'cifar-10-batches-py' / 'data_batch_4')
    bad('train_stage1.py', STAGE1, 'data_path', str(partial), tmp_path=tmp_path, match='lacks data_batch_4')


def test_truncated_batch_file(cifar10_root, tmp_path):
    import shutil
    broken = tmp_path / 'broken'
    shutil.copytree(cifar10_root, broken)
    path = broken / 'cifar-10-batches-py' / 'test_batch'
    path.write_bytes(path.read_bytes()[:1000])
    bad('train_stage1.py', STAGE1, 'data_path', str(broken), tmp_path=tmp_path, match='test_batch')


def test_stage2_without_resume(cifar10_root, tmp_path):
    bad('train_stage2.py', STAGE2, 'data_path', cifar10_root, tmp_path=tmp_path, match='needs a checkpoint')


def test_stage2_with_missing_checkpoint(cifar10_root, tmp_path):
    bad('train_stage2.py', STAGE2, 'data_path', cifar10_root, 'resume', str(tmp_path / 'no.pth.tar'),
        tmp_path=tmp_path, match='not found')


def test_stage2_with_unreadable_checkpoint(cifar10_root, pipeline, tmp_path):
    path = tmp_path / 'cut.pth.tar'
    path.write_bytes(open(f"{pipeline['run1']}/ckps/model_best.pth.tar", 'rb').read()[:5000])
    bad('train_stage2.py', STAGE2, 'data_path', cifar10_root, 'resume', str(path), tmp_path=tmp_path,
        match='truncated or corrupt')


def test_checkpoint_of_another_class_count(cifar100_root, pipeline, tmp_path):
    msg = bad('eval.py', 'config/cifar100/cifar100_imb001_stage2_ce_H2T.yaml', 'data_path', cifar100_root,
              'resume', f"{pipeline['run1']}/ckps/model_best.pth.tar", tmp_path=tmp_path, match='does not fit')
    assert '[10, 64]' in msg and '[100, 64]' in msg


def test_checkpoint_of_another_backbone(cifar10_root, pipeline, tmp_path):
    bad('train_stage2.py', STAGE2, 'data_path', cifar10_root, 'backbone', 'resnet20_fe',
        'resume', f"{pipeline['run1']}/ckps/model_best.pth.tar", tmp_path=tmp_path, match='does not fit')


def test_unknown_key_on_the_command_line(tmp_path):
    bad('train_stage1.py', STAGE1, 'lr_sheduler.type', 'cos', tmp_path=tmp_path, match="unknown config key 'lr_sheduler.type'")


def test_unknown_key_in_the_file(tmp_path):
    cfg = tmp_path / 'typo.yaml'
    cfg.write_text(open(os.path.join(os.path.dirname(__file__), '..', STAGE1)).read() + 'weight_dacay: 1e-4\n')
    msg = bad('train_stage1.py', str(cfg), tmp_path=tmp_path, match="unknown config key 'weight_dacay'")
    assert 'typo.yaml' in msg


def test_wrong_value_type(tmp_path):
    bad('train_stage1.py', STAGE1, 'lr', 'fast', tmp_path=tmp_path, match="'lr' has a value of the wrong type")


@pytest.mark.parametrize('value', ['1.5', '-0.1'])
def test_h2t_outside_unit_interval(value, tmp_path):
    bad('train_stage2.py', STAGE2, 'H2T', value, tmp_path=tmp_path, match='outside [0, 1]')


@pytest.mark.parametrize('value', ['0', '1.5', '-0.01'])
def test_imb_factor_outside_range(value, tmp_path):
    bad('train_stage1.py', STAGE1, 'imb_factor', value, tmp_path=tmp_path, match='outside (0, 1]')


def test_integer_values_are_accepted_for_float_keys(cifar10_root, tmp_path):
    # `H2T 0` (plain cRT) and `imb_factor 1` must not trip yacs' int-vs-float type check
    bad('train_stage2.py', STAGE2, 'H2T', '0', 'imb_factor', '1', 'data_path', cifar10_root,
        tmp_path=tmp_path, match='needs a checkpoint')
