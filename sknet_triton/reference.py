"""The Selective Kernel fuse and select operations in plain PyTorch.

This module is the oracle the Triton kernels are tested against and the path every non-Triton device
runs. It is written for clarity, not speed: every intermediate of the eager formulation is materialised.
Computation happens in float32 (float64 for float64 inputs), as in the kernels.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

__all__ = ["branch_values", "sk_fuse", "sk_select"]


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


def sk_fuse(
    branches: List[Tensor],
    scale: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    relu: bool = False,
) -> Tensor:
    """Fuse: the global average pool of the sum of the branches.

    Args:
        branches: M tensors [B, C, H, W].
        scale, bias, relu: the prologue of :func:`branch_values`.

    Returns:
        ``s`` [B, C], float32 (float64 for float64 input): ``mean over (h, w) of sum over m of P_m``.
    """
    values = branch_values(branches, scale, bias, relu)
    return torch.stack(values, dim=1).sum(dim=1).mean(dim=(2, 3))


def sk_select(
    branches: List[Tensor],
    logits: Tensor,
    scale: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    relu: bool = False,
) -> Tensor:
    """Select: the branches weighted by a softmax over the branch axis.

    Args:
        branches: M tensors [B, C, H, W].
        logits: [B, M, C] attention logits (path-major, as timm's ``fc_select`` output viewed [B, M, C]).
        scale, bias, relu: the prologue of :func:`branch_values`.

    Returns:
        ``sum over m of softmax(logits, dim=1)[:, m, :, None, None] * P_m``, [B, C, H, W], in the
        branches' dtype and memory format.
    """
    values = branch_values(branches, scale, bias, relu)
    attention = torch.softmax(logits.to(values[0].dtype), dim=1)
    out = attention[:, 0, :, None, None] * values[0]
    for m in range(1, len(values)):
        out = out + attention[:, m, :, None, None] * values[m]
    return out.to(branches[0].dtype)
