"""The datasets, one family a module, behind `build_data(cfg, device)`: CIFAR-10/100-LT (cifar_lt.py) and the
list datasets ImageNet-LT, Places-LT and iNaturalist 2018 (image_list.py), with their batch loaders
(loaders.py); `check_config` refuses dataset settings none of them can serve."""
from common import distributed
from common.errors import need
from common.metrics import config_splits
from .cifar_lt import IMBALANCECIFAR10, IMBALANCECIFAR100, img_num_per_cls
from .image_list import ImageNet_LT, LT_Dataset, Places_LT, iNa2018
from .loaders import (DeviceEvalLoader, DeviceTrainLoader, balanced_indices, crop_flip, instance_indices,
                      torch_eval_loader, torch_train_loader)


class CIFAR10_LT:
    """The long-tailed training set, the balanced test set, and the batch loaders a config asks for."""
    dataset_class = IMBALANCECIFAR10
    num_classes = 10

    @classmethod
    def check_config(cls, cfg):
        need(cfg.num_classes == cls.num_classes,
             f'num_classes {cfg.num_classes} does not match dataset {cfg.dataset} ({cls.num_classes} classes); fix '
             f'num_classes')
        need(cfg.data_loader == 'device' or not distributed.launched_by_torchrun(),
             'multi-process CIFAR runs need data_loader device; drop `data_loader torch` or run one process')
        for key in ('head_class_idx', 'med_class_idx', 'tail_class_idx'):  # the many / medium / few classes
            idx = cfg[key]
            need(len(idx) == 2 and 0 <= idx[0] <= idx[1] <= cfg.num_classes,
                 f'{key} {list(idx)} must be [start, end) with 0 <= start <= end <= num_classes ({cfg.num_classes})')

    def __init__(self, cfg, device):
        self.cfg, self.device = cfg, device
        kwargs = dict(imb_type=cfg.imb_type, imb_factor=cfg.imb_factor, download=cfg.download)
        self.train_set = self.dataset_class(cfg.data_path, train=True, **kwargs)
        self.test_set = self.dataset_class(cfg.data_path, train=False, **kwargs)
        self.cls_num_list = self.train_set.get_cls_num_list()
        self.class_splits = config_splits(cfg)  # the classes are sorted by size: ranges of the config
        self.imb_factor = cfg.imb_factor
        self.description = f'{cfg.dataset} IF={1 / cfg.imb_factor:g}'

    def train_loader(self):
        """Stage 1: instance sampling; `sampler.type: weighted sampler` makes it class-balanced, and
        `sampler.dual_sample.enable` adds the instance-sampled fusing branch of stage 2 where H2T fuses
        (rho > 0). At rho 0 the authors never run that branch through the backbone, so it is not drawn:
        the batches, the random numbers and the BN running statistics are those of a run without it."""
        cfg = self.cfg
        sampling = 'balanced' if cfg.sampler.type == 'weighted sampler' else 'instance'
        dual = cfg.sampler.dual_sample.enable and cfg.H2T > 0
        if cfg.data_loader == 'torch':
            return torch_train_loader(self.train_set, cfg.batch_size, self.device, cfg.workers, sampling, dual,
                                      cfg.channels_last)
        return DeviceTrainLoader(self.train_set.data, self.train_set.targets, cfg.num_classes, cfg.batch_size,
                                 self.device, sampling, dual, cfg.channels_last)

    def eval_loader(self):
        cfg = self.cfg
        if cfg.data_loader == 'torch':
            return torch_eval_loader(self.test_set, cfg.eval_batch_size, self.device, cfg.workers, cfg.channels_last)
        return DeviceEvalLoader(self.test_set.data, self.test_set.targets, cfg.eval_batch_size, self.device,
                                cfg.channels_last)


class CIFAR100_LT(CIFAR10_LT):
    dataset_class = IMBALANCECIFAR100
    num_classes = 100


DATASETS = {'cifar10': CIFAR10_LT, 'cifar100': CIFAR100_LT, 'imagenet': ImageNet_LT, 'places': Places_LT,
            'ina2018': iNa2018}


def check_config(cfg):
    """The data keys: a known dataset, an imbalance, a loader and samplers it has, and the dataset's own rules."""
    need(cfg.dataset in DATASETS, f"dataset {cfg.dataset!r} is not supported; use one of {sorted(DATASETS)}")
    need(cfg.num_classes >= 2, f'num_classes {cfg.num_classes} must be at least 2')
    need(cfg.image_size >= 32, f'image_size {cfg.image_size} is too small; use 224 (the published crop)')
    need(cfg.workers >= 0, f'workers {cfg.workers} must be 0 (load in the training process) or more')
    need(isinstance(cfg.imb_factor, (int, float)) and 0 < cfg.imb_factor <= 1,
         f'imb_factor {cfg.imb_factor} is outside (0, 1]; it is n_min / n_max, e.g. 0.01 for IF=100')
    need(cfg.imb_type in ('exp', 'step'), f"imb_type {cfg.imb_type!r} is unknown; use 'exp' or 'step'")
    need(cfg.data_loader in ('device', 'torch'), f"data_loader {cfg.data_loader!r} is unknown; use 'device' or 'torch'")
    need(cfg.sampler.type in ('default', 'weighted sampler'),
         f"sampler.type {cfg.sampler.type!r} is unknown; use 'default' or 'weighted sampler'")
    need(cfg.sampler.weighted_sampler.type == 'balance',
         f"sampler.weighted_sampler.type {cfg.sampler.weighted_sampler.type!r} is not supported; use 'balance'")
    need(cfg.sampler.dual_sample.type == 'long-tailed',
         f"sampler.dual_sample.type {cfg.sampler.dual_sample.type!r} is not supported; use 'long-tailed'")
    DATASETS[cfg.dataset].check_config(cfg)


def build_data(cfg, device):
    return DATASETS[cfg.dataset](cfg, device)
