"""The shipped CIFAR configs: their hyper-parameters pinned against the authors' published YAML files, their
many / medium / few ranges and what their comments say of them, and the authors' own YAML files loading here."""
import glob
import os
import re

import pytest
import yaml

from conftest import ROOT, TINY, assert_one_line_error, only_run, run_main
from datasets import img_num_per_cls
from utils.config import load_config

CIFAR_CONFIGS = sorted(glob.glob(os.path.join(ROOT, 'config/cifar10/*.yaml')) +
                       glob.glob(os.path.join(ROOT, 'config/cifar100/*.yaml')))
FIXTURES = os.path.join(ROOT, 'tests', 'fixtures', 'authors_configs')


def config(name):
    return load_config(os.path.join(ROOT, 'config', name.split('_')[0], name))


# -- 8. the CE + mixup / CE + H2T recipe, value by value, from the authors' files ---------------------------
# Keke921/H2T config/cifar100/cifar100_imb{0005,001,002}_stage1_ce_mixup.yaml: the same at every IF. Their
# train_stage1.py hard-codes the schedule: 5 warm-up epochs, x0.1 after epoch 160 and x0.01 after 180.
AUTHORS_STAGE1 = {'lr': 0.1, 'batch_size': 128, 'weight_decay': 2e-4, 'num_epochs': 200, 'momentum': 0.9,
                  'mixup': True, 'alpha': 1.0, 'H2T': 0.0, 'lr_scheduler.type': 'warmup_step',
                  'lr_scheduler.warmup_epochs': 5, 'lr_scheduler.milestones': [160, 180], 'lr_scheduler.gamma': 0.1,
                  'sampler.type': 'default', 'loss.type': 'CrossEntropyLoss', 'loss.CE.reweight_CE': False}
# Keke921/H2T config/cifar100/cifar100_imb{0005,001,002}_stage2_ce_H2T.yaml
STAGE2_COMMON = {'batch_size': 128, 'num_epochs': 10, 'momentum': 0.9, 'mixup': False, 'H2T': 0.25,
                 'shift_bn': True, 'lr_scheduler.type': 'cos', 'sampler.type': 'weighted sampler',
                 'sampler.weighted_sampler.type': 'balance', 'sampler.dual_sample.enable': True,
                 'sampler.dual_sample.type': 'long-tailed', 'loss.type': 'CrossEntropyLoss'}
AUTHORS_STAGE2 = {  # IF: lr, lr_scheduler.lr_factor, weight_decay
    200: {'lr': 0.2, 'lr_scheduler.lr_factor': 0.1, 'weight_decay': 2e-4},   # ..._imb0005_stage2_ce_H2T.yaml
    100: {'lr': 0.1, 'lr_scheduler.lr_factor': 0.2, 'weight_decay': 5e-4},   # ..._imb001_stage2_ce_H2T.yaml
    50: {'lr': 0.1, 'lr_scheduler.lr_factor': 0.2, 'weight_decay': 2e-4}}    # ..._imb002_stage2_ce_H2T.yaml
IMB = {200: '0005', 100: '001', 50: '002', 10: '01'}


def value(cfg, key):
    for part in key.split('.'):
        cfg = cfg[part]
    return list(cfg) if isinstance(cfg, (list, tuple)) else cfg


def assert_values(cfg, expected, name):
    got = {key: value(cfg, key) for key in expected}
    assert got == expected, name


@pytest.mark.parametrize('imb', [200, 100, 50])
def test_cifar100_ce_configs_carry_the_authors_values(imb):
    stage1 = config(f'cifar100_imb{IMB[imb]}_stage1_ce_mixup.yaml')
    assert_values(stage1, {**AUTHORS_STAGE1, 'imb_factor': 1 / imb, 'num_classes': 100}, 'stage 1')
    stage2 = config(f'cifar100_imb{IMB[imb]}_stage2_ce_H2T.yaml')
    assert_values(stage2, {**STAGE2_COMMON, **AUTHORS_STAGE2[imb], 'imb_factor': 1 / imb, 'num_classes': 100},
                  'stage 2')


@pytest.mark.parametrize('imb', [100, 50, 10])
def test_cifar10_ce_configs_carry_the_published_values(imb):
    """Stage 1: dvlab-research/MiSLAS config/cifar10/cifar10_imb{001,002,01}_stage1_mixup.yaml (lr 0.1, batch 128,
    weight decay 2e-4, 200 epochs, mixup alpha 1), the same values as the authors' CIFAR-100 files. Stage 2: the
    authors publish no CIFAR-10 CE + H2T file; the configs take their CIFAR-100 values of the same IF (IF 10:
    IF 50's), pinned here so that a change is deliberate."""
    stage1 = config(f'cifar10_imb{IMB[imb]}_stage1_ce_mixup.yaml')
    assert_values(stage1, {**AUTHORS_STAGE1, 'imb_factor': 1 / imb, 'num_classes': 10}, 'stage 1')
    stage2 = config(f'cifar10_imb{IMB[imb]}_stage2_ce_H2T.yaml')
    assert_values(stage2, {**STAGE2_COMMON, **AUTHORS_STAGE2[{100: 100, 50: 50, 10: 50}[imb]],
                           'imb_factor': 1 / imb, 'num_classes': 10}, 'stage 2')


# -- 6. many / medium / few -------------------------------------------------------------------------------
SPLITS = {100: ([0, 36], [36, 71], [71, 100]),  # the authors' (and MiSLAS's) CIFAR-100 ranges
          10: ([0, 3], [3, 7], [7, 10])}         # MiSLAS's CIFAR-10 ranges: 3 / 4 / 3 classes
COMMENT = re.compile(r'^(head|med|tail)_class_idx: \[(\d+), (\d+)\] +# (many|medium|few)-shot: classes (\d+)-(\d+), '
                     r'(\d+) to (\d+) training images$')


@pytest.mark.parametrize('path', CIFAR_CONFIGS, ids=os.path.basename)
def test_many_medium_few_ranges_are_pinned_and_their_comments_true(path):
    """Every CIFAR config has the fixed ranges, and each range's comment names its classes and the training images
    of its largest and smallest class at the config's own imb_factor (at IF 100 class 35 keeps 98 images, so
    'more than 100 images' is not the rule behind [0, 36))."""
    cfg = load_config(path)
    ranges = [list(cfg.head_class_idx), list(cfg.med_class_idx), list(cfg.tail_class_idx)]
    assert ranges == list(SPLITS[cfg.num_classes])
    counts = img_num_per_cls(50000 / cfg.num_classes, cfg.num_classes, cfg.imb_type, cfg.imb_factor)
    lines = [line for line in open(path).read().splitlines() if re.match(r'^(head|med|tail)_class_idx:', line)]
    assert len(lines) == 3
    for line, kind in zip(lines, ('many', 'medium', 'few')):
        m = COMMENT.match(line)
        assert m, f'{os.path.basename(path)}: {line!r} does not say which classes and images its range holds'
        start, end = int(m[2]), int(m[3])
        assert m[4] == kind and (int(m[5]), int(m[6])) == (start, end - 1), line
        assert (int(m[7]), int(m[8])) == (counts[start], counts[end - 1]), line


def test_at_if_100_the_ranges_are_not_a_count_rule():
    """The boundary classes at IF 100, by hand: n_c = int(500 * 0.01 ** (c / 99)) = int(500 * exp(-4.6052 c / 99)),
    98.2 / 93.6 / 19.3 / 18.4 for classes 35 / 36 / 70 / 71."""
    counts = img_num_per_cls(500, 100, 'exp', 0.01)
    assert (counts[35], counts[36], counts[70], counts[71]) == (98, 93, 19, 18)


# -- the authors' own YAML files -----------------------------------------------------------------------------
def fixture(name):
    return os.path.join(FIXTURES, name)


def flatten(node, prefix=''):
    for key, val in node.items():
        if isinstance(val, dict):
            yield from flatten(val, f'{prefix}{key}.')
        else:
            yield f'{prefix}{key}', val


LOADABLE = ['cifar100_imb0005_stage1_ce_mixup.yaml', 'cifar100_imb0005_stage2_ce_H2T.yaml',
            'cifar100_imb001_stage1_ce_mixup.yaml', 'cifar100_imb001_stage2_ce_H2T.yaml',
            'cifar100_imb002_stage1_ce_mixup.yaml', 'cifar100_imb002_stage2_ce_H2T.yaml']


@pytest.mark.parametrize('name', LOADABLE)
def test_the_authors_yaml_files_load_unchanged(name):
    """Each key of the authors' file reaches the config with its value. As yacs reads YAML for them too, a string
    that is a Python literal is that literal (`2e-4`, a string to YAML 1.1, is 0.0002; `dist_url: None` is None),
    and a YAML int where a float is due is the same number."""
    cfg = load_config(fixture(name))
    written = dict(flatten(yaml.safe_load(open(fixture(name)))))
    for key, val in written.items():
        if isinstance(val, str) and re.fullmatch(r'[0-9.]+e-?[0-9]+', val):
            val = float(val)
        if val == 'None':
            val = None
        assert value(cfg, key) == val, key
    assert cfg.mode == ('stage1' if 'stage1' in name else 'stage2')


def test_cos_true_is_refused_with_the_key_that_does_it(tmp_path):
    """Their IF-50 stage-1 file carries MiSLAS's `cos: False` (it loads, above); `cos True` would ask for a schedule
    this key does not switch here: one line naming the key that does."""
    code, _, err = run_main('train_stage1.py', '--cfg', fixture('cifar100_imb002_stage1_ce_mixup.yaml'),
                            'save_dir', tmp_path / 's', 'cos', 'True')
    assert_one_line_error(code, err, 'cos True')
    assert 'lr_scheduler.type cos' in err and not (tmp_path / 's').exists()


def test_the_authors_if100_files_train_both_stages(cifar100_root, tmp_path):
    """Their stage-1 file names `resume: 'current.pth.tar'`, which a fresh run has not: the user is told the
    checkpoint is missing, and `resume ''` (the documented override) trains; their stage-2 file then trains from
    that run's model_best."""
    tiny = ['data_path', cifar100_root, *TINY, 'num_epochs', '1']
    stage1 = fixture('cifar100_imb001_stage1_ce_mixup.yaml')
    code, _, err = run_main('train_stage1.py', '--cfg', stage1, 'save_dir', tmp_path / 'no', *tiny)
    assert_one_line_error(code, err, 'checkpoint current.pth.tar not found; check the path given to `resume`')
    assert not (tmp_path / 'no').exists()
    code, _, err = run_main('train_stage1.py', '--cfg', stage1, 'save_dir', tmp_path / 's1', *tiny, 'resume', '')
    assert code == 0, err[-2000:]
    best = f'{only_run(tmp_path / "s1")}/ckps/model_best.pth.tar'
    code, _, err = run_main('train_stage2.py', '--cfg', fixture('cifar100_imb001_stage2_ce_H2T.yaml'),
                            'save_dir', tmp_path / 's2', *tiny, 'resume', best)
    assert code == 0, err[-2000:]
    assert os.path.isfile(f'{only_run(tmp_path / "s2")}/summary.json')


def test_mixup_on_an_authors_stage2_file_without_alpha_is_one_line(tmp_path):
    """The authors' stage-2 files set `alpha: null` (mixup off); turning mixup on there names the missing alpha."""
    code, _, err = run_main('train_stage2.py', '--cfg', fixture('cifar100_imb001_stage2_ce_H2T.yaml'),
                            'save_dir', tmp_path / 's', 'mixup', 'True')
    assert_one_line_error(code, err, 'mixup True needs alpha')
    assert not (tmp_path / 's').exists()
