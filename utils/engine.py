"""The one training/evaluation loop that train_stage1.py, train_stage2.py and eval.py share."""
import json
import math
import os
import sys
import time

import torch
from tqdm import tqdm

from methods import H2T, cross_entropy, mixup_criterion, mixup_data
from .checkpoint import save_checkpoint
from .errors import UserError
from .metrics import classification_metrics
from .runtime import autocast


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
def stage1_loss(backbone, classifier, batch, cfg, device, precision):
    """CE on the batch, with mixup (one lam per batch) when cfg.mixup is set."""
    x, y = batch
    if cfg.mixup:
        x, y_a, y_b, lam = mixup_data(x, y, cfg.alpha)
    with autocast(device, precision):
        out = classifier(backbone(x))
    if cfg.mixup:
        return mixup_criterion(cross_entropy, out, y_a, y_b, lam), out, y
    return cross_entropy(out, y), out, y


def stage2_loss(backbone, classifier, batch, cfg, device, precision):
    """Frozen backbone; H2T fuses the instance branch's channels into the balanced branch's map."""
    with torch.no_grad(), autocast(device, precision):
        if len(batch) == 2:
            (x1, y1), f2 = batch, None
            f1 = backbone(x1)
        elif backbone.training:
            # Train-mode BN normalises with batch statistics: one pass over both branches would mix
            # them and update the running statistics once with the mixture. Two passes keep each
            # branch's own statistics, as the recipe does.
            x1, y1, x2, _ = batch
            f1, f2 = backbone(x1), backbone(x2)
        else:
            # Eval-mode BN is per-sample, so one pass over the concatenation is exactly two passes.
            x1, y1, x2, _ = batch
            f1, f2 = backbone(torch.cat([x1, x2])).chunk(2)
    fused = H2T(f1, f2, cfg.H2T) if f2 is not None else f1
    with autocast(device, precision):
        out = classifier(fused)
    return cross_entropy(out, y1), out, y1


def train_one_epoch(backbone, classifier, loader, optimizer, cfg, device, precision, epoch, logger, stage):
    """One pass over `loader`; returns {'loss', 'train_acc'}. Stops with a UserError on a NaN/inf loss."""
    step_fn = stage1_loss if stage == 'stage1' else stage2_loss
    classifier.train()
    backbone.train(stage == 'stage1' or cfg.shift_bn)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    seen = 0
    bar = tqdm(loader, desc=f'epoch {epoch + 1}/{cfg.num_epochs}', leave=False, file=sys.stderr,
               disable=not sys.stderr.isatty(), dynamic_ncols=True)
    for step, batch in enumerate(bar):
        loss, out, y = step_fn(backbone, classifier, batch, cfg, device, precision)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * len(y)
        correct += out.detach().argmax(1).eq(y).sum()
        seen += len(y)
        last = step + 1 == len(loader)
        if (step + 1) % cfg.print_freq == 0 or last:
            # the only host syncs of the loop: one every print_freq steps
            avg = loss_sum.item() / seen
            if not math.isfinite(avg):
                raise UserError(f'loss became {avg} at epoch {epoch + 1}, step {step + 1}; training stopped, the last '
                                f'good checkpoint is kept; lower lr or check the data')
            if bar.disable and not last:
                logger.info(f'  epoch {epoch + 1} step {step + 1}/{len(loader)} loss {avg:.4f}')
            bar.set_postfix(loss=f'{avg:.4f}')
    return {'loss': loss_sum.item() / seen, 'train_acc': correct.item() / seen * 100}


# -- evaluation ------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(backbone, classifier, loader, cfg, device, precision):
    """Softmax outputs of the whole test set (kept on the device), then every metric at once."""
    backbone.eval()
    classifier.eval()
    probs, targets = [], []
    for x, y in loader:
        with autocast(device, precision):
            logits = classifier(backbone(x))
        probs.append(torch.softmax(logits.float(), dim=1))
        targets.append(y)
    return classification_metrics(torch.cat(probs), torch.cat(targets), cfg)


def format_metrics(m):
    return (f"top1 {m['top1']:.2f} top5 {m['top5']:.2f} | many {m['many']:.2f} medium {m['medium']:.2f} "
            f"few {m['few']:.2f} | ECE {m['ece'] * 100:.2f}%")


# -- the epoch loop --------------------------------------------------------------------------------
def fit(backbone, classifier, data, optimizer, cfg, device, precision, run, logger, stage):
    """Train for cfg.num_epochs, evaluate after each epoch, keep current/model_best checkpoints,
    log to the run folder and TensorBoard, and write summary.json with the best and last epochs."""
    from torch.utils.tensorboard import SummaryWriter
    run_dir, log_dir, ckpt_dir, name = run
    writer = SummaryWriter(log_dir)
    train_loader, eval_loader = data.train_loader(), data.eval_loader()
    best, best_epoch, history = None, -1, []
    start = time.time()
    for epoch in range(cfg.num_epochs):
        lr = learning_rate(cfg, epoch)
        for group in optimizer.param_groups:
            group['lr'] = lr
        t0 = time.time()
        train = train_one_epoch(backbone, classifier, train_loader, optimizer, cfg, device, precision, epoch,
                                logger, stage)
        t1 = time.time()
        test = evaluate(backbone, classifier, eval_loader, cfg, device, precision)
        t2 = time.time()
        is_best = best is None or test['top1'] > best['top1']
        if is_best:
            best, best_epoch = test, epoch + 1
        history.append({'epoch': epoch + 1, 'lr': lr, **train, **{k: v for k, v in test.items() if k != 'per_class_acc'}})
        logger.info(f"Epoch [{epoch + 1}/{cfg.num_epochs}] lr {lr:.5f} loss {train['loss']:.4f} "
                    f"train_acc {train['train_acc']:.2f} | test {format_metrics(test)} | best {best['top1']:.2f} "
                    f"(epoch {best_epoch}) | {t1 - t0:.1f}s train {t2 - t1:.1f}s eval")
        for key, value in [('loss', train['loss']), ('lr', lr), ('train_acc', train['train_acc'])]:
            writer.add_scalar(f'train/{key}', value, epoch + 1)
        for key in ('top1', 'top5', 'many', 'medium', 'few', 'ece'):
            writer.add_scalar(f'test/{key}', test[key], epoch + 1)
        state = {'epoch': epoch + 1, 'state_dict_model': backbone.state_dict(),
                 'state_dict_classifier': classifier.state_dict(), 'best_acc1': best['top1'],
                 'its_ece': best['ece'], 'optimizer': optimizer.state_dict(), 'config': cfg.dump()}
        save_checkpoint(state, os.path.join(ckpt_dir, 'current.pth.tar'))
        if is_best:
            save_checkpoint(state, os.path.join(ckpt_dir, 'model_best.pth.tar'))
    writer.close()
    summary = {'name': name, 'stage': stage, 'dataset': cfg.dataset, 'imb_factor': cfg.imb_factor,
               'H2T': cfg.H2T, 'precision': precision, 'device': str(device), 'epochs': cfg.num_epochs,
               'wall_time_s': round(time.time() - start, 1), 'best_epoch': best_epoch, 'best': best,
               'last': test, 'history': history}
    with open(os.path.join(run_dir, 'summary.json'), 'w') as f:
        json.dump(summary, f, indent=1)
    logger.info(f'Best  (epoch {best_epoch}): {format_metrics(best)}')
    logger.info(f'Last  (epoch {cfg.num_epochs}): {format_metrics(test)}')
    logger.info(f'Checkpoints in {ckpt_dir}; wall time {summary["wall_time_s"]:.0f}s')
    return summary
