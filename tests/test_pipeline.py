"""The three commands as a user runs them, on tiny generated data: the files, logs, TensorBoard scalars and
metrics they write."""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, STAGE1, STAGE2, args, only_run, run_main, run_script

# compile False: the stage-1 configs compile, which a one-epoch run on tiny data never pays back;
# test_training checks the compiled step against the eager one. Device and precision stay 'auto'.
TINY = ['num_epochs', '1', 'batch_size', '16', 'eval_batch_size', '64', 'print_freq', '5', 'imb_factor', '0.1',
        'compile', 'False']


def ok(result):
    code, out, err = result
    assert code == 0, out[-2000:] + err[-3000:]
    return out


@pytest.fixture(scope='module')
def pipeline(cifar10_root, tmp_path_factory):
    """stage 1 -> stage 2 -> eval, one short epoch each, as the README runs them (in this process)."""
    save = str(tmp_path_factory.mktemp('saved'))
    common = ['data_path', cifar10_root, 'save_dir', save, *TINY]
    s1 = ok(run_main('train_stage1.py', '--cfg', STAGE1, *common))
    run1 = glob.glob(f'{save}/cifar10_imb001_stage1_ce_mixup_*')[0]
    s2 = ok(run_main('train_stage2.py', '--cfg', STAGE2, *common, 'resume', f'{run1}/ckps/model_best.pth.tar'))
    run2 = glob.glob(f'{save}/cifar10_imb001_stage2_ce_h2t_*')[0]
    before = sorted(os.listdir(f'{run2}/ckps'))
    plain = ok(run_main('eval.py', '--cfg', STAGE2, *common, 'resume', f'{run2}/ckps/model_best.pth.tar'))
    written = sorted(os.listdir(f'{run2}/ckps'))  # without --out, eval.py prints and writes nothing
    ev = ok(run_main('eval.py', '--cfg', STAGE2, *common, 'resume', f'{run2}/ckps/model_best.pth.tar',
                     '--out', f'{run2}/ckps/model_best.eval.json'))
    return dict(before=before, written=written, plain=plain, save=save, run1=run1, run2=run2, s1=s1, s2=s2, ev=ev, common=common)


def test_runs_write_logs_checkpoints_and_summary(pipeline):
    for run, name in ((pipeline['run1'], 'cifar10_imb001_stage1_ce_mixup'),
                      (pipeline['run2'], 'cifar10_imb001_stage2_ce_h2t')):
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


def test_eval_prints_its_metrics_and_writes_them_only_where_asked(pipeline):
    assert pipeline['written'] == pipeline['before'] and 'top1' in pipeline['plain']
    out = f"{pipeline['run2']}/ckps/model_best.eval.json"
    metrics = json.load(open(out))
    for key in ('top1', 'top5', 'many', 'medium', 'few', 'ece', 'confidence', 'per_class_acc'):
        assert key in metrics
    summary = json.load(open(f"{pipeline['run2']}/summary.json"))
    assert metrics['top1'] == pytest.approx(summary['best']['top1'])  # same checkpoint, same numbers
    assert 'top1' in pipeline['ev'] and 'ECE' in pipeline['ev']


def test_eval_loads_dataparallel_checkpoints(pipeline, tmp_path):
    ckpt = torch.load(f"{pipeline['run1']}/ckps/model_best.pth.tar", weights_only=True)
    authors = {'epoch': ckpt['epoch'], 'best_acc1': torch.tensor(ckpt['best_acc1']), 'its_ece': ckpt['its_ece'],
               'state_dict_model': {f'module.{k}': v for k, v in ckpt['state_dict_model'].items()},
               'state_dict_classifier': {f'module.{k}': v for k, v in ckpt['state_dict_classifier'].items()}}
    path = str(tmp_path / 'authors.pth.tar')
    torch.save(authors, path)
    ev = ok(run_main('eval.py', '--cfg', STAGE1, *pipeline['common'], 'resume', path,
                     '--out', str(tmp_path / 'authors.eval.json')))
    assert json.load(open(str(tmp_path / 'authors.eval.json')))['top1'] >= 0
    assert 'top1' in ev


def test_model_zoo_weights_reproduce_the_checkpoints_figures(pipeline, tmp_path):
    """scripts.export_weights: fp32 weights under the authors' keys only, small, and eval.py gives the same metrics."""
    out = tmp_path / 'zoo' / 'weights' / 'stage2.pth.tar'
    ok(run_main('scripts/export_weights.py', f"{pipeline['run2']}/ckps/model_best.pth.tar", str(out)))
    zoo = torch.load(out, weights_only=True)
    assert set(zoo) == {'epoch', 'state_dict_model', 'state_dict_classifier', 'best_acc1', 'its_ece'}
    assert all(v.dtype in (torch.float32, torch.int64) for part in ('state_dict_model', 'state_dict_classifier')
               for v in zoo[part].values())
    assert out.stat().st_size < 2e6
    ok(run_main('eval.py', '--cfg', STAGE2, *pipeline['common'], 'resume', str(out),
                '--out', str(out.with_name('stage2.eval.json'))))
    ours = json.load(open(out.with_name('stage2.eval.json')))
    original = json.load(open(f"{pipeline['run2']}/ckps/model_best.eval.json"))
    assert all(ours[k] == original[k] for k in ('top1', 'per_class_acc', 'ece'))


def test_half_precision_zoo_weights_are_half_the_size_and_evaluate_alike(pipeline, tmp_path):
    """export_weights --half: fp16 floats (integer buffers untouched), about half the bytes, and eval.py loads
    them into the fp32 model, giving the checkpoint's figures up to fp16 rounding."""
    full, half = tmp_path / 'full.pth.tar', tmp_path / 'half.pth.tar'
    ckpt = f"{pipeline['run2']}/ckps/model_best.pth.tar"
    ok(run_main('scripts/export_weights.py', ckpt, str(full)))
    ok(run_main('scripts/export_weights.py', ckpt, str(half), '--half'))
    zoo, zoo32 = torch.load(half, weights_only=True), torch.load(full, weights_only=True)
    for part in ('state_dict_model', 'state_dict_classifier'):
        for k, v in zoo[part].items():
            ref = zoo32[part][k]
            assert v.dtype == (torch.float16 if ref.is_floating_point() else ref.dtype), k
            assert torch.equal(v, ref.half()) if ref.is_floating_point() else torch.equal(v, ref), k
    assert half.stat().st_size < 0.6 * full.stat().st_size
    ok(run_main('eval.py', '--cfg', STAGE2, *pipeline['common'], 'resume', str(half), '--out',
                str(tmp_path / 'half.eval.json')))
    ours = json.load(open(tmp_path / 'half.eval.json'))
    original = json.load(open(f"{pipeline['run2']}/ckps/model_best.eval.json"))
    assert abs(ours['top1'] - original['top1']) <= 1.0  # 1 % is one image of this test's 100


def test_cifar100_runs(cifar100_root, tmp_path):
    save = str(tmp_path / 'saved')
    ok(run_main('train_stage1.py', '--cfg', os.path.join(ROOT, 'config/cifar100/cifar100_imb001_stage1_ce_mixup.yaml'),
                  'data_path', cifar100_root, 'save_dir', save, *TINY))
    run = glob.glob(f'{save}/cifar100_imb001_stage1_ce_mixup_*')[0]
    summary = json.load(open(f'{run}/summary.json'))
    assert len(summary['last']['per_class_acc']) == 100


def test_tensorboard_scalars_per_epoch(cifar10_root, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    import train_stage1
    train_stage1.main(args(STAGE1, cifar10_root, tmp_path, 'num_epochs', '2'))
    acc = EventAccumulator(f'{only_run(tmp_path)}/logs')
    acc.Reload()
    tags = set(acc.Tags()['scalars'])
    for tag in ('train/loss', 'train/lr', 'test/top1', 'test/many', 'test/medium', 'test/few', 'test/ece'):
        assert tag in tags and [e.step for e in acc.Scalars(tag)] == [1, 2]


@pytest.mark.slow
def test_progress_bar_on_a_terminal_and_plain_lines_otherwise(cifar10_root, tmp_path):
    import fcntl
    import pty
    import select
    import struct
    import termios
    cmd = [sys.executable, os.path.join(ROOT, 'train_stage1.py'),
           *args(STAGE1, cifar10_root, tmp_path / 'tty', 'num_epochs', '1')]
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
