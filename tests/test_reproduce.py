"""scripts/reproduce.sh and scripts/collect_results.py: a row reproduced end to end, the seed statistics, and
their errors."""
import csv
import glob
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys

import pytest

from conftest import ROOT
from utils.config import load_config


@pytest.mark.slow
def test_reproduce_runs_a_row_and_collects_results(cifar10_root, tmp_path):
    tiny = f'data_path {cifar10_root} num_epochs 1 batch_size 16 eval_batch_size 64 imb_factor 0.1 compile False'
    env = dict(os.environ, PYTHON=sys.executable, STAGE1_OVERRIDES=tiny, STAGE2_OVERRIDES=tiny,
               SAVE_DIR=str(tmp_path / 'saved'), RESULTS=str(tmp_path / 'results'), SEEDS='0 1', FROM='last',
               JOBS='2', OMP_NUM_THREADS='1')  # stage-2 runs two at a time, each logging to its own file
    result = subprocess.run(['bash', 'scripts/reproduce.sh', 'config/cifar10/cifar10_imb001', '0', '0.5'], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    out = tmp_path / 'results'
    rows = list(csv.DictReader(open(out / 'metrics.csv')))
    assert len(glob.glob(str(tmp_path / 'saved' / '*_rho*.log'))) == 4
    assert [(r['stage'], r['from'], r['seed'], r['rho']) for r in rows] == [('stage1', '', '0', '')] + [
        ('stage2', 'last', seed, rho) for seed in '01' for rho in ('0.0', '0.5')]
    assert all(0 <= float(r['best_top1']) <= 100 for r in rows)
    configs = [run['config'] for run in json.load(open(out / 'metrics.json'))['runs'][1:]]
    assert all('current.pth.tar' in c for c in configs) and sum('seed: 1' in c for c in configs) == 2
    metrics = json.load(open(out / 'metrics.json'))
    assert metrics['meta']['commit'] and metrics['meta']['machine']['hardware']
    assert all(run['hardware'].endswith('cores)') and run['torch'] for run in metrics['runs'])  # ran on CPU
    assert len(list(csv.reader(open(out / 'per_class.csv')))) == 1 + 2 * 5
    stats = {(s['from'], s['rho']): s for s in csv.DictReader(open(out / 'seeds.csv'))}
    assert stats['last', '0.5']['seeds'] == '0 1'
    history = list(csv.DictReader(open(out / 'history.csv')))
    assert len(history) == 5 and all(h['epoch'] == '1' for h in history)
    assert all(float(h['train_loss']) > 0 and float(h['test_loss']) > 0 for h in history)
    assert all(h['train_loss'] != h['test_loss'] for h in history)
    if importlib.util.find_spec('matplotlib'):
        for png in ('per_class.png', 'rho.png', 'reliability.png', 'curves.png'):
            assert (out / png).stat().st_size > 1000


def load_collect():
    from scripts import collect_results
    return collect_results


def test_seed_statistics_pair_each_seed_with_its_own_rho0_run():
    collect = load_collect()
    top1 = {('best', 0, 0.0): 45.0, ('best', 1, 0.0): 46.0, ('best', 0, 0.25): 47.5, ('best', 1, 0.25): 47.0,
            ('last', 0, 0.0): 44.0, ('last', 0, 0.25): 44.5}
    runs = [{'stage': 'stage1', 'H2T': 0.0, 'from': '', 'seed': 0, 'best': {'top1': 39.0}, 'last': {'top1': 38.0}}]
    runs += [{'stage': 'stage2', 'from': start, 'seed': seed, 'H2T': rho, 'best': {'top1': acc},
              'last': {'top1': acc - 1}}
             for (start, seed, rho), acc in top1.items()]
    stats = {(row['from'], row['rho']): row for row in collect.seed_statistics(runs)}
    assert set(stats) == {('best', 0.0), ('best', 0.25), ('last', 0.0), ('last', 0.25)}
    best = stats['best', 0.25]  # gains 2.5 and 1.0
    assert best['seeds'] == '0 1' and best['best_gain_mean'] == pytest.approx(1.75)
    assert best['best_gain_sd'] == pytest.approx(1.5 / 2 ** 0.5, abs=1e-3)
    assert (best['best_gain_min'], best['best_gain_max']) == (1.0, 2.5)
    assert best['best_top1_mean'] == pytest.approx(47.25) and best['last_gain_mean'] == pytest.approx(1.75)
    assert stats['last', 0.25]['best_gain_mean'] == pytest.approx(0.5) and stats['last', 0.25]['best_gain_sd'] == 0
    assert 'best_gain_mean' not in stats['best', 0.0]


def test_reproduce_rejects_an_unknown_prefix(tmp_path):
    result = subprocess.run(['bash', 'scripts/reproduce.sh', 'config/cifar10/cifar10_imb999'], cwd=ROOT,
                            env=dict(os.environ, PYTHON=sys.executable),
                            capture_output=True, text=True)
    assert result.returncode == 2 and 'not found' in result.stderr


def fake_run(folder, name, rho, resume, top1):
    """A stage-2 run folder as train_stage2.py leaves it, as far as collect_results reads it."""
    os.makedirs(folder)
    metrics = {'top1': top1, 'top5': 90.0, 'many': top1 + 5, 'medium': top1, 'few': top1 - 5, 'ece': 0.02,
               'test_loss': 1.0, 'per_class_acc': [top1] * 10,
               'reliability': {'count': [0] * 14 + [100], 'accuracy': [0.0] * 14 + [top1 / 100],
                               'confidence': [0.0] * 14 + [0.98]}}
    summary = {'name': name, 'stage': 'stage2', 'dataset': 'cifar10', 'imb_factor': 0.01, 'H2T': rho, 'epochs': 1,
               'wall_time_s': 1.0, 'best_epoch': 1, 'best': metrics, 'last': metrics,
               'history': [dict(metrics, epoch=1, lr=0.1, train_loss=1.5)]}
    with open(os.path.join(folder, 'summary.json'), 'w') as f:
        json.dump(summary, f)
    cfg = load_config(os.path.join(ROOT, 'config/cifar10/cifar10_imb001_stage2_ce_H2T.yaml'),
                      ['H2T', str(rho), 'resume', resume])
    with open(os.path.join(folder, 'config.yaml'), 'w') as f:
        f.write(cfg.dump())  # the whole config, as train_stage2.py writes it


@pytest.mark.slow
def test_collect_adds_new_runs_to_an_earlier_metrics_json(tmp_path):
    """Runs whose folders are gone (committed metrics.json) are collected again beside new ones, each keeping
    its commit; zoo weights count as best / last; a folder replaces the json's entry for the same run."""
    fake_run(str(tmp_path / 'old'), 'rho0', 0.0, 'saved/s1/ckps/model_best.pth.tar', 45.0)
    collect = load_collect()
    earlier = tmp_path / 'earlier.json'
    old_runs = collect.load_inputs([str(tmp_path / 'old')], 'abc123')
    earlier.write_text(json.dumps({'meta': {'commit': 'abc123'}, 'runs': old_runs}))
    fake_run(str(tmp_path / 'new'), 'rho0.5', 0.5, 'results/x/weights/stage1_ce_mixup_best.pth.tar', 47.0)
    fake_run(str(tmp_path / 'last'), 'fromlast_rho0', 0.0, 'results/x/weights/stage1_ce_mixup_last.pth.tar', 44.0)
    runs = collect.load_inputs([str(earlier), str(tmp_path / 'new'), str(tmp_path / 'last')], 'def456')
    assert [(r['name'], r['from'], r['commit']) for r in runs] == [
        ('rho0', 'best', 'abc123'), ('rho0.5', 'best', 'def456'), ('fromlast_rho0', 'last', 'def456')]
    again = collect.load_inputs([str(earlier), str(tmp_path / 'old')], 'def456')
    assert [(r['name'], r['commit']) for r in again] == [('rho0', 'def456')]
    result = subprocess.run([sys.executable, '-m', 'scripts.collect_results', '--out', str(tmp_path / 'out'),
                             '--commit',
                             'def456', str(earlier), str(tmp_path / 'new')], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr  # no stage-1 run: the plots that need one are left out
    rows = list(csv.DictReader(open(tmp_path / 'out' / 'metrics.csv')))
    assert [(r['run'], r['commit']) for r in rows] == [('rho0', 'abc123'), ('rho0.5', 'def456')]
    stats = {row['rho']: row for row in csv.DictReader(open(tmp_path / 'out' / 'seeds.csv'))}
    assert float(stats['0.5']['best_gain_mean']) == pytest.approx(2.0)
    bad = subprocess.run([sys.executable, '-m', 'scripts.collect_results', '--out', str(tmp_path / 'o2'),
                          str(tmp_path / 'missing')], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith('error: ') and 'neither a run folder' in bad.stderr
    assert not (tmp_path / 'o2').exists()


def test_reproduce_from_last_needs_the_last_epoch(tmp_path):
    best = tmp_path / 'stage1_ce_mixup_best.pth.tar'
    best.write_bytes(b'')
    env = dict(os.environ, PYTHON=sys.executable, STAGE1_CKPT=str(best), FROM='best last', SAVE_DIR=str(tmp_path))
    result = subprocess.run(['bash', 'scripts/reproduce.sh', 'config/cifar10/cifar10_imb001', '0'], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 2 and 'STAGE1_LAST' in result.stderr


def test_reproduce_reads_the_configs_rho_and_rejects_a_bad_one(tmp_path):
    """A rho of `config` is the stage-2 config's own H2T (the ResLT authors fuse at 0.4), said before anything
    runs; a rho that is no fraction from 0 to 1 stops it with a one-line error before any run or folder."""
    env = dict(os.environ, PYTHON=sys.executable, METHOD='reslt', SAVE_DIR=str(tmp_path / 'saved'),
               STAGE1_CKPT=str(tmp_path / 'absent.pth.tar'))  # stops it right after the rhos are read
    result = subprocess.run(['bash', 'scripts/reproduce.sh', 'config/cifar100/cifar100_imb001', '0', 'config'],
                            cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 2 and 'stage2_reslt_H2T.yaml: rhos 0 0.4' in result.stdout
    env['SAVE_DIR'] = str(tmp_path / 'untouched')
    for bad in ('1.5', 'quarter'):
        result = subprocess.run(['bash', 'scripts/reproduce.sh', 'config/cifar100/cifar100_imb001', '0', bad],
                                cwd=ROOT, env=env, capture_output=True, text=True)
        assert result.returncode == 2 and result.stderr.startswith(f'error: rho {bad} ')
        assert result.stderr.count('\n') == 1 and not (tmp_path / 'untouched').exists()


TINY = 'num_epochs 1 batch_size 16 eval_batch_size 64 imb_factor 0.1 compile False'


def table_env(cifar10_root, save, stage1_overrides, **extra):
    """scripts/reproduce_table.sh on the tiny CIFAR-10 files, IF 100 configs only, one seed, rho 0.25 only."""
    return dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS='1', PREFIXES='cifar10_imb001', SEEDS='0',
                RHOS='0.25', SAVE_DIR=str(save), STAGE1_OVERRIDES=f'data_path {cifar10_root} {stage1_overrides}',
                STAGE2_OVERRIDES=f'data_path {cifar10_root} {TINY}', **extra)


def run_folders(save):
    return sorted(p.name for p in save.iterdir() if p.name != 'results')


@pytest.mark.slow
def test_reproduce_table_runs_every_row_of_an_if_and_keeps_them_when_run_again(cifar10_root, tmp_path):
    """CE + mixup, MiSLAS from the same stage 1, LDAM-DRW with its own: one results folder per row; called
    again, it trains nothing that is done."""
    save = tmp_path / 'saved'
    env = table_env(cifar10_root, save, TINY + ' loss.LDAM.reweight_epoch 0', JOBS='2')
    result = subprocess.run(['bash', 'scripts/reproduce_table.sh'], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    results = save / 'results'
    assert sorted(p.name for p in results.iterdir()) == ['cifar10_imb001', 'cifar10_imb001_ldam_drw',
                                                         'cifar10_imb001_mislas', 'table.md']
    rows = {p.name: list(csv.DictReader(open(p / 'metrics.csv'))) for p in results.iterdir() if p.is_dir()}
    assert {name: [(r['run'], r['rho']) for r in table] for name, table in rows.items()} == {
        'cifar10_imb001': [('cifar10_imb001_stage1_ce_mixup', ''), ('cifar10_imb001_stage2_ce_rho0.25', '0.25')],
        'cifar10_imb001_mislas': [('cifar10_imb001_stage1_ce_mixup', ''),
                                  ('cifar10_imb001_stage2_mislas_rho0.25', '0.25')],
        'cifar10_imb001_ldam_drw': [('cifar10_imb001_stage1_ldam_drw', ''),
                                    ('cifar10_imb001_stage2_ldam_drw_rho0.25', '0.25')]}
    table = (results / 'table.md').read_text()
    assert table in result.stdout and [line.split(' | ')[0] for line in table.splitlines()[2:]] == [
        '| cifar10_imb001', '| cifar10_imb001_ldam_drw', '| cifar10_imb001_mislas']
    runs = {r['name']: r for r in json.load(open(results / 'cifar10_imb001_mislas' / 'metrics.json'))['runs']}
    stage1 = runs['cifar10_imb001_stage1_ce_mixup']['run_dir']
    assert f'resume: {stage1}/ckps/model_best.pth.tar' in runs['cifar10_imb001_stage2_mislas_rho0.25']['config']
    folders = run_folders(save)
    assert len(folders) == 2 + 5 and 'cifar10_imb001_ce+mislas.log' in folders  # two job logs, five runs
    folders = sorted(folders + ['cifar10_imb001_ce.log'])  # the log of the second call's one job

    again = subprocess.run(['bash', 'scripts/reproduce_table.sh'], cwd=ROOT, env=dict(env, METHODS='ce'),
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-2000:]
    assert run_folders(save) == folders  # nothing trained again
    log = open(save / 'cifar10_imb001_ce.log').read()
    assert log.count('== stage 1: kept') == 1 and log.count(': kept ') == 2


def processes_naming(text):
    """PIDs of the live processes whose command line contains `text`."""
    found = []
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open(f'/proc/{pid}/cmdline', 'rb') as f:
                cmdline = f.read().replace(b'\0', b' ').decode()
            with open(f'/proc/{pid}/stat') as f:
                zombie = f.read().rsplit(')', 1)[1].split()[0] == 'Z'
        except OSError:
            continue
        if text in cmdline and not zombie:
            found.append(int(pid))
    return found


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir('/proc'), reason='reads the process table from /proc')
def test_reproduce_table_stops_only_its_own_runs_at_the_budget_and_says_how_to_resume(cifar10_root, tmp_path):
    save = tmp_path / 'saved'
    # a process outside the table whose command line names the same folder: a broad `pkill -f` would end it
    bystander = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)', f'save_dir {save}/'])
    try:
        env = table_env(cifar10_root, save, TINY.replace('num_epochs 1', 'num_epochs 100000'), JOBS='2',
                        METHODS='ce ldam_drw', BUDGET='30s')
        result = subprocess.run(['bash', 'scripts/reproduce_table.sh'], cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 3, result.stdout[-3000:] + result.stderr[-2000:]
        assert 'budget of 30 s reached' in result.stdout
        assert processes_naming(str(save)) == [bystander.pid]  # the table's runs are gone, the bystander is not
        resume = re.findall(r'to continue it alone: (.*)', result.stdout)
        assert len(resume) == 2 and all(line.endswith('/ckps/current.pth.tar auto_resume True') for line in resume)
        assert 'stopped: config/cifar10/cifar10_imb001 ce (' in result.stdout
        assert 'stopped: config/cifar10/cifar10_imb001 ldam_drw (' in result.stdout
        # the printed command continues that run, in its own folder, after its last saved epoch
        continued = subprocess.Popen(resume[0].split(), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        try:
            line = next(line for line in continued.stdout if 'continuing' in line or 'error' in line)
        finally:
            continued.kill()
            continued.wait()
        assert re.search(r'continuing cifar10_imb001_stage1_\w+ after epoch [1-9]', line), line
    finally:
        bystander.kill()
        bystander.wait()
        for pid in processes_naming(str(save)):  # left behind only when the script failed to stop them
            os.kill(pid, signal.SIGKILL)


def test_per_class_plot_counts_the_training_images_of_the_subset_rule():
    """The grey counts behind per_class.png: CIFAR-100-LT IF 100 keeps 10,847 images (the published total),
    500 of the most frequent class down to 5 of the least."""
    cfg = load_config(os.path.join(ROOT, 'config/cifar100/cifar100_imb001_stage1_ce_mixup.yaml'))
    counts = load_collect().training_counts({'config': cfg.dump(), 'best': {'per_class_acc': [0.0] * 100}})
    assert sum(counts) == 10847 and (counts[0], counts[-1]) == (500, 5)
    assert all(a >= b for a, b in zip(counts, counts[1:]))
