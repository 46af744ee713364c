import csv
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


def test_reproduce_runs_a_row_and_collects_results(cifar10_root, tmp_path):
    tiny = f'data_path {cifar10_root} num_epochs 1 batch_size 16 eval_batch_size 64 imb_factor 0.1 compile False'
    env = dict(os.environ, PYTHON=sys.executable, STAGE1_OVERRIDES=tiny, STAGE2_OVERRIDES=tiny,
               SAVE_DIR=str(tmp_path / 'saved'), RESULTS=str(tmp_path / 'results'), SEEDS='0 1', FROM='best last')
    result = subprocess.run(['bash', 'scripts/reproduce.sh', 'config/cifar10/cifar10_imb001', '0', '0.5'], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    out = tmp_path / 'results'
    rows = list(csv.DictReader(open(out / 'metrics.csv')))
    assert [(r['stage'], r['from'], r['seed'], r['rho']) for r in rows] == [('stage1', '', '0', '')] + [
        ('stage2', start, seed, rho) for start in ('best', 'last') for seed in '01' for rho in ('0.0', '0.5')]
    assert all(0 <= float(r['best_top1']) <= 100 for r in rows)
    meta = json.load(open(out / 'metrics.json'))['meta']
    assert meta['commit'] and meta['machine']['cores'] >= 1
    assert len(list(csv.reader(open(out / 'per_class.csv')))) == 1 + 2 * 9
    # the gain of rho 0.5 over rho 0 is taken seed by seed, from the same stage-1 checkpoint
    top1 = {(r['from'], r['seed'], r['rho']): float(r['best_top1']) for r in rows[1:]}
    stats = {(s['from'], s['rho']): s for s in csv.DictReader(open(out / 'seeds.csv'))}
    for start in ('best', 'last'):
        gains = [top1[start, seed, '0.5'] - top1[start, seed, '0.0'] for seed in '01']
        assert float(stats[start, '0.5']['best_gain_mean']) == pytest.approx(sum(gains) / 2, abs=1e-3)
        assert float(stats[start, '0.5']['best_gain_sd']) == pytest.approx(abs(gains[0] - gains[1]) / 2 ** 0.5, abs=1e-3)
    history = list(csv.DictReader(open(out / 'history.csv')))
    assert len(history) == 9 and all(h['epoch'] == '1' for h in history)
    assert all(float(h['train_loss']) > 0 and float(h['test_loss']) > 0 for h in history)
    assert all(h['train_loss'] != h['test_loss'] for h in history)
    if importlib.util.find_spec('matplotlib'):
        for png in ('per_class.png', 'rho.png', 'reliability.png', 'curves.png'):
            assert (out / png).stat().st_size > 1000


def test_reproduce_rejects_an_unknown_prefix(tmp_path):
    result = subprocess.run(['bash', 'scripts/reproduce.sh', 'config/cifar10/cifar10_imb999'], cwd=ROOT,
                            env=dict(os.environ, PYTHON=sys.executable),
                            capture_output=True, text=True)
    assert result.returncode == 2 and 'not found' in result.stderr
