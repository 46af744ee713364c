"""LR schedules and what each stage's step does to the model: stage 2's frozen backbone, BN statistics and labels,
stage 1's mixup, and the compiled step."""
import glob
import math
import os

import numpy as np
import pytest
import torch
from torch.nn.functional import cross_entropy

from conftest import ROOT, STAGE1, STAGE2, make_stage_optimizer, one_train_epoch, one_train_step, stage_loss
from models import Classifier, ResNet_fe, build_model, resnet32_fe
from utils.config import get_default_config, head_scale, load_config
from utils.engine import learning_rate
from utils.runtime import compile_in_place


CIFAR_CONFIGS = sorted(glob.glob(os.path.join(ROOT, 'config', 'cifar*', '*.yaml')))


@pytest.mark.parametrize('path', CIFAR_CONFIGS, ids=os.path.basename)
def test_the_optimizer_takes_every_setting_from_the_config(path):
    """SGD with the config's weight decay, momentum and Nesterov switch, over exactly what the stage trains."""
    for overrides in ([], ['weight_decay', '3.3e-4', 'momentum', '0.77', 'nesterov', 'True']):
        cfg = load_config(path, overrides)
        backbone, classifier = build_model(cfg, head_scale(cfg))
        optimizer = make_stage_optimizer(backbone, classifier, cfg)
        assert isinstance(optimizer, torch.optim.SGD)
        for group in optimizer.param_groups:
            assert (group['weight_decay'], group['momentum'], group['nesterov']) == \
                (cfg.weight_decay, cfg.momentum, cfg.nesterov)
        trained = [classifier] + ([backbone] if cfg.mode == 'stage1' else [])
        expected = {id(p) for m in trained for p in m.parameters()}
        assert {id(p) for g in optimizer.param_groups for p in g['params']} == expected
        assert sum(len(g['params']) for g in optimizer.param_groups) == len(expected)
        assert all(not p.requires_grad for p in backbone.parameters()) == (cfg.mode == 'stage2')


def test_stage1_warmup_then_steps():
    cfg = get_default_config()  # lr 0.1, warm-up 5, milestones 160/180
    lrs = [learning_rate(cfg, e) for e in range(200)]  # epoch counted from 0
    assert lrs[:5] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1])
    assert lrs[5] == lrs[159] == pytest.approx(0.1)
    assert lrs[160] == lrs[179] == pytest.approx(0.01)  # epoch 161 (from 1) is after 160
    assert lrs[180] == lrs[199] == pytest.approx(0.001)


def test_stage2_cosine_times_lr_factor():
    cfg = get_default_config()
    cfg.lr_scheduler.type, cfg.lr_scheduler.lr_factor, cfg.lr, cfg.num_epochs = 'cos', 0.2, 0.1, 10
    lrs = [learning_rate(cfg, e) for e in range(10)]
    assert lrs[0] == pytest.approx(0.02)
    assert lrs[5] == pytest.approx(0.01)
    assert lrs == pytest.approx([0.2 * 0.5 * 0.1 * (1 + math.cos(math.pi * e / 10)) for e in range(10)])


class DualBatches:
    def __init__(self, steps=3, batch=16, num_classes=10):
        g = torch.Generator().manual_seed(0)
        self.batches = [(torch.randn(batch, 3, 32, 32, generator=g), torch.randint(num_classes, (batch,), generator=g),
                         torch.randn(batch, 3, 32, 32, generator=g) * 2 + 1,
                         torch.randint(num_classes, (batch,), generator=g))
                        for _ in range(steps)]

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def stage2_cfg(shift_bn, rho=0.25):
    cfg = get_default_config()
    cfg.mode, cfg.shift_bn, cfg.H2T, cfg.mixup, cfg.lr_scheduler.type = 'stage2', shift_bn, rho, False, 'cos'
    return cfg


def run_stage2(shift_bn):
    """Three steps of stage 2 (an epoch of DualBatches) on the model and optimizer the script builds."""
    torch.manual_seed(0)
    cfg = load_config(STAGE2, ['shift_bn', str(shift_bn)])
    backbone, classifier = build_model(cfg, head_scale(cfg))
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    fc_before = classifier.fc.weight.clone()
    optimizer = make_stage_optimizer(backbone, classifier, cfg)
    # what stage 2 optimises: the classifier's parameters, nothing of the (frozen) backbone
    assert {id(p) for g in optimizer.param_groups for p in g['params']} == {id(p) for p in classifier.parameters()}
    assert not any(p.requires_grad for p in backbone.parameters())
    one_train_epoch(backbone, classifier, DualBatches(), optimizer, cfg, cross_entropy)
    after = backbone.state_dict()
    return before, after, fc_before, classifier.fc.weight


@pytest.mark.parametrize('shift_bn', [True, False])
def test_stage2_changes_no_backbone_weight_but_trains_the_classifier(shift_bn):
    before, after, fc_before, fc_after = run_stage2(shift_bn)
    learned = [k for k in before if not k.endswith(('running_mean', 'running_var', 'num_batches_tracked'))]
    assert all(torch.equal(before[k], after[k]) for k in learned)
    assert not torch.equal(fc_before, fc_after)


def test_shift_bn_updates_running_statistics_only_when_set():
    before, after, _, _ = run_stage2(True)
    assert not torch.equal(before['layer3.4.bn2.running_mean'], after['layer3.4.bn2.running_mean'])
    assert after['bn1.num_batches_tracked'] == before['bn1.num_batches_tracked'] + 6  # 3 steps x 2 branches
    before, after, _, _ = run_stage2(False)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize('shift_bn', [True, False])
def test_stage2_labels_come_from_the_fused_branch(shift_bn):
    torch.manual_seed(0)
    backbone, classifier = resnet32_fe().train(shift_bn), Classifier(64, 10)
    x1, y1, x2, y2 = DualBatches(steps=1).batches[0]
    loss, _, y = stage_loss(backbone, classifier, (x1, y1, x2, y2), stage2_cfg(shift_bn, rho=0.0), cross_entropy)
    assert torch.equal(y, y1)
    with torch.no_grad():
        expected = cross_entropy(classifier(backbone(x1)), y1)
    assert torch.allclose(loss, expected, atol=1e-5)


def test_one_pass_equals_two_passes_in_eval_mode():
    """stage2_loss concatenates the branches only when BN is in eval mode; there it is exact."""
    torch.manual_seed(0)
    backbone = resnet32_fe().eval()
    x1, _, x2, _ = DualBatches(steps=1).batches[0]
    with torch.no_grad():
        joint = backbone(torch.cat([x1, x2]))
        assert torch.allclose(joint[:16], backbone(x1), atol=1e-5)
        assert torch.allclose(joint[16:], backbone(x2), atol=1e-5)
        backbone.train()
        assert not torch.allclose(backbone(torch.cat([x1, x2]))[:16], backbone(x1), atol=1e-3)


@pytest.mark.slow
def test_compiled_stage1_step_matches_eager():
    """The stage-1 configs compile the model: two CE + mixup steps of the compiled model give the
    eager steps' loss, logits, weights and BN running statistics. The net is ResNet-32's blocks, one a
    stage (identity and downsampling shortcuts, 8 layers): what compiling changes is per block, and a
    cold compile of all 15 blocks cost CI minutes. In float64, so that what is left is rounding: at
    initialisation ResNet-32 turns fp32 rounding into 1% gradient differences, between eager NCHW and
    eager channels_last as much as between eager and compiled."""
    cfg = get_default_config()
    x = torch.randn(16, 3, 32, 32, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    y = torch.arange(16) % 10
    results = {}
    for name in ('eager', 'compiled'):
        torch.manual_seed(0)
        backbone = ResNet_fe(1).double().to(memory_format=torch.channels_last).train()
        classifier = Classifier(64, 10).double().train()
        if name == 'compiled':
            compile_in_place(backbone, classifier)  # as the training scripts compile
        optimizer = make_stage_optimizer(backbone, classifier, cfg)
        torch.manual_seed(1)  # the same mixup lam and permutation
        np.random.seed(1)
        losses = [one_train_step(backbone, classifier, (x, y), optimizer, cfg, cross_entropy)[:2]
                  for _ in range(2)]  # the second step reuses the compiled graph, with momentum
        results[name] = (losses, backbone.state_dict(), classifier.state_dict())
    (steps_e, bb_e, cl_e), (steps_c, bb_c, cl_c) = results['eager'], results['compiled']
    for (loss_e, out_e), (loss_c, out_c) in zip(steps_e, steps_c):
        assert torch.isfinite(loss_e) and loss_c.item() == pytest.approx(loss_e.item(), rel=1e-9)
        torch.testing.assert_close(out_c, out_e, rtol=1e-7, atol=1e-9)
    assert bb_c.keys() == bb_e.keys()  # checkpoints keep the plain parameter names
    for key in bb_e:
        torch.testing.assert_close(bb_c[key], bb_e[key], rtol=1e-7, atol=1e-9, msg=key)
    torch.testing.assert_close(cl_c['fc.weight'], cl_e['fc.weight'], rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize('alpha', [0.2, 1.0])
def test_stage1_mixes_with_the_configs_alpha_in_the_authors_order(alpha):
    """One stage-1 batch against the authors' order: lam ~ Beta(alpha, alpha) from numpy, then torch.randperm,
    x = lam x + (1 - lam) x[perm] through backbone and classifier, lam CE(y) + (1 - lam) CE(y[perm])."""
    cfg = load_config(STAGE1, ['alpha', str(alpha)])
    torch.manual_seed(0)
    backbone, classifier = build_model(cfg, head_scale(cfg))
    x, y = DualBatches(steps=1).batches[0][:2]
    np.random.seed(3)
    torch.manual_seed(3)
    loss, _, labels = stage_loss(backbone, classifier, (x, y), cfg, cross_entropy)
    np.random.seed(3)
    torch.manual_seed(3)
    lam = np.random.beta(alpha, alpha)
    perm = torch.randperm(len(y))
    with torch.no_grad():
        out = classifier(backbone(lam * x + (1 - lam) * x[perm]))
    expected = lam * cross_entropy(out, y) + (1 - lam) * cross_entropy(out, y[perm])
    assert 0.01 < lam < 0.99 and torch.equal(labels, y)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # mixup False: plain CE of the batch itself
    cfg = load_config(STAGE1, ['mixup', 'False'])
    plain, _, _ = stage_loss(backbone, classifier, (x, y), cfg, cross_entropy)
    with torch.no_grad():
        assert plain.item() == pytest.approx(cross_entropy(classifier(backbone(x)), y).item(), rel=1e-5)
    assert abs(plain.item() - loss.item()) > 1e-3
