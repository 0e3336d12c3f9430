"""Memory layouts the kernels read in place, and the outputs that keep them.

The kernels see each branch image as a dense [C, H*W] matrix (contiguous NCHW) or a dense [H*W, C]
matrix (channels_last); the batch stride is free, so the M views of a stacked [B, M, C, H, W] tensor are
read where they lie. Branches with any other strides, or whose layouts or batch strides disagree, are
copied once to contiguous NCHW. Outputs are dense in the layout the kernels ran in.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor


def image_layout(u: Tensor) -> Optional[bool]:
    """Layout of each image of a 4-D [B, C, H, W] tensor.

    Returns False for dense NCHW, True for dense channels_last, None for anything else. Sizes of 1 accept
    any stride, so a tensor that is both (C == 1 or H * W == 1) reports NCHW.
    """
    _, c, h, w = u.shape
    _, sc, sh, sw = u.stride()
    if (w == 1 or sw == 1) and (h == 1 or sh == w) and (c == 1 or sc == h * w):
        return False
    if (c == 1 or sc == 1) and (w == 1 or sw == c) and (h == 1 or sh == w * c):
        return True
    return None


def branch_views(branches: Sequence[Tensor]) -> list[Tensor]:
    """The M branch tensors [B, C, H, W] of a list of M tensors, or of a one-element list [B, M, C, H, W]."""
    if len(branches) == 1:
        return list(branches[0].unbind(1))
    return list(branches)


def _shared_layout(views: Sequence[Tensor]) -> Optional[bool]:
    """The layout all views (of one shape) share with one batch stride, or None when they do not."""
    strides = views[0].stride()
    layout = image_layout(views[0])
    if layout is None:
        return None
    for v in views[1:]:
        other = v.stride()  # the same strides are the same layout; different ones may still be (sizes of 1)
        if other != strides and (other[0] != strides[0] or image_layout(v) != layout):
            return None
    return layout


def kernel_views(branches: Sequence[Tensor]) -> tuple[list[Tensor], bool, int]:
    """The branch views the kernels read, their layout (True: channels_last) and their batch stride.

    Views are used in place when they share one dense layout and one batch stride; otherwise each is
    copied to contiguous NCHW.
    """
    views = branch_views(branches)
    layout = _shared_layout(views)
    if layout is None:
        views = [v.contiguous() for v in views]
        layout = False
    return views, layout, views[0].stride(0)


def kernel_layout(branches: Sequence[Tensor]) -> bool:
    """The layout :func:`kernel_views` gives the branches (True: channels_last), without copying."""
    return bool(_shared_layout(branch_views(branches)))


def empty_images(like: Tensor, channels_last: bool, dtype: Optional[torch.dtype] = None) -> Tensor:
    """An uninitialised [B, C, H, W] tensor shaped as the 4-D ``like``, dense in the given layout."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(like.shape, dtype=dtype or like.dtype, device=like.device, memory_format=fmt)


def empty_stacked(shape, dtype: torch.dtype, device: torch.device, channels_last: bool) -> Tensor:
    """An uninitialised [B, M, C, H, W] tensor of ``shape`` whose M views are dense in the layout."""
    b, m, c, h, w = shape
    if channels_last:
        return torch.empty((b, m, h, w, c), dtype=dtype, device=device).permute(0, 1, 4, 2, 3)
    return torch.empty((b, m, c, h, w), dtype=dtype, device=device)


def empty_branch_grads(branches: Sequence[Tensor], channels_last: bool) -> list[Tensor]:
    """Uninitialised gradients with the structure of ``branches`` (M tensors, or one stacked tensor)."""
    if len(branches) == 1:
        u = branches[0]
        return [empty_stacked(u.shape, u.dtype, u.device, channels_last)]
    return [empty_images(u, channels_last) for u in branches]


def expanded_branch_grads(grad: Tensor, shape: torch.Size, num_inputs: int) -> list[Tensor]:
    """Gradients constant over (h, w), as expanded views with the structure of the branches.

    ``grad`` is [B, M, C] (one value per branch) or [B, 1, C] (the same for every branch); ``shape`` is
    the shape of the op's first branch tensor and ``num_inputs`` the number of branch tensors it took
    (one: a stacked [B, M, C, H, W] tensor).
    """
    grad = grad[..., None, None]
    if num_inputs == 1:
        return [grad.expand(shape)]
    B, C, H, W = shape
    return [grad[:, min(m, grad.shape[1] - 1)].expand(B, C, H, W) for m in range(num_inputs)]
