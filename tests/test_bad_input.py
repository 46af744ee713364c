"""Bad input to the three scripts: a one-line error (`error: ...` on stderr) naming the problem and the fix,
exit status 2, and nothing written. In this process through the scripts' main; one test runs the command."""
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, STAGE1, STAGE2, args, assert_one_line_error, run_main, run_script


def bad(script, cfg, *args, tmp_path, match):
    """`python <script> --cfg cfg args` (in this process): one line naming the problem, exit 2, nothing written.
    compile False: the stage-1 configs' compile check imports torch's compiler, seconds that test nothing here."""
    save = tmp_path / 'saved'
    line = assert_one_line_error(*run_main(script, '--cfg', cfg, 'save_dir', save, 'compile', 'False', *args)[::2],
                                 match)
    assert not save.exists()
    return line


def test_the_command_line_entry_point_reports_bad_input_in_one_line(tmp_path):
    """The one test through a new interpreter: `python train_stage1.py` is run_cli(main), exit 2, one line."""
    result = run_script('train_stage1.py', '--cfg', STAGE1, 'save_dir', str(tmp_path / 's'), 'lr_sheduler.type', 'cos')
    assert_one_line_error(result.returncode, result.stderr, "unknown config key 'lr_sheduler.type'")
    assert result.stdout == '' and not (tmp_path / 's').exists()


def test_missing_data_folder(tmp_path):
    msg = bad('train_stage1.py', STAGE1, 'data_path', str(tmp_path / 'none'), 'download', 'False', tmp_path=tmp_path,
              match='CIFAR-10 not found')
    assert 'data_batch_1' in msg and '`download True`' in msg and 'cifar-10-batches-py/' in msg
    assert not os.path.exists(tmp_path / 'none')


def test_incomplete_data_folder(cifar10_root, tmp_path):
    import shutil
    partial = tmp_path / 'partial'
    shutil.copytree(cifar10_root, partial)
    os.remove(partial / 'cifar-10-batches-py' / 'data_batch_4')
    bad('train_stage1.py', STAGE1, 'data_path', str(partial), 'download', 'False', tmp_path=tmp_path,
        match='lacks data_batch_4')


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


def test_stage2_with_unreadable_checkpoint(cifar10_root, stage1_checkpoint, tmp_path):
    path = tmp_path / 'cut.pth.tar'
    path.write_bytes(open(stage1_checkpoint, 'rb').read()[:5000])
    bad('train_stage2.py', STAGE2, 'data_path', cifar10_root, 'resume', str(path), tmp_path=tmp_path,
        match='truncated or corrupt')


def test_checkpoint_of_another_class_count(cifar100_root, stage1_checkpoint, tmp_path):
    msg = bad('eval.py', os.path.join(ROOT, 'config/cifar100/cifar100_imb001_stage2_ce_H2T.yaml'), 'data_path',
              cifar100_root, 'resume', stage1_checkpoint, tmp_path=tmp_path, match='does not fit')
    assert '[10, 64]' in msg and '[100, 64]' in msg


def test_checkpoint_of_another_backbone(cifar10_root, stage1_checkpoint, tmp_path):
    bad('train_stage2.py', STAGE2, 'data_path', cifar10_root, 'backbone', 'resnet20_fe',
        'resume', stage1_checkpoint, tmp_path=tmp_path, match='does not fit')


def test_unknown_key_on_the_command_line(tmp_path):
    bad('train_stage1.py', STAGE1, 'lr_sheduler.type', 'cos', tmp_path=tmp_path,
        match="unknown config key 'lr_sheduler.type'")


def test_unknown_key_in_the_file(tmp_path):
    cfg = tmp_path / 'typo.yaml'
    cfg.write_text(open(STAGE1).read() + 'weight_dacay: 1e-4\n')
    msg = bad('train_stage1.py', str(cfg), tmp_path=tmp_path, match="unknown config key 'weight_dacay'")
    assert 'typo.yaml' in msg


def test_a_python_config_is_refused_without_running_it(tmp_path):
    marker = tmp_path / 'marker'
    cfg = tmp_path / 'config.py'  # yacs would import a .py config, running it
    cfg.write_text(f'open({str(marker)!r}, "w")\ncfg = dict()\n')
    bad('train_stage1.py', str(cfg), tmp_path=tmp_path, match=f'config file {cfg} holds a YAML str, not KEY: VALUE')
    assert not marker.exists()


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


@pytest.mark.parametrize('key', ['batch_size', 'num_epochs'])
def test_batch_size_and_epochs_below_one(key, tmp_path):
    code, _, err = run_main('train_stage1.py', '--cfg', STAGE1, 'save_dir', tmp_path / 's', key, '0')
    assert code == 2 and err == f'error: {key} 0 must be at least 1\n'
    assert not os.path.exists(tmp_path / 's')


@pytest.mark.parametrize('stage_args', [
    ('train_stage2.py', STAGE2, 'H2T', '0.25', 'sampler.dual_sample.enable', 'False', 'resume', 'x.pth.tar'),
    ('train_stage1.py', STAGE1, 'H2T', '0.25')])
def test_h2t_that_would_be_ignored_is_refused(stage_args, tmp_path):
    script, cfg, *extra = stage_args
    line = bad(script, cfg, *extra, tmp_path=tmp_path, match='error: H2T 0.25 ')
    assert ('sampler.dual_sample.enable True' if script == 'train_stage2.py' else 'stage-2 method') in line


def test_nan_loss_on_the_command_line_exits_2(cifar10_root, tmp_path):
    code, _, err = run_main('train_stage1.py', *args(STAGE1, cifar10_root, tmp_path, 'num_epochs', '1', 'lr', '1e30'))
    assert_one_line_error(code, err, 'error: loss became nan/inf at epoch 1, step')


@pytest.mark.slow
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
