"""The one training/evaluation loop that train_stage1.py, train_stage2.py and eval.py share."""
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from methods import H2T, mixup_criterion, mixup_data
from .checkpoint import save_checkpoint
from .errors import UserError
from . import distributed
from .metrics import add_sums, finalize, metric_sums
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


def make_optimizer(backbone, classifier, cfg):
    """SGD over what the stage (cfg.mode) trains: backbone and classifier in stage 1; in stage 2 the classifier
    only, with the backbone frozen (requires_grad off). MiSLAS's learnable weight scaling (`lws`) gets a
    group of its own whose LR is not scaled by lr_scheduler.lr_factor (`lr_scale` undoes it)."""
    if cfg.mode == 'stage2':
        backbone.requires_grad_(False)
    lws = [p for name, p in classifier.named_parameters() if name.startswith('lws.')]
    lws_ids = {id(p) for p in lws}
    params = [p for m in (backbone, classifier) for p in m.parameters() if p.requires_grad and id(p) not in lws_ids]
    groups = [{'params': params, 'lr_scale': 1.0}]
    if lws:
        factor = cfg.lr_scheduler.lr_factor if cfg.lr_scheduler.type == 'cos' else 1.0
        groups.append({'params': lws, 'lr_scale': 1.0 / factor})
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=cfg.nesterov)


def train_step(exp, batch, optimizer):
    """One optimisation step of the loss of the stage exp.cfg.mode; returns (loss, logits, labels)."""
    step_fn = stage1_loss if exp.cfg.mode == 'stage1' else stage2_loss
    loss, out, y = step_fn(exp, batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), out.detach(), y


def set_train_mode(backbone, classifier, cfg):
    """Classifier in train mode; the backbone too in stage 1, and in stage 2 only with `shift_bn`
    (its BatchNorm then normalises with batch statistics and updates its running statistics)."""
    classifier.train()
    backbone.train(cfg.mode == 'stage1' or cfg.shift_bn)


NO_BAD_STEP = 2 ** 62  # no non-finite loss so far: larger than any step, so that the minimum over ranks works


def train_one_epoch(exp, loader, optimizer, epoch):
    """One pass over `loader` (epoch counted from 0); returns {'train_loss', 'train_acc'} summed over all ranks.

    Host syncs only every print_freq steps. A NaN/inf loss raises a UserError naming the first bad
    step, before anything of this epoch is saved, so the last checkpoint stays the last good one.
    """
    cfg, device = exp.cfg, exp.device
    set_train_mode(exp.backbone, exp.classifier, cfg)
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
def evaluate(backbone, classifier, loader, splits, device, precision):
    """Every metric of the test set (`splits`: the dataset's many/medium/few classes); batches stay on the
    device, sums are added over the ranks."""
    backbone.eval()
    classifier.eval()
    sums = None
    for x, y in loader:
        with autocast(device, precision):
            logits = final_logits(classifier, classifier(backbone(x)))
        sums = add_sums(sums, metric_sums(torch.softmax(logits.float(), dim=1), y))
    for value in sums.values():
        distributed.all_reduce_sum(value)
    return finalize(sums, splits)


def format_metrics(m):
    return (f"top1 {m['top1']:.2f} top5 {m['top5']:.2f} | many {m['many']:.2f} medium {m['medium']:.2f} "
            f"few {m['few']:.2f} | ECE {m['ece'] * 100:.2f}%")


# -- the epoch loop --------------------------------------------------------------------------------
def unwrap(module):
    """The module itself under a DistributedDataParallel wrapper."""
    return getattr(module, 'module', module)


def training_state(epoch, backbone, classifier, optimizer, cfg, best, best_epoch, history):
    """Everything a run needs to continue exactly where it stopped, in the authors' checkpoint
    format (epoch, state_dict_model, state_dict_classifier, best_acc1, its_ece) plus our keys."""
    return {'epoch': epoch, 'mode': cfg.mode, 'state_dict_model': unwrap(backbone).state_dict(),
            'state_dict_classifier': unwrap(classifier).state_dict(), 'best_acc1': best['top1'],
            'its_ece': best['ece'], 'best_epoch': best_epoch, 'best_metrics': best, 'history': history,
            'optimizer': optimizer.state_dict(), 'rng': rng_state(next(unwrap(classifier).parameters()).device),
            'config': cfg.dump()}


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


def saved_cuda_state(saved, device):
    """The CUDA generator state of `saved` (rng_state's 'cuda') for this run's `device`, or None. Older
    checkpoints hold a list, one state per GPU the saving process saw, of which it drew on its own only:
    the entry of this device's index in a one-process run, else (torchrun's rank 0: GPU 0, or a list
    shorter than the index) the first."""
    if isinstance(saved, torch.Tensor):
        return saved
    if not saved:
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return saved[index] if distributed.world_size() == 1 and index < len(saved) else saved[0]


def set_rng_state(state, device):
    """Restore what rng_state saved; a CUDA state only on a CUDA run, into its own GPU's generator."""
    torch.set_rng_state(state['torch'])
    random.setstate(state['python'])
    n = state['numpy']
    np.random.set_state(('MT19937', n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'],
                         n['cached_gaussian']))
    cuda_state = saved_cuda_state(state.get('cuda'), device) if device.type == 'cuda' else None
    if cuda_state is not None:
        torch.cuda.set_rng_state(cuda_state, device)


def fit(exp, optimizer):
    """Train exp's model for cfg.num_epochs in the stage cfg.mode, evaluate after each epoch, keep
    current/model_best checkpoints, log to the run folder and TensorBoard, and write summary.json with
    the best and last epochs.

    `exp.resume_state` (a checkpoint from `training_state`) continues that run exactly: optimizer,
    epoch, best metrics and every RNG state. `exp.run` is None on ranks other than 0: they write nothing.
    """
    cfg, data, device, precision, logger = exp.cfg, exp.data, exp.device, exp.precision, exp.logger
    backbone, classifier, resume_state = exp.backbone, exp.classifier, exp.resume_state
    main = distributed.is_main()
    run_dir, log_dir, ckpt_dir, name = exp.run if main else (None,) * 4
    train_loader, eval_loader = data.train_loader(), data.eval_loader()
    best, best_epoch, history, start_epoch = None, -1, [], 0
    if resume_state is not None:
        optimizer.load_state_dict(resume_state['optimizer'])
        best, best_epoch = resume_state['best_metrics'], resume_state['best_epoch']
        history, start_epoch = list(resume_state['history']), resume_state['epoch']
        set_rng_state(resume_state['rng'], device)
        logger.info(f'continuing {name} after epoch {start_epoch} (best {best["top1"]:.2f} at epoch {best_epoch})')
    writer = None
    if main:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(log_dir, purge_step=start_epoch + 1)
    start = time.time()
    test = best
    eval_precision = select_eval_precision(cfg, precision)  # fp32 unless asked: model_best must not depend on it
    for epoch in range(start_epoch, cfg.num_epochs):
        lr = learning_rate(cfg, epoch)
        for group in optimizer.param_groups:
            group['lr'] = lr * group.get('lr_scale', 1.0)
        exp.criterion.before_epoch(epoch)  # DRW switches its class weights on here
        t0 = time.time()
        train = train_one_epoch(exp, train_loader, optimizer, epoch)
        if cfg.mode == 'stage2' and cfg.shift_bn and not cfg.sync_bn:  # SyncBatchNorm's are equal on every rank
            distributed.average_buffers(unwrap(backbone))
        t1 = time.time()
        test = evaluate(backbone, classifier, eval_loader, data.class_splits, device, eval_precision)
        t2 = time.time()
        is_best = best is None or test['top1'] > best['top1']
        if is_best:
            best, best_epoch = test, epoch + 1
        history.append({'epoch': epoch + 1, 'lr': lr, **train, 'time_train_s': round(t1 - t0, 2),
                        'time_eval_s': round(t2 - t1, 2),
                        **{k: v for k, v in test.items() if k not in ('per_class_acc', 'reliability')}})
        if not main:
            continue
        logger.info(f"Epoch [{epoch + 1}/{cfg.num_epochs}] lr {lr:.5f} loss {train['train_loss']:.4f} "
                    f"train_acc {train['train_acc']:.2f} | test {format_metrics(test)} | best {best['top1']:.2f} "
                    f"(epoch {best_epoch}) | {t1 - t0:.1f}s train {t2 - t1:.1f}s eval")
        for key, value in [('loss', train['train_loss']), ('lr', lr), ('train_acc', train['train_acc'])]:
            writer.add_scalar(f'train/{key}', value, epoch + 1)
        for key in ('top1', 'top5', 'many', 'medium', 'few', 'ece'):
            writer.add_scalar(f'test/{key}', test[key], epoch + 1)
        writer.add_scalar('test/loss', test['test_loss'], epoch + 1)
        writer.flush()
        state = training_state(epoch + 1, backbone, classifier, optimizer, cfg, best, best_epoch, history)
        save_checkpoint(state, os.path.join(ckpt_dir, 'current.pth.tar'))
        if is_best:
            save_checkpoint(state, os.path.join(ckpt_dir, 'model_best.pth.tar'))
    ranks = distributed.check_in_sync(unwrap(backbone), unwrap(classifier))
    if not main:
        return None
    writer.close()
    if ranks > 1:
        logger.info(f'weights identical on all {ranks} ranks')
    wall = sum(h['time_train_s'] + h['time_eval_s'] for h in history)
    summary = {'name': name, 'stage': cfg.mode, 'dataset': cfg.dataset, 'imb_factor': data.imb_factor,
               'H2T': cfg.H2T, 'precision': precision,
               'eval_precision': eval_precision, 'device': str(device), 'hardware': hardware_name(device),
               'torch': torch.__version__, 'world_size': ranks,
               'epochs': cfg.num_epochs, 'wall_time_s': round(wall, 1), 'best_epoch': best_epoch, 'best': best,
               'last': test, 'history': history}
    with open(os.path.join(run_dir, 'summary.json'), 'w') as f:
        json.dump(summary, f, indent=1)
    logger.info(f'Best  (epoch {best_epoch}): {format_metrics(best)}')
    logger.info(f'Last  (epoch {cfg.num_epochs}): {format_metrics(test)}')
    logger.info(f'Checkpoints in {ckpt_dir}; train + eval time {wall:.0f}s ({time.time() - start:.0f}s in this process)')
    return summary
