"""The classification losses of the two-stage recipes, chosen by `loss.type` (the authors' class names).

- `CrossEntropyLoss`: CE, optionally with class-balanced weights (`loss.CE.reweight_CE`, beta 0.9999).
- `LabelAwareSmoothing` (MiSLAS stage 2): label smoothing whose strength follows the class size,
  `smooth_head` for the largest class down to `smooth_tail` for the smallest (`loss.LAS.shape`).
- `LDAMLoss` (LDAM-DRW): a margin `m_c` proportional to `n_c ** -1/4` (largest `loss.LDAM.max_m`) taken off
  the true class's logit; with `loss.LDAM.reweight_epoch` >= 0, class-balanced weights from then on (DRW).

Every loss is computed in fp32 whatever the autocast dtype of the logits. `build_loss(cfg, cls_num_list)`
builds the configured one; the epoch loop calls `before_epoch(epoch)` (epoch counted from 0) first.
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

SMOOTHING_SHAPES = ('concave', 'linear', 'convex', 'exp')


def class_balanced_weights(cls_num_list, beta=0.9999):
    """Cui et al. 2019: w_c proportional to (1 - beta) / (1 - beta ** n_c), normalised to sum to C."""
    counts = np.asarray(cls_num_list, dtype=np.float64)
    weights = (1 - beta) / (1 - np.power(beta, counts))
    return torch.tensor(weights / weights.sum() * len(counts), dtype=torch.float32)


class CrossEntropyLoss(nn.Module):
    def __init__(self, cls_num_list, reweight_CE=False):
        super().__init__()
        self.register_buffer('weight', class_balanced_weights(cls_num_list) if reweight_CE else None)

    def before_epoch(self, epoch):
        pass

    def forward(self, logits, target):
        return F.cross_entropy(logits.float(), target, weight=self.weight)


def smoothing_per_class(cls_num_list, smooth_head, smooth_tail, shape='concave', power=None):
    """Smoothing of each class: smooth_tail at the smallest class, smooth_head at the largest, and in
    between a function of r = (n_c - n_min) / (n_max - n_min): sin(r pi / 2) (concave), r (linear),
    1 - cos(r pi / 2) (convex) or r ** power (exp)."""
    counts = np.asarray(cls_num_list, dtype=np.float64)
    spread = counts.max() - counts.min()
    r = (counts - counts.min()) / spread if spread > 0 else np.ones_like(counts)
    ramp = {'concave': lambda: np.sin(r * math.pi / 2), 'linear': lambda: r,
            'convex': lambda: 1 - np.cos(r * math.pi / 2), 'exp': lambda: np.power(r, power)}[shape]()
    return torch.tensor(smooth_tail + (smooth_head - smooth_tail) * ramp, dtype=torch.float32)


class LabelAwareSmoothing(nn.Module):
    """(1 - e_y) * NLL(y) + e_y * mean over classes of -log p, with e_y the smoothing of the true class."""

    def __init__(self, cls_num_list, smooth_head, smooth_tail, shape='concave', power=None):
        super().__init__()
        self.register_buffer('smooth', smoothing_per_class(cls_num_list, smooth_head, smooth_tail, shape, power))

    def before_epoch(self, epoch):
        pass

    def forward(self, logits, target):
        log_probs = F.log_softmax(logits.float(), dim=1)
        nll = -log_probs.gather(1, target[:, None]).squeeze(1)
        uniform = -log_probs.mean(dim=1)
        smoothing = self.smooth[target]
        return ((1 - smoothing) * nll + smoothing * uniform).mean()


class LDAMLoss(nn.Module):
    """CE on logits whose true-class entry is lowered by s * m_y, m_c = max_m * (n_min / n_c) ** (1/4),
    as the authors' loss (after RIDE) computes it for a classifier whose logits are already scaled by s
    (`use_norm: True`: s times the cosine). From epoch `reweight_epoch` + 1 (epochs counted from 0, as
    the authors' `epoch > reweight_epoch`) CE takes class-balanced weights; -1 never reweights."""

    def __init__(self, cls_num_list, max_m=0.5, s=30.0, reweight_epoch=-1):
        super().__init__()
        margins = 1.0 / np.power(np.asarray(cls_num_list, dtype=np.float64), 0.25)
        self.register_buffer('margins', torch.tensor(margins * (max_m / margins.max()), dtype=torch.float32))
        self.register_buffer('drw_weight', class_balanced_weights(cls_num_list) if reweight_epoch >= 0 else None)
        self.s, self.reweight_epoch = s, reweight_epoch
        self.weight = None

    def before_epoch(self, epoch):
        self.weight = self.drw_weight if 0 <= self.reweight_epoch < epoch else None

    def forward(self, logits, target):
        logits = logits.float()
        shifted = logits.scatter_add(1, target[:, None], -self.s * self.margins[target][:, None])
        return F.cross_entropy(shifted, target, weight=self.weight)


LOSSES = ('CrossEntropyLoss', 'LabelAwareSmoothing', 'LDAMLoss')


def build_loss(cfg, cls_num_list):
    """The criterion `cfg.loss.type` names, with its keys (checked by utils.config.check_config)."""
    if cfg.loss.type == 'CrossEntropyLoss':
        return CrossEntropyLoss(cls_num_list, cfg.loss.CE.reweight_CE)
    if cfg.loss.type == 'LabelAwareSmoothing':
        return LabelAwareSmoothing(cls_num_list, cfg.smooth_head, cfg.smooth_tail, cfg.loss.LAS.shape,
                                   cfg.loss.LAS.power)
    return LDAMLoss(cls_num_list, cfg.loss.LDAM.max_m, cfg.loss.LDAM.s, cfg.loss.LDAM.reweight_epoch)
