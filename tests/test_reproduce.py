import csv
import importlib.util
import json
import os
import subprocess

from conftest import ROOT


def test_reproduce_runs_a_row_and_collects_results(cifar10_root, tmp_path):
    tiny = f'data_path {cifar10_root} num_epochs 1 batch_size 16 eval_batch_size 64 imb_factor 0.1 compile False'
    env = dict(os.environ, STAGE1_OVERRIDES=tiny, STAGE2_OVERRIDES=tiny, SAVE_DIR=str(tmp_path / 'saved'),
               RESULTS=str(tmp_path / 'results'))
    result = subprocess.run(['bash', 'scripts/reproduce.sh', 'config/cifar10/cifar10_imb001', '0', '0.5'], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    out = tmp_path / 'results'
    rows = list(csv.DictReader(open(out / 'metrics.csv')))
    assert [(r['stage'], r['rho']) for r in rows] == [('stage1', ''), ('stage2', '0.0'), ('stage2', '0.5')]
    assert all(0 <= float(r['best_top1']) <= 100 for r in rows)
    meta = json.load(open(out / 'metrics.json'))['meta']
    assert meta['commit'] and meta['machine']['cores'] >= 1
    assert len(list(csv.reader(open(out / 'per_class.csv')))) == 1 + 2 * 3
    if importlib.util.find_spec('matplotlib'):
        for png in ('per_class.png', 'rho.png', 'reliability.png'):
            assert (out / png).stat().st_size > 1000


def test_reproduce_rejects_an_unknown_prefix(tmp_path):
    result = subprocess.run(['bash', 'scripts/reproduce.sh', 'config/cifar10/cifar10_imb999'], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 2 and 'not found' in result.stderr
