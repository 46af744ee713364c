"""ResNet-10/50/152 and ResNeXt-50 for ImageNet-LT, iNaturalist 2018 and Places-LT, as feature extractors.

The networks are torchvision's (`torchvision.models.resnet.ResNet`), not a copy. `ResNetFE` keeps their
stem and four stages under torchvision's names (conv1, bn1, layer1..4), so torchvision's and MiSLAS's
weight files load as they are, and returns the last feature map, [B, C, H/32, W/32], on which H2T fuses
channels; `Classifier` (heads.py) pools it and applies `fc`, as for ResNet-32.
"""
import os

import torch
import torch.nn as nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from common.checkpoint import state_dict_differences
from common.errors import UserError

STAGES = ('conv1', 'bn1', 'relu', 'maxpool', 'layer1', 'layer2', 'layer3', 'layer4')


class ResNetFE(nn.Module):
    """torchvision's ResNet up to its last stage (no pooling, no fc)."""
    new_modules = ()   # prefixes of parameters that ImageNet weights do not provide
    discarded = ()     # prefixes of ImageNet weights this network leaves out
    needs_pretrained = False

    def __init__(self, block, layers, **kwargs):
        super().__init__()
        net = ResNet(block, layers, **kwargs)
        for name in STAGES:
            setattr(self, name, getattr(net, name))
        self.out_channels = net.fc.in_features

    def forward(self, x):
        for name in STAGES:
            x = getattr(self, name)(x)
        return x


class PlacesResNetFE(ResNetFE):
    """Places-LT's recipe (Decoupling, MiSLAS): an ImageNet-trained ResNet whose last block is replaced by
    a new one (`block`, as their `Bottleneck(2048, 512)`), which alone is trained; everything before it
    keeps its ImageNet weights and, in eval mode whatever `train()` says, its BN statistics."""
    needs_pretrained = True

    def __init__(self, block, layers, **kwargs):
        super().__init__(block, layers[:-1] + [layers[-1] - 1], **kwargs)
        self.requires_grad_(False)
        self.block = block(self.out_channels, self.out_channels // block.expansion)
        self.new_modules = ('block.',)
        self.discarded = (f'layer4.{layers[-1] - 1}.',)

    def train(self, mode=True):
        super().train(mode)
        for name in STAGES:
            getattr(self, name).eval()
        return self

    def forward(self, x):
        with torch.no_grad():
            x = super().forward(x)
        return self.block(x)


def _backbone(name, cls, block, layers, **kwargs):
    def build():
        return cls(block, layers, **kwargs)
    build.__name__ = name
    return build


BACKBONES = {f.__name__: f for f in (
    _backbone('resnet10_fe', ResNetFE, BasicBlock, [1, 1, 1, 1]),
    _backbone('resnet50_fe', ResNetFE, Bottleneck, [3, 4, 6, 3]),
    _backbone('resnet152_fe', ResNetFE, Bottleneck, [3, 8, 36, 3]),
    _backbone('resnext50_32x4d_fe', ResNetFE, Bottleneck, [3, 4, 6, 3], groups=32, width_per_group=4),
    _backbone('resnet152_places_fe', PlacesResNetFE, Bottleneck, [3, 8, 36, 3]),
)}


def load_pretrained(backbone, path):
    """Weights of an ImageNet-trained ResNet from a local file (compute nodes are often offline): a plain
    state_dict (torchvision's `resnet152-*.pth`) or a checkpoint holding one under `state_dict` or
    `state_dict_model`; `module.` prefixes, the `fc.` classifier and what the network leaves out are dropped."""
    if not os.path.isfile(path):
        raise UserError(f'pretrained weights {path} not found; download them on a machine with internet (e.g. '
                        f'torchvision ResNet152_Weights.IMAGENET1K_V1) and set pretrained to the local file')
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise UserError(f'cannot read pretrained weights {path} ({type(e).__name__}); is it a torch weights file?')
    for key in ('state_dict_model', 'state_dict'):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f'{path} holds no state_dict of tensors; give a torch weights file of the backbone')
    drop = ('fc.',) + tuple(getattr(backbone, 'discarded', ()))
    state = {k.removeprefix('module.'): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(drop)}
    missing, unexpected, mismatched = state_dict_differences(backbone.state_dict(), state)
    missing = [k for k in missing if not k.startswith(tuple(getattr(backbone, 'new_modules', ())))]
    if missing or unexpected or mismatched:
        first = (missing + unexpected + [k for k, _, _ in mismatched])[0]
        raise UserError(f'pretrained weights {path} do not fit this backbone ({len(missing)} missing, '
                        f'{len(unexpected)} unexpected, {len(mismatched)} of another shape, e.g. {first!r}); '
                        f'pick the matching backbone')
    backbone.load_state_dict(state, strict=False)
