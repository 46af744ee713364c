"""What the three scripts do before training or evaluating: config, device, data, model, checkpoint,
run folder and logger, in that order, so that bad input stops a script before it writes anything; and
`run_cli`, how each of them runs."""
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import yaml

from common import distributed
from common.checkpoint import load_checkpoint, load_weights
from common.errors import UserError, nondeterministic_op
from datasets import build_data
from loss import build_loss
from models import build_model
from .config import head_scale, load_config, parse_args
from .runtime import (RunDir, check_compile_toolchain, compile_in_place, create_run_dir, disable_tf32, get_logger,
                      keep_freed_memory, select_device, select_precision, seed_everything)


@dataclass
class Experiment:
    """Everything a script works with once `prepare` has checked and built it; a training step needs only
    the fields without a default."""
    cfg: Any                     # the frozen yacs config
    device: torch.device
    precision: str               # 'fp32' | 'bf16'
    backbone: torch.nn.Module    # fit() replaces what the stage trains by its DDP wrapper under torchrun
    classifier: torch.nn.Module
    criterion: Any               # loss.py's loss of loss.type (or any callable (logits, target) -> loss)
    stage: Any = None            # utils.engine's Stage: what the script trains
    data: Any = None             # datasets.build_data: train_set, cls_num_list, loaders, class_splits
    ckpt: Optional[dict] = None  # the checkpoint of `resume`, if any
    resume_state: Optional[dict] = None  # the checkpoint when `auto_resume` continues a run
    run: Optional[RunDir] = None  # the run folder: training scripts on rank 0 only
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger('h2t'))


def prepare(stage, argv=None, record=True):
    """Parse `--cfg FILE KEY VALUE ...`, check everything the run needs, and build it for `stage` (a
    utils.engine Stage: its config mode, whether it needs a checkpoint, what it trains; the rest is frozen).

    Returns an Experiment: cfg, device, precision, data, backbone, classifier, criterion (loss.type,
    built from the training set's class counts), stage, ckpt, resume_state (the checkpoint when `auto_resume`
    continues a run), run (a RunDir where the stage trains and `record` is set, on rank 0 only, else None) and
    logger. The model is compiled when cfg.compile is set and the stage trains (one evaluation pass never
    pays back a compile).
    """
    args = parse_args(stage.description, argv)
    cfg = load_config(args.cfg, args.opts)
    if stage.mode and cfg.mode != stage.mode:
        script = 'train_stage1.py' if cfg.mode == 'stage1' else 'train_stage2.py'
        raise UserError(f'{args.cfg} is a {cfg.mode} config (mode: {cfg.mode}); run {script} with it')
    if (stage.needs_checkpoint or cfg.auto_resume) and not cfg.resume:
        raise UserError(f'{stage.description.split(":")[0]} needs a checkpoint; add `resume '
                        f'path/to/{"current" if cfg.auto_resume else "model_best"}.pth.tar`')
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
        if not stage.trains or ckpt.get('mode') != stage.mode or 'rng' not in ckpt or 'optimizer' not in ckpt:
            raise UserError(f'{cfg.resume} holds no {cfg.mode} training state to continue; auto_resume takes the '
                            f'ckps/current.pth.tar of a {cfg.mode} run of this project')
        check_resume_config(cfg, ckpt)
        if ckpt['epoch'] >= cfg.num_epochs:
            raise UserError(f'{cfg.resume} has finished all {ckpt["epoch"]} epochs; raise num_epochs to train longer')
        resume_state = ckpt
    backbone, classifier = build_model(cfg, head_scale(cfg))
    if ckpt is not None:
        load_weights(backbone, ckpt['state_dict_model'], cfg.resume, 'backbone', cfg)
        load_weights(classifier, ckpt['state_dict_classifier'], cfg.resume, 'classifier', cfg)
    stage.freeze_untrained(backbone, classifier)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    backbone.to(device, memory_format=memory_format)
    classifier.to(device)
    if cfg.sync_bn:
        backbone = distributed.sync_batchnorm(backbone)  # before compiling and DDP
    if cfg.compile and stage.trains:
        check_compile_toolchain(device)
        compile_in_place(backbone, classifier, mode=cfg.compile_mode)
    data = build_data(cfg, device)
    criterion = build_loss(cfg, data.cls_num_list).to(device)

    run, log_file = None, None
    if stage.trains and record and distributed.is_main():
        if resume_state is not None:
            run_dir = os.path.dirname(os.path.dirname(os.path.abspath(cfg.resume)))
            name = cfg.name or os.path.basename(run_dir).rsplit('_', 1)[0]
            run = RunDir(run_dir, os.path.join(run_dir, cfg.log_dir), os.path.join(run_dir, cfg.model_dir), name)
            os.makedirs(run.log_dir, exist_ok=True)
        else:
            run = create_run_dir(cfg)
        log_file = os.path.join(run.log_dir, f'{run.name}.txt')
    logger = get_logger(log_file, quiet=not distributed.is_main())
    return Experiment(cfg=cfg, device=device, precision=precision, backbone=backbone, classifier=classifier,
                      criterion=criterion, stage=stage, data=data, ckpt=ckpt, resume_state=resume_state, run=run,
                      logger=logger)


# What a run computes depends on these keys (the sub-keys of loss, sampler and lr_scheduler included): a run
# continued under another value of one would be two runs recorded as one. num_epochs may grow: that is how a
# finished run trains longer.
RESUME_KEYS = ('dataset', 'num_classes', 'imb_type', 'imb_factor', 'data_loader', 'backbone', 'classifier',
               'use_norm', 'lws', 'loss', 'smooth_head', 'smooth_tail', 'sampler', 'mode', 'H2T', 'mixup', 'alpha',
               'shift_bn', 'lr', 'lr_scheduler', 'batch_size', 'weight_decay', 'momentum', 'seed', 'precision')


def check_resume_config(cfg, ckpt):
    """auto_resume continues a run under the config it started with: the first of RESUME_KEYS whose value differs
    from the one in the checkpoint's stored config is a UserError naming it."""
    if not ckpt.get('config'):
        return
    saved = yaml.safe_load(ckpt['config'])

    missing = object()  # a key added to the project after the checkpoint was written: its default applies

    def leaves(ours, theirs, key):
        if isinstance(ours, dict):
            for sub in ours:
                yield from leaves(ours[sub], theirs.get(sub, missing) if isinstance(theirs, dict) else missing,
                                  f'{key}.{sub}')
        elif theirs is not missing:
            yield key, ours, theirs

    for top in RESUME_KEYS:
        for key, ours, theirs in leaves(cfg[top], saved.get(top, missing), top):
            if (list(ours) if isinstance(ours, (list, tuple)) else ours) != theirs:
                raise UserError(f'{cfg.resume} was trained with {key} {theirs}, not {ours}; auto_resume continues a '
                                f'run with its own config (only num_epochs may change): drop the change, or start a '
                                f'new run without auto_resume')


def run_cli(main):
    """Run a script's main(); a UserError becomes `error: ...` on stderr and exit status 2, as does an op
    that `deterministic True` forbids. Under torchrun the process group is left on the way out, whichever
    way main() ends."""
    try:
        try:
            main()
        except RuntimeError as e:
            op = nondeterministic_op(e)
            if op is None:
                raise
            raise UserError(f'deterministic True, but {op} has no deterministic implementation on this device; '
                            f'set deterministic False to run with it') from e
    except UserError as e:
        message = str(e).strip()
        if '\n' in message:  # raised in a DataLoader worker, which wraps it in the worker's traceback
            message = message.splitlines()[-1].split('UserError: ', 1)[-1]
        print(f'error: {message}', file=sys.stderr)
        sys.exit(2)
    finally:
        distributed.finish()
