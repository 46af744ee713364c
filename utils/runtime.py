"""Device, precision, seeding and the run folder: what every script sets up before training."""
import contextlib
import ctypes
import ctypes.util
import logging
import os
import platform
import random
import shutil
import sys
import time
from collections import namedtuple

import numpy as np
import torch

from common import distributed
from common.errors import UserError


def select_device(cfg):
    """cfg.device ('auto' = CUDA when present, else CPU); the authors' `gpu: N` means 'cuda:N'."""
    name = cfg.device
    if name == 'auto':
        name = f'cuda:{cfg.gpu}' if cfg.gpu is not None else ('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device {name!r} is not a device name; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UserError(f'device {name} asked for, but CUDA is not available here; use device auto or cpu')
    if cfg.sync_bn and device.type != 'cuda' and distributed.launched_by_torchrun():
        # torch's SyncBatchNorm has GPU kernels only: a CPU run under torchrun would fail at its first step.
        # One process never converts (nothing to synchronise), so evaluating such a run's config on a CPU works.
        raise UserError(f'sync_bn True needs CUDA GPUs (torch\'s SyncBatchNorm runs on GPUs only), but the device is '
                        f'{device}; drop sync_bn')
    return device


def hardware_name(device):
    """What ran the computation: the GPU's name for CUDA, else the CPU's model name and core count."""
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    cpu = ''
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    return f'{cpu} ({os.cpu_count()} cores)'


def cpu_has_bf16():
    return any(getattr(torch.cpu, f, lambda: False)() for f in ('_is_avx512_bf16_supported', '_is_amx_tile_supported'))


def cuda_has_native_bf16(device):
    """Compute capability 8.0 (Ampere) and later. torch.cuda.is_bf16_supported() also counts GPUs that
    only emulate bf16 (V100, T4), where it is slow or fails."""
    return torch.cuda.get_device_capability(device)[0] >= 8


def select_precision(cfg, device):
    """'auto' -> bf16 autocast on GPUs with native bf16 and on CPUs with AVX512-BF16 or AMX, else fp32."""
    if cfg.precision != 'auto':
        return cfg.precision
    if device.type == 'cuda':
        return 'bf16' if cuda_has_native_bf16(device) else 'fp32'
    return 'bf16' if device.type == 'cpu' and cpu_has_bf16() else 'fp32'


def select_eval_precision(cfg, precision):
    """The evaluation's precision: fp32 unless `eval_precision same` asks for the training `precision`."""
    return precision if cfg.eval_precision == 'same' else 'fp32'


def disable_tf32(device):
    """On CUDA, fp32 convolutions (cuDNN) and matmuls (cuBLAS) otherwise run in TF32 on Ampere and later
    GPUs (cuDNN's default): switched off so that fp32 means fp32, as on the CPU. bf16 autocast is not
    affected (its convolutions and matmuls run in bf16). The legacy flags are set, not the newer
    fp32_precision ones: torch 2.14 refuses to read `cudnn.allow_tf32` (inductor does) once the new API
    has set cuDNN's precision, while the legacy setters keep both views consistent."""
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def autocast(device, precision):
    """Forward passes in bf16 where asked; losses are taken in fp32 by the callers, BN statistics
    and the optimizer stay fp32 (autocast keeps BN in fp32 and never touches the weights)."""
    if precision == 'bf16':
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def keep_freed_memory():
    """Make glibc keep freed blocks for reuse instead of giving them back to the OS at once.

    With glibc's defaults, blocks above its mmap threshold are unmapped when freed and a free heap top is
    trimmed, so every CPU training step maps its activations afresh and the kernel zeroes them page by
    page, in system time. Raising both thresholds keeps that memory in the process for the next step;
    it is process-wide and stays on. Returns False, changing nothing, where the C library has no mallopt.
    """
    name = ctypes.util.find_library('c')
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    # 32 MiB is glibc's largest mmap threshold on 64-bit; a batch's activations are 4-16 MiB each
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


def compile_in_place(*modules, mode='default'):
    """torch.compile each module in place (its state_dict keys stay those of the checkpoints), with
    static shapes: under torch's default an epoch's short last batch recompiles a dynamic-batch graph
    that then serves every full batch as well, slower than a graph of fixed shape; static shapes give
    one graph per batch size instead (full, last, evaluation). `mode` is torch.compile's (cfg.compile_mode).
    What changes every step stays outside the graphs, so that no step recompiles: mixup's lam is applied
    to the inputs and the loss in eager code, the LR lives in the (uncompiled) optimizer."""
    for module in modules:
        module.compile(dynamic=False, mode=mode)


def find_c_compiler():
    """The C compiler Triton builds its launchers with: $CC if set, else gcc, else clang; None if absent."""
    if os.environ.get('CC'):
        return shutil.which(os.environ['CC'])
    return shutil.which('gcc') or shutil.which('clang')


def check_compile_toolchain(device):
    """torch.compile writes C++ kernels on CPU and Triton kernels on CUDA (Triton also needs a C compiler):
    stop before training, with the fix, where the toolchain is missing, rather than at the first step."""
    if device.type == 'cpu':
        from torch._inductor import config as inductor_config
        from torch._inductor.cpp_builder import cpp_compiler_search
        try:
            cpp_compiler_search(tuple(inductor_config.cpp.cxx))
        except Exception:
            names = ', '.join(c for c in inductor_config.cpp.cxx if c)
            raise UserError(f'compile True on CPU needs a C++ compiler and none was found (looked for {names}); '
                            f'install one (or point CXX at it) or add `compile False`')
    elif device.type == 'cuda':
        from torch.utils._triton import has_triton
        if not has_triton():
            raise UserError('compile True on CUDA needs Triton, which is not installed; '
                            '`pip install triton` or add `compile False`')
        if find_c_compiler() is None:
            looked = f'CC={os.environ["CC"]}' if os.environ.get('CC') else 'gcc, clang'
            raise UserError(f'compile True on CUDA needs a C compiler for Triton and none was found (looked for '
                            f'{looked}); install one (or point CC at it) or add `compile False`')


CUBLAS_DETERMINISTIC = (':4096:8', ':16:8')  # the workspace settings cuBLAS is repeatable with


def seed_everything(seed, deterministic=False):
    """Seed every generator; with `deterministic`, make a run repeatable where PyTorch can: deterministic
    algorithms only (an op without one raises, and run_cli names it), cuDNN without benchmarking,
    inductor's deterministic mode (torch.use_deterministic_algorithms switches it on) and a cuBLAS
    workspace that is repeatable, set here, before any CUDA work, unless the environment gives one.
    Call it before CUDA starts; without `deterministic` everything is switched back off."""
    if deterministic:
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', CUBLAS_DETERMINISTIC[0])
        if os.environ['CUBLAS_WORKSPACE_CONFIG'] not in CUBLAS_DETERMINISTIC:
            raise UserError(f'deterministic True needs CUBLAS_WORKSPACE_CONFIG={CUBLAS_DETERMINISTIC[0]} (or '
                            f'{CUBLAS_DETERMINISTIC[1]}), but the environment sets '
                            f'{os.environ["CUBLAS_WORKSPACE_CONFIG"]!r}; unset it or set one of those')
    if torch.are_deterministic_algorithms_enabled() != deterministic:
        torch.use_deterministic_algorithms(deterministic)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


RunDir = namedtuple('RunDir', 'dir log_dir ckpt_dir name')


def create_run_dir(cfg):
    """saved/<name>_<YYYYmmddHHMM>/{logs,ckps}; created only once all inputs have been checked."""
    name = cfg.name or f'{cfg.dataset}_{cfg.mode}'
    run_dir = os.path.join(cfg.save_dir, f'{name}_{time.strftime("%Y%m%d%H%M")}')
    base, n = run_dir, 1
    while os.path.exists(run_dir):  # two runs started within the same minute
        n += 1
        run_dir = f'{base}_{n}'
    log_dir, ckpt_dir = os.path.join(run_dir, cfg.log_dir), os.path.join(run_dir, cfg.model_dir)
    os.makedirs(log_dir)
    os.makedirs(ckpt_dir)
    with open(os.path.join(run_dir, 'config.yaml'), 'w') as f:
        f.write(cfg.dump())
    return RunDir(run_dir, log_dir, ckpt_dir, name)


def get_logger(log_file=None, quiet=False):
    """Logs to stdout and, where given, to a file in the run folder (appended); `quiet` logs nothing."""
    logger = logging.getLogger('h2t')
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter('%(asctime)s %(message)s', '%H:%M:%S')
    sys.stdout.reconfigure(line_buffering=True)  # progress shows up in `nohup ... > log` too
    handlers = [] if quiet else [logging.StreamHandler(sys.stdout)]
    if log_file:
        handlers.append(logging.FileHandler(log_file))
    if not handlers:
        handlers.append(logging.NullHandler())
    for handler in handlers:
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    return logger
