from loss import LOSSES
from utils.errors import UserError
from .heads import HEADS, Classifier, ExpertClassifier, LearnableWeightScaling, NormedLinear, ResClassifier
from .resnet_cifar import BACKBONES as CIFAR_BACKBONES
from .resnet_cifar import (EXPERT_BACKBONES, RIDEResNet_fe, ResNet_fe, resnet20_fe, resnet32_fe, resnet32_ride_fe,
                           resnet44_fe, resnet56_fe, resnet110_fe)
from .resnet_imagenet import BACKBONES as IMAGENET_BACKBONES
from .resnet_imagenet import PlacesResNetFE, ResNetFE, load_pretrained

BACKBONES = {**CIFAR_BACKBONES, **IMAGENET_BACKBONES}


def build_model(cfg):
    """The backbone named by `cfg.backbone` and a `Classifier` for `cfg.num_classes` classes (cosine,
    scaled by the s of loss.type, with `use_norm`; MiSLAS's learnable weight scaling with `lws`). Without a
    checkpoint to resume, the backbone starts from `cfg.pretrained` where given.

    A multi-expert backbone (RIDE's) has `num_experts` experts (widths per `reduce_dimension`) and gets
    one classifier per expert (ExpertClassifier, scaled by loss.RIDE.s with `use_norm`); `classifier:
    ResClassifier` gives ResLT's head/medium/tail branches on either kind of backbone."""
    experts = cfg.backbone in EXPERT_BACKBONES
    build = BACKBONES[cfg.backbone]
    backbone = build(cfg.num_experts, cfg.reduce_dimension) if experts else build()
    if not cfg.resume:
        if cfg.pretrained:
            load_pretrained(backbone, cfg.pretrained)
        elif getattr(backbone, 'needs_pretrained', False):
            raise UserError(f'{cfg.backbone} trains only its last block on ImageNet-trained weights; set pretrained '
                            f'to a local file of them (torchvision resnet152-*.pth)')
    num_experts = cfg.num_experts if experts else 1
    if cfg.classifier == 'ResClassifier':
        return backbone, ResClassifier(backbone.out_channels, cfg.num_classes, num_experts)
    if experts:
        return backbone, ExpertClassifier(backbone.out_channels, cfg.num_classes, num_experts, cfg.use_norm,
                                          cfg.loss.RIDE.s)
    scale = LOSSES[cfg.loss.type].cosine_scale(cfg)
    return backbone, Classifier(backbone.out_channels, cfg.num_classes, cfg.use_norm, scale, cfg.lws)
