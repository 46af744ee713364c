from .resnet_cifar import BACKBONES, Classifier, LearnableWeightScaling, NormedLinear, ResNet_fe, resnet20_fe, \
    resnet32_fe, resnet44_fe, resnet56_fe, resnet110_fe


def build_model(cfg):
    """The backbone named by `cfg.backbone` and a `Classifier` for `cfg.num_classes` classes (cosine,
    scaled by loss.LDAM.s, with `use_norm`; MiSLAS's learnable weight scaling with `lws`)."""
    backbone = BACKBONES[cfg.backbone]()
    return backbone, Classifier(backbone.out_channels, cfg.num_classes, cfg.use_norm, cfg.loss.LDAM.s, cfg.lws)
