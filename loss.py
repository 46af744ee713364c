"""The classification losses of the two-stage recipes, chosen by `loss.type` (the authors' class names).

- `CrossEntropyLoss`: CE, optionally with class-balanced weights (`loss.CE.reweight_CE`, beta 0.9999).
- `LabelAwareSmoothing` (MiSLAS stage 2): label smoothing whose strength follows the class size,
  `smooth_head` for the largest class down to `smooth_tail` for the smallest (`loss.LAS.shape`).
- `LDAMLoss` (LDAM-DRW): a margin `m_c` proportional to `n_c ** -1/4` (largest `loss.LDAM.max_m`) taken off
  the true class's logit; with `loss.LDAM.reweight_epoch` >= 0, class-balanced weights from then on (DRW).
- `RIDELoss` (RIDE): each expert's LDAM-DRW loss plus its KL divergence to the experts' mean (`loss.RIDE`).
- `ResLoss` (ResLT): CE of the branches' sum and of each branch on its own classes (`loss.ResLT`).
- `GCLLoss` (GCL, Li et al. CVPR 2022): in training, a random "Gaussian cloud" taken off the cosine logits,
  larger for rarer classes (`loss.GCL.noise_mul`), a margin `loss.GCL.m` on the true class, scale
  `loss.GCL.s`; with `loss.GCL.gamma` > 0 the focal form of its stage 2.

Every loss is computed in fp32 whatever the autocast dtype of the logits. `build_loss(cfg, cls_num_list)`
builds the configured one; the epoch loop calls `before_epoch(epoch)` (epoch counted from 0) first.

A loss is a subclass of `Loss` registered under its `loss.type` name with `@register_loss(name)`: it
checks its config keys (`check_config`, called by utils.config.check_config), says what it takes (`takes`:
one set of logits, the experts' or the branches') and the scale of the cosine head it expects
(`cosine_scale`), and builds itself from the config and the training set's class counts (`from_config`).
Its keys' defaults go in utils/config.py.
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.errors import need

SMOOTHING_SHAPES = ('concave', 'linear', 'convex', 'exp')
LOSSES = {}  # loss.type -> its Loss class, filled by @register_loss


def register_loss(name):
    """Class decorator: make the Loss subclass the loss of `loss.type: <name>`."""
    def register(cls):
        if name in LOSSES:
            raise ValueError(f'loss.type {name!r} is registered twice ({LOSSES[name].__name__}, {cls.__name__})')
        LOSSES[name] = cls
        return cls
    return register


class Loss(nn.Module):
    """A classification loss: forward(logits, target) -> the batch's mean loss."""
    takes = 'logits'  # what its forward takes: one set of 'logits' [B, C], the 'experts' or the 'branches' [B, K, C]
    pairs_with = ''   # for a loss that takes more than logits: the model settings that give what it takes

    @staticmethod
    def check_config(cfg):
        """Raise UserError (common.errors.need) for a value of the loss's keys it cannot train with."""

    @classmethod
    def from_config(cls, cfg, cls_num_list):
        """The loss of `cfg` for a training set of `cls_num_list` images per class."""
        raise NotImplementedError

    @staticmethod
    def cosine_scale(cfg):
        """s of the cosine head (`use_norm`): its logits are s times the cosine, the s this loss expects."""
        return cfg.loss.LDAM.s

    def before_epoch(self, epoch):
        """Called before each epoch (counted from 0); a loss that changes over training (DRW) does it here."""


def class_balanced_weights(cls_num_list, beta=0.9999):
    """Cui et al. 2019: w_c proportional to (1 - beta) / (1 - beta ** n_c), normalised to sum to C."""
    counts = np.asarray(cls_num_list, dtype=np.float64)
    weights = (1 - beta) / (1 - np.power(beta, counts))
    return torch.tensor(weights / weights.sum() * len(counts), dtype=torch.float32)


@register_loss('CrossEntropyLoss')
class CrossEntropyLoss(Loss):
    def __init__(self, cls_num_list, reweight_CE=False):
        super().__init__()
        self.register_buffer('weight', class_balanced_weights(cls_num_list) if reweight_CE else None)

    @classmethod
    def from_config(cls, cfg, cls_num_list):
        return cls(cls_num_list, cfg.loss.CE.reweight_CE)

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


@register_loss('LabelAwareSmoothing')
class LabelAwareSmoothing(Loss):
    """(1 - e_y) * NLL(y) + e_y * mean over classes of -log p, with e_y the smoothing of the true class."""

    def __init__(self, cls_num_list, smooth_head, smooth_tail, shape='concave', power=None):
        super().__init__()
        self.register_buffer('smooth', smoothing_per_class(cls_num_list, smooth_head, smooth_tail, shape, power))

    @staticmethod
    def check_config(cfg):
        for key in ('smooth_head', 'smooth_tail'):
            need(isinstance(cfg[key], (int, float)) and not isinstance(cfg[key], bool) and 0 <= cfg[key] < 1,
                 f'{key} {cfg[key]} must be a number in [0, 1) for loss.type LabelAwareSmoothing; e.g. smooth_head 0.4 '
                 f'smooth_tail 0.1')
        need(cfg.loss.LAS.shape in SMOOTHING_SHAPES,
             f'loss.LAS.shape {cfg.loss.LAS.shape!r} is unknown; use one of {", ".join(SMOOTHING_SHAPES)}')
        need(cfg.loss.LAS.shape != 'exp' or (isinstance(cfg.loss.LAS.power, (int, float)) and cfg.loss.LAS.power > 0),
             f'loss.LAS.shape exp needs a positive loss.LAS.power, got {cfg.loss.LAS.power}')

    @classmethod
    def from_config(cls, cfg, cls_num_list):
        return cls(cls_num_list, cfg.smooth_head, cfg.smooth_tail, cfg.loss.LAS.shape, cfg.loss.LAS.power)

    def forward(self, logits, target):
        log_probs = F.log_softmax(logits.float(), dim=1)
        nll = -log_probs.gather(1, target[:, None]).squeeze(1)
        uniform = -log_probs.mean(dim=1)
        smoothing = self.smooth[target]
        return ((1 - smoothing) * nll + smoothing * uniform).mean()


@register_loss('LDAMLoss')
class LDAMLoss(Loss):
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

    @staticmethod
    def check_config(cfg):
        need(cfg.loss.LDAM.s > 0, f'loss.LDAM.s {cfg.loss.LDAM.s} must be positive (the logit scale, 30 in LDAM-DRW)')
        need(cfg.loss.LDAM.max_m > 0, f'loss.LDAM.max_m {cfg.loss.LDAM.max_m} must be positive (0.5 in LDAM-DRW)')
        need(cfg.loss.LDAM.reweight_epoch < cfg.num_epochs,
             f'loss.LDAM.reweight_epoch {cfg.loss.LDAM.reweight_epoch} is not below num_epochs {cfg.num_epochs}, so '
             f'DRW would never start; lower it (160 of 200 in LDAM-DRW) or set -1 for no re-weighting')
        need(cfg.loss.LDAM.reweight_epoch >= -1, f'loss.LDAM.reweight_epoch {cfg.loss.LDAM.reweight_epoch} must be -1 '
             f'(never) or an epoch')

    @classmethod
    def from_config(cls, cfg, cls_num_list):
        return cls(cls_num_list, cfg.loss.LDAM.max_m, cfg.loss.LDAM.s, cfg.loss.LDAM.reweight_epoch)

    def before_epoch(self, epoch):
        self.weight = self.drw_weight if 0 <= self.reweight_epoch < epoch else None

    def forward(self, logits, target):
        logits = logits.float()
        shifted = logits.scatter_add(1, target[:, None], -self.s * self.margins[target][:, None])
        return F.cross_entropy(shifted, target, weight=self.weight)



# -- multi-output losses: RIDE's experts, ResLT's branches -----------------------------------------
def _need_multi_output(out, loss_name, what):
    need(out.dim() == 3, f'{loss_name} takes {what} as [batch, K, classes], got logits of shape {tuple(out.shape)}')


@register_loss('RIDELoss')
class RIDELoss(Loss):
    """RIDE's distribution-aware diversity loss on the experts' logits [B, E, C] (each s times a cosine):
    sum over experts of base_loss_factor * LDAM(expert) (DRW weights after reweight_epoch) plus
    additional_diversity_factor * T_mean^2 * KL(softmax(mean / T) || softmax(expert / T)), the experts'
    mean held constant. T is base_diversity_temperature, and after reweight_epoch T_c = T * w_c with
    w_c = (C * p_c * f + 1 - f) / max over classes (p_c the class's share of the training set, f the
    reweight_factor); T_mean is the mean of T_c. A negative factor pushes the experts apart.

    `expert_terms` False (config `loss.add_extra_info False`, the authors' default) is what RIDE's and the
    H2T authors' RIDELoss compute when the experts' logits are not passed to it: plain cross-entropy of
    the experts' mean, no margins, no diversity term (the H2T authors' RIDE stage 2)."""
    takes, pairs_with = 'experts', 'backbone resnet32_ride_fe with classifier Classifier'

    def __init__(self, cls_num_list, base_loss_factor=1.0, additional_diversity_factor=-0.2,
                 base_diversity_temperature=1.0, reweight_factor=0.05, max_m=0.5, s=30.0, reweight_epoch=-1,
                 expert_terms=True):
        super().__init__()
        self.expert_terms = expert_terms
        self.ldam = LDAMLoss(cls_num_list, max_m, s, reweight_epoch)
        share = np.asarray(cls_num_list, dtype=np.float64) / np.sum(cls_num_list)
        weights = len(share) * share * reweight_factor + 1 - reweight_factor
        self.register_buffer('drw_temperature', torch.tensor(base_diversity_temperature * weights / weights.max(),
                                                             dtype=torch.float32))
        self.base_loss_factor, self.diversity_factor = base_loss_factor, additional_diversity_factor
        self.base_temperature, self.reweight_epoch = base_diversity_temperature, reweight_epoch
        self.temperature = None  # per class after reweight_epoch, else the scalar base temperature

    @staticmethod
    def check_config(cfg):
        ride = cfg.loss.RIDE
        need(ride.s > 0, f'loss.RIDE.s {ride.s} must be positive (the logit scale, 30 in RIDE)')
        need(ride.max_m > 0, f'loss.RIDE.max_m {ride.max_m} must be positive (0.5 in RIDE)')
        need(ride.base_diversity_temperature > 0,
             f'loss.RIDE.base_diversity_temperature {ride.base_diversity_temperature} must be positive (1 in RIDE)')
        need(0 <= ride.reweight_factor < 1, f'loss.RIDE.reweight_factor {ride.reweight_factor} must be in [0, 1) '
             f'(0.05 in RIDE)')
        need(ride.reweight_epoch >= -1,
             f'loss.RIDE.reweight_epoch {ride.reweight_epoch} must be -1 (never) or an epoch')
        need(not ride.reweight or ride.reweight_epoch < cfg.num_epochs,
             f'loss.RIDE.reweight_epoch {ride.reweight_epoch} is not below num_epochs {cfg.num_epochs}, so DRW would '
             f'never start; lower it (159 of 200 in RIDE), or set -1 or loss.RIDE.reweight False')

    @staticmethod
    def cosine_scale(cfg):
        return cfg.loss.RIDE.s

    @classmethod
    def from_config(cls, cfg, cls_num_list):
        ride = cfg.loss.RIDE
        return cls(cls_num_list, ride.base_loss_factor, ride.additional_diversity_factor,
                   ride.base_diversity_temperature, ride.reweight_factor, ride.max_m, ride.s,
                   ride.reweight_epoch if ride.reweight else -1, expert_terms=cfg.loss.add_extra_info)

    def before_epoch(self, epoch):
        self.ldam.before_epoch(epoch)
        self.temperature = self.drw_temperature if 0 <= self.reweight_epoch < epoch else None

    def forward(self, logits, target):
        _need_multi_output(logits, 'RIDELoss', "the experts' logits")
        logits = logits.float()
        mean = logits.mean(dim=1)
        if not self.expert_terms:
            return F.cross_entropy(mean, target)
        if self.temperature is None:
            temperature, temperature_mean = self.base_temperature, self.base_temperature
        else:
            temperature, temperature_mean = self.temperature[None], self.temperature.mean()
        mean_probs = F.softmax(mean.detach() / temperature, dim=1)
        loss = 0
        for expert in logits.unbind(dim=1):
            # RIDE trains each expert on its own logits, or on the mean when there is no diversity term
            loss = loss + self.base_loss_factor * self.ldam(mean if self.diversity_factor == 0 else expert, target)
            log_probs = F.log_softmax(expert / temperature, dim=1)
            kl = F.kl_div(log_probs, mean_probs, reduction='batchmean')
            loss = loss + self.diversity_factor * temperature_mean ** 2 * kl
        return loss


@register_loss('ResLoss')
class ResLoss(Loss):
    """ResLT's loss on the branches' logits [B, 3, C] (head, medium, tail): (1 - beta) * CE(head + medium
    + tail) + beta * (the sum of each branch's CE over the samples of its classes) / (the number of such
    sample-branch pairs). The head branch learns every class, the medium branch classes from
    branch_starts[0], the tail branch classes from branch_starts[1] (classes sorted largest first)."""
    takes, pairs_with = 'branches', 'classifier ResClassifier'

    def __init__(self, num_classes, branch_starts, beta=0.998):
        super().__init__()
        medium, tail = branch_starts
        starts = torch.tensor([0, medium, tail])
        self.register_buffer('member', torch.arange(num_classes)[:, None] >= starts[None])  # [C, 3]
        self.beta = beta

    @staticmethod
    def check_config(cfg):
        res = cfg.loss.ResLT
        need(0 <= res.beta <= 1, f'loss.ResLT.beta {res.beta} must be in [0, 1] (0.998 in the stage-1 configs)')
        starts = list(res.branch_starts)
        need(len(starts) == 2 and 0 < starts[0] < starts[1] < cfg.num_classes,
             f'loss.ResLT.branch_starts {starts} must be [m, t] with 0 < m < t < num_classes ({cfg.num_classes}): '
             f'the first class of the medium and of the tail branch, e.g. [35, 70] for CIFAR-100')

    @classmethod
    def from_config(cls, cfg, cls_num_list):
        return cls(len(cls_num_list), list(cfg.loss.ResLT.branch_starts), cfg.loss.ResLT.beta)

    def forward(self, logits, target):
        _need_multi_output(logits, 'ResLoss', "the head/medium/tail branches' logits")
        need(logits.size(1) == 3, f'ResLoss takes 3 branches, got {logits.size(1)}')
        logits = logits.float()
        fused = F.cross_entropy(logits.sum(dim=1), target)
        nll = -F.log_softmax(logits, dim=2).gather(2, target[:, None, None].expand(-1, 3, 1)).squeeze(2)  # [B, 3]
        member = self.member[target].float()
        individual = (nll * member).sum() / member.sum()
        return (1 - self.beta) * fused + self.beta * individual


# -- GCL ---------------------------------------------------------------------------------------------
def gcl_cloud_scale(cls_num_list):
    """(log n_max - log n_c) / (log n_max - log n_min) of each class: 0 at the largest, 1 at the smallest
    (all 0 when every class has as many images, where GCL's own division would give 0 / 0)."""
    log_counts = np.log(np.asarray(cls_num_list, dtype=np.float64))
    rarity = log_counts.max() - log_counts
    return torch.tensor(rarity / rarity.max() if rarity.max() > 0 else rarity, dtype=torch.float32)


@register_loss('GCLLoss')
class GCLLoss(Loss):
    """Gaussian clouded logit adjustment on the cosine head's logits s * cos (`use_norm`), as GCL's
    GCLLoss computes them: CE of s * (cos_j - noise_mul * |z_j| * r_j - m [j = y]), z normal with
    standard deviation 1/3 clipped to [-1, 1], drawn afresh for every sample, class and call (mixup's
    two label sets get two draws, as theirs), r_j = gcl_cloud_scale. The cloud only in training mode;
    `.eval()` leaves the margin alone. gamma > 0: the focal weighting (1 - p_y) ** gamma (p_y without
    gradient) of GCL's stage 2 (their `train_cls`); gamma 0 is plain CE.

    z comes from torch's global generator of the logits' device (seeded by the scripts, saved in
    checkpoints), so a resumed run draws what the uninterrupted run would have drawn."""

    def __init__(self, cls_num_list, m=0.0, s=30.0, noise_mul=0.5, gamma=0.0):
        super().__init__()
        self.register_buffer('cloud_scale', gcl_cloud_scale(cls_num_list))
        self.m, self.s, self.noise_mul, self.gamma = m, s, noise_mul, gamma

    @staticmethod
    def check_config(cfg):
        gcl = cfg.loss.GCL
        need(gcl.s > 0, f'loss.GCL.s {gcl.s} must be positive (the logit scale: 30 in GCL stage 1, 20 in stage 2)')
        need(gcl.noise_mul >= 0, f'loss.GCL.noise_mul {gcl.noise_mul} must be 0 (no cloud) or more (GCL: 0.5)')
        need(gcl.m >= 0, f'loss.GCL.m {gcl.m} must be 0 or more (the margin on the cosine: 0 in GCL stage 1, '
             f'0.1 in stage 2)')
        need(gcl.gamma >= 0, f'loss.GCL.gamma {gcl.gamma} must be 0 (CE) or more (focal: 1 in GCL stage 2)')
        need(cfg.use_norm, 'loss.type GCLLoss works on cosine logits; set use_norm True')
        need(not cfg.lws, 'loss.type GCLLoss expects the logits s * cosine, which lws rescales; set lws False')

    @classmethod
    def from_config(cls, cfg, cls_num_list):
        gcl = cfg.loss.GCL
        return cls(cls_num_list, gcl.m, gcl.s, gcl.noise_mul, gcl.gamma)

    @staticmethod
    def cosine_scale(cfg):
        return cfg.loss.GCL.s

    def adjusted_logits(self, logits, target):
        """The logits the loss takes the CE of: the cloud (training mode only) and the margin taken off."""
        logits = logits.float()
        if self.training and self.noise_mul > 0:
            z = torch.randn(logits.shape, device=logits.device) * (1 / 3)
            logits = logits - (self.s * self.noise_mul) * z.clamp_(-1, 1).abs_() * self.cloud_scale
        return logits.scatter_add(1, target[:, None], torch.full_like(logits[:, :1], -self.s * self.m))

    def forward(self, logits, target):
        nll = F.cross_entropy(self.adjusted_logits(logits, target), target, reduction='none')
        if self.gamma > 0:
            nll = (1 - torch.exp(-nll.detach())) ** self.gamma * nll
        return nll.mean()


def build_loss(cfg, cls_num_list):
    """The criterion `cfg.loss.type` names, with its keys (checked by utils.config.check_config)."""
    return LOSSES[cfg.loss.type].from_config(cfg, cls_num_list)
