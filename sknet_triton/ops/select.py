"""The select, ``out = sum over m of softmax(logits)[:, m] * P_m``: its validation, launchers, operator,
autograd and kernel families (device code: ``kernels/select.py``)."""
from __future__ import annotations

import sys
from typing import List, Optional, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from sknet_triton import reference
from sknet_triton.device import KERNEL_DEVICE_TYPES, TRITON_INSTALLED, uses_triton
from sknet_triton.layout import branch_views, empty_branch_grads, empty_images, kernel_layout
from sknet_triton.ops import launch
from sknet_triton.ops.checks import Branches, check_branches, check_logits, check_prologue

# TorchScript reads a module-level constant only as an attribute of a module object.
_this_module = sys.modules[__name__]

if TRITON_INSTALLED:
    from sknet_triton.kernels.select import sk_select_bwd_kernel, sk_select_fwd_kernel


def sk_select(
    branches: Branches,
    logits: Tensor,
    scale: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    relu: bool = False,
) -> Tensor:
    """Select: the branches weighted by a softmax over the branch axis.

    Args:
        branches: as for :func:`sknet_triton.ops.sk_fuse`.
        logits: [B, M, C] attention logits, path-major (timm's ``fc_select`` output viewed [B, M, C]);
            float32, float16 or bfloat16.
        scale, bias, relu: the prologue of :func:`sknet_triton.ops.sk_fuse`.

    Returns:
        [B, C, H, W] in the branches' dtype, dense in their memory format (contiguous where the branches
        are neither contiguous nor channels_last):
        ``sum over m of softmax(logits, dim=1)[:, m, :, None, None] * P_m``, computed in float32.
    """
    tensors, views = check_branches("sk_select", branches)
    check_logits("sk_select", logits, views)
    check_prologue("sk_select", views, scale, bias, relu)
    if not uses_triton(views[0].device):
        fmt = torch.channels_last if kernel_layout(tensors) else torch.contiguous_format
        return reference.sk_select(views, logits, scale, bias, relu).contiguous(memory_format=fmt)
    if not launch.runs_eagerly(views[0]):
        launch.refuse_jit_trace()
        return torch.ops.sknet_triton.sk_select(tensors, logits, scale, bias, relu)
    if launch.records_grad([*tensors, logits]):
        return _EagerSelect.apply(logits, scale, bias, relu, *tensors)
    return select_forward(tensors, logits, scale, bias, relu)


def graph_sk_select(
    branches: List[Tensor],
    logits: Tensor,
    scale: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    relu: bool = False,
) -> Tensor:
    """:func:`sk_select` of M branches [B, C, H, W] and logits [B, M, C] as SKConv's fused-ops paths call it:
    one torch.fx node that TorchScript compiles, as :func:`sknet_triton.ops.fuse.graph_sk_fuse` is."""
    if torch.jit.is_scripting():
        if branches[0].device.type in _this_module.KERNEL_DEVICE_TYPES:
            return torch.ops.sknet_triton.sk_select(branches, logits, scale, bias, relu)
        return reference.sk_select(branches, logits, scale, bias, relu)
    return sk_select(branches, logits, scale, bias, relu)


# --------------------------------------------------------------------------------------------------------
# Launchers, on validated inputs.


def select_forward(
    branches: Sequence[Tensor], logits: Tensor, scale: Optional[Tensor], bias: Optional[Tensor], relu: bool
) -> Tensor:
    """out [B, C, H, W] of M branches (or one stacked [B, M, C, H, W]) and logits [B, M, C] (any strides,
    read where they lie), dense in the branches' layout."""
    j = launch.job(branches)
    out = empty_images(j.views[0], j.channels_last)
    if j.shape[0]:
        launch.launch_branches(SELECT_FORWARD, j, logits, out, *logits.stride(), out.stride(0), prologue=(scale, bias),
                               RELU=relu)
    return out


def select_backward(
    grad_out: Tensor,
    branches: Sequence[Tensor],
    logits: Tensor,
    scale: Optional[Tensor],
    bias: Optional[Tensor],
    relu: bool,
) -> list[Tensor]:
    """Gradients of :func:`select_forward` for ``grad_out`` [B, C, H, W]: the branch gradients structured as
    ``branches`` (:func:`sknet_triton.layout.empty_branch_grads`), then dlogits [B, M, C] in the logits'
    dtype, contiguous."""
    j = launch.job(branches)
    grads = empty_branch_grads(branches)
    dlogits = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
    if j.shape[0]:
        grad_out = grad_out.contiguous(memory_format=j.memory_format)
        grad_views = branch_views(grads)
        launch.launch_branches(
            SELECT_BACKWARD, j, logits, grad_out, *j.grad_pointers(grad_views), dlogits, *logits.stride(),
            grad_out.stride(0), *j.grad_strides(grad_views), prologue=(scale, bias), RELU=relu,
        )
    return grads + [dlogits.to(logits.dtype)]


# --------------------------------------------------------------------------------------------------------
# The operators and their autograd; an eager call that autograd records takes _EagerSelect instead, over
# the same launchers and the same backward.


def _select_shape(branches, logits, scale, bias, relu):
    return empty_images(branch_views(branches)[0], kernel_layout(branches))


@launch.operator("sk_select", _select_shape)
def _sk_select_op(
    branches: list[Tensor], logits: Tensor, scale: Optional[Tensor], bias: Optional[Tensor], relu: bool
) -> Tensor:
    return select_forward(branches, logits, scale, bias, relu)


def _select_backward_shape(grad_out, branches, logits, scale, bias, relu):
    dlogits = torch.empty_like(logits, memory_format=torch.contiguous_format)
    return empty_branch_grads(branches) + [dlogits]


@launch.operator("sk_select_backward", _select_backward_shape)
def _sk_select_backward_op(
    grad_out: Tensor,
    branches: list[Tensor],
    logits: Tensor,
    scale: Optional[Tensor],
    bias: Optional[Tensor],
    relu: bool,
) -> list[Tensor]:
    return select_backward(grad_out, branches, logits, scale, bias, relu)


def _save(ctx, branches: Sequence[Tensor], logits: Tensor, scale, bias, relu: bool) -> None:
    ctx.relu = relu
    ctx.save_for_backward(*branches, logits, scale, bias)


def _grads(ctx, grad_out: Tensor) -> list[Tensor]:
    """The branch gradients, then dlogits."""
    *branches, logits, scale, bias = ctx.saved_tensors
    if launch.runs_eagerly(grad_out):
        return select_backward(grad_out, branches, logits, scale, bias, ctx.relu)
    return torch.ops.sknet_triton.sk_select_backward(grad_out, branches, logits, scale, bias, ctx.relu)


def _setup_context(ctx, inputs, output):
    _save(ctx, *inputs)


def _backward(ctx, grad_out):
    grads = _grads(ctx, grad_out)
    return grads[:-1], grads[-1], None, None, None


_sk_select_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerSelect(torch.autograd.Function):
    """:func:`select_forward` recorded by autograd, for eager calls on plain tensors: the branches are
    arguments of their own, as autograd tracks them."""

    @staticmethod
    def forward(ctx, logits, scale, bias, relu, *branches):
        _save(ctx, branches, logits, scale, bias, relu)
        return select_forward(branches, logits, scale, bias, relu)

    @staticmethod
    @once_differentiable  # the backward launches record no graph: a double backward raises, never silently wrong
    def backward(ctx, grad_out):
        *grads, dlogits = _grads(ctx, grad_out)
        return dlogits, None, None, None, *grads


# --------------------------------------------------------------------------------------------------------
# The kernel families.

if TRITON_INSTALLED:
    # Reads the M branches, writes the output.
    SELECT_FORWARD = launch.Family(
        "select_fwd", sk_select_fwd_kernel, select_forward, launch.FORWARD_DEFAULTS, launch.branch_variants,
        passes=lambda M: M + 1, flags=("RELU",),
    )
    # In one pass: reads dV and the M branches, writes the M gradients.
    SELECT_BACKWARD = launch.Family(
        "select_bwd", sk_select_bwd_kernel, select_backward, launch.BACKWARD_DEFAULTS, launch.branch_variants,
        passes=lambda M: 2 * M + 1, small_tiles=True, flags=("RELU",),
    )
    FAMILIES = (SELECT_FORWARD, SELECT_BACKWARD)
else:
    FAMILIES = ()
