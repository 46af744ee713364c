"""The classifier heads, shared by every backbone: pool the backbone's feature map, then a linear or
cosine layer, optionally MiSLAS's learnable weight scaling. Parameter names match the authors'
checkpoints (fc.weight, fc.bias; lws.learned_norm)."""
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['Classifier', 'NormedLinear', 'LearnableWeightScaling']


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
