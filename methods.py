"""The two training tricks of the recipe: mixup (stage 1) and H2T feature fusion (stage 2).

Both run on whatever device their tensors live on and draw their randomness from torch's and
numpy's global generators, which the scripts seed, so a run is reproducible.
"""
import numpy as np
import torch


def mixup_data(x, y, alpha=1.0):
    """Mix each sample with a random partner: one lam ~ Beta(alpha, alpha) for the whole batch.

    Returns (mixed_x, y_a, y_b, lam); the loss is `mixup_criterion(...)`. alpha <= 0 disables mixing.
    """
    lam = float(np.random.beta(alpha, alpha)) if alpha > 0 else 1.0
    perm = torch.randperm(x.size(0), device=x.device)
    mixed_x = lam * x + (1 - lam) * x[perm]
    return mixed_x, y, y[perm], lam


def mixup_criterion(criterion, pred, y_a, y_b, lam):
    return lam * criterion(pred, y_a) + (1 - lam) * criterion(pred, y_b)


def H2T(x1, x2, rho=0.25):
    """Head-to-tail fusion: replace a random `int(rho * C)` of x1's channels by x2's.

    x1 (fused branch, class-balanced, its labels are kept) and x2 (fusing branch, instance-sampled)
    are feature maps [B, C, H, W], or lists of them for multi-branch backbones (fused pairwise, each
    pair with its own channel draw). One channel set serves the whole batch. Returns new tensors;
    rho <= 0 returns x1 itself.
    """
    if isinstance(x1, (list, tuple)):
        return [H2T(a, b, rho) for a, b in zip(x1, x2)]
    if x1.shape != x2.shape:
        raise ValueError(f'H2T needs feature maps of one shape, got {tuple(x1.shape)} and {tuple(x2.shape)}')
    num_fused = int(rho * x1.size(1))
    if num_fused <= 0:
        return x1
    channels = torch.randperm(x1.size(1), device=x1.device)[:num_fused]
    fused = x1.clone()
    fused[:, channels] = x2[:, channels]
    return fused
