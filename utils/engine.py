"""The one training/evaluation loop that train_stage1.py, train_stage2.py and eval.py share, and the two
stages it runs: what each trains (`Stage`), its loss for one batch, the epoch loop and the evaluation."""
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
from tqdm import tqdm

from common import distributed
from common.checkpoint import save_checkpoint
from common.errors import UserError
from common.metrics import add_sums, finalize, metric_sums
from methods import H2T, mixup_criterion, mixup_data
from .runtime import autocast, hardware_name, select_eval_precision


# -- learning rate ---------------------------------------------------------------------------------
def learning_rate(cfg, epoch):
    """LR of epoch `epoch` (counted from 0).

    'warmup_step' (stage 1): linear warm-up lr * e / warmup_epochs for e = epoch + 1 <= warmup_epochs,
    then lr, times gamma after each milestone epoch. 'cos' (stage 2):
    lr_factor * lr * (1 + cos(pi * epoch / num_epochs)) / 2.
    """
    sched = cfg.lr_scheduler
    if sched.type == 'cos':
        return sched.lr_factor * 0.5 * cfg.lr * (1 + math.cos(math.pi * epoch / cfg.num_epochs))
    e = epoch + 1
    if e <= sched.warmup_epochs:
        return cfg.lr * e / sched.warmup_epochs
    return cfg.lr * sched.gamma ** sum(e > m for m in sched.milestones)


# -- one step of each stage ------------------------------------------------------------------------
def mix_inputs(x, y, cfg):
    """Mixup of a batch when cfg.mixup is set: (inputs, (y_a, y_b, lam)); else (x, None)."""
    if not cfg.mixup:
        return x, None
    x, y_a, y_b, lam = mixup_data(x, y, cfg.alpha)
    return x, (y_a, y_b, lam)


def classification_loss(criterion, out, y, mix):
    """criterion(out, y), or for a mixed batch the lam-weighted criterion of its two label sets."""
    if mix is None:
        return criterion(out, y)
    return mixup_criterion(criterion, out, *mix)


def stage1_loss(exp, batch):
    """exp.criterion (loss.py, chosen by loss.type) on the batch, with mixup (one lam per batch) when
    cfg.mixup is set; returns (loss, logits, labels)."""
    x, y = batch
    x, mix = mix_inputs(x, y, exp.cfg)
    with autocast(exp.device, exp.precision):
        out = exp.classifier(exp.backbone(x))
    return classification_loss(exp.criterion, out, y, mix), out, y


def stage2_loss(exp, batch):
    """Frozen backbone; H2T fuses the instance branch's channels into the balanced branch's map.

    As in the authors' loop: mixup (cfg.mixup) mixes the balanced images only, before the backbone;
    the instance branch exists only where H2T fuses (the loader draws none at rho 0) and stays unmixed.
    """
    backbone, cfg = exp.backbone, exp.cfg
    x1, y1 = batch[:2]
    x1, mix = mix_inputs(x1, y1, cfg)
    with torch.no_grad(), autocast(exp.device, exp.precision):
        if len(batch) == 2:
            f1, f2 = backbone(x1), None
        elif backbone.training:
            # Train-mode BN normalises with batch statistics: one pass over both branches would mix
            # them and update the running statistics once with the mixture. Two passes keep each
            # branch's own statistics, as the recipe does.
            # (f1 copied: under CUDA graphs, compile_mode reduce-overhead, the second call reuses the memory
            # of the first one's output)
            f1 = copied(backbone(x1))
            f2 = backbone(batch[2])
        else:
            # Eval-mode BN is per-sample, so one pass over the concatenation is exactly two passes.
            f1, f2 = split_halves(backbone(torch.cat([x1, batch[2]])))
    fused = f1 if f2 is None else H2T(f1, f2, cfg.H2T)  # a multi-expert backbone: each expert its own draw
    with autocast(exp.device, exp.precision):
        out = exp.classifier(fused)
    return classification_loss(exp.criterion, out, y1, mix), out, y1


def copied(feats):
    """A copy of a feature map, or of each expert's map of a list."""
    return [f.clone() for f in feats] if isinstance(feats, (list, tuple)) else feats.clone()


def split_halves(feats):
    """The two halves of a batch's feature map(s): a map, or each expert's map of a list."""
    if isinstance(feats, (list, tuple)):
        halves = [f.chunk(2) for f in feats]
        return [h[0] for h in halves], [h[1] for h in halves]
    return feats.chunk(2)


def final_logits(classifier, out):
    """The [B, C] logits that accuracy and evaluation use: a multi-output head's `combine` of its
    output (RIDE: the experts' mean; ResLT: the branches' sum), a single head's logits as they are."""
    return unwrap(classifier).combine(out)


# -- the stages -------------------------------------------------------------------------------------
@dataclass
class Stage:
    """What a script does with the model: the config mode it runs (`mode`, None: any), whether it needs a
    checkpoint to start from, which modules it trains (`trains`: the optimizer's and DDP's; the others are
    frozen), and the loss of one batch, loss(exp, batch) -> (loss, logits, labels)."""
    mode: Optional[str]
    description: str
    trains: tuple
    needs_checkpoint: bool
    loss: Optional[Callable] = None

    def freeze_untrained(self, backbone, classifier):
        """requires_grad off for every module this stage does not train."""
        for name, module in (('backbone', backbone), ('classifier', classifier)):
            if name not in self.trains:
                module.requires_grad_(False)

    def set_train_mode(self, exp):
        """Train mode for what it trains; the frozen backbone of stage 2 too with `shift_bn` (its BatchNorm
        then normalises with batch statistics and updates its running statistics)."""
        exp.classifier.train()
        exp.backbone.train('backbone' in self.trains or exp.cfg.shift_bn)


STAGE1 = Stage('stage1', 'Stage 1: representation learning', ('backbone', 'classifier'), False, stage1_loss)
STAGE2 = Stage('stage2', 'Stage 2: classifier re-training', ('classifier',), True, stage2_loss)
EVALUATION = Stage(None, 'Evaluation: a checkpoint on the balanced test set', (), True)
STAGES = {stage.mode: stage for stage in (STAGE1, STAGE2)}


def make_optimizer(exp):
    """SGD (lr, momentum, weight_decay, nesterov of the config) over the parameters of what the stage trains:
    backbone and classifier in stage 1, the classifier in stage 2. MiSLAS's learnable weight scaling (`lws`)
    gets a group of its own whose LR is not scaled by lr_scheduler.lr_factor (`lr_scale` undoes it)."""
    cfg, classifier = exp.cfg, exp.classifier
    modules = [getattr(exp, name) for name in exp.stage.trains]
    lws = [p for name, p in classifier.named_parameters() if name.startswith('lws.')]
    lws_ids = {id(p) for p in lws}
    params = [p for m in modules for p in m.parameters() if p.requires_grad and id(p) not in lws_ids]
    groups = [{'params': params, 'lr_scale': 1.0}]
    if lws:
        factor = cfg.lr_scheduler.lr_factor if cfg.lr_scheduler.type == 'cos' else 1.0
        groups.append({'params': lws, 'lr_scale': 1.0 / factor})
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=cfg.nesterov)


def train_step(exp, batch, optimizer):
    """One optimisation step of the stage's loss; returns (loss, logits, labels)."""
    loss, out, y = exp.stage.loss(exp, batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), out.detach(), y


NO_BAD_STEP = 2 ** 62  # no non-finite loss so far: larger than any step, so that the minimum over ranks works


def train_one_epoch(exp, loader, optimizer, epoch):
    """One pass over `loader` (epoch counted from 0); returns {'train_loss', 'train_acc'} summed over all ranks.

    Host syncs only every print_freq steps. A NaN/inf loss raises a UserError naming the first bad
    step, before anything of this epoch is saved, so the last checkpoint stays the last good one.
    """
    cfg, device = exp.cfg, exp.device
    exp.stage.set_train_mode(exp)
    # loss sum, correct, seen: one tensor, one all_reduce; the first non-finite step (+1; NO_BAD_STEP = none)
    # is the minimum over the ranks
    stats = torch.zeros(3, device=device)
    first_bad = torch.full((), NO_BAD_STEP, dtype=torch.long, device=device)
    bar = tqdm(loader, desc=f'epoch {epoch + 1}/{cfg.num_epochs}', leave=False, file=sys.stderr,
               disable=not (sys.stderr.isatty() and distributed.is_main()), dynamic_ncols=True)
    for step, batch in enumerate(bar):
        loss, out, y = train_step(exp, batch, optimizer)
        first_bad = torch.where((first_bad == NO_BAD_STEP) & ~torch.isfinite(loss), step + 1, first_bad)
        stats[0] += loss * len(y)
        stats[1] += final_logits(exp.classifier, out).argmax(1).eq(y).sum()
        stats[2] += len(y)
        last = step + 1 == len(loader)
        if (step + 1) % cfg.print_freq == 0 or last:
            reduced = distributed.all_reduce_sum(stats.clone())
            bad = int(distributed.all_reduce_min(first_bad.clone()).item())
            if bad != NO_BAD_STEP:
                raise UserError(f'loss became nan/inf at epoch {epoch + 1}, step {bad}; training stopped and the '
                                f'last good checkpoint is kept; lower lr or check the data')
            avg = (reduced[0] / reduced[2]).item()
            if bar.disable and not last and distributed.is_main():
                exp.logger.info(f'  epoch {epoch + 1} step {step + 1}/{len(loader)} loss {avg:.4f}')
            bar.set_postfix(loss=f'{avg:.4f}')
    return {'train_loss': (reduced[0] / reduced[2]).item(), 'train_acc': (reduced[1] / reduced[2]).item() * 100}


# -- evaluation ------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(exp, loader, precision):
    """Every metric of the test set of `loader` for exp's model (many/medium/few: the dataset's class splits),
    in `precision`; batches stay on the device, sums are added over the ranks."""
    backbone, classifier = exp.backbone, exp.classifier
    backbone.eval()
    classifier.eval()
    sums = None
    for x, y in loader:
        with autocast(exp.device, precision):
            logits = final_logits(classifier, classifier(backbone(x)))
        sums = add_sums(sums, metric_sums(torch.softmax(logits.float(), dim=1), y))
    for value in sums.values():
        distributed.all_reduce_sum(value)
    return finalize(sums, exp.data.class_splits)


def format_metrics(m):
    return (f"top1 {m['top1']:.2f} top5 {m['top5']:.2f} | many {m['many']:.2f} medium {m['medium']:.2f} "
            f"few {m['few']:.2f} | ECE {m['ece'] * 100:.2f}%")


# -- the epoch loop --------------------------------------------------------------------------------
def unwrap(module):
    """The module itself under a DistributedDataParallel wrapper."""
    return getattr(module, 'module', module)


@dataclass
class Progress:
    """Where a run stands: the epochs done, the best epoch's metrics and number, and every epoch's record."""
    epoch: int = 0
    best: Optional[dict] = None
    best_epoch: int = -1
    history: list = field(default_factory=list)


def training_state(exp, optimizer, progress):
    """Everything a run needs to continue exactly where it stopped, in the authors' checkpoint
    format (epoch, state_dict_model, state_dict_classifier, best_acc1, its_ece) plus our keys."""
    best = progress.best
    return {'epoch': progress.epoch, 'mode': exp.cfg.mode, 'state_dict_model': unwrap(exp.backbone).state_dict(),
            'state_dict_classifier': unwrap(exp.classifier).state_dict(), 'best_acc1': best['top1'],
            'its_ece': best['ece'], 'best_epoch': progress.best_epoch, 'best_metrics': best,
            'history': progress.history, 'optimizer': optimizer.state_dict(), 'rng': rng_state(exp.device),
            'config': exp.cfg.dump()}


def rng_state(device):
    """The generators a run draws from: Python's, numpy's, torch's CPU one and, on CUDA, the run's own GPU's
    (under torchrun the ranks draw in lockstep, so rank 0's, which it saves, is every rank's). A CPU run
    leaves CUDA alone."""
    np_state = np.random.get_state()
    state = {'torch': torch.get_rng_state(), 'python': random.getstate(),
             'numpy': {'keys': torch.from_numpy(np_state[1].astype(np.int64)), 'pos': int(np_state[2]),
                       'has_gauss': int(np_state[3]), 'cached_gaussian': float(np_state[4])}}
    if device.type == 'cuda':
        state['cuda'] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    """Restore what rng_state saved; a CUDA state only on a CUDA run, into its own GPU's generator."""
    torch.set_rng_state(state['torch'])
    random.setstate(state['python'])
    n = state['numpy']
    np.random.set_state(('MT19937', n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'],
                         n['cached_gaussian']))
    if device.type == 'cuda' and state.get('cuda') is not None:
        torch.cuda.set_rng_state(state['cuda'], device)


def describe_run(exp):
    """The run's first log line: what trains on what, where, and where it is recorded."""
    cfg, data = exp.cfg, exp.data
    if 'backbone' in exp.stage.trains:
        sizes = data.cls_num_list
        counts = sizes if len(sizes) <= 100 else f'({max(sizes)} to {min(sizes)} a class)'
        what = f'{len(data.train_set)} training images {counts}, {cfg.backbone}'
    else:
        what = f'H2T rho={cfg.H2T}, shift_bn={cfg.shift_bn}, from {cfg.resume}'
    return (f'{exp.run.name}: {data.description}, {what} on {exp.device} ({exp.precision}) x '
            f'{distributed.world_size()} process(es), run folder {exp.run.dir}')


def fit(exp):
    """Train what exp.stage trains for cfg.num_epochs, evaluate after each epoch, keep current/model_best
    checkpoints, log to the run folder and TensorBoard, and write summary.json with the best and last epochs.

    `exp.resume_state` (a checkpoint from `training_state`) continues that run exactly: optimizer,
    epoch, best metrics and every RNG state. `exp.run` is None on ranks other than 0: they write nothing.
    """
    cfg, data, device, precision, logger = exp.cfg, exp.data, exp.device, exp.precision, exp.logger
    optimizer = make_optimizer(exp)
    for name in exp.stage.trains:  # under torchrun, DDP averages the gradients of what the stage trains
        setattr(exp, name, distributed.wrap(getattr(exp, name), device))
    main = distributed.is_main()
    run_dir, log_dir, ckpt_dir, name = exp.run if main else (None,) * 4
    train_loader, eval_loader = data.train_loader(), data.eval_loader()
    progress = Progress()
    if exp.resume_state is not None:
        state = exp.resume_state
        optimizer.load_state_dict(state['optimizer'])
        progress = Progress(state['epoch'], state['best_metrics'], state['best_epoch'], list(state['history']))
        set_rng_state(state['rng'], device)
        logger.info(f'continuing {name} after epoch {progress.epoch} (best {progress.best["top1"]:.2f} at epoch '
                    f'{progress.best_epoch})')
    elif main:
        logger.info(describe_run(exp))
    writer = None
    if main:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(log_dir, purge_step=progress.epoch + 1)
    start = time.time()
    test = progress.best
    eval_precision = select_eval_precision(cfg, precision)  # fp32 unless asked: model_best must not depend on it
    for epoch in range(progress.epoch, cfg.num_epochs):
        lr = learning_rate(cfg, epoch)
        for group in optimizer.param_groups:
            group['lr'] = lr * group.get('lr_scale', 1.0)
        exp.criterion.before_epoch(epoch)  # DRW switches its class weights on here
        t0 = time.time()
        train = train_one_epoch(exp, train_loader, optimizer, epoch)
        if 'backbone' not in exp.stage.trains and cfg.shift_bn and not cfg.sync_bn:  # SyncBatchNorm's are equal
            distributed.average_buffers(unwrap(exp.backbone))
        t1 = time.time()
        test = evaluate(exp, eval_loader, eval_precision)
        t2 = time.time()
        is_best = progress.best is None or test['top1'] > progress.best['top1']
        if is_best:
            progress.best, progress.best_epoch = test, epoch + 1
        progress.epoch = epoch + 1
        progress.history.append({'epoch': epoch + 1, 'lr': lr, **train, 'time_train_s': round(t1 - t0, 2),
                                 'time_eval_s': round(t2 - t1, 2),
                                 **{k: v for k, v in test.items() if k not in ('per_class_acc', 'reliability')}})
        if not main:
            continue
        logger.info(f"Epoch [{epoch + 1}/{cfg.num_epochs}] lr {lr:.5f} loss {train['train_loss']:.4f} "
                    f"train_acc {train['train_acc']:.2f} | test {format_metrics(test)} | best "
                    f"{progress.best['top1']:.2f} (epoch {progress.best_epoch}) | {t1 - t0:.1f}s train "
                    f"{t2 - t1:.1f}s eval")
        for key, value in [('loss', train['train_loss']), ('lr', lr), ('train_acc', train['train_acc'])]:
            writer.add_scalar(f'train/{key}', value, epoch + 1)
        for key in ('top1', 'top5', 'many', 'medium', 'few', 'ece'):
            writer.add_scalar(f'test/{key}', test[key], epoch + 1)
        writer.add_scalar('test/loss', test['test_loss'], epoch + 1)
        writer.flush()
        state = training_state(exp, optimizer, progress)
        save_checkpoint(state, os.path.join(ckpt_dir, 'current.pth.tar'))
        if is_best:
            save_checkpoint(state, os.path.join(ckpt_dir, 'model_best.pth.tar'))
    ranks = distributed.check_in_sync(unwrap(exp.backbone), unwrap(exp.classifier))
    if not main:
        return None
    writer.close()
    if ranks > 1:
        logger.info(f'weights identical on all {ranks} ranks')
    history, best = progress.history, progress.best
    wall = sum(h['time_train_s'] + h['time_eval_s'] for h in history)
    summary = {'name': name, 'stage': cfg.mode, 'dataset': cfg.dataset, 'imb_factor': data.imb_factor,
               'H2T': cfg.H2T, 'precision': precision,
               'eval_precision': eval_precision, 'device': str(device), 'hardware': hardware_name(device),
               'torch': torch.__version__, 'world_size': ranks,
               'epochs': cfg.num_epochs, 'wall_time_s': round(wall, 1), 'best_epoch': progress.best_epoch,
               'best': best, 'last': test, 'history': history}
    with open(os.path.join(run_dir, 'summary.json'), 'w') as f:
        json.dump(summary, f, indent=1)
    logger.info(f'Best  (epoch {progress.best_epoch}): {format_metrics(best)}')
    logger.info(f'Last  (epoch {cfg.num_epochs}): {format_metrics(test)}')
    logger.info(f'Checkpoints in {ckpt_dir}; train + eval time {wall:.0f}s ({time.time() - start:.0f}s in this process)')
    return summary
