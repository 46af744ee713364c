from utils.metrics import config_splits
from .cifar_lt import IMBALANCECIFAR10, IMBALANCECIFAR100, img_num_per_cls
from .image_list import ImageNet_LT, LT_Dataset, Places_LT, iNa2018
from .loaders import (DeviceEvalLoader, DeviceTrainLoader, balanced_indices, crop_flip, instance_indices,
                      torch_eval_loader, torch_train_loader)


class CIFAR10_LT:
    """The long-tailed training set, the balanced test set, and the batch loaders a config asks for."""
    dataset_class = IMBALANCECIFAR10

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


DATASETS = {'cifar10': CIFAR10_LT, 'cifar100': CIFAR100_LT, 'imagenet': ImageNet_LT, 'places': Places_LT,
            'ina2018': iNa2018}


def build_data(cfg, device):
    return DATASETS[cfg.dataset](cfg, device)
