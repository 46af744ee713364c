"""What a GPU or multi-process run relies on, checked on CPU: the CUDA generator state in checkpoints,
SyncBatchNorm, precision and TF32, fp32 evaluation, determinism, one GPU per process, the compile
toolchain and mode, the NaN stop under DDP, and evaluation sums without data-dependent shapes.
Where a branch runs only on CUDA, torch.cuda's functions are replaced by recorders."""
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import eval as eval_script
import train_stage1
import common.distributed as distributed
import utils.engine as engine
import utils.runtime as runtime
import utils.setup as setup
from conftest import ROOT, STAGE1, TINY, args, only_run
from utils.config import get_default_config, head_scale, load_config
from common.errors import UserError
from utils.setup import run_cli
from common.metrics import N_BINS, metric_sums


def config(*opts):
    return load_config(STAGE1, list(opts))


def forbid(*names):
    def fail(*a, **kw):
        raise AssertionError(f'{names} called')
    return fail


# -- CUDA random-number state in checkpoints ---------------------------------------------------------
def fake_cuda_state(i):
    return torch.full((16,), i, dtype=torch.uint8)


def test_a_cpu_run_leaves_cuda_alone_even_where_a_gpu_is_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    for name in ('get_rng_state', 'get_rng_state_all', 'set_rng_state', 'set_rng_state_all', 'current_device'):
        monkeypatch.setattr(torch.cuda, name, forbid(name))
    state = engine.rng_state(torch.device('cpu'))
    assert 'cuda' not in state
    engine.set_rng_state({**state, 'cuda': fake_cuda_state(0)}, torch.device('cpu'))


@pytest.mark.parametrize('cuda', [None, fake_cuda_state(5)], ids=['none', 'a gpu run'])
def test_a_checkpoint_from_any_host_resumes_on_cpu(cuda, monkeypatch):
    """Whether a checkpoint carries a GPU run's CUDA state or none, a CPU run restores the CPU generators from
    it and nothing else."""
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)  # a GPU host running on its CPU
    monkeypatch.setattr(torch.cuda, 'set_rng_state_all', forbid('set_rng_state_all'))
    monkeypatch.setattr(torch.cuda, 'set_rng_state', forbid('set_rng_state'))
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    saved = engine.rng_state(torch.device('cpu'))
    expected = (torch.rand(3).tolist(), random.random(), np.random.rand())
    if cuda is not None:
        saved['cuda'] = cuda
    torch.manual_seed(2)
    random.seed(2)
    np.random.seed(2)
    engine.set_rng_state(saved, torch.device('cpu'))
    assert (torch.rand(3).tolist(), random.random(), np.random.rand()) == expected


@pytest.fixture
def cuda_generators(monkeypatch):
    """torch.cuda's generator functions as recorders: the calls made, as (what, state, device)."""
    calls = []
    monkeypatch.setattr(torch.cuda, 'get_rng_state', lambda device='cuda': calls.append(('get', None, device))
                        or fake_cuda_state(7))
    monkeypatch.setattr(torch.cuda, 'set_rng_state', lambda state, device='cuda': calls.append(('set', state, device)))
    for name in ('get_rng_state_all', 'set_rng_state_all'):
        monkeypatch.setattr(torch.cuda, name, forbid(name))
    return calls


def test_a_cuda_run_saves_its_own_gpus_state_only(cuda_generators):
    state = engine.rng_state(torch.device('cuda', 1))
    assert torch.equal(state['cuda'], fake_cuda_state(7))
    assert [(what, str(device)) for what, _, device in cuda_generators] == [('get', 'cuda:1')]


@pytest.mark.parametrize('device, world', [(2, 1), (1, 2)])  # one process; a rank of two, which takes rank 0's
def test_a_cuda_run_restores_its_state_into_its_own_gpu(device, world, cuda_generators, monkeypatch):
    monkeypatch.setattr(distributed, 'world_size', lambda: world)
    state = {**engine.rng_state(torch.device('cpu')), 'cuda': fake_cuda_state(5)}
    engine.set_rng_state(state, torch.device('cuda', device))
    assert len(cuda_generators) == 1
    what, restored, where = cuda_generators[0]
    assert what == 'set' and torch.equal(restored, fake_cuda_state(5)) and where == torch.device('cuda', device)


def test_a_cuda_run_resumes_from_a_checkpoint_without_cuda_state(cuda_generators):
    engine.set_rng_state(engine.rng_state(torch.device('cpu')), torch.device('cuda', 0))
    assert cuda_generators == []


# -- SyncBatchNorm -----------------------------------------------------------------------------------
def test_sync_bn_with_several_cpu_processes_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv('WORLD_SIZE', '2')
    with pytest.raises(UserError, match=r"^sync_bn True needs CUDA GPUs .*SyncBatchNorm runs on GPUs only.*; drop "
                                        r"sync_bn$"):
        runtime.select_device(config('device', 'cpu', 'sync_bn', 'True'))


def test_a_sync_bn_config_runs_in_one_cpu_process(monkeypatch):
    """A multi-GPU run's config (sync_bn True) evaluates on a laptop: one process has nothing to synchronise."""
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    assert runtime.select_device(config('device', 'cpu', 'sync_bn', 'True')) == torch.device('cpu')


@pytest.mark.parametrize('sync_bn', [True, False])
def test_sync_bn_converts_the_backbone_when_several_processes_run(sync_bn, cifar10_root, monkeypatch):
    """prepare() under a (faked) 2-process world: with sync_bn the backbone's BatchNorm layers become
    SyncBatchNorm, whose state_dict keys are those of the checkpoints."""
    monkeypatch.setattr(setup, 'select_device', lambda cfg: torch.device('cpu'))  # SyncBatchNorm needs CUDA to run
    monkeypatch.setattr(distributed, 'world_size', lambda: 2)
    s = setup.prepare(engine.STAGE1, ['--cfg', STAGE1, 'data_path', cifar10_root, *TINY, 'sync_bn', str(sync_bn)],
                      record=False)
    bns = [m for m in s.backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and all(isinstance(m, torch.nn.SyncBatchNorm) == sync_bn for m in bns)
    from models import build_model
    assert s.backbone.state_dict().keys() == build_model(s.cfg, head_scale(s.cfg))[0].state_dict().keys()


# -- precision and TF32 ------------------------------------------------------------------------------
@pytest.mark.parametrize('capability, expected', [((7, 0), 'fp32'), ((7, 5), 'fp32'), ((8, 0), 'bf16'),
                                                  ((9, 0), 'bf16')], ids=['V100', 'T4', 'A100', 'H100'])
def test_precision_auto_picks_bf16_only_on_gpus_that_have_it_natively(capability, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda including_emulation=True: True)  # emulation counts
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: capability)
    assert runtime.select_precision(get_default_config(), torch.device('cuda', 0)) == expected


@pytest.fixture
def tf32_flags():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # what a GPU may default to
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_fp32_on_cuda_is_not_tf32(tf32_flags):
    runtime.disable_tf32(torch.device('cuda', 0))
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    # the newer per-op view agrees (and reading the legacy flags above raised nothing)
    assert torch.backends.cuda.matmul.fp32_precision == 'ieee'
    assert torch.backends.cudnn.conv.fp32_precision != 'tf32' and torch.backends.cudnn.rnn.fp32_precision != 'tf32'


def test_a_cpu_run_leaves_the_tf32_flags_alone(tf32_flags):
    runtime.disable_tf32(torch.device('cpu'))
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32


# -- evaluation in fp32 ------------------------------------------------------------------------------
@pytest.fixture
def evaluated_precisions(monkeypatch):
    """The precision each evaluate() call got, in eval.py and in the training loop."""
    seen, real = [], engine.evaluate

    def evaluate(*a):
        seen.append(a[-1])
        return real(*a)
    monkeypatch.setattr(engine, 'evaluate', evaluate)
    monkeypatch.setattr(eval_script, 'evaluate', evaluate)
    return seen


@pytest.mark.parametrize('opts, expected', [([], 'fp32'), (['eval_precision', 'same'], 'bf16')])
def test_eval_py_evaluates_in_fp32_unless_asked(opts, expected, stage1_checkpoint, cifar10_root, tmp_path,
                                                evaluated_precisions):
    ckpt = tmp_path / 'ckpt.pth.tar'
    shutil.copy(stage1_checkpoint, ckpt)
    eval_script.main(['--cfg', STAGE1, 'data_path', cifar10_root, *TINY, 'precision', 'bf16', *opts,
                      'resume', str(ckpt), '--out', str(tmp_path / 'ckpt.eval.json')])
    assert evaluated_precisions == [expected]
    assert json.load(open(tmp_path / 'ckpt.eval.json'))['precision'] == expected


@pytest.mark.parametrize('opts, expected', [([], 'fp32'), (['eval_precision', 'same'], 'bf16')])
def test_training_picks_model_best_from_fp32_evaluations(opts, expected, cifar10_root, tmp_path,
                                                         evaluated_precisions):
    train_stage1.main(args(STAGE1, cifar10_root, tmp_path, 'num_epochs', '1', 'precision', 'bf16', *opts))
    assert evaluated_precisions == [expected]
    summary = json.load(open(f'{only_run(tmp_path)}/summary.json'))
    assert summary['precision'] == 'bf16' and summary['eval_precision'] == expected


def test_eval_precision_takes_fp32_or_same():
    with pytest.raises(UserError, match=r"^eval_precision 'bf16' is unknown; use fp32 or same"):
        config('eval_precision', 'bf16')


# -- determinism -------------------------------------------------------------------------------------
@pytest.fixture
def deterministic_state(monkeypatch):
    import torch._inductor.config as inductor_config
    monkeypatch.delenv('CUBLAS_WORKSPACE_CONFIG', raising=False)
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark, inductor_config.deterministic)
    yield inductor_config
    torch.use_deterministic_algorithms(saved[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, inductor_config.deterministic = saved[1:]


def test_deterministic_switches_on_everything_pytorch_has(deterministic_state):
    inductor_config = deterministic_state
    runtime.seed_everything(0, deterministic=True)
    assert torch.are_deterministic_algorithms_enabled() and inductor_config.deterministic
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ['CUBLAS_WORKSPACE_CONFIG'] == ':4096:8'
    runtime.seed_everything(0, deterministic=False)  # the next run in this process is not held to it
    assert not torch.are_deterministic_algorithms_enabled() and not inductor_config.deterministic
    assert not torch.backends.cudnn.deterministic and torch.backends.cudnn.benchmark


def test_deterministic_keeps_a_repeatable_cublas_setting_and_refuses_another(deterministic_state, monkeypatch):
    monkeypatch.setenv('CUBLAS_WORKSPACE_CONFIG', ':16:8')
    runtime.seed_everything(0, deterministic=True)
    assert os.environ['CUBLAS_WORKSPACE_CONFIG'] == ':16:8'
    monkeypatch.setenv('CUBLAS_WORKSPACE_CONFIG', ':0:0')
    with pytest.raises(UserError, match=r"^deterministic True needs CUBLAS_WORKSPACE_CONFIG=:4096:8 .*':0:0'"):
        runtime.seed_everything(0, deterministic=True)


def test_an_op_without_a_deterministic_kernel_is_a_one_line_error(deterministic_state, capsys):
    def main():
        runtime.seed_everything(0, deterministic=True)
        torch.zeros(3).put_(torch.tensor([0]), torch.tensor([1.0]))  # no deterministic kernel, on CPU too

    with pytest.raises(SystemExit) as exit_:
        run_cli(main)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count('\n') == 1
    assert err == ('error: deterministic True, but put_ has no deterministic implementation on this device; '
                   'set deterministic False to run with it\n')


def test_other_runtime_errors_are_not_translated():
    def main():
        raise RuntimeError('something else')
    with pytest.raises(RuntimeError, match='something else'):
        run_cli(main)


# -- one visible GPU per process ---------------------------------------------------------------------
@pytest.fixture
def torchrun_on_gpus(monkeypatch):
    """distributed.init as torchrun's rank with LOCAL_RANK 1 of 2 would run it; returns the CUDA indices
    set_device got, given torch.cuda.device_count() = visible[0]."""
    monkeypatch.setenv('WORLD_SIZE', '2')
    monkeypatch.setenv('LOCAL_RANK', '1')
    visible, set_to = [0], []
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: visible[0])
    monkeypatch.setattr(torch.cuda, 'set_device', set_to.append)
    monkeypatch.setattr(distributed.dist, 'init_process_group', lambda backend: None)
    return visible, set_to


@pytest.mark.parametrize('visible, expected', [(2, 1), (8, 1), (1, 0)])
def test_each_process_takes_a_gpu_it_can_see(visible, expected, torchrun_on_gpus):
    torchrun_on_gpus[0][0] = visible
    assert distributed.init('cuda') == expected and torchrun_on_gpus[1] == [expected]


def test_a_local_rank_without_a_visible_gpu_is_a_one_line_error(torchrun_on_gpus, monkeypatch):
    monkeypatch.setenv('LOCAL_RANK', '3')
    torchrun_on_gpus[0][0] = 2
    with pytest.raises(UserError, match=r'^LOCAL_RANK 3 has no GPU of its own: this process sees 2 CUDA devices; '):
        distributed.init('cuda')
    assert torchrun_on_gpus[1] == []


# -- compile toolchain and mode ----------------------------------------------------------------------
@pytest.fixture
def triton_present(monkeypatch):
    import torch.utils._triton
    monkeypatch.setattr(torch.utils._triton, 'has_triton', lambda: True)
    monkeypatch.delenv('CC', raising=False)


def test_compile_on_cuda_needs_a_c_compiler(triton_present, monkeypatch):
    monkeypatch.setattr(runtime.shutil, 'which', lambda name: None)
    with pytest.raises(UserError, match=r'^compile True on CUDA needs a C compiler for Triton and none was found '
                                        r'\(looked for gcc, clang\); install one \(or point CC at it\) or add '
                                        r'`compile False`$'):
        runtime.check_compile_toolchain(torch.device('cuda', 0))
    monkeypatch.setenv('CC', 'no-such-cc')
    with pytest.raises(UserError, match=r'looked for CC=no-such-cc'):
        runtime.check_compile_toolchain(torch.device('cuda', 0))


def test_compile_on_cuda_accepts_gcc_or_clang(triton_present, monkeypatch):
    monkeypatch.setattr(runtime.shutil, 'which', lambda name: '/usr/bin/clang' if name == 'clang' else None)
    runtime.check_compile_toolchain(torch.device('cuda', 0))


@pytest.mark.parametrize('mode', ['reduce-overhead', 'max-autotune'])
def test_compile_mode_reaches_torch_compile(mode, cifar10_root, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, 'compile', lambda self, **kw: compiled.append((type(self).__name__, kw)))
    monkeypatch.setattr(setup, 'check_compile_toolchain', lambda device: None)
    setup.prepare(engine.STAGE1, ['--cfg', STAGE1, 'data_path', cifar10_root, *TINY, 'compile', 'True',
                                  'compile_mode', mode], record=False)
    assert compiled == [('ResNet_fe', {'dynamic': False, 'mode': mode}),
                        ('Classifier', {'dynamic': False, 'mode': mode})]


def test_a_bad_compile_mode_is_a_one_line_error():
    with pytest.raises(UserError, match=r"^compile_mode 'fast' is unknown; use one of default, reduce-overhead, "
                                        r"max-autotune, max-autotune-no-cudagraphs$"):
        config('compile_mode', 'fast')


# -- NaN stop under DDP; evaluation sums -------------------------------------------------------------
@pytest.mark.slow
def test_nan_stop_names_the_first_bad_step_over_all_ranks(cifar10_root, tmp_path):
    """2 CPU ranks: rank 1's loss turns NaN at step 3, which (through DDP's averaged gradients) makes rank 0's
    NaN from step 4; the first bad step is 3 (the ranks' steps added would say 7)."""
    script = tmp_path / 'poisoned_stage1.py'
    script.write_text(textwrap.dedent(f'''
        import os, sys
        sys.path.insert(0, {ROOT!r})
        import train_stage1
        import utils.engine as engine
        from utils.setup import run_cli
        real, calls = engine.STAGE1.loss, []

        def poisoned(*a, **kw):
            loss, out, y = real(*a, **kw)
            calls.append(1)
            return (loss * float('nan') if os.environ['RANK'] == '1' and len(calls) == 3 else loss), out, y
        engine.STAGE1.loss = poisoned
        run_cli(lambda: train_stage1.main(sys.argv[1:]))
        '''))
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(script),
           *args(STAGE1, cifar10_root, tmp_path / 's', 'num_epochs', '1')]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
    assert errors and all(line.startswith('error: loss became nan/inf at epoch 1, step 3;') for line in errors), \
        result.stderr[-3000:]


def bincount_reference(probs, targets):
    """The per-class and per-bin sums as torch.bincount computes them."""
    num_classes = probs.size(1)
    confidence, pred = probs.max(dim=1)
    correct = pred.eq(targets).double()
    bins = (torch.ceil(confidence * N_BINS).long() - 1).clamp(0, N_BINS - 1)
    return {'class_total': torch.bincount(targets, minlength=num_classes).double(),
            'class_correct': torch.bincount(targets, weights=correct, minlength=num_classes),
            'bin_count': torch.bincount(bins, minlength=N_BINS).double(),
            'bin_confidence': torch.bincount(bins, weights=confidence.double(), minlength=N_BINS),
            'bin_correct': torch.bincount(bins, weights=correct, minlength=N_BINS)}


@pytest.mark.parametrize('seed', range(3))
def test_evaluation_sums_equal_bincounts(seed):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(777, 37, generator=g) * 3, dim=1)
    targets = torch.randint(0, 30, (777,), generator=g)  # some classes without images
    ours, reference = metric_sums(probs, targets), bincount_reference(probs, targets)
    for key, expected in reference.items():
        assert ours[key].dtype == torch.float64 and ours[key].shape == expected.shape
        torch.testing.assert_close(ours[key], expected, rtol=1e-12, atol=1e-12, msg=key)


def test_evaluation_sums_have_shapes_known_without_reading_the_data():
    """On fake tensors (shapes only, no data) the sums still come out: nothing in them has a size that
    depends on the values, which on CUDA would wait for the GPU (torch.bincount's does)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        sums = metric_sums(torch.rand(64, 10).softmax(dim=1), torch.randint(0, 10, (64,)))
    assert sums['class_total'].shape == (10,) and sums['bin_count'].shape == (N_BINS,)
