"""What the three scripts do before training or evaluating: config, device, data, model, checkpoint."""
import torch

from datasets import build_data
from models import build_model
from .checkpoint import load_checkpoint, load_weights
from .config import load_config, parse_args
from .errors import UserError
from .runtime import select_device, select_precision, seed_everything


def prepare(description, stage=None, checkpoint='optional'):
    """Parse `--cfg FILE KEY VALUE ...`, check everything the run needs, and build it.

    Every input is checked here, before any file is written: a bad config, missing data or an
    unusable checkpoint stops the script with one line and no run folder.
    Returns (cfg, device, precision, data, backbone, classifier, ckpt).
    """
    args = parse_args(description)
    cfg = load_config(args.cfg, args.opts)
    if stage and cfg.mode != stage:
        script = 'train_stage1.py' if cfg.mode == 'stage1' else 'train_stage2.py'
        raise UserError(f'{args.cfg} is a {cfg.mode} config (mode: {cfg.mode}); run {script} with it')
    if checkpoint == 'required' and not cfg.resume:
        raise UserError(f'{description.split(":")[0]} needs a checkpoint; add `resume path/to/model_best.pth.tar`')
    device = select_device(cfg)
    precision = select_precision(cfg, device)
    seed_everything(cfg.seed, cfg.deterministic)
    ckpt = load_checkpoint(cfg.resume) if cfg.resume else None
    backbone, classifier = build_model(cfg)
    if ckpt is not None:
        load_weights(backbone, ckpt['state_dict_model'], cfg.resume, 'backbone', cfg)
        load_weights(classifier, ckpt['state_dict_classifier'], cfg.resume, 'classifier', cfg)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    backbone.to(device, memory_format=memory_format)
    classifier.to(device)
    data = build_data(cfg, device)
    return cfg, device, precision, data, backbone, classifier, ckpt
