"""What the three scripts do before training or evaluating: config, device, data, model, checkpoint,
run folder and logger, in that order, so that bad input stops a script before it writes anything."""
import os
from types import SimpleNamespace

import torch

from datasets import build_data
from loss import build_loss
from models import build_model
from . import distributed
from .checkpoint import load_checkpoint, load_weights
from .config import CIFAR, load_config, parse_args
from .errors import UserError
from .runtime import (RunDir, check_compile_toolchain, compile_in_place, create_run_dir, disable_tf32, get_logger,
                      keep_freed_memory, select_device, select_precision, seed_everything)


def prepare(description, stage=None, checkpoint='optional', argv=None, compile_model=True):
    """Parse `--cfg FILE KEY VALUE ...`, check everything the run needs, and build it.

    Returns a namespace: cfg, device, precision, data, backbone, classifier, criterion (loss.type, built
    from the training set's class counts), ckpt, resume_state
    (the checkpoint when `auto_resume` continues a run), run (a RunDir; training scripts on rank 0
    only, else None) and logger. The model is compiled when cfg.compile is set, unless the caller
    (eval.py: one pass) passes compile_model=False.
    """
    args = parse_args(description, argv)
    cfg = load_config(args.cfg, args.opts)
    if stage and cfg.mode != stage:
        script = 'train_stage1.py' if cfg.mode == 'stage1' else 'train_stage2.py'
        raise UserError(f'{args.cfg} is a {cfg.mode} config (mode: {cfg.mode}); run {script} with it')
    if (checkpoint == 'required' or cfg.auto_resume) and not cfg.resume:
        raise UserError(f'{description.split(":")[0]} needs a checkpoint; add `resume path/to/'
                        f'{"current" if cfg.auto_resume else "model_best"}.pth.tar`')
    if distributed.launched_by_torchrun() and cfg.dataset in CIFAR and cfg.data_loader != 'device':
        raise UserError('multi-process CIFAR runs need data_loader device; drop `data_loader torch` or run one process')
    seed_everything(cfg.seed, cfg.deterministic)  # before CUDA starts: deterministic sets cuBLAS's workspace
    device = select_device(cfg)
    cuda_index = distributed.init(device.type)
    if cuda_index is not None:
        device = torch.device('cuda', cuda_index)
    precision = select_precision(cfg, device)
    disable_tf32(device)
    if device.type == 'cpu' and cfg.keep_freed_memory:
        keep_freed_memory()

    ckpt = load_checkpoint(cfg.resume) if cfg.resume else None
    resume_state = None
    if cfg.auto_resume:
        if ckpt.get('mode') != stage or 'rng' not in ckpt or 'optimizer' not in ckpt:
            raise UserError(f'{cfg.resume} holds no {stage} training state to continue; auto_resume takes the '
                            f'ckps/current.pth.tar of a {stage} run of this project')
        if ckpt['epoch'] >= cfg.num_epochs:
            raise UserError(f'{cfg.resume} has finished all {ckpt["epoch"]} epochs; raise num_epochs to train longer')
        resume_state = ckpt
    backbone, classifier = build_model(cfg)
    if ckpt is not None:
        load_weights(backbone, ckpt['state_dict_model'], cfg.resume, 'backbone', cfg)
        load_weights(classifier, ckpt['state_dict_classifier'], cfg.resume, 'classifier', cfg)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    backbone.to(device, memory_format=memory_format)
    classifier.to(device)
    if cfg.sync_bn:
        backbone = distributed.sync_batchnorm(backbone)  # before compiling and DDP
    if cfg.compile and compile_model:
        check_compile_toolchain(device)
        compile_in_place(backbone, classifier, mode=cfg.compile_mode)
    data = build_data(cfg, device)
    criterion = build_loss(cfg, data.cls_num_list).to(device)

    run, log_file = None, None
    if stage and distributed.is_main():
        if resume_state is not None:
            run_dir = os.path.dirname(os.path.dirname(os.path.abspath(cfg.resume)))
            name = cfg.name or os.path.basename(run_dir).rsplit('_', 1)[0]
            run = RunDir(run_dir, os.path.join(run_dir, cfg.log_dir), os.path.join(run_dir, cfg.model_dir), name)
            os.makedirs(run.log_dir, exist_ok=True)
        else:
            run = create_run_dir(cfg)
        log_file = os.path.join(run.log_dir, f'{run.name}.txt')
    logger = get_logger(log_file, quiet=not distributed.is_main())
    return SimpleNamespace(cfg=cfg, device=device, precision=precision, data=data, backbone=backbone,
                           classifier=classifier, criterion=criterion, ckpt=ckpt, resume_state=resume_state, run=run,
                           logger=logger)
