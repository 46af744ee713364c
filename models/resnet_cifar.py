"""ResNet for CIFAR (He et al. 2016, section 4.2), split into a feature extractor and a classifier.

The backbone (`resnet32_fe` and its siblings) returns the last feature map, [B, 64, 8, 8] for a
32x32 input, because H2T fuses channels of that map; `Classifier` (heads.py) pools it and applies `fc`.
Parameter names match the authors' checkpoints (conv1, bn1, layer1..3.*, fc).

`resnet32_ride_fe` is RIDE's multi-expert ResNet-32 (Wang et al., ICLR 2021): conv1 and layer1 shared,
layer2 and layer3 once per expert (layer2s.i, layer3s.i, RIDE's names); it returns the list of the
experts' last feature maps, which H2T fuses each with its own channel draw.
"""
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['ResNet_fe', 'RIDEResNet_fe', 'resnet20_fe', 'resnet32_fe', 'resnet44_fe', 'resnet56_fe', 'resnet110_fe',
           'resnet32_ride_fe', 'BACKBONES', 'EXPERT_BACKBONES']


def _kaiming_init(module):
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.kaiming_normal_(module.weight)


class DownsampleA(nn.Module):
    """Option-A shortcut: subsample every second pixel and zero-pad the new channels (no parameters)."""

    def __init__(self, in_planes, planes):
        super().__init__()
        self.pad = (planes - in_planes) // 2

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        downsample = stride != 1 or in_planes != planes
        self.shortcut = DownsampleA(in_planes, planes) if downsample else nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet_fe(nn.Module):
    """conv 3x3/16 + BN + ReLU, then three stages of `depth` BasicBlocks (16/32/64 channels)."""

    def __init__(self, blocks_per_stage):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes = 16
        for i, (planes, stride) in enumerate([(16, 1), (32, 2), (64, 2)]):
            blocks = []
            for b in range(blocks_per_stage):
                blocks.append(BasicBlock(in_planes, planes, stride if b == 0 else 1))
                in_planes = planes
            setattr(self, f'layer{i + 1}', nn.Sequential(*blocks))
        self.out_channels = in_planes
        self.apply(_kaiming_init)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(out)))


def _stage(in_planes, planes, stride, blocks):
    return nn.Sequential(*[BasicBlock(in_planes if b == 0 else planes, planes, stride if b == 0 else 1)
                           for b in range(blocks)])


class RIDEResNet_fe(nn.Module):
    """RIDE's CIFAR ResNet: conv 3x3/16 + BN + ReLU and layer1 (16 channels) shared by all experts, then
    per expert its own layer2 and layer3: widths 32/64 as ResNet-32, or 24/48 with RIDE's `reduce_dimension`
    (set in RIDE's CIFAR config)."""

    def __init__(self, blocks_per_stage, num_experts=3, reduce_dimension=False):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f'num_experts must be at least 1, got {num_experts}')
        width2, width3 = (24, 48) if reduce_dimension else (32, 64)
        self.num_experts = num_experts
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = _stage(16, 16, 1, blocks_per_stage)
        self.layer2s = nn.ModuleList(_stage(16, width2, 2, blocks_per_stage) for _ in range(num_experts))
        self.layer3s = nn.ModuleList(_stage(width2, width3, 2, blocks_per_stage) for _ in range(num_experts))
        self.out_channels = width3
        self.apply(_kaiming_init)

    def forward(self, x):
        shared = self.layer1(F.relu(self.bn1(self.conv1(x))))
        return [layer3(layer2(shared)) for layer2, layer3 in zip(self.layer2s, self.layer3s)]


def resnet32_ride_fe(num_experts=3, reduce_dimension=False):
    return RIDEResNet_fe(5, num_experts, reduce_dimension)


def resnet20_fe():
    return ResNet_fe(3)


def resnet32_fe():
    return ResNet_fe(5)


def resnet44_fe():
    return ResNet_fe(7)


def resnet56_fe():
    return ResNet_fe(9)


def resnet110_fe():
    return ResNet_fe(18)


BACKBONES = {f.__name__: f for f in (resnet20_fe, resnet32_fe, resnet44_fe, resnet56_fe, resnet110_fe,
                                     resnet32_ride_fe)}
# backbones that return a list of the experts' feature maps; built with (num_experts, reduce_dimension)
EXPERT_BACKBONES = {'resnet32_ride_fe'}
