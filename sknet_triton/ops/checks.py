"""Validation of the ops' inputs: every check on user input, run once, before any kernel starts."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from sknet_triton.layout import MAX_IMAGE_ELEMENTS
from sknet_triton.ops.launch import MAX_BRANCHES

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

Branches = Union[Tensor, Sequence[Tensor]]


def describe(shape) -> str:
    """A shape as the messages print it: [2, 3]."""
    return "[" + ", ".join(str(s) for s in shape) + "]"


def check_float(op: str, name: str, t: Tensor) -> None:
    """TypeError unless ``t`` is float32, float16 or bfloat16."""
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, float16 or bfloat16, got {t.dtype}")


def check_branches(op: str, branches: Branches) -> tuple[list[Tensor], list[Tensor]]:
    """The branches as the operators take them (M 4-D tensors [B, C, H, W], or one 5-D stacked
    [B, M, C, H, W] tensor), and the M 4-D branch tensors."""
    if isinstance(branches, Tensor):
        if branches.dim() != 5:
            raise ValueError(f"{op}: stacked branches must be 5-D [B, M, C, H, W], got {describe(branches.shape)}")
        tensors, views = [branches], list(branches.unbind(1))
    elif isinstance(branches, (list, tuple)):
        for i, u in enumerate(branches):
            if not isinstance(u, Tensor):
                raise TypeError(f"{op}: branch {i} must be a Tensor, got {type(u).__name__}")
            if u.dim() != 4:
                raise ValueError(f"{op}: branch {i} must be 4-D [B, C, H, W], got {describe(u.shape)}")
        tensors = views = list(branches)
    else:
        raise TypeError(
            f"{op}: branches must be a list or tuple of tensors or one stacked tensor, got {type(branches).__name__}"
        )
    if not 2 <= len(views) <= MAX_BRANCHES:
        raise ValueError(f"{op}: needs 2 to {MAX_BRANCHES} branches, got {len(views)}")
    first = views[0]
    for i, u in enumerate(views[1:], 1):
        if u.shape != first.shape:
            raise ValueError(f"{op}: branches differ in shape: {describe(first.shape)} and {describe(u.shape)} (branch {i})")
        if u.dtype != first.dtype:
            raise TypeError(f"{op}: branches differ in dtype: {first.dtype} and {u.dtype} (branch {i})")
        if u.device != first.device:
            raise ValueError(f"{op}: branches are on different devices: {first.device} and {u.device} (branch {i})")
    check_float(op, "branches", first)
    _, C, H, W = first.shape
    if C == 0 or H == 0 or W == 0:
        raise ValueError(f"{op}: branches need C, H, W >= 1, got {describe(first.shape)}")
    if C * H * W >= MAX_IMAGE_ELEMENTS:
        raise ValueError(f"{op}: one image of a branch (C*H*W = {C * H * W}) must hold fewer than 2**31 elements")
    return tensors, views


def check_param(op: str, name: str, t: Optional[Tensor], shape, device, constant: bool = True) -> None:
    """An optional [M, C] parameter: its type, shape, dtype and device; ``constant`` ones may not require grad."""
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor or None, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must be [M, C] = {describe(shape)}, got {describe(t.shape)}")
    check_float(op, name, t)
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device}, the branches on {device}")
    if constant and t.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            f"{op}: {name} requires grad, but the prologue's scale and bias are constants (eval-mode "
            "BatchNorm folded into the kernels); detach them, or apply BatchNorm before the op"
        )


def check_logits(op: str, logits, views: list[Tensor]) -> None:
    """Logits [B, M, C] of the branches ``views``, in a supported dtype, on their device."""
    B, C = views[0].shape[:2]
    M, device = len(views), views[0].device
    if not isinstance(logits, Tensor):
        raise TypeError(f"{op}: logits must be a Tensor [B, M, C], got {type(logits).__name__}")
    if tuple(logits.shape) != (B, M, C):
        raise ValueError(f"{op}: logits must be [B, M, C] = {describe((B, M, C))}, got {describe(logits.shape)}")
    check_float(op, "logits", logits)
    if logits.device != device:
        raise ValueError(f"{op}: logits are on {logits.device}, the branches on {device}")


def check_prologue(op: str, views: list[Tensor], scale, bias, relu) -> None:
    """The optional constant prologue of the fuse and select: [M, C] scale and bias, and the relu flag."""
    M, C, device = len(views), views[0].shape[1], views[0].device
    check_param(op, "scale", scale, (M, C), device)
    check_param(op, "bias", bias, (M, C), device)
    if not isinstance(relu, bool):
        raise TypeError(f"{op}: relu must be a bool, got {type(relu).__name__}")
