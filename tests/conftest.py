"""Tiny CIFAR-10 / CIFAR-100 files in the official pickled format, and helpers the tests share.

The tests reach the training loop through the scripts' `main(argv)` where they can; where a test needs one
step, one loss or one optimizer, it goes through the small adapters at the end of this file, so that a
change of the engine's signatures is made here once.
"""
import glob
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# One intra-op thread for each test process and the scripts it starts (unless the environment sets a number):
# the models are tiny, and spinning torch threads would fight each other and any training run on the machine.
os.environ.setdefault('OMP_NUM_THREADS', '1')

STAGE1 = os.path.join(ROOT, 'config/cifar10/cifar10_imb001_stage1_ce_mixup.yaml')
STAGE2 = os.path.join(ROOT, 'config/cifar10/cifar10_imb001_stage2_ce_H2T.yaml')
# a few seconds a run on the tiny CIFAR-10 below (8 steps of 16 an epoch at imb_factor 0.1); compile False:
# a one-epoch run never pays a compile back (test_training checks the compiled step against the eager one)
TINY = ['batch_size', '16', 'eval_batch_size', '64', 'print_freq', '5', 'imb_factor', '0.1', 'device', 'cpu',
        'precision', 'fp32', 'deterministic', 'True', 'compile', 'False']


def args(cfg, root, save, *extra):
    """argv of a tiny run of config `cfg` on the generated data at `root`, writing under `save`."""
    return ['--cfg', cfg, 'data_path', root, 'save_dir', str(save), *TINY, *extra]


def only_run(save):
    runs = glob.glob(f'{save}/*_2*')
    assert len(runs) == 1, runs
    return runs[0]


def write_cifar(root, dataset='cifar10', train_per_class=30, test_per_class=10, seed=0):
    """Random images whose first pixel byte pair encodes the image's index in the training set, in
    the layout and pickle format of the official files; classes interleaved as in the originals."""
    rng = np.random.RandomState(seed)
    num_classes = 10 if dataset == 'cifar10' else 100

    def split(per_class):
        labels = np.tile(np.arange(num_classes), per_class)
        rng.shuffle(labels)
        data = rng.randint(0, 256, (len(labels), 3072), dtype=np.uint8)
        data[:, 0] = np.arange(len(labels)) % 256
        data[:, 1] = np.arange(len(labels)) // 256
        return data, labels.tolist()

    (xtr, ytr), (xte, yte) = split(train_per_class), split(test_per_class)
    if dataset == 'cifar10':
        folder = os.path.join(root, 'cifar-10-batches-py')
        os.makedirs(folder, exist_ok=True)
        chunks = np.array_split(np.arange(len(ytr)), 5)
        for i, idx in enumerate(chunks):
            dump({'batch_label': f'training batch {i + 1} of 5', 'data': xtr[idx],
                  'labels': [ytr[j] for j in idx], 'filenames': [f'{j}.png' for j in idx]},
                 os.path.join(folder, f'data_batch_{i + 1}'))
        dump({'batch_label': 'testing batch 1 of 1', 'data': xte, 'labels': yte,
              'filenames': [f'{j}.png' for j in range(len(yte))]}, os.path.join(folder, 'test_batch'))
        dump({'label_names': [f'c{i}' for i in range(10)], 'num_cases_per_batch': 10000, 'num_vis': 3072},
             os.path.join(folder, 'batches.meta'))
    else:
        folder = os.path.join(root, 'cifar-100-python')
        os.makedirs(folder, exist_ok=True)
        for name, x, y in (('train', xtr, ytr), ('test', xte, yte)):
            dump({'filenames': [f'{j}.png' for j in range(len(y))], 'batch_label': name, 'data': x,
                  'fine_labels': y, 'coarse_labels': [c // 5 for c in y]}, os.path.join(folder, name))
        dump({'fine_label_names': [f'f{i}' for i in range(100)], 'coarse_label_names': [f'c{i}' for i in range(20)]},
             os.path.join(folder, 'meta'))
    return root


def dump(obj, path):
    with open(path, 'wb') as f:
        pickle.dump(obj, f, protocol=2)


@pytest.fixture(scope='session')
def cifar10_root(tmp_path_factory):
    return write_cifar(str(tmp_path_factory.mktemp('cifar10')), 'cifar10')


@pytest.fixture(scope='session')
def stage1_checkpoint(cifar10_root, tmp_path_factory):
    """model_best of a one-epoch CE + mixup stage 1 on the tiny CIFAR-10, which the stage-2 tests start
    from (read only: tests that need a file beside it copy it)."""
    import train_stage1
    save = tmp_path_factory.mktemp('s1')
    train_stage1.main(args(STAGE1, cifar10_root, save, 'num_epochs', '1'))
    return f'{only_run(save)}/ckps/model_best.pth.tar'


@pytest.fixture(scope='session')
def cifar100_root(tmp_path_factory):
    return write_cifar(str(tmp_path_factory.mktemp('cifar100')), 'cifar100', train_per_class=6, test_per_class=2)


def run_script(script, *args, cwd=ROOT, timeout=600):
    """Run one of the project's scripts in a new interpreter; returns the CompletedProcess (text output)."""
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env)


def run_main(script, *argv):
    """`python <script> argv` in this process: the script's main under run_cli, which is all its __main__ runs
    (a UserError becomes `error: ...` on stderr and exit status 2), with stdout and stderr captured.
    Returns (exit status, stdout, stderr)."""
    import contextlib
    import importlib
    import io
    from utils.setup import run_cli
    module = importlib.import_module(script.removesuffix('.py').replace('/', '.'))
    out, err = (io.TextIOWrapper(io.BytesIO(), encoding='utf-8', write_through=True) for _ in range(2))
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run_cli(lambda: module.main([str(a) for a in argv]))
        except SystemExit as e:
            code = e.code
    return code, out.buffer.getvalue().decode(), err.buffer.getvalue().decode()


def assert_one_line_error(code, err, match):
    """Exit status 2 and one line `error: ...` holding `match`; returns that line."""
    lines = err.strip().splitlines()
    assert code == 2, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith('error: '), err[-2000:]
    assert match in lines[0], lines[0]
    return lines[0]


# -- ImageNet-LT-style list datasets ------------------------------------------------------------------
LIST_COUNTS = [3, 6, 12, 2, 5]  # training images of labels 0..4: not sorted, so the renumbering shows


def write_image_lists(root, train_name='ImageNet_LT_train.txt', eval_name='ImageNet_LT_test.txt', counts=LIST_COUNTS,
                      eval_per_class=2, seed=0):
    """JPEGs of random sizes under root/train/<label>/ and root/val/<label>/, and their `path label` lists;
    each image's mean colour encodes its label, so a model can learn them."""
    from PIL import Image
    rng = np.random.RandomState(seed)
    lines = {train_name: [], eval_name: []}
    for name, split, per_class in ((train_name, 'train', counts), (eval_name, 'val', [eval_per_class] * len(counts))):
        for label, n in enumerate(per_class):
            os.makedirs(os.path.join(root, split, str(label)), exist_ok=True)
            for i in range(n):
                h, w = rng.randint(24, 72, 2)
                pixels = rng.randint(0, 60, (h, w, 3)) + 40 * label
                path = f'{split}/{label}/{i}.jpg'
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(os.path.join(root, path), quality=90)
                lines[name].append(f'{path} {label}')
    for name, entries in lines.items():
        with open(os.path.join(root, name), 'w') as f:
            f.write('\n'.join(entries) + '\n')
    return root


@pytest.fixture(scope='session')
def imagenet_lt_root(tmp_path_factory):
    return write_image_lists(str(tmp_path_factory.mktemp('imagenet_lt')))


# -- the engine, where a test needs less than a whole run ------------------------------------------------
def experiment(backbone, classifier, cfg, criterion, device='cpu', precision='fp32'):
    """The parts of a run a training step needs, as prepare() returns them for the stage cfg.mode names (what
    that stage does not train frozen)."""
    import torch
    from utils.engine import STAGES
    from utils.setup import Experiment
    stage = STAGES[cfg.mode]
    stage.freeze_untrained(backbone, classifier)
    return Experiment(cfg=cfg, device=torch.device(device), precision=precision, backbone=backbone,
                      classifier=classifier, criterion=criterion, stage=stage)


def make_stage_optimizer(backbone, classifier, cfg):
    """The optimizer the training scripts build for cfg.mode (stage 2: classifier only, backbone frozen)."""
    from utils.engine import make_optimizer
    return make_optimizer(experiment(backbone, classifier, cfg, None))


def stage_loss(backbone, classifier, batch, cfg, criterion, device='cpu', precision='fp32'):
    """(loss, logits, labels) of one batch of the stage cfg.mode names, without a step."""
    exp = experiment(backbone, classifier, cfg, criterion, device, precision)
    return exp.stage.loss(exp, batch)


def one_train_step(backbone, classifier, batch, optimizer, cfg, criterion, device='cpu', precision='fp32'):
    """One optimisation step of the stage cfg.mode names; returns (loss, logits, labels)."""
    from utils.engine import train_step
    return train_step(experiment(backbone, classifier, cfg, criterion, device, precision), batch, optimizer)


def one_train_epoch(backbone, classifier, loader, optimizer, cfg, criterion, epoch=0, device='cpu', precision='fp32'):
    """One pass over `loader` as fit makes it (train modes set as the stage asks); returns its train metrics."""
    from utils.engine import train_one_epoch
    return train_one_epoch(experiment(backbone, classifier, cfg, criterion, device, precision), loader, optimizer,
                           epoch)


def script_test_top1(monkeypatch, values):
    """Make the per-epoch test evaluation of a run report top-1 `values[0]`, `values[1]`, ... (every other
    metric as measured), so that a test chooses which epoch is best."""
    import utils.engine as engine
    real, calls = engine.evaluate, []

    def evaluate(*a, **kw):
        metrics = real(*a, **kw)
        calls.append(1)
        return {**metrics, 'top1': float(values[len(calls) - 1])}
    monkeypatch.setattr(engine, 'evaluate', evaluate)
