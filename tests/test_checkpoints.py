"""Checkpoints: written atomically, read without running pickled code, the authors' files and the committed
model zoo loading into the model a config builds."""
import glob
import json
import os
import re

import numpy as np
import pytest
import torch

from conftest import ROOT, STAGE1, assert_one_line_error, run_main
from models import build_model
from common.checkpoint import load_checkpoint, load_weights, save_checkpoint
from utils.config import head_scale, load_config
from common.errors import UserError


def test_a_killed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = str(tmp_path / 'current.pth.tar')
    save_checkpoint({'epoch': 1, 'state_dict_model': {'w': torch.ones(3)}, 'state_dict_classifier': {}}, path)

    def dies_halfway(obj, f, *a, **kw):
        with open(f, 'wb') as fh:
            fh.write(b'PK\x03\x04 half a zip')
        raise KeyboardInterrupt  # the process is killed in the middle of writing
    monkeypatch.setattr(torch, 'save', dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({'epoch': 2, 'state_dict_model': {}, 'state_dict_classifier': {}}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)['epoch'] == 1


class Payload:
    def __reduce__(self):
        return (os.system, (f'touch {MARKER}',))


MARKER = ''


def test_a_checkpoint_carrying_code_is_refused_without_running_it(tmp_path):
    global MARKER
    MARKER = str(tmp_path / 'pwned')
    path = tmp_path / 'evil.pth.tar'
    torch.save({'epoch': 1, 'state_dict_model': {}, 'state_dict_classifier': {}, 'extra': Payload()}, path)
    with pytest.raises(UserError, match='holds objects other than tensors'):
        load_checkpoint(str(path))
    assert not os.path.exists(MARKER)
    # the same through eval.py: exit 2, one line, nothing run
    code, _, err = run_main('eval.py', '--cfg', STAGE1, 'resume', path)
    assert_one_line_error(code, err, 'holds objects other than tensors')
    assert not os.path.exists(MARKER)


def bn(name, channels):
    return {f'{name}.weight': [channels], f'{name}.bias': [channels], f'{name}.running_mean': [channels],
            f'{name}.running_var': [channels], f'{name}.num_batches_tracked': []}


# The state_dict of the authors' CIFAR ResNet-32 feature extractor and classifier, written out from their
# models/resnet_cifar.py (Keke921/H2T: `resnet32_fe` = ResNet_fe(BasicBlock, [5, 5, 5]), `Classifier` = fc with
# a bias; the option-A shortcut has no weights), with each tensor's shape, as their checkpoints hold them.
AUTHORS_BACKBONE = {'conv1.weight': [16, 3, 3, 3], **bn('bn1', 16)}
for layer, (planes, first_in) in enumerate([(16, 16), (32, 16), (64, 32)], start=1):
    for block in range(5):
        name = f'layer{layer}.{block}'
        AUTHORS_BACKBONE.update({f'{name}.conv1.weight': [planes, first_in if block == 0 else planes, 3, 3],
                                 **bn(f'{name}.bn1', planes),
                                 f'{name}.conv2.weight': [planes, planes, 3, 3], **bn(f'{name}.bn2', planes)})
AUTHORS_CLASSIFIER = {'fc.weight': [100, 64], 'fc.bias': [100]}


def test_the_authors_checkpoint_loads_into_the_model_of_their_config(tmp_path):
    """A file as the authors' train_stage1.py saves it (DataParallel's `module.` prefix, best_acc1 a tensor,
    its_ece a numpy float) loads through load_checkpoint and load_weights into the CIFAR-100 model, every
    tensor where their name puts it."""
    assert len(AUTHORS_BACKBONE) == 6 + 15 * 12  # conv1, bn1 (5 tensors); 15 blocks of 2 convs and 2 BNs
    g = torch.Generator().manual_seed(0)

    def tensors(shapes):
        return {f'module.{k}': torch.randint(0, 100, (), generator=g) if k.endswith('num_batches_tracked')
                else torch.randn(shape, generator=g) for k, shape in shapes.items()}
    theirs = {'epoch': 200, 'best_acc1': torch.tensor(39.5), 'its_ece': np.float64(0.12),
              'state_dict_model': tensors(AUTHORS_BACKBONE), 'state_dict_classifier': tensors(AUTHORS_CLASSIFIER)}
    path = str(tmp_path / 'authors.pth.tar')
    torch.save(theirs, path)
    ckpt = load_checkpoint(path)
    assert ckpt['its_ece'] == pytest.approx(0.12) and ckpt['best_acc1'].item() == pytest.approx(39.5)
    cfg = load_config(os.path.join(ROOT, 'config/cifar100/cifar100_imb001_stage1_ce_mixup.yaml'))
    backbone, classifier = build_model(cfg, head_scale(cfg))
    load_weights(backbone, ckpt['state_dict_model'], path, 'backbone', cfg)
    load_weights(classifier, ckpt['state_dict_classifier'], path, 'classifier', cfg)
    for module, part in ((backbone, 'state_dict_model'), (classifier, 'state_dict_classifier')):
        loaded = module.state_dict()
        assert sorted(loaded) == sorted(k.removeprefix('module.') for k in theirs[part])
        for key, value in theirs[part].items():
            assert torch.equal(loaded[key.removeprefix('module.')], value), key


ZOO = sorted(glob.glob(os.path.join(ROOT, 'results', '*', 'weights', '*.pth.tar')))


@pytest.mark.parametrize('path', ZOO, ids=[os.path.basename(p) for p in ZOO])
def test_committed_model_zoo_loads_into_the_model_of_its_config(path):
    """Each committed weights file fits the model its config builds, and its eval.json is of that file."""
    table = os.path.basename(os.path.dirname(os.path.dirname(path)))  # e.g. cifar100_imb001[_ldam_drw]
    dataset, imbalance = table.split('_')[:2]
    stage = re.sub(r'(_rho[0-9.]+)?_(best|last)\.pth\.tar$', '', os.path.basename(path))
    cfg_file = os.path.join(ROOT, 'config', dataset, f'{dataset}_{imbalance}_{stage}.yaml')
    cfg = load_config(cfg_file)
    backbone, classifier = build_model(cfg, head_scale(cfg))
    ckpt = load_checkpoint(path)
    load_weights(backbone, ckpt['state_dict_model'], path, 'backbone', cfg)
    load_weights(classifier, ckpt['state_dict_classifier'], path, 'classifier', cfg)
    evaluated = json.load(open(path.replace('.pth.tar', '.eval.json')))
    assert evaluated['checkpoint_epoch'] == ckpt['epoch']
    # weights only: under 2 MB for one network, under 3 MiB (fp16) for a three-expert one
    assert os.path.getsize(path) < (3 * 2 ** 20 if cfg.num_experts > 1 else 2e6)
