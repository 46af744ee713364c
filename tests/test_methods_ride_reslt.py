"""RIDE (multi-expert ResNet-32, diversity loss) and ResLT (head/medium/tail branches, its loss): shapes,
the losses against values worked out by hand, H2T on the experts, both stages end to end, bad settings."""
import glob
import logging
import math
import os

import pytest
import torch
from torch.nn.functional import cross_entropy

import eval as eval_script
import train_stage1
import train_stage2
from conftest import ROOT, args, only_run, run_script
from loss import ResLoss, RIDELoss, build_loss
from methods import H2T
from models import ExpertClassifier, ResClassifier, build_model, resnet32_ride_fe
from utils.config import get_default_config, head_scale, load_config
from utils.engine import STAGE2, final_logits
from common.errors import UserError
from utils.setup import Experiment

CPU = torch.device('cpu')
CIFAR10 = os.path.join(ROOT, 'config/cifar10/cifar10_imb001')


# -- shapes ----------------------------------------------------------------------------------------
@pytest.mark.parametrize('reduce_dimension, width', [(True, 48), (False, 64)])
def test_ride_backbone_returns_one_map_per_expert_with_rides_widths(reduce_dimension, width):
    backbone = resnet32_ride_fe(num_experts=3, reduce_dimension=reduce_dimension).eval()
    maps = backbone(torch.randn(2, 3, 32, 32))
    assert len(maps) == 3 and all(m.shape == (2, width, 8, 8) for m in maps)
    assert backbone.out_channels == width
    names = backbone.state_dict().keys()
    assert 'layer1.0.conv1.weight' in names  # one shared layer1 ...
    assert {'layer2s.2.0.conv1.weight', 'layer3s.2.4.conv2.weight'} <= set(names)  # ... layer2 and layer3 per expert
    assert backbone.layer2s[0][0].conv1.weight.shape[0] == (24 if reduce_dimension else 32)


def test_ride_experts_share_only_the_early_layers():
    torch.manual_seed(0)
    backbone = resnet32_ride_fe(num_experts=3).eval()
    x = torch.randn(2, 3, 32, 32)
    before = backbone(x)
    with torch.no_grad():
        backbone.layer3s[1][4].conv2.weight.mul_(2)
    after = backbone(x)
    assert torch.equal(before[0], after[0]) and torch.equal(before[2], after[2])
    assert not torch.equal(before[1], after[1])
    with torch.no_grad():
        backbone.layer1[0].conv1.weight.mul_(2)  # the shared stage moves every expert
    assert all(not torch.equal(a, b) for a, b in zip(after, backbone(x)))


def test_expert_classifier_gives_each_expert_its_own_scaled_cosine_logits():
    torch.manual_seed(0)
    head = ExpertClassifier(48, 10, num_experts=3, use_norm=True, s=30.0)
    maps = [torch.randn(4, 48, 8, 8) for _ in range(3)]
    out = head(maps)
    assert out.shape == (4, 3, 10)
    for e in range(3):
        pooled = maps[e].mean(dim=(2, 3))
        w = head.linears[e].weight
        cosine = (pooled / pooled.norm(dim=1, keepdim=True)) @ (w / w.norm(dim=0, keepdim=True))
        assert torch.allclose(out[:, e], 30 * cosine, atol=1e-5)
    assert torch.allclose(final_logits(head, out), out.sum(dim=1) / 3)


def test_res_classifier_gives_three_branches_averaged_over_experts_and_sums_them():
    torch.manual_seed(0)
    head = ResClassifier(64, 10, num_experts=2).eval()
    with torch.no_grad():
        for bn, shift in ((head.BNH, 0.0), (head.BNM, 1.0), (head.BNT, -2.0)):
            bn.bias.fill_(shift)
    maps = [torch.randn(4, 64, 8, 8) for _ in range(2)]
    out = head(maps)
    assert out.shape == (4, 3, 10)
    expected = []
    for b, shift in enumerate((0.0, 1.0, -2.0)):
        per_expert = []
        for e in range(2):
            # eval-mode BN with fresh statistics: x / sqrt(1 + eps) * 1 + shift, then pool and the expert's linear
            pooled = maps[e].mean(dim=(2, 3)) / math.sqrt(1 + 1e-5) + shift
            per_expert.append(pooled @ head.linear[e].weight.T + head.linear[e].bias)
        expected.append((per_expert[0] + per_expert[1]) / 2)
        assert torch.allclose(out[:, b], expected[b], atol=1e-5)
    assert torch.allclose(final_logits(head, out), expected[0] + expected[1] + expected[2], atol=1e-5)
    assert head(maps[0]).shape == (4, 3, 10)  # a single-map backbone (ResLT's own CIFAR model) works too


def test_build_model_pairs_backbones_and_heads_from_the_config():
    cfg = load_config(f'{CIFAR10}_stage1_ride.yaml')
    backbone, classifier = build_model(cfg, head_scale(cfg))
    assert isinstance(classifier, ExpertClassifier) and len(classifier.linears) == 3 and classifier.scale == 30.0
    assert backbone.out_channels == 48
    cfg = load_config(f'{CIFAR10}_stage1_reslt.yaml')
    backbone, classifier = build_model(cfg, head_scale(cfg))
    assert isinstance(classifier, ResClassifier) and len(classifier.linear) == 3 and backbone.out_channels == 64


# -- the losses against hand-worked values ----------------------------------------------------------
def log_softmax(z, i, t=1.0):
    return z[i] / t - math.log(sum(math.exp(v / t) for v in z))


def softmax(z, t=1.0):
    total = sum(math.exp(v / t) for v in z)
    return [math.exp(v / t) / total for v in z]


def kl(p, log_q):
    return sum(pi * (math.log(pi) - lq) for pi, lq in zip(p, log_q))


# two classes of 4 and 1 images: LDAM margins 0.5 * (1/4)^(1/4) / 1 = 0.5/sqrt(2) and 0.5 (s = 1 below)
COUNTS = [4, 1]
MARGIN = [0.5 / math.sqrt(2), 0.5]
EXPERTS = [[[1.0, 0.0], [0.0, 1.0]],   # sample 0 (class 0): expert 1, expert 2
           [[2.0, 0.0], [0.5, 0.5]]]   # sample 1 (class 1)
TARGETS = [0, 1]
REWEIGHT_FACTOR = 0.5  # RIDE's 0.05 moves the temperatures too little to show in a test


def ride_by_hand(drw):
    if drw:
        raw = [(1 - 0.9999) / (1 - 0.9999 ** n) for n in COUNTS]
        class_weight = [w / sum(raw) * 2 for w in raw]
        shares = [n / sum(COUNTS) for n in COUNTS]
        t_raw = [2 * p * REWEIGHT_FACTOR + 1 - REWEIGHT_FACTOR for p in shares]
        temperature = [t / max(t_raw) for t in t_raw]
    else:
        class_weight, temperature = [1.0, 1.0], [1.0, 1.0]
    t_mean = sum(temperature) / 2
    total = 0.0
    for e in range(2):
        ce = []
        for i, y in enumerate(TARGETS):
            z = list(EXPERTS[i][e])
            z[y] -= MARGIN[y]
            ce.append(-log_softmax(z, y))
        total += sum(class_weight[y] * c for y, c in zip(TARGETS, ce)) / sum(class_weight[y] for y in TARGETS)
        kls = []
        for i in range(2):
            mean = [(EXPERTS[i][0][c] + EXPERTS[i][1][c]) / 2 for c in range(2)]
            p = softmax([m / t for m, t in zip(mean, temperature)])
            scaled = [v / t for v, t in zip(EXPERTS[i][e], temperature)]
            kls.append(kl(p, [log_softmax(scaled, c) for c in range(2)]))
        total += -0.2 * t_mean ** 2 * sum(kls) / 2
    return total


@pytest.mark.parametrize('epoch, drw', [(0, False), (1, True)])
def test_ride_loss_matches_a_hand_computation(epoch, drw):
    loss = RIDELoss(COUNTS, base_loss_factor=1.0, additional_diversity_factor=-0.2, base_diversity_temperature=1.0,
                    reweight_factor=REWEIGHT_FACTOR, max_m=0.5, s=1.0, reweight_epoch=0)
    loss.before_epoch(epoch)  # DRW (class weights, per-class temperature) from the epoch after reweight_epoch
    value = loss(torch.tensor(EXPERTS), torch.tensor(TARGETS))
    assert value.item() == pytest.approx(ride_by_hand(drw), rel=1e-5)


def test_ride_loss_of_identical_experts_is_their_ldam_loss_and_without_diversity_each_learns_the_mean():
    loss = RIDELoss([10, 10], additional_diversity_factor=-0.2, s=1.0)
    loss.before_epoch(0)
    same = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    apart = torch.tensor([[[2.0, 0.0], [0.0, 0.0]]])  # the same mean [1, 0]
    margin = 0.5
    ce_same = -log_softmax([1.0 - margin, 0.0], 0)
    assert loss(same, torch.tensor([0])).item() == pytest.approx(2 * ce_same, rel=1e-6)
    assert RIDELoss([10, 10], additional_diversity_factor=0.0, s=1.0)(apart, torch.tensor([0])).item() == \
        pytest.approx(2 * ce_same, rel=1e-6)  # no diversity term: RIDE trains every expert on the mean


def test_ride_loss_without_the_experts_logits_is_cross_entropy_of_their_mean():
    # the authors' stage 2 (loss.add_extra_info False): no margins, no diversity term, no DRW weights
    loss = RIDELoss(COUNTS, additional_diversity_factor=-0.2, reweight_factor=REWEIGHT_FACTOR, max_m=0.5, s=1.0,
                    reweight_epoch=0, expert_terms=False)
    loss.before_epoch(1)
    means = [[(EXPERTS[i][0][c] + EXPERTS[i][1][c]) / 2 for c in range(2)] for i in range(2)]
    by_hand = sum(-log_softmax(means[i], y) for i, y in enumerate(TARGETS)) / 2
    assert loss(torch.tensor(EXPERTS), torch.tensor(TARGETS)).item() == pytest.approx(by_hand, rel=1e-6)
    assert by_hand != pytest.approx(ride_by_hand(drw=True), rel=1e-2)


@pytest.mark.parametrize('config, expert_terms', [('stage1_ride', True), ('stage2_ride_H2T', False)])
def test_add_extra_info_picks_rides_loss_in_stage_1_and_the_authors_ce_of_the_mean_in_stage_2(config, expert_terms):
    cfg = load_config(f'{CIFAR10}_{config}.yaml')
    loss = build_loss(cfg, [5000, 500, 50, 50, 50, 50, 50, 50, 50, 50])
    assert loss.expert_terms is expert_terms
    flipped = load_config(f'{CIFAR10}_{config}.yaml', ['loss.add_extra_info', str(not expert_terms)])
    assert build_loss(flipped, [10] * 10).expert_terms is not expert_terms


def test_res_loss_matches_a_hand_computation():
    logits = [[[2.0, 0.0, 1.0], [0.5, 0.5, 0.0], [0.0, 1.0, -1.0]],   # sample 0, class 0: head branch only
              [[0.0, 1.0, 0.5], [1.0, 0.0, 2.0], [-0.5, 0.0, 1.5]]]   # sample 1, class 2: all three branches
    targets = [0, 2]
    beta = 0.3
    members = [[1], [1, 1, 1]]  # branch_starts [1, 2]: medium learns classes 1.., tail class 2
    individual = sum(-log_softmax(logits[i][b], targets[i]) for i in range(2) for b in range(len(members[i])))
    individual /= 4
    fused = sum(-log_softmax([sum(logits[i][b][c] for b in range(3)) for c in range(3)], targets[i])
                for i in range(2)) / 2
    loss = ResLoss(3, [1, 2], beta)(torch.tensor(logits), torch.tensor(targets))
    assert loss.item() == pytest.approx((1 - beta) * fused + beta * individual, rel=1e-6)


# -- H2T on the experts ----------------------------------------------------------------------------
def test_h2t_fuses_each_expert_with_its_own_channel_draw():
    torch.manual_seed(0)
    x1 = [torch.zeros(4, 64, 2, 2) for _ in range(3)]
    x2 = [torch.ones(4, 64, 2, 2) * (e + 1) for e in range(3)]
    fused = H2T(x1, x2, 0.25)
    draws = []
    for e, f in enumerate(fused):
        channels = (f[0, :, 0, 0] != 0).nonzero().flatten().tolist()
        assert len(channels) == 16 and torch.all(f[:, channels] == e + 1)  # each from its own expert's map
        draws.append(tuple(channels))
    assert len(set(draws)) == 3


def test_stage2_step_fuses_every_experts_map_as_two_separate_passes_would():
    torch.manual_seed(0)
    backbone, head = resnet32_ride_fe(3, True).eval(), ExpertClassifier(48, 10, 3, True)
    cfg = get_default_config()
    cfg.mode, cfg.H2T, cfg.mixup = 'stage2', 0.5, False
    exp = Experiment(cfg=cfg, device=CPU, precision='fp32', backbone=backbone, classifier=head,
                     criterion=cross_entropy_of_mean, stage=STAGE2, logger=logging.getLogger('test'))
    x1, x2, y = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(1)
    loss, out, _ = STAGE2.loss(exp, (x1, y, x2, y))
    torch.manual_seed(1)
    with torch.no_grad():
        expected = head(H2T(backbone(x1), backbone(x2), 0.5))
    assert out.shape == (4, 3, 10)
    assert torch.allclose(out, expected, atol=1e-5)


def cross_entropy_of_mean(out, y):
    return cross_entropy(out.mean(dim=1), y)


# -- bad settings ----------------------------------------------------------------------------------
@pytest.mark.parametrize('config, overrides, message', [
    ('stage1_ride', ['num_experts', '0'], 'num_experts 0 must be'),
    ('stage1_ride', ['backbone', 'resnet32_fe', 'num_experts', '1'],
     "RIDELoss takes the experts' logits, but backbone resnet32_fe with classifier Classifier gives one set of "
     'logits; set backbone resnet32_ride_fe with classifier Classifier'),
    ('stage1_ride', ['loss.type', 'CrossEntropyLoss'], 'takes one set of logits'),
    ('stage1_ride', ['loss.RIDE.reweight_epoch', '200'], 'DRW would never start'),
    ('stage1_reslt', ['classifier', 'Classifier'], "ResLoss takes ResLT's head/medium/tail branches, but backbone "
     'resnet32_ride_fe with classifier Classifier gives the experts\' logits; set classifier ResClassifier'),
    ('stage1_reslt', ['loss.ResLT.branch_starts', '[70, 35]'], 'branch_starts [70, 35]'),
    ('stage1_reslt', ['loss.ResLT.beta', '1.5'], 'loss.ResLT.beta 1.5'),
    ('stage1_ce_mixup', ['num_experts', '3'], 'needs a multi-expert backbone'),
    ('stage1_ce_mixup', ['loss.type', 'ResLoss', 'loss.ResLT.branch_starts', '[2, 4]'], 'classifier ResClassifier'),
])
def test_bad_settings_are_one_line_errors(config, overrides, message):
    with pytest.raises(UserError, match=message.replace('[', r'\[').replace(']', r'\]')):
        load_config(f'{CIFAR10}_{config}.yaml', overrides)


def test_bad_setting_stops_the_script_with_exit_2_and_one_line(tmp_path):
    result = run_script('train_stage1.py', '--cfg', f'{CIFAR10}_stage1_ride.yaml', 'num_experts', '0',
                        'save_dir', str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().count('\n') == 0 and 'num_experts 0' in result.stderr
    assert not os.listdir(tmp_path)


def test_every_ride_and_reslt_config_is_shipped_and_loads():
    for ds, imbs in (('cifar100', ('0005', '001', '002')), ('cifar10', ('001', '002', '01'))):
        for imb in imbs:
            for name in ('stage1_ride', 'stage2_ride_H2T', 'stage1_reslt', 'stage2_reslt_H2T', 'stage2_reslt'):
                cfg = load_config(os.path.join(ROOT, f'config/{ds}/{ds}_imb{imb}_{name}.yaml'))
                assert cfg.num_experts == 3 and cfg.backbone == 'resnet32_ride_fe'
                assert cfg.loss.type == ('RIDELoss' if 'ride' in name else 'ResLoss')
                assert cfg.loss.ResLT.branch_starts == ([35, 70] if ds == 'cifar100' else [2, 4]) or 'ride' in name
    ride = load_config(f'{CIFAR10}_stage1_ride.yaml')
    assert (ride.reduce_dimension, ride.use_norm, ride.loss.RIDE.additional_diversity_factor,
            ride.loss.RIDE.reweight_epoch, ride.lr_scheduler.gamma, ride.weight_decay, ride.nesterov,
            ride.mixup) == (True, True, -0.2, 159, 0.01, 5e-4, True, False)
    reslt = load_config(f'{CIFAR10}_stage2_reslt_H2T.yaml')
    assert (reslt.loss.ResLT.beta, reslt.H2T, reslt.batch_size, reslt.shift_bn) == (0.3, 0.4, 512, False)
    for ds, imbs in (('cifar100', ('0005', '001', '002')), ('cifar10', ('001', '002', '01'))):
        for imb in imbs:
            prefix = os.path.join(ROOT, f'config/{ds}/{ds}_imb{imb}')
            plain = load_config(f'{prefix}_stage2_reslt.yaml')  # the authors' final plain-ResLT stage 2
            assert (plain.loss.ResLT.beta, plain.H2T, plain.batch_size, plain.shift_bn) == (0.5, 0, 512, False)
            ride = load_config(f'{prefix}_stage2_ride_H2T.yaml')  # their ride_mixf values, CE of the mean
            assert (ride.loss.add_extra_info, ride.batch_size, ride.lr, ride.lr_scheduler.lr_factor, ride.weight_decay,
                    ride.num_epochs, ride.shift_bn, ride.H2T, ride.mixup) == (False, 512, 0.1, 0.5, 5e-4, 10, False,
                                                                              0.4, False)
            assert load_config(f'{prefix}_stage1_ride.yaml').loss.add_extra_info


# -- both stages end to end, and eval.py -----------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize('method, stage1_extra', [('ride', ['loss.RIDE.reweight_epoch', '0']), ('reslt', [])])
def test_both_stages_run_end_to_end_and_evaluate(method, stage1_extra, cifar10_root, tmp_path, capsys):
    s1, s2 = tmp_path / 's1', tmp_path / 's2'
    train_stage1.main(args(f'{CIFAR10}_stage1_{method}.yaml', cifar10_root, s1, 'num_epochs', '1', *stage1_extra))
    ckpt1 = f'{only_run(s1)}/ckps/model_best.pth.tar'
    state = torch.load(ckpt1, weights_only=False)
    assert any(k.startswith('layer3s.2.') for k in state['state_dict_model'])
    train_stage2.main(args(f'{CIFAR10}_stage2_{method}_H2T.yaml', cifar10_root, s2, 'num_epochs', '1',
                           'batch_size', '16', 'resume', ckpt1))
    ckpt2 = f'{only_run(s2)}/ckps/model_best.pth.tar'
    after = torch.load(ckpt2, weights_only=False)
    learned = [k for k in state['state_dict_model'] if 'running' not in k and 'num_batches' not in k]
    assert all(torch.equal(state['state_dict_model'][k], after['state_dict_model'][k]) for k in learned)
    assert any(not torch.equal(state['state_dict_classifier'][k], after['state_dict_classifier'][k])
               for k in state['state_dict_classifier'])  # the heads were re-trained
    for cfg, ckpt in ((f'{CIFAR10}_stage1_{method}.yaml', ckpt1), (f'{CIFAR10}_stage2_{method}_H2T.yaml', ckpt2)):
        eval_script.main([*args(cfg, cifar10_root, tmp_path, 'resume', ckpt, *stage1_extra), '--out',
                          ckpt.replace('.pth.tar', '.eval.json')])
        assert glob.glob(ckpt.replace('.pth.tar', '.eval.json'))
    assert 'top1' in capsys.readouterr().out
