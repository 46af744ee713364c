"""Top-1/top-5, per-class and many/medium/few accuracy, and calibration.

Evaluation accumulates additive sums per batch (`metric_sums`), which several processes can add
together (all_reduce) before `finalize` turns them into the reported numbers.
"""
import torch

N_BINS = 15


def confidence_bins(confidence, n_bins=N_BINS):
    """Bin index of each confidence: equal-width bins, right-inclusive ((0, 1/15], (1/15, 2/15], ...)."""
    return (torch.ceil(confidence * n_bins).long() - 1).clamp_(0, n_bins - 1)


def sums_by_index(index, values, size):
    """values summed per index into a float64 tensor of `size` entries. Unlike torch.bincount, whose output
    size depends on the data, this waits for nothing on CUDA (no host sync per batch), and it has a
    deterministic CUDA kernel (`deterministic True`), where bincount with weights has none."""
    return torch.zeros(size, dtype=torch.float64, device=index.device).index_add_(0, index, values.double())


def calibration_sums(confidence, correct, n_bins=N_BINS):
    """Per confidence bin: the count, the summed confidence and the number of correct predictions."""
    bins = confidence_bins(confidence, n_bins)
    return {'bin_count': sums_by_index(bins, torch.ones_like(confidence), n_bins),
            'bin_confidence': sums_by_index(bins, confidence, n_bins),
            'bin_correct': sums_by_index(bins, correct, n_bins)}


def ece_from_sums(sums):
    """ECE: sum over bins of |accuracy - mean confidence| * bin share."""
    return ((sums['bin_correct'] - sums['bin_confidence']).abs().sum() / sums['bin_count'].sum()).item()


def metric_sums(probs, targets, n_bins=N_BINS):
    """Sufficient statistics of a batch of softmax outputs `probs` [N, C] with labels `targets` [N]:
    per-class counts and hits, top-5 hits, the calibration sums and the NLL sum."""
    num_classes = probs.size(1)
    confidence, pred = probs.max(dim=1)
    correct = pred.eq(targets).double()
    top5 = probs.topk(min(5, num_classes), dim=1).indices.eq(targets[:, None]).any(dim=1).double()
    return {
        'class_total': sums_by_index(targets, torch.ones_like(correct), num_classes),
        'class_correct': sums_by_index(targets, correct, num_classes),
        'top5': top5.sum().reshape(1),
        **calibration_sums(confidence, correct, n_bins),
        'nll': -torch.log(probs.gather(1, targets[:, None]).clamp_min(1e-12)).double().sum().reshape(1),
    }


def add_sums(total, sums):
    return sums if total is None else {k: total[k] + v for k, v in sums.items()}


def config_splits(cfg):
    """Many/medium/few classes from the config's [start, end) ranges (CIFAR: classes sorted by size)."""
    return {split: torch.arange(*cfg[key]) for split, key in
            (('many', 'head_class_idx'), ('medium', 'med_class_idx'), ('few', 'tail_class_idx'))}


def split_accuracy(per_class_acc, splits, present=None):
    """Mean per-class accuracy over each split's classes that have evaluation images (`present`, a bool
    mask; default all); nan for a split without any."""
    out = {}
    for split, classes in splits.items():
        classes = classes.to(per_class_acc.device)
        if present is not None:
            classes = classes[present[classes]]
        out[split] = per_class_acc[classes].mean().item() * 100 if len(classes) else float('nan')
    return out


def finalize(sums, splits):
    """All reported numbers: accuracies in %, ECE and confidence as fractions; `splits` maps 'many',
    'medium' and 'few' to their class indices (the dataset's `class_splits`)."""
    n = sums['class_total'].sum()
    per_class_acc = sums['class_correct'] / sums['class_total'].clamp_min(1)
    return {
        'top1': (sums['class_correct'].sum() / n).item() * 100,
        'top5': (sums['top5'].sum() / n).item() * 100,
        **split_accuracy(per_class_acc, splits, sums['class_total'] > 0),
        'ece': ece_from_sums(sums),
        'confidence': (sums['bin_confidence'].sum() / n).item(),
        'test_loss': (sums['nll'].sum() / n).item(),  # mean NLL of the evaluated set
        'per_class_acc': [round(a * 100, 2) for a in per_class_acc.tolist()],
        'reliability': {'count': sums['bin_count'].tolist(),
                        'accuracy': (sums['bin_correct'] / sums['bin_count'].clamp_min(1)).tolist(),
                        'confidence': (sums['bin_confidence'] / sums['bin_count'].clamp_min(1)).tolist()},
    }


def classification_metrics(probs, targets, cfg):
    return finalize(metric_sums(probs, targets), config_splits(cfg))


def expected_calibration_error(confidence, correct, n_bins=N_BINS):
    """ECE of max-softmax `confidence` [N] with `correct` [N] (bool), as the evaluation computes it."""
    return ece_from_sums(calibration_sums(confidence, correct, n_bins))
