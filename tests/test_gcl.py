"""GCL (Gaussian clouded logit adjustment): GCLLoss against values worked out by hand on a 3-class
example with 100 / 10 / 1 training images, its cloud (training only, growing with rarity, drawn from
torch's global generator), the focal stage-2 form, the config wiring, the shipped configs, bad settings,
and both stages end to end (with eval.py and an exact resume)."""
import csv
import glob
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run_script
from loss import GCLLoss, build_loss, gcl_cloud_scale
from models import NormedLinear, build_model
from test_resume import assert_same_weights, stage1_straight_and_resumed
from utils.config import head_scale, load_config
from common.errors import UserError

COUNTS = [100, 10, 1]
# (log 100 - log n_c) / (log 100 - log 1): 0, 1/2, 1
RARITY = [0.0, 0.5, 1.0]
COSINE = [[0.5, 0.0, -0.5], [0.2, 0.4, 0.1]]
TARGET = [0, 2]
STAGE1 = os.path.join(ROOT, 'config/cifar10/cifar10_imb001_stage1_gcl.yaml')
STAGE2 = os.path.join(ROOT, 'config/cifar10/cifar10_imb001_stage2_gcl_H2T.yaml')
IMB = {'imb0005': 0.005, 'imb001': 0.01, 'imb002': 0.02, 'imb01': 0.1}
DEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])


def cross_entropy(logits, target):
    """-log softmax(logits)[target] of one sample, plain floats."""
    return math.log(sum(math.exp(v) for v in logits)) - logits[target]


def hand_loss(cosine, target, s, m, cloud=None, gamma=0.0):
    """Mean over the samples of (1 - p_y) ** gamma * CE of s * (cos - cloud - m [j = y])."""
    total = 0.0
    for i, (row, y) in enumerate(zip(cosine, target)):
        logits = [s * (c - (cloud[i][j] if cloud else 0.0) - (m if j == y else 0.0)) for j, c in enumerate(row)]
        ce = cross_entropy(logits, y)
        total += (1 - math.exp(-ce)) ** gamma * ce
    return total / len(cosine)


def test_cloud_scale_by_hand():
    assert gcl_cloud_scale(COUNTS).tolist() == pytest.approx(RARITY, abs=1e-7)
    assert gcl_cloud_scale([5, 5, 5]).tolist() == [0.0, 0.0, 0.0]  # balanced: no cloud (no 0 / 0)


@pytest.mark.parametrize('device', DEVICES)
def test_margin_scale_and_focal_by_hand_without_the_cloud(device):
    logits = 20 * torch.tensor(COSINE, device=device)
    target = torch.tensor(TARGET, device=device)
    # sample 0: s (cos - m at class 0) = [8, 0, -10]; sample 1: [4, 8, 2 - 2]
    ce0, ce1 = cross_entropy([8, 0, -10], 0), cross_entropy([4, 8, 0], 2)
    assert ce0 == pytest.approx(0.000335, abs=1e-6) and ce1 == pytest.approx(8.018479, rel=1e-6)
    plain = GCLLoss(COUNTS, m=0.1, s=20, noise_mul=0.5).to(device).eval()
    assert plain(logits, target).item() == pytest.approx((ce0 + ce1) / 2, rel=1e-5)
    assert plain(logits, target).item() == pytest.approx(hand_loss(COSINE, TARGET, 20, 0.1), rel=1e-5)
    # noise_mul 0: no cloud in training mode either
    assert GCLLoss(COUNTS, m=0.1, s=20, noise_mul=0).to(device)(logits, target).item() == pytest.approx(
        (ce0 + ce1) / 2, rel=1e-5)
    # stage 2's focal form: (1 - p_y) * CE, p_y = exp(-CE)
    focal = GCLLoss(COUNTS, m=0.1, s=20, noise_mul=0.5, gamma=1.0).to(device).eval()
    expected = ((1 - math.exp(-ce0)) * ce0 + (1 - math.exp(-ce1)) * ce1) / 2
    assert focal(logits, target).item() == pytest.approx(expected, rel=1e-5)


def test_focal_weight_gets_no_gradient():
    # d/dx of (1 - p_y) * CE with p_y held constant: (1 - p_y) (softmax - onehot); p_y = exp(-CE)
    focal = GCLLoss(COUNTS, m=0.1, s=20, gamma=1.0).eval()
    logits = (20 * torch.tensor(COSINE[1:])).requires_grad_()
    focal(logits, torch.tensor([2])).backward()
    shifted = [4.0, 8.0, 0.0]
    total = sum(math.exp(v) for v in shifted)
    probs = [math.exp(v) / total for v in shifted]
    expected = [(1 - probs[2]) * (p - (j == 2)) for j, p in enumerate(probs)]
    assert logits.grad[0].tolist() == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_cloud_by_hand_from_the_same_seeded_draw():
    """The loss draws z = N(0, 1) / 3 of the logits' shape from torch's global generator: seeding it
    and drawing the same numbers here gives the cloud to subtract, clipped at 1."""
    for gamma in (0.0, 1.0):
        torch.manual_seed(11)
        z = (torch.randn(2, 3) * (1 / 3)).tolist()
        cloud = [[0.5 * min(abs(v), 1.0) * RARITY[j] for j, v in enumerate(row)] for row in z]
        expected = hand_loss(COSINE, TARGET, 20, 0.1, cloud, gamma)
        assert expected != pytest.approx(hand_loss(COSINE, TARGET, 20, 0.1, None, gamma), rel=1e-3)
        gcl = GCLLoss(COUNTS, m=0.1, s=20, noise_mul=0.5, gamma=gamma)
        torch.manual_seed(11)
        assert gcl(20 * torch.tensor(COSINE), torch.tensor(TARGET)).item() == pytest.approx(expected, rel=1e-5)


def test_cloud_is_clipped_at_one_and_taken_as_magnitude(monkeypatch):
    draws = torch.tensor([[-6.0, 1.5, -0.9]])  # / 3: -2 (clipped to -1), 0.5, -0.3

    def randn(shape, device=None):
        assert tuple(shape) == (1, 3)
        return draws.clone()
    monkeypatch.setattr(torch, 'randn', randn)
    gcl = GCLLoss(COUNTS, m=0.0, s=20, noise_mul=0.5)
    # cloud s * noise_mul * |z| * r = 10 * [1 * 0, 0.5 * 0.5, 0.3 * 1] = [0, 2.5, 3]
    adjusted = gcl.adjusted_logits(torch.zeros(1, 3), torch.tensor([1]))
    assert adjusted.tolist()[0] == pytest.approx([0.0, -2.5, -3.0], abs=1e-6)
    assert gcl(torch.zeros(1, 3), torch.tensor([1])).item() == pytest.approx(
        2.5 + math.log(1 + math.exp(-2.5) + math.exp(-3)), rel=1e-6)


def test_cloud_grows_with_rarity_and_is_off_in_eval():
    gcl = GCLLoss(COUNTS, m=0.0, s=20, noise_mul=0.5)
    logits, target = torch.zeros(40000, 3), torch.zeros(40000, dtype=torch.long)
    torch.manual_seed(0)
    cloud = -gcl.adjusted_logits(logits, target)
    # E min(|Z| / 3, 1) for Z ~ N(0, 1): (2 / 3) (phi(0) - phi(3)) + P(|Z| > 3)
    phi = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    mean_abs = 2 / 3 * (phi(0) - phi(3)) + math.erfc(3 / math.sqrt(2))
    assert mean_abs == pytest.approx(0.265706, rel=1e-5)
    assert cloud.mean(0).tolist() == pytest.approx([20 * 0.5 * r * mean_abs for r in RARITY], rel=0.02, abs=1e-9)
    assert cloud[:, 0].abs().max() == 0 and cloud.min() >= 0 and cloud[:, 2].max() <= 10 + 1e-5
    # eval: no cloud, and the global generator is left alone
    gcl.eval()
    state = torch.get_rng_state()
    assert torch.equal(gcl.adjusted_logits(logits, target), logits)
    assert torch.equal(torch.get_rng_state(), state)


def test_same_seed_same_loss_and_fp32_under_bf16_autocast():
    gcl = GCLLoss(COUNTS, m=0.1, s=20)
    logits = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([0, 1, 2, 0, 1, 2])
    values = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            loss = gcl(logits.bfloat16(), target)
        assert loss.dtype == torch.float32
        values.append(loss.item())
    assert values[0] == values[1] != values[2]


# -- config wiring ---------------------------------------------------------------------------------
def test_config_values_reach_the_loss_and_the_cosine_head():
    cfg = load_config(STAGE2, ['loss.GCL.noise_mul', '0.3'])
    gcl = build_loss(cfg, COUNTS)
    assert isinstance(gcl, GCLLoss)
    assert (gcl.m, gcl.s, gcl.noise_mul, gcl.gamma) == (0.1, 20.0, 0.3, 1.0)
    _, head = build_model(cfg, head_scale(cfg))
    assert isinstance(head.fc, NormedLinear) and head.scale == 20.0
    cfg1 = load_config(STAGE1)
    gcl1 = build_loss(cfg1, COUNTS)
    assert (gcl1.m, gcl1.s, gcl1.noise_mul, gcl1.gamma) == (0.0, 30.0, 0.5, 0.0)
    assert build_model(cfg1, head_scale(cfg1))[1].scale == 30.0
    # the other cosine-head loss keeps its own s
    ldam = load_config(STAGE1, ['loss.type', 'LDAMLoss', 'loss.LDAM.s', '16'])
    assert build_model(ldam, head_scale(ldam))[1].scale == 16.0


def test_every_gcl_config_is_shipped_with_the_authors_values():
    paths = sorted(glob.glob(os.path.join(ROOT, 'config/*/*_gcl*.yaml')))
    names = {os.path.basename(p) for p in paths}
    for ds, imbs in (('cifar100', ('0005', '001', '002')), ('cifar10', ('001', '002', '01'))):
        for imb in imbs:
            assert {f'{ds}_imb{imb}_stage1_gcl.yaml', f'{ds}_imb{imb}_stage2_gcl_H2T.yaml'} <= names
    assert len(paths) == 12
    for path in paths:
        cfg = load_config(path)
        assert cfg.loss.type == 'GCLLoss' and cfg.use_norm and cfg.mixup and cfg.batch_size == 64
        assert cfg.loss.GCL.noise_mul == 0.5
        assert cfg.imb_factor == IMB[os.path.basename(path).split('_')[1]]
        if cfg.mode == 'stage1':
            assert (cfg.loss.GCL.m, cfg.loss.GCL.s, cfg.loss.GCL.gamma, cfg.num_epochs, cfg.lr) == (0, 30, 0, 200, 0.1)
            assert (cfg.lr_scheduler.milestones, cfg.lr_scheduler.gamma) == ([160, 180], 0.1)
        else:
            assert (cfg.loss.GCL.m, cfg.loss.GCL.s, cfg.loss.GCL.gamma, cfg.num_epochs) == (0.1, 20, 1, 30)
            # their LR (GCL's current cifar_train_classifier.py): 0.1 * 0.1 * lr * (1 + cos) with lr 0.1,
            # = lr_factor * lr * (1 + cos) / 2 here
            assert cfg.lr * cfg.lr_scheduler.lr_factor / 2 == pytest.approx(0.1 * 0.1 * 0.1)
            assert cfg.sampler.type == 'weighted sampler' and cfg.sampler.dual_sample.enable and not cfg.shift_bn


@pytest.mark.parametrize('extra,message', [
    (['loss.GCL.s', '0'], 'loss.GCL.s 0.0 must be positive'),
    (['loss.GCL.noise_mul', '-0.5'], 'loss.GCL.noise_mul -0.5 must be 0'),
    (['loss.GCL.m', '-0.1'], 'loss.GCL.m -0.1 must be 0 or more'),
    (['loss.GCL.gamma', '-1'], 'loss.GCL.gamma -1.0 must be 0'),
    (['use_norm', 'False'], 'GCLLoss works on cosine logits; set use_norm True'),
    (['lws', 'True'], 'set lws False'),
])
def test_bad_gcl_settings_are_refused(extra, message):
    with pytest.raises(UserError, match=message.replace('.', r'\.')):
        load_config(STAGE1, extra)


def test_a_bad_gcl_setting_stops_the_script_with_one_line(tmp_path):
    result = run_script('train_stage1.py', '--cfg', STAGE1, 'save_dir', str(tmp_path / 's'), 'loss.GCL.s', '-30')
    assert result.returncode == 2 and result.stderr.count('\n') == 1, result.stderr[-2000:]
    assert result.stderr.startswith('error: loss.GCL.s -30.0 must be positive')
    assert not os.path.exists(tmp_path / 's')


# -- end to end ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_gcl_row_end_to_end_through_reproduce_and_eval(cifar10_root, tmp_path):
    """One epoch of GCL stage 1, then GCL stage 2 alone (rho 0) and with H2T (rho 0.25), each evaluated
    by eval.py; the frozen backbone (eval mode, as GCL) comes out of stage 2 unchanged."""
    tiny = f'data_path {cifar10_root} num_epochs 1 batch_size 16 eval_batch_size 64 imb_factor 0.1 compile False'
    save = tmp_path / 'saved'
    env = dict(os.environ, PYTHON=sys.executable, METHOD='gcl', STAGE1_OVERRIDES=tiny, STAGE2_OVERRIDES=tiny,
               SAVE_DIR=str(save), RESULTS=str(tmp_path / 'results'))
    result = subprocess.run(['bash', 'scripts/reproduce.sh', 'config/cifar10/cifar10_imb001', '0', '0.25'], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / 'results' / 'metrics.csv')))
    assert [(r['stage'], r['rho'], r['run']) for r in rows] == [
        ('stage1', '', 'cifar10_imb001_stage1_gcl'), ('stage2', '0.0', 'cifar10_imb001_stage2_gcl_rho0'),
        ('stage2', '0.25', 'cifar10_imb001_stage2_gcl_rho0.25')]
    stage1 = torch.load(glob.glob(f'{save}/cifar10_imb001_stage1_gcl_2*/ckps/model_best.pth.tar')[0], weights_only=True)
    assert stage1['state_dict_classifier']['fc.weight'].shape == (64, 10)  # the cosine head
    for rho in ('0', '0.25'):
        run = glob.glob(f'{save}/cifar10_imb001_stage2_gcl_rho{rho}_2*')[0]
        state = torch.load(f'{run}/ckps/model_best.pth.tar', weights_only=True)
        for k, v in stage1['state_dict_model'].items():
            assert torch.equal(state['state_dict_model'][k], v), k
        head, head1 = state['state_dict_classifier']['fc.weight'], stage1['state_dict_classifier']['fc.weight']
        assert not torch.equal(head, head1)
        evaluated = json.load(open(f'{run}/ckps/model_best.eval.json'))
        summary = json.load(open(f'{run}/summary.json'))
        assert evaluated['top1'] == pytest.approx(summary['best']['top1'])
        assert evaluated['ece'] == pytest.approx(summary['best']['ece'])


@pytest.mark.slow
def test_gcl_stage1_resumes_bit_identical(cifar10_root, tmp_path, monkeypatch):
    """The cloud's draws come from the generators the checkpoint saves: an interrupted run continues
    exactly as the straight one."""
    straight, run = stage1_straight_and_resumed(STAGE1, cifar10_root, tmp_path, monkeypatch, 2, 1)
    assert_same_weights(f'{straight}/ckps/current.pth.tar', f'{run}/ckps/current.pth.tar')
