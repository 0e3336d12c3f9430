"""The Selective Kernel split (eval mode), fuse and select operations in plain PyTorch.

This module is the oracle the Triton kernels are tested against and the path every non-Triton device
runs. It is written for clarity, not speed: every intermediate of the eager formulation is materialised.
Computation happens in float32 (float64 for float64 inputs), as in the kernels.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["branch_values", "batch_norm_relu", "sk_fuse", "sk_select", "sk_split"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def branch_values(
    branches: List[Tensor],
    scale: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    relu: bool = False,
) -> List[Tensor]:
    """The branch values ``P_m`` after the optional per-channel prologue.

    Args:
        branches: M tensors [B, C, H, W], any floating dtype.
        scale, bias: optional [M, C]; ``P_m = scale[m, c] * U_m + bias[m, c]``.
        relu: apply ``max(P_m, 0)`` last.

    Returns:
        M tensors [B, C, H, W] in float32 (float64 for float64 input).
    """
    values: List[Tensor] = []
    for m, u in enumerate(branches):
        p = u.to(_compute_dtype(u.dtype))
        if scale is not None:
            p = p * scale[m].to(p.dtype)[None, :, None, None]
        if bias is not None:
            p = p + bias[m].to(p.dtype)[None, :, None, None]
        if relu:
            p = torch.relu(p)
        values.append(p)
    return values


def batch_norm_relu(
    branches: List[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> tuple[list[Tensor], Tensor, Tensor]:
    """Training-mode BatchNorm (the batch's statistics) and ReLU of each branch, as ``nn.BatchNorm2d`` in
    training followed by ``nn.ReLU``, without the running statistics.

    Args:
        branches: M raw branches Y_m [B, C, H, W], any floating dtype.
        weight, bias: optional [M, C] affine parameters (None: 1 and 0).
        eps: added to the variance.

    Returns:
        ``(values, mean, var)``: the M branches ``max(weight * (Y - mean) / sqrt(var + eps) + bias, 0)`` in
        float32 (float64 for float64 input), and the per-channel batch mean and biased variance over
        (B, H, W), [M, C], detached.
    """
    values, means, variances = [], [], []
    for m, y in enumerate(branches):
        y = y.to(_compute_dtype(y.dtype))
        # Written out rather than var_mean, which warns on an empty batch (where both are NaN).
        mean = y.mean(dim=(0, 2, 3))
        var = (y - mean[None, :, None, None]).square().mean(dim=(0, 2, 3))
        p = (y - mean[None, :, None, None]) * torch.rsqrt(var + eps)[None, :, None, None]
        if weight is not None:
            p = p * weight[m].to(p.dtype)[None, :, None, None]
        if bias is not None:
            p = p + bias[m].to(p.dtype)[None, :, None, None]
        values.append(torch.relu(p))
        means.append(mean.detach())
        variances.append(var.detach())
    return values, torch.stack(means), torch.stack(variances)


def sk_fuse(
    branches: List[Tensor],
    scale: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    relu: bool = False,
) -> Tensor:
    """Plain-PyTorch :func:`sknet_triton.ops.sk_fuse` (shapes, dtypes and meaning there), over M branch
    tensors [B, C, H, W], unvalidated; float32 result (float64 for float64 input)."""
    values = branch_values(branches, scale, bias, relu)
    return torch.stack(values, dim=1).sum(dim=1).mean(dim=(2, 3))


def sk_select(
    branches: List[Tensor],
    logits: Tensor,
    scale: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    relu: bool = False,
) -> Tensor:
    """Plain-PyTorch :func:`sknet_triton.ops.sk_select` (shapes, dtypes and meaning there), over M branch
    tensors [B, C, H, W], unvalidated; computed in float32 (float64 for float64 input), returned in the
    branches' dtype."""
    values = branch_values(branches, scale, bias, relu)
    attention = torch.softmax(logits.to(values[0].dtype), dim=1)
    out = attention[:, 0, :, None, None] * values[0]
    for m in range(1, len(values)):
        out = out + attention[:, m, :, None, None] * values[m]
    return out.to(branches[0].dtype)


def sk_split(
    x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor, stride: int = 1, split_input: bool = False
) -> tuple[Tensor, Tensor]:
    """Plain-PyTorch :func:`sknet_triton.ops.sk_split` (shapes, dtypes and meaning there), unvalidated:
    ``F.conv2d`` per branch, the folded BatchNorm, ReLU, and :func:`sk_fuse` of the branches; computed in
    float32 (float64 for float64 input), the branches returned stacked [B, M, C, Ho, Wo] in x's dtype."""
    M = weight.shape[0]
    dtype = _compute_dtype(x.dtype)
    inputs = torch.chunk(x.to(dtype), M, dim=1) if split_input else [x.to(dtype)] * M
    groups = inputs[0].shape[1] // weight.shape[2]
    convs = [
        F.conv2d(xi, weight[m].to(dtype), stride=stride, padding=m + 1, dilation=m + 1, groups=groups)
        for m, xi in enumerate(inputs)
    ]
    values = branch_values(convs, scale.to(dtype), bias.to(dtype), relu=True)
    return torch.stack(values, dim=1).to(x.dtype), sk_fuse(values)
