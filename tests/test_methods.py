"""H2T channel fusion and mixup (methods.py) against what they must do to a batch."""
import math

import numpy as np
import pytest
import torch
from torch.nn.functional import cross_entropy

from methods import H2T, mixup_criterion, mixup_data


@pytest.mark.parametrize('rho', [0.25, 0.5, 1.0, 0.1])
def test_h2t_takes_exactly_int_rho_c_channels_from_the_fusing_branch(rho):
    torch.manual_seed(0)
    x1, x2 = torch.randn(8, 64, 8, 8), torch.randn(8, 64, 8, 8)
    x1_before = x1.clone()
    fused = H2T(x1, x2, rho)
    from_x2 = [c for c in range(64) if torch.equal(fused[:, c], x2[:, c])]
    from_x1 = [c for c in range(64) if torch.equal(fused[:, c], x1[:, c])]
    assert len(from_x2) == int(rho * 64)
    assert sorted(from_x1 + from_x2) == list(range(64))  # every other channel is untouched
    assert torch.equal(x1, x1_before)  # inputs are not modified in place


def test_h2t_uses_one_channel_set_for_the_whole_batch():
    x1, x2 = torch.zeros(16, 64, 2, 2), torch.ones(16, 64, 2, 2)
    fused = H2T(x1, x2, 0.25)
    per_sample = fused.mean(dim=(2, 3))
    assert torch.equal(per_sample, per_sample[:1].expand_as(per_sample))
    assert per_sample[0].sum() == 16


def test_h2t_rho_zero_is_a_no_op():
    x1, x2 = torch.randn(4, 64, 8, 8), torch.randn(4, 64, 8, 8)
    assert H2T(x1, x2, 0.0) is x1
    assert H2T(x1, x2, 0.01) is x1  # int(0.01 * 64) == 0 channels


def test_h2t_draws_new_channels_each_call():
    torch.manual_seed(0)
    x1, x2 = torch.zeros(1, 64, 1, 1), torch.ones(1, 64, 1, 1)
    draws = {tuple(H2T(x1, x2, 0.25).flatten().nonzero().flatten().tolist()) for _ in range(20)}
    assert len(draws) > 1


def test_h2t_on_lists_of_branches():
    x1 = [torch.zeros(2, 64, 4, 4), torch.zeros(2, 32, 4, 4)]
    x2 = [torch.ones(2, 64, 4, 4), torch.ones(2, 32, 4, 4)]
    out = H2T(x1, x2, 0.5)
    assert [int(o[0, :, 0, 0].sum()) for o in out] == [32, 16]


def test_h2t_keeps_device_and_dtype():
    x1, x2 = torch.randn(2, 8, 2, 2, dtype=torch.bfloat16), torch.randn(2, 8, 2, 2, dtype=torch.bfloat16)
    out = H2T(x1, x2, 0.5)
    assert out.dtype == torch.bfloat16 and out.device == x1.device


def test_h2t_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        H2T(torch.zeros(2, 64, 8, 8), torch.zeros(2, 32, 8, 8), 0.25)


def test_mixup_mixes_with_one_lambda_and_a_permutation():
    np.random.seed(0)
    torch.manual_seed(0)
    x = torch.arange(6.).view(6, 1) * torch.ones(6, 3)
    y = torch.arange(6)
    mixed, y_a, y_b, lam = mixup_data(x, y, alpha=1.0)
    assert 0 <= lam <= 1
    assert torch.equal(y_a, y)
    assert sorted(y_b.tolist()) == list(range(6))  # a permutation of the batch
    # row i of x is i everywhere, so a mixed row is lam * i + (1 - lam) * (its partner's index)
    expected = (lam * y + (1 - lam) * y_b).float()[:, None].expand(6, 3)
    assert torch.allclose(mixed, expected)


def test_mixup_lambda_is_beta_1_1():
    np.random.seed(0)
    x, y = torch.zeros(4, 1), torch.arange(4)
    lams = np.array([mixup_data(x, y, 1.0)[3] for _ in range(4000)])
    assert abs(lams.mean() - 0.5) < 0.02 and abs(lams.var() - 1 / 12) < 0.01  # uniform on [0, 1]


def test_mixup_criterion_weights_the_two_targets():
    logits = torch.tensor([[2.0, 0, 0], [0, 1.0, 0]])
    ya, yb = torch.tensor([0, 1]), torch.tensor([1, 0])
    # -log softmax: [2, 0, 0] gives a = log(1 + 2 e^-2) at class 0 and 2 + a at class 1;
    # [0, 1, 0] gives b = log(1 + 2 / e) at class 1 and 1 + b at class 0
    a, b = math.log(1 + 2 * math.exp(-2)), math.log(1 + 2 / math.e)
    expected = 0.3 * (a + b) / 2 + 0.7 * ((2 + a) + (1 + b)) / 2
    assert mixup_criterion(cross_entropy, logits, ya, yb, 0.3).item() == pytest.approx(expected, rel=1e-6)
