"""Backbones (one file per family) and the heads that serve them: `build_model` makes the pair a config
names, `check_config` refuses a pair that cannot be built."""
from common.errors import UserError, need
from .heads import HEADS, Classifier, ExpertClassifier, LearnableWeightScaling, NormedLinear, ResClassifier, head_class
from .resnet_cifar import BACKBONES as CIFAR_BACKBONES
from .resnet_cifar import (EXPERT_BACKBONES, RIDEResNet_fe, ResNet_fe, resnet20_fe, resnet32_fe, resnet32_ride_fe,
                           resnet44_fe, resnet56_fe, resnet110_fe)
from .resnet_imagenet import BACKBONES as IMAGENET_BACKBONES
from .resnet_imagenet import PlacesResNetFE, ResNetFE, load_pretrained

BACKBONES = {**CIFAR_BACKBONES, **IMAGENET_BACKBONES}


def head_of(cfg):
    """The head class cfg builds: ResClassifier, ExpertClassifier (Classifier on a multi-expert backbone) or
    Classifier. Its `output` says what it gives: 'branches', 'experts' or 'logits'."""
    return head_class(cfg, cfg.backbone in EXPERT_BACKBONES)


def check_config(cfg):
    """The model keys: a known backbone and head, experts only on a multi-expert backbone, and what the head
    allows (its own check_config)."""
    need(cfg.backbone in BACKBONES, f'backbone {cfg.backbone!r} is unknown; use one of {sorted(BACKBONES)}')
    need(cfg.classifier in HEADS, f"classifier {cfg.classifier!r} is not supported; use one of {', '.join(HEADS)} "
         f"(use_norm True gives the cosine head)")
    need(isinstance(cfg.num_experts, int) and cfg.num_experts >= 1,
         f'num_experts {cfg.num_experts} must be a whole number, at least 1 (RIDE: 3)')
    need(cfg.num_experts == 1 or cfg.backbone in EXPERT_BACKBONES,
         f'num_experts {cfg.num_experts} needs a multi-expert backbone ({", ".join(sorted(EXPERT_BACKBONES))}); '
         f'{cfg.backbone} has one; set num_experts 1 or change backbone')
    head_of(cfg).check_config(cfg)


def build_model(cfg, cosine_scale):
    """The backbone named by `cfg.backbone` and its head for `cfg.num_classes` classes: `Classifier` (cosine
    with `use_norm`, its logits `cosine_scale` times the cosine; MiSLAS's learnable weight scaling with `lws`),
    one cosine or linear classifier per expert on a multi-expert backbone (RIDE's, `num_experts` experts, widths
    per `reduce_dimension`), or ResLT's head/medium/tail branches with `classifier: ResClassifier`. Without a
    checkpoint to resume, the backbone starts from `cfg.pretrained` where given."""
    experts = cfg.backbone in EXPERT_BACKBONES
    build = BACKBONES[cfg.backbone]
    backbone = build(cfg.num_experts, cfg.reduce_dimension) if experts else build()
    if not cfg.resume:
        if cfg.pretrained:
            load_pretrained(backbone, cfg.pretrained)
        elif getattr(backbone, 'needs_pretrained', False):
            raise UserError(f'{cfg.backbone} trains only its last block on ImageNet-trained weights; set pretrained '
                            f'to a local file of them (torchvision resnet152-*.pth)')
    return backbone, head_of(cfg).from_config(cfg, backbone.out_channels, cosine_scale)
