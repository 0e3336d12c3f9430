"""The fused ops as SKConv's fused-ops paths call them, in a form TorchScript compiles and torch.fx records as one
call each (``sknet_triton.layers`` registers both with ``torch.fx.wrap``, so that every torch.fx tracer, timm's
and torchvision's feature extractors included, records each as a single node, and a scripted graph compiles it).

TorchScript compiles neither :func:`sknet_triton.ops.sk_fuse` nor :func:`sknet_triton.ops.sk_select`
(validation, the eager launch), so under TorchScript these call the registered custom ops
``torch.ops.sknet_triton.sk_fuse`` / ``sk_select`` (the Triton kernels) where
:data:`sknet_triton.device.KERNEL_DEVICE_TYPES` holds the device's type, :mod:`sknet_triton.reference`
elsewhere. Outside TorchScript they are the ops themselves.
"""
import sys
from typing import List, Optional

import torch
from torch import Tensor

from sknet_triton import reference
from sknet_triton.device import KERNEL_DEVICE_TYPES
from sknet_triton.ops.fuse import sk_fuse as _sk_fuse
from sknet_triton.ops.select import sk_select as _sk_select

__all__ = ["sk_fuse", "sk_select"]

# TorchScript reads a module-level constant only as an attribute of a module object.
_this_module = sys.modules[__name__]


def sk_fuse(
    branches: List[Tensor], scale: Optional[Tensor] = None, bias: Optional[Tensor] = None, relu: bool = False
) -> Tensor:
    """:func:`sknet_triton.ops.sk_fuse` of M (2 to 4) branches [B, C, H, W] (float32, float16 or bfloat16),
    with the optional prologue ``scale``, ``bias`` ([M, C]) and ``relu``: ``s`` [B, C], float32.

    Under TorchScript the inputs are not validated (SKConv builds them).
    """
    if torch.jit.is_scripting():
        if branches[0].device.type in _this_module.KERNEL_DEVICE_TYPES:
            return torch.ops.sknet_triton.sk_fuse(branches, scale, bias, relu)
        return reference.sk_fuse(branches, scale, bias, relu)
    return _sk_fuse(branches, scale, bias, relu)


def sk_select(
    branches: List[Tensor],
    logits: Tensor,
    scale: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    relu: bool = False,
) -> Tensor:
    """:func:`sknet_triton.ops.sk_select` of M branches [B, C, H, W] and logits [B, M, C], with the prologue
    of :func:`sk_fuse`: [B, C, H, W] in the branches' dtype and memory format.

    Under TorchScript the inputs are not validated (SKConv builds them).
    """
    if torch.jit.is_scripting():
        if branches[0].device.type in _this_module.KERNEL_DEVICE_TYPES:
            return torch.ops.sknet_triton.sk_select(branches, logits, scale, bias, relu)
        return reference.sk_select(branches, logits, scale, bias, relu)
    return _sk_select(branches, logits, scale, bias, relu)
