"""Every configuration key with its default, in one place (yacs), and the checks on its values.

Scripts take `--cfg FILE` and then `KEY VALUE` pairs, e.g. `resume saved/run/ckps/model_best.pth.tar`
or `lr_scheduler.lr_factor 0.1`. The keys of the authors' H2T configs are all accepted, so their CIFAR
YAML files run unchanged (their IF-50 stage-1 file's `cos: False` included); MiSLAS's YAMLs have keys of their
own (a top-level `lr_factor`) and are refused with the key named: use the shipped configs, which carry MiSLAS's
values.
"""
import argparse
import os

import yaml
from yacs.config import CfgNode as CN

import datasets
import models
from common.errors import UserError, need
from loss import LOSSES

_C = CN()
_C.name = ''
_C.print_freq = 40
_C.workers = 0               # DataLoader worker processes (per rank): list datasets, and CIFAR's data_loader 'torch'
_C.log_dir = 'logs'
_C.model_dir = 'ckps'
_C.save_dir = 'saved'        # runs go to <save_dir>/<name>_<YYYYmmddHHMM>/{log_dir,model_dir}

# dataset
_C.dataset = 'cifar10'       # 'cifar10' | 'cifar100' | 'imagenet' (ImageNet-LT) | 'places' (Places-LT) | 'ina2018'
_C.data_path = './data/cifar10'  # CIFAR: the folder holding cifar-10-batches-py/; list datasets: the image root
_C.train_list = ''           # list datasets: `path label` list (or iNat JSON); '' = data_path/<standard name>
_C.eval_list = ''            # ... and the evaluation list (ImageNet_LT_test.txt, Places_LT_test.txt,
                             # iNaturalist18_val.txt)
_C.image_size = 224          # list datasets: the training crop and the evaluation centre crop
_C.download = True           # CIFAR: fetch the official files (MD5-checked) if they are absent; False: never
_C.num_classes = 10
_C.imb_type = 'exp'          # 'exp' | 'step'
_C.imb_factor = 0.01         # n_min / n_max, in (0, 1]; 1 keeps the balanced set
_C.data_loader = 'device'    # CIFAR: 'device': data held on the training device, batched augmentation;
                             # 'torch': PIL transforms in a torch DataLoader (the authors' way).
                             # List datasets always decode in DataLoader workers.
_C.eval_batch_size = 1000

_C.sampler = CN()
_C.sampler.type = 'default'  # 'default' (instance) | 'weighted sampler'
_C.sampler.weighted_sampler = CN()
_C.sampler.weighted_sampler.type = 'balance'
_C.sampler.dual_sample = CN()
_C.sampler.dual_sample.enable = False
_C.sampler.dual_sample.type = 'long-tailed'

# model
_C.backbone = 'resnet32_fe'
_C.pretrained = ''           # ImageNet-trained weights of the backbone, a local file (Places-LT: resnet152)
_C.resume = ''               # checkpoint to start from (stage 2: the stage-1 model_best.pth.tar)
_C.auto_resume = False       # continue the run of `resume` (its ckps/current.pth.tar) exactly, in its folder
_C.head_class_idx = [0, 1]   # [start, end) of the many-shot classes
_C.med_class_idx = [0, 1]
_C.tail_class_idx = [0, 1]
_C.classifier = 'Classifier'
_C.use_norm = False          # Classifier: s * cosine of normalised features and weights (LDAM, GCL), s = loss.LDAM.s
                             # (loss.GCL.s with GCLLoss)
_C.lws = False               # stage 2: MiSLAS's learnable per-class scale of the logits, learned at the full LR
                             # (lr_scheduler.lr_factor scales the classifier's LR only, as in MiSLAS)
_C.num_experts = 1           # multi-expert backbones (resnet32_ride_fe): the number of experts (RIDE: 3)
_C.reduce_dimension = False  # resnet32_ride_fe: RIDE's narrower experts, layer2/layer3 widths 24/48 instead of 32/64

# loss (loss.py), the authors' keys and defaults
_C.loss = CN()
_C.loss.type = 'CrossEntropyLoss'  # registered in loss.py: 'CrossEntropyLoss' | 'LabelAwareSmoothing' | 'LDAMLoss' |
                                   # 'RIDELoss' | 'ResLoss' | 'GCLLoss'
_C.loss.CE = CN()
_C.loss.CE.reweight_CE = False     # class-balanced weights, beta 0.9999
_C.loss.LDAM = CN()
_C.loss.LDAM.max_m = 0.5           # the largest margin (the rarest class)
_C.loss.LDAM.s = 30.0               # also the cosine head's scale (use_norm) for the losses without an s
_C.loss.LDAM.reweight_epoch = -1   # DRW: class-balanced weights after this epoch (counted from 0); -1 never
_C.loss.LAS = CN()
_C.loss.LAS.shape = 'concave'      # how smoothing falls from smooth_head to smooth_tail: concave|linear|convex|exp
_C.loss.LAS.power = None           # the exponent of shape 'exp'
# RIDE's distribution-aware diversity loss (RIDELoss), the defaults of RIDE's RIDELoss
_C.loss.RIDE = CN()
_C.loss.RIDE.base_loss_factor = 1.0             # weight of each expert's LDAM loss
_C.loss.RIDE.additional_diversity_factor = -0.2  # weight of each expert's KL to the experts' mean (negative: diversity)
_C.loss.RIDE.base_diversity_temperature = 1.0
_C.loss.RIDE.reweight_factor = 0.05              # after reweight_epoch the temperature grows with the class's share
_C.loss.RIDE.max_m = 0.5                         # LDAM's largest margin
_C.loss.RIDE.s = 30.0                            # logit scale of the cosine heads (use_norm) and of the margins
_C.loss.RIDE.reweight = True                     # False: no DRW weights, no per-class temperature
_C.loss.RIDE.reweight_epoch = -1                 # DRW from the epoch after this one (counted from 0); -1 never
_C.loss.add_extra_info = False  # RIDELoss gets every expert's logits (True: RIDE's loss, as RIDE's stage 1); False,
                                # the authors' default: plain CE of the experts' mean (their RIDE stage 2)
# ResLT's loss (ResLoss): (1 - beta) * CE of the fused logits + beta * the branches' own CE
_C.loss.ResLT = CN()
_C.loss.ResLT.beta = 0.998
_C.loss.ResLT.branch_starts = []   # [m, t]: the medium branch learns classes m.. and the tail branch t.. (classes
                                   # sorted largest first); the head branch learns all
_C.loss.GCL = CN()                 # GCL (Keke921/GCLLoss): the values of its CIFAR stage 1
_C.loss.GCL.m = 0.0                # margin on the true class's cosine (stage 2: 0.1)
_C.loss.GCL.s = 30.0               # logit scale, also the cosine head's (stage 2: 20)
_C.loss.GCL.noise_mul = 0.5        # amplitude of the Gaussian cloud at the rarest class
_C.loss.GCL.gamma = 0.0            # focal exponent: 0 = CE (stage 1), 1 in stage 2 (their train_cls)
_C.smooth_head = None              # LabelAwareSmoothing: smoothing of the largest class (MiSLAS key)
_C.smooth_tail = None              # ... and of the smallest

# device and run
_C.device = 'auto'           # 'auto' (CUDA when present, else CPU) | 'cpu' | 'cuda' | 'cuda:N'
_C.precision = 'auto'        # 'auto' (bf16 autocast where the hardware has it natively) | 'fp32' | 'bf16'
_C.eval_precision = 'fp32'   # evaluation (eval.py, and after each epoch, which picks model_best): 'fp32', so a
                             # checkpoint's figures do not depend on the machine, or 'same' (= precision, faster)
_C.channels_last = True
_C.compile = False           # torch.compile the model in the training scripts (faster steps for a one-time
                             # compile); the stage-1 configs turn it on
_C.compile_mode = 'default'  # torch.compile's mode: 'default' | 'reduce-overhead' (CUDA graphs: fewer kernel
                             # launches) | 'max-autotune' | 'max-autotune-no-cudagraphs'
_C.keep_freed_memory = False  # CPU: glibc keeps freed activation memory for the next step (docs/performance.md)
_C.seed = 0
_C.deterministic = False     # repeatable runs: deterministic kernels only (an op without one stops the run)
_C.sync_bn = False           # torchrun on GPUs: the backbone's BatchNorm normalises over the global batch
                             # (SyncBatchNorm) instead of each process's share
_C.gpu = None                # authors' key: a CUDA index, same as device 'cuda:<gpu>'

# training
_C.mode = 'stage1'
_C.shift_bn = False
_C.lr_scheduler = CN()
_C.lr_scheduler.type = 'warmup_step'  # stage 1: 'warmup_step'; stage 2: 'cos'
_C.lr_scheduler.warmup_epochs = 5
_C.lr_scheduler.milestones = [160, 180]
_C.lr_scheduler.gamma = 0.1
_C.lr_scheduler.lr_factor = 1.0
_C.lr = 0.1
_C.batch_size = 128
_C.weight_decay = 2e-4
_C.num_epochs = 200
_C.momentum = 0.9
_C.nesterov = False           # Nesterov momentum (RIDE's stage 1)
_C.mixup = True
_C.alpha = 1.0
_C.H2T = 0.0                 # rho: fraction of channels fused from the instance branch (stage 2)

# accepted so the authors' YAML files load; not read (multi-process runs are set up by torchrun, see
# common/distributed.py)
_C.distributed = False
_C.world_size = -1
_C.rank = -1
_C.dist_url = 'tcp://224.66.41.62:23456'
_C.dist_backend = 'nccl'
_C.multiprocessing_distributed = False
_C.cos = False               # MiSLAS's stage-1 switch, in the authors' IF-50 stage-1 file; True is refused

COMPILE_MODES = ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs')


def get_default_config():
    return _C.clone()


def parse_args(description, argv=None):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('--cfg', required=True, help='YAML config file')
    parser.add_argument('opts', nargs=argparse.REMAINDER, default=[],
                        help='KEY VALUE pairs that override the config, e.g. resume path/to/ckpt')
    return parser.parse_args(argv)


def load_config(cfg_file, opts=()):
    """Defaults, then the YAML file, then the overrides; checked and frozen."""
    cfg = get_default_config()
    if not os.path.isfile(cfg_file):
        raise UserError(f'config file {cfg_file} not found; pass an existing YAML file with --cfg')
    try:
        with open(cfg_file) as f:
            raw = yaml.safe_load(f)  # not CN.load_cfg(f), which imports (runs) a config file ending in .py
        if not isinstance(raw, (dict, type(None))):
            raise UserError(f'config file {cfg_file} holds a YAML {type(raw).__name__}, not KEY: VALUE lines; '
                            f'pass a YAML config like those in config/')
        cfg.merge_from_other_cfg(_ints_to_floats(CN(raw), cfg))
    except yaml.YAMLError as e:
        raise UserError(f'config file {cfg_file} is not valid YAML ({str(e).splitlines()[0]}); fix its syntax')
    except KeyError as e:
        raise UserError(f'{_key_message(e)} in {cfg_file}; remove it or fix its spelling')
    except ValueError as e:
        raise UserError(f'{_type_message(e)} in {cfg_file}')
    opts = list(opts)
    if len(opts) % 2:
        raise UserError(f'override {opts[-1]!r} has no value; give overrides as KEY VALUE pairs')
    for i in range(0, len(opts), 2):
        if _default_of(cfg, opts[i]) is _MISSING:
            raise UserError(f'unknown config key {opts[i]!r} on the command line; remove it or fix its spelling')
        opts[i + 1] = _int_to_float(CN._decode_cfg_value(opts[i + 1]), _default_of(cfg, opts[i]))
    try:
        cfg.merge_from_list(opts)
    except ValueError as e:
        raise UserError(f'{_type_message(e)} on the command line')
    check_config(cfg)
    cfg.freeze()
    return cfg


def _int_to_float(value, default):
    # yacs rejects `H2T 0` or `lr: 1` for float keys; an integer is a fine float.
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


_MISSING = object()


def _default_of(cfg, full_key):
    node = cfg
    for part in full_key.split('.'):
        if not isinstance(node, CN) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _ints_to_floats(loaded, defaults):
    for key, value in loaded.items():
        default = defaults.get(key) if isinstance(defaults, CN) else None
        if isinstance(value, CN):
            _ints_to_floats(value, default)
        else:
            loaded[key] = _int_to_float(CN._decode_cfg_value(value), default)
    return loaded


def _key_message(err):
    # yacs: KeyError('Non-existent config key: {}'.format(full_key))
    text = err.args[0] if err.args else str(err)
    key = text.split(':', 1)[-1].strip()
    return f'unknown config key {key!r}'


def _type_message(err):
    # yacs: 'Type mismatch (<class 'float'> vs. <class 'str'>) with values (0.1 vs. abc) for config key: lr'
    text = str(err.args[0] if err.args else err)
    if 'for config key:' in text:
        key = text.rsplit(':', 1)[-1].strip()
        return (f'config key {key!r} has a value of the wrong type ({text.split(" with ")[0]}); '
                f'give a value like its default')
    return f'bad config value ({text})'


def head_scale(cfg):
    """s of the cosine head (`use_norm`): its logits are s times the cosine, the s that loss.type expects."""
    return LOSSES[cfg.loss.type].cosine_scale(cfg)


OUTPUT_WORDS = {'logits': 'one set of logits', 'experts': "the experts' logits",
                'branches': "ResLT's head/medium/tail branches"}


def check_config(cfg):
    """Reject values that would train something other than what the user meant: the training keys here, then
    the data's, the model's and the loss's own rules, and whether the loss takes what the model gives."""
    need(isinstance(cfg.H2T, (int, float)) and 0 <= cfg.H2T <= 1,
         f'H2T {cfg.H2T} is outside [0, 1]; it is the fraction of fused channels (0 turns fusion off)')
    need(cfg.mode != 'stage1' or cfg.H2T <= 0,
         f'H2T {cfg.H2T} is set in a stage-1 config, but fusion is a stage-2 method; remove H2T or set it to 0')
    need(cfg.mode != 'stage2' or cfg.H2T <= 0 or cfg.sampler.dual_sample.enable,
         f'H2T {cfg.H2T} fuses channels of the instance-sampled branch, which sampler.dual_sample.enable False '
         f'turns off; set sampler.dual_sample.enable True, or H2T 0 for plain class-balanced re-training')
    need(cfg.batch_size >= 1, f'batch_size {cfg.batch_size} must be at least 1')
    need(not cfg.mixup or (isinstance(cfg.alpha, (int, float)) and not isinstance(cfg.alpha, bool)),
         f'mixup True needs alpha, the Beta(alpha, alpha) of its mixing weight, but alpha is {cfg.alpha}; set alpha '
         f'1.0 (CIFAR) or mixup False')
    need(cfg.eval_batch_size >= 1, f'eval_batch_size {cfg.eval_batch_size} must be at least 1')
    need(cfg.num_epochs >= 1, f'num_epochs {cfg.num_epochs} must be at least 1')
    need(cfg.lr > 0, f'lr {cfg.lr} must be positive')
    need(cfg.lr_scheduler.lr_factor > 0, f'lr_scheduler.lr_factor {cfg.lr_scheduler.lr_factor} must be positive')
    need(cfg.mode in ('stage1', 'stage2'), f"mode {cfg.mode!r} is unknown; use 'stage1' or 'stage2'")
    need(not cfg.cos, "cos True (MiSLAS's cosine schedule switch) is not read here; set lr_scheduler.type cos (with "
                      "lr_scheduler.lr_factor 1.0 for the full LR) and remove cos")
    need(cfg.lr_scheduler.type in ('warmup_step', 'cos'),
         f"lr_scheduler.type {cfg.lr_scheduler.type!r} is unknown; use 'warmup_step' or 'cos'")
    need(cfg.precision in ('auto', 'fp32', 'bf16'), f"precision {cfg.precision!r} is unknown; use auto, fp32 or bf16")
    need(cfg.eval_precision in ('fp32', 'same'),
         f"eval_precision {cfg.eval_precision!r} is unknown; use fp32 or same (the training precision)")
    need(cfg.compile_mode in COMPILE_MODES,
         f"compile_mode {cfg.compile_mode!r} is unknown; use one of {', '.join(COMPILE_MODES)}")
    datasets.check_config(cfg)
    models.check_config(cfg)
    need(cfg.loss.type in LOSSES, f'loss.type {cfg.loss.type!r} is unknown; use one of {", ".join(LOSSES)}')
    loss, gives = LOSSES[cfg.loss.type], models.head_of(cfg).output
    if loss.takes != gives:
        fix = loss.pairs_with and f'set {loss.pairs_with}'
        if loss.takes == 'logits':
            fix = 'use loss.type ' + ' or '.join(name for name, c in LOSSES.items() if c.takes == gives)
        raise UserError(f'loss.type {cfg.loss.type} takes {OUTPUT_WORDS[loss.takes]}, but backbone {cfg.backbone} with '
                        f'classifier {cfg.classifier} gives {OUTPUT_WORDS[gives]}; {fix}')
    loss.check_config(cfg)  # each loss checks its own keys (loss.py)
