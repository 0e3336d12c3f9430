"""The fuse, ``s = mean over (h, w) of sum over m of P_m``: its validation, launchers, operator, autograd
and kernel families (device code: ``kernels/fuse.py``)."""
from __future__ import annotations

import sys
from typing import List, Optional, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from sknet_triton import reference
from sknet_triton.device import KERNEL_DEVICE_TYPES, TRITON_INSTALLED, uses_triton
from sknet_triton.layout import branch_views, empty_branch_grads, expanded_branch_grads
from sknet_triton.ops import launch
from sknet_triton.ops.checks import Branches, check_branches, check_prologue

# TorchScript reads a module-level constant only as an attribute of a module object.
_this_module = sys.modules[__name__]

if TRITON_INSTALLED:
    from sknet_triton.kernels.fuse import sk_fuse_bwd_kernel, sk_fuse_fwd_kernel


def sk_fuse(
    branches: Branches, scale: Optional[Tensor] = None, bias: Optional[Tensor] = None, relu: bool = False
) -> Tensor:
    """Fuse: the global average pool of the sum of the branches.

    Args:
        branches: M (2 to 4) tensors [B, C, H, W], or one stacked tensor [B, M, C, H, W]; float32, float16
            or bfloat16; contiguous or channels_last, channel slices of one such tensor included (other strides
            are copied once: :mod:`sknet_triton.layout`).
        scale, bias: optional [M, C] constants of a per-branch prologue ``P_m = scale[m] * U_m + bias[m]``
            (eval-mode BatchNorm); they may not require grad.
        relu: apply ``max(P_m, 0)`` after the prologue.

    Returns:
        ``s`` [B, C], float32: ``mean over (h, w) of sum over m of P_m``, accumulated in float32. Where the
        kernels split H*W across programs (small batches on a large GPU), their float32 partial sums are
        added atomically, in no fixed order, unless ``torch.use_deterministic_algorithms(True)`` is set.
    """
    tensors, views = check_branches("sk_fuse", branches)
    check_prologue("sk_fuse", views, scale, bias, relu)
    if not uses_triton(views[0].device):
        return reference.sk_fuse(views, scale, bias, relu)
    if not launch.runs_eagerly(views[0]):
        launch.refuse_jit_trace()
        return torch.ops.sknet_triton.sk_fuse(tensors, scale, bias, relu)
    if launch.records_grad(tensors):
        return _EagerFuse.apply(scale, bias, relu, *tensors)
    return fuse_forward(tensors, scale, bias, relu)


def graph_sk_fuse(
    branches: List[Tensor], scale: Optional[Tensor] = None, bias: Optional[Tensor] = None, relu: bool = False
) -> Tensor:
    """:func:`sk_fuse` of M branches [B, C, H, W] as SKConv's fused-ops paths call it: one node in a torch.fx
    graph (``sknet_triton.layers`` wraps it), compiled by TorchScript, which compiles neither the validation
    nor the eager launch; scripted, it calls the registered operator where the device's type is in
    :data:`sknet_triton.device.KERNEL_DEVICE_TYPES` and the reference elsewhere, unvalidated (SKConv builds
    the inputs)."""
    if torch.jit.is_scripting():
        if branches[0].device.type in _this_module.KERNEL_DEVICE_TYPES:
            return torch.ops.sknet_triton.sk_fuse(branches, scale, bias, relu)
        return reference.sk_fuse(branches, scale, bias, relu)
    return sk_fuse(branches, scale, bias, relu)


# --------------------------------------------------------------------------------------------------------
# Launchers, on validated inputs.


def fuse_forward(branches: Sequence[Tensor], scale: Optional[Tensor], bias: Optional[Tensor], relu: bool) -> Tensor:
    """s [B, C] float32 of M branches [B, C, H, W] (or one stacked [B, M, C, H, W]) with the prologue."""
    j = launch.job(branches)
    B, C = j.shape[:2]
    s = torch.zeros(B, C, dtype=torch.float32, device=j.views[0].device)
    if B:
        launch.launch_branches(FUSE_FORWARD, j, s, prologue=(scale, bias), RELU=relu)
    return s


def fuse_relu_backward(
    grad_s: Tensor, branches: Sequence[Tensor], scale: Optional[Tensor], bias: Optional[Tensor]
) -> list[Tensor]:
    """Branch gradients of :func:`fuse_forward` with relu=True for float32 [B, C] ``grad_s``, structured as
    ``branches`` (:func:`sknet_triton.layout.empty_branch_grads`)."""
    j = launch.job(branches)
    grads = empty_branch_grads(branches)
    if j.shape[0]:
        grad_views = branch_views(grads)
        launch.launch_branches(FUSE_RELU_BACKWARD, j, grad_s.float().contiguous(), *j.grad_pointers(grad_views),
                               *j.grad_strides(grad_views), prologue=(scale, bias))
    return grads


# --------------------------------------------------------------------------------------------------------
# The operators and their autograd; an eager call that autograd records takes _EagerFuse instead, over
# the same launchers and the same backward.


def _fuse_shape(branches, scale, bias, relu):
    u = branch_views(branches)[0]
    return u.new_empty((u.shape[0], u.shape[1]), dtype=torch.float32)


@launch.operator("sk_fuse", _fuse_shape)
def _sk_fuse_op(branches: list[Tensor], scale: Optional[Tensor], bias: Optional[Tensor], relu: bool) -> Tensor:
    return fuse_forward(branches, scale, bias, relu)


def _fuse_relu_backward_shape(grad_s, branches, scale, bias):
    return empty_branch_grads(branches)


@launch.operator("sk_fuse_relu_backward", _fuse_relu_backward_shape)
def _sk_fuse_relu_backward_op(
    grad_s: Tensor, branches: list[Tensor], scale: Optional[Tensor], bias: Optional[Tensor]
) -> list[Tensor]:
    return fuse_relu_backward(grad_s, branches, scale, bias)


def _save(ctx, branches: Sequence[Tensor], scale: Optional[Tensor], bias: Optional[Tensor], relu: bool) -> None:
    ctx.relu = relu
    ctx.shape = branches[0].shape
    ctx.num_inputs = len(branches)
    ctx.dtype = branches[0].dtype
    # Without ReLU the gradient does not depend on the branches: keep none of them alive.
    ctx.save_for_backward(*(branches if relu else ()), scale, bias)


def _branch_grads(ctx, grad_s: Tensor) -> list[Tensor]:
    *branches, scale, bias = ctx.saved_tensors
    if not ctx.relu:
        # dU_m = ds * scale[m] / HW, the same at every position: expanded views, no memory traffic.
        H, W = ctx.shape[-2:]
        grad = (grad_s.float() / (H * W))[:, None, :]  # [B, 1, C]
        if scale is not None:
            grad = grad * scale.float()[None]  # [B, M, C]
        return expanded_branch_grads(grad.to(ctx.dtype), ctx.shape, ctx.num_inputs)
    if launch.runs_eagerly(grad_s):
        return fuse_relu_backward(grad_s, branches, scale, bias)
    return torch.ops.sknet_triton.sk_fuse_relu_backward(grad_s, branches, scale, bias)


def _setup_context(ctx, inputs, output):
    _save(ctx, *inputs)


def _backward(ctx, grad_s):
    return _branch_grads(ctx, grad_s), None, None, None


_sk_fuse_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerFuse(torch.autograd.Function):
    """:func:`fuse_forward` recorded by autograd, for eager calls on plain tensors: the branches are
    arguments of their own, as autograd tracks them."""

    @staticmethod
    def forward(ctx, scale, bias, relu, *branches):
        _save(ctx, branches, scale, bias, relu)
        return fuse_forward(branches, scale, bias, relu)

    @staticmethod
    @once_differentiable  # the backward launches record no graph: a double backward raises, never silently wrong
    def backward(ctx, grad_s):
        return None, None, None, *_branch_grads(ctx, grad_s)


# --------------------------------------------------------------------------------------------------------
# The kernel families.

if TRITON_INSTALLED:
    # Reads the M branches.
    FUSE_FORWARD = launch.Family(
        "fuse_fwd", sk_fuse_fwd_kernel, fuse_forward, launch.FORWARD_DEFAULTS, launch.branch_variants,
        passes=lambda M: M, flags=("RELU",),
    )
    # With a ReLU prologue: reads the M branches (the ReLU mask), writes M gradients. Without one the
    # gradient is a broadcast, returned as an expanded view: no kernel.
    FUSE_RELU_BACKWARD = launch.Family(
        "fuse_bwd", sk_fuse_bwd_kernel, fuse_relu_backward, launch.BACKWARD_DEFAULTS, launch.branch_variants,
        passes=lambda M: 2 * M, small_tiles=True,
    )
    FAMILIES = (FUSE_FORWARD, FUSE_RELU_BACKWARD)
else:
    FAMILIES = ()
