"""The fused ops as SKConv calls them, in a form TorchScript compiles and torch.fx records as one call each.

Eagerly (and under ``torch.compile`` and in a ``torch.fx`` GraphModule, which run Python) :func:`sk_fuse`
and :func:`sk_select` are :func:`sknet_triton.ops.sk_fuse` and :func:`sknet_triton.ops.sk_select`:
validated, then dispatched by :func:`sknet_triton.device.uses_triton`. TorchScript cannot compile those, so
under ``torch.jit.script`` they call the registered custom ops ``torch.ops.sknet_triton.sk_fuse`` /
``sk_select`` (the Triton kernels) or :mod:`sknet_triton.reference` directly, choosing by
:data:`KERNEL_DEVICE_TYPES`, which is ``uses_triton`` itself, asked once per device type.

``sknet_triton.layers`` registers both with ``torch.fx.wrap``, so that every torch.fx tracer (timm's and
torchvision's feature extractors included) records each as a single node.

``torch.jit.trace`` of the kernels' path raises (:func:`refuse_jit_trace`): the trace would hold
sknet_triton's custom ops, which only run where sknet_triton is imported;
``sknet_triton.set_backend(model, "torch")`` traces plain PyTorch operations instead.
"""
import sys
from typing import List, Optional

import torch
from torch import Tensor

from sknet_triton import ops, reference
from sknet_triton.device import KERNEL_DEVICE_TYPES, uses_triton

__all__ = ["KERNEL_DEVICE_TYPES", "kernels_run_on", "refuse_jit_trace", "sk_fuse", "sk_select"]

# TorchScript reads a module-level constant only as an attribute of a module object.
_this_module = sys.modules[__name__]


def kernels_run_on(t: Tensor) -> bool:
    """Whether ``t``'s device runs the Triton kernels (:func:`sknet_triton.device.uses_triton`), also in
    TorchScript."""
    if torch.jit.is_scripting():
        return t.device.type in _this_module.KERNEL_DEVICE_TYPES
    return uses_triton(t.device)


def refuse_jit_trace(t: Tensor) -> None:
    """Raise RuntimeError while ``torch.jit.trace`` records a computation on ``t``'s device that would run the
    kernels (an SK unit's, or a fused op's in a torch.fx graph)."""
    if torch.jit.is_tracing() and kernels_run_on(t):
        raise RuntimeError(
            "sknet_triton: torch.jit.trace would record the Triton kernels as sknet_triton custom ops, which run "
            "only where sknet_triton is imported; call sknet_triton.set_backend(model, \"torch\") before tracing "
            "to trace plain PyTorch operations"
        )


def sk_fuse(
    branches: List[Tensor], scale: Optional[Tensor] = None, bias: Optional[Tensor] = None, relu: bool = False
) -> Tensor:
    """:func:`sknet_triton.ops.sk_fuse` of M (2 to 4) branches [B, C, H, W] (float32, float16 or bfloat16),
    with the optional prologue ``scale``, ``bias`` ([M, C]) and ``relu``: ``s`` [B, C], float32.

    Under TorchScript the inputs are not validated (SKConv builds them).
    """
    if torch.jit.is_scripting():
        if kernels_run_on(branches[0]):
            return torch.ops.sknet_triton.sk_fuse(branches, scale, bias, relu)
        return reference.sk_fuse(branches, scale, bias, relu)
    refuse_jit_trace(branches[0])
    return ops.sk_fuse(branches, scale, bias, relu)


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
        if kernels_run_on(branches[0]):
            return torch.ops.sknet_triton.sk_select(branches, logits, scale, bias, relu)
        return reference.sk_select(branches, logits, scale, bias, relu)
    refuse_jit_trace(branches[0])
    return ops.sk_select(branches, logits, scale, bias, relu)
