from loss import LOSSES
from utils.errors import UserError
from .heads import Classifier, LearnableWeightScaling, NormedLinear
from .resnet_cifar import BACKBONES as CIFAR_BACKBONES
from .resnet_cifar import ResNet_fe, resnet20_fe, resnet32_fe, resnet44_fe, resnet56_fe, resnet110_fe
from .resnet_imagenet import BACKBONES as IMAGENET_BACKBONES
from .resnet_imagenet import PlacesResNetFE, ResNetFE, load_pretrained

BACKBONES = {**CIFAR_BACKBONES, **IMAGENET_BACKBONES}


def build_model(cfg):
    """The backbone named by `cfg.backbone` and a `Classifier` for `cfg.num_classes` classes (cosine,
    scaled by the s of loss.type, with `use_norm`; MiSLAS's learnable weight scaling with `lws`). Without a
    checkpoint to resume, the backbone starts from `cfg.pretrained` where given."""
    backbone = BACKBONES[cfg.backbone]()
    if not cfg.resume:
        if cfg.pretrained:
            load_pretrained(backbone, cfg.pretrained)
        elif getattr(backbone, 'needs_pretrained', False):
            raise UserError(f'{cfg.backbone} trains only its last block on ImageNet-trained weights; set pretrained '
                            f'to a local file of them (torchvision resnet152-*.pth)')
    scale = LOSSES[cfg.loss.type].cosine_scale(cfg)
    return backbone, Classifier(backbone.out_channels, cfg.num_classes, cfg.use_norm, scale, cfg.lws)
