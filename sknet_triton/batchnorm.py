"""Training-mode BatchNorm's host arithmetic around the kernels of kernels/batchnorm.py, on small
per-channel tensors: combining the statistics kernel's partials, folding the statistics into the
prologue, and the coefficients that carry BatchNorm's backward through the batch statistics.

The statistics travel as one float32 [5, M, C] tensor, rows indexed by BN_SCALE .. BN_VAR. Select's
backward hands fuse's backward a float32 [HANDOFF_ROWS, B, M, C] tensor: the logits, then the four sums
of kernels/batchnorm.py (a_m * sum dV [P > 0], a_m * sum dV [P > 0] x_hat, sum [P > 0], sum [P > 0] x_hat).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

BN_SCALE, BN_SHIFT, BN_MEAN, BN_RSTD, BN_VAR = range(5)
HANDOFF_ROWS = 5


def combine_partials(
    partial_mean: Tensor, partial_m2: Tensor, B: int, HW: int, num_splits: int, chunk: int
) -> tuple[Tensor, Tensor]:
    """Per-channel batch mean and biased variance, float32 [M, C] each, from the statistics kernel's
    float32 [M, B * num_splits, C] partial means and M2 (partial b * num_splits + k: split k of image b,
    ``chunk`` positions of the HW, the last maybe fewer), combined with Chan's formula as the kernel
    combines its tiles."""
    positions = HW - torch.arange(num_splits, device=partial_mean.device) * chunk
    counts = positions.clamp(max=chunk).float().repeat(B)[None, :, None]
    total = B * HW
    mean = (partial_mean * counts).sum(1) / total
    m2 = partial_m2.sum(1) + (counts * (partial_mean - mean[:, None]).square()).sum(1)
    return mean, m2 / total


def fold_statistics(mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    """The float32 [5, M, C] statistics (rows BN_SCALE .. BN_VAR) of float32 [M, C] batch ``mean`` and
    ``var`` and the optional [M, C] affine parameters: BatchNorm + ReLU is then the prologue
    max(scale * Y + shift, 0)."""
    rstd = torch.rsqrt(var + eps)
    scale = rstd if weight is None else rstd * weight.float()
    shift = -mean * scale if bias is None else bias.float() - mean * scale
    return torch.stack([scale, shift, mean, rstd, var])


def backward_coefficients(
    grad_s: Tensor, stats: Tensor, handoff: Tensor, HW: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(alpha, offset, dgamma, dbeta), float32 [M, C] each, of BatchNorm's backward once ds (float32
    [B, C]) is known: dY = scale * dZ + alpha * Y + offset, the form the fuse backward kernel takes."""
    _, dv_active, dv_x_hat_active, active, x_hat_active = handoff
    grad_position = (grad_s.float() / HW)[:, None]  # ds / HW: fuse's part of dP, [B, 1, C]
    dbeta = (dv_active + grad_position * active).sum(0)
    dgamma = (dv_x_hat_active + grad_position * x_hat_active).sum(0)
    # dY = scale * (dZ - dbeta / n - x_hat * dgamma / n), x_hat = (Y - mean) * rstd: scale * dZ + alpha * Y + offset.
    scale, mean, rstd = stats[BN_SCALE], stats[BN_MEAN], stats[BN_RSTD]
    total = grad_s.shape[0] * HW
    alpha = -scale * rstd * dgamma / total
    offset = -scale * dbeta / total - alpha * mean
    return alpha, offset, dgamma, dbeta
