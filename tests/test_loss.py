"""loss.py against values worked out by hand on a 3-class example with 100 / 10 / 1 training images: each loss,
the mixup combination of every loss, fp32 under bf16 autocast, what a config's loss keys reach through
build_loss, and the config errors."""
import math
import os

import pytest
import torch

from conftest import STAGE1, STAGE2, assert_one_line_error, run_main
from loss import (CrossEntropyLoss, LabelAwareSmoothing, LDAMLoss, build_loss, class_balanced_weights,
                  smoothing_per_class)
from utils.config import load_config
from utils.engine import classification_loss

COUNTS = [100, 10, 1]
DEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])
# (1 - b) / (1 - b ** n) for b = 0.9999, scaled to sum to 3
CB_WEIGHTS = [0.0271587, 0.2703689, 2.7024724]
# -log softmax of the logits [2, 0, 0] at class 0, and of [0, 1, 0] at class 1
NLL_A, NLL_B = math.log(1 + 2 * math.exp(-2)), math.log(1 + 2 / math.e)


def test_class_balanced_weights_by_hand():
    assert class_balanced_weights(COUNTS).tolist() == pytest.approx(CB_WEIGHTS, rel=1e-5)


@pytest.mark.parametrize('device', DEVICES)
def test_cross_entropy_plain_and_class_balanced(device):
    logits = torch.tensor([[2.0, 0, 0], [0, 1, 0]], device=device)
    target = torch.tensor([0, 1], device=device)
    assert CrossEntropyLoss(COUNTS).to(device)(logits, target).item() == pytest.approx((NLL_A + NLL_B) / 2, rel=1e-5)
    weighted = (CB_WEIGHTS[0] * NLL_A + CB_WEIGHTS[1] * NLL_B) / (CB_WEIGHTS[0] + CB_WEIGHTS[1])
    reweighted = CrossEntropyLoss(COUNTS, reweight_CE=True).to(device)
    assert reweighted(logits, target).item() == pytest.approx(weighted, rel=1e-5)


@pytest.mark.parametrize('shape,power,middle', [('concave', None, 0.1426945), ('linear', None, 0.1272727),
                                                ('convex', None, 0.1030536), ('exp', 2, 0.1024793)])
def test_label_aware_smoothing_per_class(shape, power, middle):
    # r = (n - 1) / 99 = 1, 1/11, 0: head 0.4 at the largest class, tail 0.1 at the smallest
    assert smoothing_per_class(COUNTS, 0.4, 0.1, shape, power).tolist() == pytest.approx([0.4, middle, 0.1], rel=1e-5)


@pytest.mark.parametrize('device', DEVICES)
def test_label_aware_smoothing_loss_by_hand(device):
    las = LabelAwareSmoothing(COUNTS, 0.4, 0.1).to(device)
    logits = torch.tensor([[2.0, 0, 0]], device=device)
    # class 0 (the head, smoothing 0.4): 0.6 * NLL + 0.4 * mean over the classes of -log p
    uniform = (NLL_A + 2 * (2 + NLL_A)) / 3
    assert las(logits, torch.tensor([0], device=device)).item() == pytest.approx(0.6 * NLL_A + 0.4 * uniform, rel=1e-5)
    # class 2 (the tail, smoothing 0.1)
    nll = 2 + NLL_A
    assert las(logits, torch.tensor([2], device=device)).item() == pytest.approx(0.9 * nll + 0.1 * uniform, rel=1e-5)


@pytest.mark.parametrize('device', DEVICES)
def test_ldam_margins_and_deferred_reweighting_by_hand(device):
    ldam = LDAMLoss(COUNTS, max_m=0.5, s=30, reweight_epoch=1).to(device)
    # m_c proportional to n_c ** -1/4, the rarest class 0.5
    assert ldam.margins.tolist() == pytest.approx([0.5 / 100 ** 0.25, 0.5 / 10 ** 0.25, 0.5], rel=1e-5)
    logits = torch.tensor([[2.0, 0, 0], [2.0, 0, 0]], device=device)
    target = torch.tensor([2, 0], device=device)
    # class 2: its logit 0 - 30 * 0.5 = -15; class 0: 2 - 30 * 0.158114 = -2.743416
    loss_tail = 15 + math.log(math.exp(2) + 1 + math.exp(-15))
    m0 = 30 * 0.5 / 100 ** 0.25
    loss_head = m0 - 2 + math.log(math.exp(2 - m0) + 2)
    assert loss_tail == pytest.approx(17.126928, rel=1e-6) and loss_head == pytest.approx(3.468232, rel=1e-6)
    for epoch in (0, 1):  # DRW from the epoch after reweight_epoch (epochs from 0), as the authors
        ldam.before_epoch(epoch)
        assert ldam(logits, target).item() == pytest.approx((loss_tail + loss_head) / 2, rel=1e-5)
    ldam.before_epoch(2)
    weighted = (CB_WEIGHTS[2] * loss_tail + CB_WEIGHTS[0] * loss_head) / (CB_WEIGHTS[2] + CB_WEIGHTS[0])
    assert ldam(logits, target).item() == pytest.approx(weighted, rel=1e-5)
    never = LDAMLoss(COUNTS, reweight_epoch=-1).to(device)
    never.before_epoch(199)
    assert never(logits, target).item() == pytest.approx((loss_tail + loss_head) / 2, rel=1e-5)


def nll(logits, target):
    """-log softmax(logits)[target], in plain floats."""
    return math.log(sum(math.exp(z) for z in logits)) - logits[target]


def make_losses():
    """One of each loss, built afresh for each test (before_epoch and .to() change a loss in place)."""
    return {'CrossEntropyLoss': CrossEntropyLoss(COUNTS, reweight_CE=True),
            'LabelAwareSmoothing': LabelAwareSmoothing(COUNTS, 0.4, 0.1, 'convex'),
            'LDAMLoss': LDAMLoss(COUNTS, reweight_epoch=0)}


# the logits [2, 0, 0] and [0, 1, 0] with labels y = [0, 1] and their swap y[perm] = [1, 0], lam 0.3
MIX_LOGITS, MIX_Y, MIX_Y_PERM, LAM = [[2.0, 0, 0], [0, 1.0, 0]], [0, 1], [1, 0], 0.3


def hand_loss(name, logits, targets):
    """Each loss of make_losses() on a batch, worked out with `nll` from its definition."""
    if name == 'CrossEntropyLoss':  # class-balanced weights: a weighted mean
        w = [CB_WEIGHTS[t] for t in targets]
        return sum(wi * nll(z, t) for wi, z, t in zip(w, logits, targets)) / sum(w)
    if name == 'LabelAwareSmoothing':  # smoothing 0.4 / 0.1030536 (convex) / 0.1 of classes 0 / 1 / 2
        e = [0.4, 0.1030536, 0.1]
        return sum((1 - e[t]) * nll(z, t) + e[t] * sum(nll(z, c) for c in range(3)) / 3
                   for z, t in zip(logits, targets)) / len(targets)
    # LDAM, s 30, margins 0.5 * (1 / n) ** 1/4 over the largest, DRW weights on (reweight_epoch 0, epoch 1)
    m = [0.5 / 100 ** 0.25, 0.5 / 10 ** 0.25, 0.5]
    shifted = [[zc - 30 * m[t] * (c == t) for c, zc in enumerate(z)] for z, t in zip(logits, targets)]
    w = [CB_WEIGHTS[t] for t in targets]
    return sum(wi * nll(z, t) for wi, z, t in zip(w, shifted, targets)) / sum(w)


@pytest.mark.parametrize('name', ['CrossEntropyLoss', 'LabelAwareSmoothing', 'LDAMLoss'])
def test_mixup_composes_with_every_loss(name):
    """lam * loss(y) + (1 - lam) * loss(y[perm]) for each loss, against the values worked out by hand."""
    criterion = make_losses()[name]
    criterion.before_epoch(1)
    out = torch.tensor(MIX_LOGITS)
    y, y_perm = torch.tensor(MIX_Y), torch.tensor(MIX_Y_PERM)
    expected = LAM * hand_loss(name, MIX_LOGITS, MIX_Y) + (1 - LAM) * hand_loss(name, MIX_LOGITS, MIX_Y_PERM)
    assert classification_loss(criterion, out, y, (y, y_perm, LAM)).item() == pytest.approx(expected, rel=1e-5)
    assert criterion(out, y).item() == pytest.approx(hand_loss(name, MIX_LOGITS, MIX_Y), rel=1e-5)


@pytest.mark.parametrize('name', ['CrossEntropyLoss', 'LabelAwareSmoothing', 'LDAMLoss'])
@pytest.mark.parametrize('device', DEVICES)
def test_losses_are_fp32_under_bf16_autocast(name, device):
    """Under bf16 autocast a loss is computed in fp32: the value of the fp32 loss of the bf16-rounded logits."""
    criterion = make_losses()[name].to(device)
    logits = (torch.randn(6, 3, generator=torch.Generator().manual_seed(1)) * 3).to(device)
    target = torch.tensor([0, 1, 2, 0, 1, 2], device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        low = criterion(logits.bfloat16(), target)
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(criterion(logits.bfloat16().float(), target).item(), rel=1e-6)




@pytest.mark.parametrize('cfg,extra,message', [
    (STAGE1, ['loss.type', 'FocalLoss'], "loss.type 'FocalLoss' is unknown"),
    (STAGE2, ['loss.type', 'LabelAwareSmoothing', 'smooth_head', '1.0', 'smooth_tail', '0.1'],
     'smooth_head 1.0 must be'),
    (STAGE2, ['loss.type', 'LabelAwareSmoothing', 'smooth_head', '0.4'], 'smooth_tail None must be'),
    (STAGE2, ['loss.type', 'LabelAwareSmoothing', 'smooth_head', '0.4', 'smooth_tail', '-0.1'],
     'smooth_tail -0.1 must be'),
    (STAGE1, ['loss.type', 'LDAMLoss', 'loss.LDAM.s', '0'], 'loss.LDAM.s 0.0 must be positive'),
    (STAGE1, ['loss.type', 'LDAMLoss', 'loss.LDAM.reweight_epoch', '200'], 'loss.LDAM.reweight_epoch 200 is not below'),
])
def test_bad_loss_settings_stop_with_one_line(cfg, extra, message, tmp_path):
    script = 'train_stage1.py' if 'stage1' in cfg else 'train_stage2.py'
    code, _, err = run_main(script, '--cfg', cfg, 'save_dir', tmp_path / 's', *extra)
    assert_one_line_error(code, err, message)
    assert not os.path.exists(tmp_path / 's')


def test_use_norm_classifier_gives_s_times_the_cosine():
    from models import Classifier
    head = Classifier(4, 3, use_norm=True, s=30)
    x = torch.randn(5, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    pooled = x.mean(dim=(2, 3))
    w = head.fc.weight.detach()
    cosine = torch.stack([torch.stack([torch.dot(p, w[:, c]) / (p.norm() * w[:, c].norm()) for c in range(3)])
                          for p in pooled])
    torch.testing.assert_close(head(x).detach(), 30 * cosine, rtol=1e-5, atol=1e-5)
    assert Classifier(4, 3).fc.weight.shape == (3, 4) and 'fc.bias' not in head.state_dict()


def test_ldam_drw_stage1_then_las_stage2_end_to_end(cifar10_root, tmp_path):
    common = ['data_path', cifar10_root, 'save_dir', tmp_path, 'num_epochs', '1', 'batch_size', '16',
              'eval_batch_size', '64', 'imb_factor', '0.1', 'compile', 'False']
    ldam = ['loss.type', 'LDAMLoss', 'loss.LDAM.reweight_epoch', '0', 'use_norm', 'True', 'mixup', 'False']
    code, _, err = run_main('train_stage1.py', '--cfg', STAGE1, *common, *ldam, 'name', 'ldam')
    assert code == 0, err[-2000:]
    ckpt = next(p for p in (tmp_path.glob('ldam_*/ckps/model_best.pth.tar')))
    assert torch.load(ckpt, weights_only=True)['state_dict_classifier']['fc.weight'].shape == (64, 10)
    # stage 2 keeps the cosine head; a linear head does not fit it: one line, nothing written
    las = ['loss.type', 'LabelAwareSmoothing', 'smooth_head', '0.3', 'smooth_tail', '0.0', 'resume', ckpt]
    code, _, err = run_main('train_stage2.py', '--cfg', STAGE2, *common, *las, 'use_norm', 'True', 'name', 'las')
    assert code == 0, err[-2000:]
    assert list(tmp_path.glob('las_*/summary.json'))
    code, _, err = run_main('train_stage2.py', '--cfg', STAGE2, *common, *las, 'name', 'linear')
    line = assert_one_line_error(code, err, 'does not fit the classifier')
    assert 'use_norm False' in line and not list(tmp_path.glob('linear_*'))


# -- build_loss: what each config's loss keys reach ------------------------------------------------------
def loss_from_config(config, *overrides):
    cfg = load_config(config, [str(o) for o in overrides])
    return build_loss(cfg, COUNTS)


def test_config_las_smoothing_runs_from_smooth_head_at_the_largest_class_to_smooth_tail():
    las = loss_from_config(STAGE2, 'loss.type', 'LabelAwareSmoothing', 'smooth_head', 0.4, 'smooth_tail', 0.1,
                           'loss.LAS.shape', 'linear')
    logits = [2.0, 0, 0]
    uniform = sum(nll(logits, c) for c in range(3)) / 3
    # classes of 100 / 10 / 1 images: smoothing 0.4, 0.1 + 0.3 * 9 / 99 (linear), 0.1
    for target, e in ((0, 0.4), (1, 0.1 + 0.3 * 9 / 99), (2, 0.1)):
        got = las(torch.tensor([logits]), torch.tensor([target])).item()
        assert got == pytest.approx((1 - e) * nll(logits, target) + e * uniform, rel=1e-5), target


def test_config_ldam_margin_scale_and_drw_epoch_reach_the_loss():
    ldam = loss_from_config(STAGE1, 'loss.type', 'LDAMLoss', 'loss.LDAM.max_m', 0.3, 'loss.LDAM.s', 20,
                            'loss.LDAM.reweight_epoch', 5, 'use_norm', True)
    logits = torch.tensor([[2.0, 0, 0], [2.0, 0, 0]])
    target = torch.tensor([2, 0])
    # the rarest class (1 image) takes the margin 0.3, the largest (100) 0.3 / 100 ** 1/4; logits scaled by s 20
    tail = nll([2.0, 0, 0 - 20 * 0.3], 2)
    head = nll([2.0 - 20 * 0.3 / 100 ** 0.25, 0, 0], 0)
    ldam.before_epoch(5)
    assert ldam(logits, target).item() == pytest.approx((tail + head) / 2, rel=1e-5)
    ldam.before_epoch(6)  # DRW: the class-balanced weights from the epoch after reweight_epoch
    expected = (CB_WEIGHTS[2] * tail + CB_WEIGHTS[0] * head) / (CB_WEIGHTS[2] + CB_WEIGHTS[0])
    assert ldam(logits, target).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize('reweight', [False, True])
def test_config_cross_entropy_with_and_without_class_balanced_weights(reweight):
    ce = loss_from_config(STAGE1, 'loss.CE.reweight_CE', reweight)
    logits, target = [[2.0, 0, 0], [0, 1.0, 0]], [0, 1]
    w = CB_WEIGHTS[:2] if reweight else [1.0, 1.0]
    expected = (w[0] * nll(logits[0], 0) + w[1] * nll(logits[1], 1)) / (w[0] + w[1])
    assert ce(torch.tensor(logits), torch.tensor(target)).item() == pytest.approx(expected, rel=1e-5)
