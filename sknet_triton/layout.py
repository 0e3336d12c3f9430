"""Memory layouts the kernels read in place, and the outputs that keep them.

The kernels see each branch image as a dense [C, H*W] matrix (contiguous NCHW) or as an [H*W, C] matrix
whose rows lie ``line >= C`` elements apart (channels_last: ``line == C`` where dense; more for a channel
slice of a wider channels_last tensor, such as ResNeSt's radix branches, channels m*C .. m*C + C - 1 of one
[B, M*C, H, W] convolution output, whose pixels lie M*C apart); the batch stride is free. So the M views of
a stacked [B, M, C, H, W] tensor and channel slices of one [B, M*C, H, W] tensor are read where they lie, in
either layout. Branches with any other strides, or whose layouts, lines or batch strides disagree, are
copied once to contiguous NCHW. A stacked tensor read in place gets gradients with its very strides, so
that a view's backward needs no copy; every other output is dense in the layout the kernels ran in.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

# The kernels' offsets within one image (its last element included, line and all) are 32-bit; the batch may
# be any size.
MAX_IMAGE_ELEMENTS = 2**31


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


def channels_last_line(u: Tensor) -> Optional[int]:
    """The distance in elements between consecutive positions of one channel of a 4-D [B, C, H, W] tensor
    whose images are [H*W, C] matrices with rows at least C elements apart: C for dense channels_last, more
    for a channel slice of a wider channels_last tensor; None for any other layout."""
    _, c, h, w = u.shape
    _, sc, sh, sw = u.stride()
    line = sw if w > 1 else sh if h > 1 else c
    if (c == 1 or sc == 1) and (h == 1 or sh == w * line) and line >= c:
        return line
    return None


def branch_views(branches: Sequence[Tensor]) -> list[Tensor]:
    """The M branch tensors [B, C, H, W] of a list of M tensors, or of a one-element list [B, M, C, H, W]."""
    if len(branches) == 1:
        return list(branches[0].unbind(1))
    return list(branches)


def _kernel_layout_of(u: Tensor) -> Optional[tuple[bool, int]]:
    """(channels_last, line) of a branch the kernels can read in place (line: C for NCHW); None otherwise."""
    C, H, W = u.shape[1:]
    if image_layout(u) is False:
        return False, C
    line = channels_last_line(u)
    if line is None or line * H * W >= MAX_IMAGE_ELEMENTS:
        return None
    return True, line


def _read_in_place(views: Sequence[Tensor]) -> Optional[tuple[bool, int]]:
    """The layout (channels_last, line) all the views share with one batch stride, so that the kernels
    read them where they lie; None where they must be copied."""
    layout = _kernel_layout_of(views[0])
    if layout is None:
        return None
    for v in views[1:]:
        # The same strides are the same layout; different ones may still be (sizes of 1).
        if v.stride() != views[0].stride() and (v.stride(0) != views[0].stride(0) or _kernel_layout_of(v) != layout):
            return None
    return layout


def kernel_views(branches: Sequence[Tensor]) -> tuple[list[Tensor], bool, int, int]:
    """The branch views the kernels read, their layout (True: channels_last), their batch stride and their
    line (the position stride in channels_last; C where the images are dense): the views themselves where
    they can be read in place, else each copied to contiguous NCHW."""
    views = branch_views(branches)
    layout = _read_in_place(views)
    if layout is None:
        views = [v.contiguous() for v in views]
        layout = False, views[0].shape[1]
    channels_last, line = layout
    return views, channels_last, views[0].stride(0), line


def kernel_layout(branches: Sequence[Tensor]) -> bool:
    """The layout :func:`kernel_views` gives the branches (True: channels_last), without copying."""
    layout = _read_in_place(branch_views(branches))
    return layout is not None and layout[0]


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


def _fills_its_storage(u: Tensor) -> bool:
    """Whether ``u``'s elements tile one block of memory without gaps or overlap (a permutation of a
    contiguous tensor), so that ``torch.empty_strided`` with its strides allocates nothing more."""
    expected = 1
    for d in sorted(range(u.dim()), key=u.stride):
        if u.shape[d] != 1:
            if u.stride(d) != expected:
                return False
            expected *= u.shape[d]
    return True


def empty_branch_grads(branches: Sequence[Tensor]) -> list[Tensor]:
    """Uninitialised gradients with the structure of ``branches`` (M tensors, or one stacked tensor), in the
    layout :func:`kernel_views` reads the branches in: a stacked tensor read in place gets its very strides
    (so that the backward of the view it is, of a [B, M*C, H, W] tensor say, is a view too); otherwise each
    branch's gradient is dense (M tensors are M outputs of an operator, which may not alias one buffer)."""
    views = branch_views(branches)
    layout = _read_in_place(views)
    channels_last = layout is not None and layout[0]
    if len(branches) == 1:
        u = branches[0]
        if layout is not None and _fills_its_storage(u):
            return [torch.empty_strided(u.shape, u.stride(), dtype=u.dtype, device=u.device)]
        return [empty_stacked(u.shape, u.dtype, u.device, channels_last)]
    return [empty_images(u, channels_last) for u in views]


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
