"""Top-1/top-5, per-class and many/medium/few accuracy, and calibration, from softmax outputs."""
import torch


def expected_calibration_error(confidence, correct, n_bins=15):
    """ECE over `n_bins` equal-width bins of the max softmax probability, bins right-inclusive
    ((0, 1/15], (1/15, 2/15], ...): sum over bins of |accuracy - mean confidence| * bin share."""
    bins = (torch.ceil(confidence * n_bins).long() - 1).clamp_(0, n_bins - 1)
    gap = torch.zeros(n_bins, dtype=torch.float64, device=confidence.device)
    gap.index_add_(0, bins, correct.double() - confidence.double())
    return (gap.abs().sum() / len(confidence)).item()


def split_accuracy(per_class_acc, cfg):
    """Mean per-class accuracy over each [start, end) range of the config."""
    out = {}
    for split, key in (('many', 'head_class_idx'), ('medium', 'med_class_idx'), ('few', 'tail_class_idx')):
        start, end = cfg[key]
        out[split] = per_class_acc[start:end].mean().item() * 100 if end > start else float('nan')
    return out


def classification_metrics(probs, targets, cfg):
    """All reported numbers (in %, ECE as a fraction) for softmax `probs` [N, C] and `targets` [N]."""
    num_classes = probs.size(1)
    confidence, pred = probs.max(dim=1)
    correct = pred.eq(targets)
    top5 = probs.topk(min(5, num_classes), dim=1).indices.eq(targets[:, None]).any(dim=1)
    per_class_total = torch.bincount(targets, minlength=num_classes).double()
    per_class_correct = torch.bincount(targets, weights=correct.double(), minlength=num_classes)
    per_class_acc = per_class_correct / per_class_total.clamp_min(1)
    nll = -torch.log(probs.gather(1, targets[:, None]).clamp_min(1e-12)).mean()
    metrics = {
        'top1': correct.double().mean().item() * 100,
        'top5': top5.double().mean().item() * 100,
        **split_accuracy(per_class_acc, cfg),
        'ece': expected_calibration_error(confidence, correct),
        'confidence': confidence.double().mean().item(),
        'loss': nll.item(),
        'per_class_acc': [round(a * 100, 2) for a in per_class_acc.tolist()],
    }
    return metrics
