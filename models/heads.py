"""The classifier heads, shared by every backbone: pool the backbone's feature map, then a linear or
cosine layer, optionally MiSLAS's learnable weight scaling. Parameter names match the authors'
checkpoints (fc.weight, fc.bias; lws.learned_norm).

Multi-output heads return more than one set of logits, [B, K, C]: RIDE's experts (`ExpertClassifier`)
and ResLT's head/medium/tail branches (`ResClassifier`). The losses of those methods take them all;
accuracy and evaluation use `head.combine(out)`, the one [B, C] prediction (a single head's `combine`
returns its logits as they are)."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.errors import need

__all__ = ['Classifier', 'NormedLinear', 'LearnableWeightScaling', 'ExpertClassifier', 'ResClassifier', 'HEADS',
           'head_class']


class NormedLinear(nn.Module):
    """Cosine similarity of the L2-normalised input and class weights (LDAM-DRW's head); weight is
    [feat_in, num_classes] as theirs, no bias."""

    def __init__(self, feat_in, num_classes):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(feat_in, num_classes).uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5))

    def forward(self, x):
        return F.normalize(x, dim=1) @ F.normalize(self.weight, dim=0)


class LearnableWeightScaling(nn.Module):
    """MiSLAS's stage-2 per-class scale of the logits, learned from 1 (identity)."""

    def __init__(self, num_classes):
        super().__init__()
        self.learned_norm = nn.Parameter(torch.ones(1, num_classes))

    def forward(self, x):
        return self.learned_norm * x


class Classifier(nn.Module):
    """Global average pooling + Linear(feat_in, num_classes); with `use_norm`, s times the cosine
    (NormedLinear), the logits LDAMLoss expects (its margins are subtracted as s * m); with `lws`,
    MiSLAS's LearnableWeightScaling after it (stage 2; absent from stage-1 checkpoints, it starts at 1)."""
    output = 'logits'  # one [B, C] set of logits

    @staticmethod
    def check_config(cfg):
        """Every setting of use_norm and lws works on one head."""

    @classmethod
    def from_config(cls, cfg, feat_in, cosine_scale):
        return cls(feat_in, cfg.num_classes, cfg.use_norm, cosine_scale, cfg.lws)

    def __init__(self, feat_in, num_classes, use_norm=False, s=30.0, lws=False):
        super().__init__()
        self.fc = NormedLinear(feat_in, num_classes) if use_norm else nn.Linear(feat_in, num_classes)
        self.scale = s if use_norm else 1.0
        if isinstance(self.fc, nn.Linear):
            nn.init.kaiming_normal_(self.fc.weight)
        self.lws = LearnableWeightScaling(num_classes) if lws else None

    def forward(self, x):
        out = self.fc(x.mean(dim=(2, 3)))
        if self.scale != 1.0:
            out = out * self.scale
        return self.lws(out) if self.lws is not None else out

    @staticmethod
    def combine(out):
        return out


def _linear_head(feat_in, num_classes, use_norm):
    if use_norm:
        return NormedLinear(feat_in, num_classes)
    linear = nn.Linear(feat_in, num_classes)
    nn.init.kaiming_normal_(linear.weight)
    return linear


class ExpertClassifier(nn.Module):
    """RIDE's per-expert classifiers: expert i pools its own feature map and applies `linears.i` (s times
    the cosine with `use_norm`, as RIDE's CIFAR model). Returns the experts' logits [B, E, C]; the
    prediction is their mean (RIDE without its expert-assignment router)."""
    output = 'experts'  # [B, E, C]

    @staticmethod
    def check_config(cfg):
        need(not cfg.lws, "lws (MiSLAS's weight scaling) needs a single Classifier head; set lws False for experts")

    @classmethod
    def from_config(cls, cfg, feat_in, cosine_scale):
        return cls(feat_in, cfg.num_classes, cfg.num_experts, cfg.use_norm, cosine_scale)

    def __init__(self, feat_in, num_classes, num_experts, use_norm=False, s=30.0):
        super().__init__()
        self.linears = nn.ModuleList(_linear_head(feat_in, num_classes, use_norm) for _ in range(num_experts))
        self.scale = s if use_norm else 1.0

    def forward(self, feats):
        out = torch.stack([linear(f.mean(dim=(2, 3))) for linear, f in zip(self.linears, feats)], dim=1)
        return out * self.scale if self.scale != 1.0 else out

    @staticmethod
    def combine(out):
        return out.mean(dim=1)


class ResClassifier(nn.Module):
    """ResLT's CIFAR head (Cui et al.): three BatchNorms on the feature map (BNH, BNM, BNT: the head,
    medium and tail branches' own parameters), each pooled and classified by a linear layer shared by
    the branches. With several experts (a list of maps, as in the H2T authors' ResLT), each expert has
    its own linear layer (`linear.i`) and the branches' logits are averaged over the experts. Returns
    [B, 3, C] (head, medium, tail); the prediction is their sum, ResLT's residual fusion."""
    output = 'branches'  # [B, 3, C]

    @staticmethod
    def check_config(cfg):
        need(not cfg.lws, "lws (MiSLAS's weight scaling) needs a single Classifier head; set lws False for "
                          "ResClassifier")
        need(not cfg.use_norm, 'use_norm gives Classifier a cosine head; ResClassifier has linear heads as ResLT, '
                               'remove use_norm')

    @classmethod
    def from_config(cls, cfg, feat_in, cosine_scale):
        return cls(feat_in, cfg.num_classes, cfg.num_experts)

    def __init__(self, feat_in, num_classes, num_experts=1):
        super().__init__()
        self.BNH, self.BNM, self.BNT = (nn.BatchNorm2d(feat_in) for _ in range(3))
        self.linear = nn.ModuleList(nn.Linear(feat_in, num_classes) for _ in range(num_experts))

    def forward(self, feats):
        feats = feats if isinstance(feats, (list, tuple)) else [feats]
        per_expert = []
        for linear, f in zip(self.linear, feats):
            branches = torch.stack([bn(f).mean(dim=(2, 3)) for bn in (self.BNH, self.BNM, self.BNT)], dim=1)
            per_expert.append(linear(branches))
        return torch.stack(per_expert).mean(dim=0)

    @staticmethod
    def combine(out):
        return out.sum(dim=1)


HEADS = ('Classifier', 'ResClassifier')  # cfg.classifier; Classifier on a multi-expert backbone is ExpertClassifier


def head_class(cfg, experts):
    """The head class of cfg.classifier on a backbone with (`experts`) or without several experts."""
    if cfg.classifier == 'ResClassifier':
        return ResClassifier
    return ExpertClassifier if experts else Classifier
