"""The Selective Kernel split, fuse and select operations: validation, dispatch and torch.library registration.

``sk_split`` (eval mode), ``sk_fuse`` and ``sk_select`` are the public entry points, and ``sk_fuse_bn`` then
``sk_select_bn`` the two of them over branches that still need training-mode BatchNorm (batch statistics) and
ReLU. Each checks its inputs once, then runs either the Triton kernels (where
:func:`sknet_triton.device.uses_triton` says so) through custom ops that ``torch.compile`` traces without a
graph break, or the plain-PyTorch reference (every other case).

The custom ops take the branches as a list: M tensors [B, C, H, W], or one stacked [B, M, C, H, W]
tensor. Gradients are structured the same way.
"""
from __future__ import annotations

import warnings
from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from sknet_triton import device as device_rule
from sknet_triton import reference
from sknet_triton.device import kernel_path, uses_triton
from sknet_triton.layout import (
    branch_views, empty_branch_grads, empty_images, empty_stacked, expanded_branch_grads, image_layout, kernel_layout,
)

# With the triton package the kernels must import: a broken installation is an error, not a silent fallback.
if device_rule.TRITON_INSTALLED:
    from sknet_triton import launch
else:
    launch = None

__all__ = [
    "sk_split", "sk_fuse", "sk_select", "sk_fuse_bn", "sk_select_bn", "BatchNormBranches", "uses_triton",
    "prefers_split_kernel", "split_geometry_problem", "kernel_path", "SUPPORTED_DTYPES", "MAX_BRANCHES",
]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The kernels take the branches as this many pointers (sknet_triton.kernels.MAX_BRANCHES; a test ties them).
MAX_BRANCHES = 4
MAX_IMAGE_ELEMENTS = 2**31

Branches = Union[Tensor, Sequence[Tensor]]

_warned_no_triton = False


def prefers_split_kernel(device: torch.device, dtype: torch.dtype, channels_last: bool, M: int, C: int, HW: int) -> bool:
    """Whether the tuned table of this CUDA device's architecture records :func:`sk_split` faster than the
    cuDNN convolutions it replaces, for M branches of C channels and HW output positions (see
    ``sknet_triton/tuned/README.md``). False without such a record, and on any other device."""
    return launch is not None and launch.split_measured_faster(device, dtype, channels_last, M, C, HW)


def _dispatch_to_kernels(device: torch.device) -> bool:
    """:func:`uses_triton`, warning once when CUDA tensors fall back for want of the triton package."""
    global _warned_no_triton
    if not device_rule.TRITON_INSTALLED and device.type == "cuda" and not _warned_no_triton:
        _warned_no_triton = True
        warnings.warn("sknet_triton: the triton package is not installed; CUDA tensors run the plain-PyTorch "
                      "reference instead of the fused kernels", RuntimeWarning, stacklevel=3)
    return uses_triton(device)


def _launch_directly(u: Tensor) -> bool:
    """Whether a call may skip the operator's dispatch and go straight to the launcher: eager inference on
    plain tensors, where no autograd graph is recorded and no graph is traced or compiled. The operator
    costs the host more than the launch itself (perf/NOTES.md)."""
    return (
        not torch.is_grad_enabled()
        and type(u) is Tensor
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
    )


# --------------------------------------------------------------------------------------------------------
# Validation: every check on user input is here, and runs before any kernel is launched.


def _describe(shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _check_float(name: str, op: str, t: Tensor) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, float16 or bfloat16, got {t.dtype}")


def _check_branches(op: str, branches: Branches) -> tuple[list[Tensor], list[Tensor]]:
    """The branches as the custom ops take them (M 4-D tensors, or one 5-D stacked tensor), and the M
    4-D branch tensors."""
    if isinstance(branches, Tensor):
        if branches.dim() != 5:
            raise ValueError(
                f"{op}: stacked branches must be 5-D [B, M, C, H, W], got {_describe(branches.shape)}"
            )
        tensors, views = [branches], list(branches.unbind(1))
    elif isinstance(branches, (list, tuple)):
        for i, u in enumerate(branches):
            if not isinstance(u, Tensor):
                raise TypeError(f"{op}: branch {i} must be a Tensor, got {type(u).__name__}")
            if u.dim() != 4:
                raise ValueError(f"{op}: branch {i} must be 4-D [B, C, H, W], got {_describe(u.shape)}")
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
            raise ValueError(
                f"{op}: branches differ in shape: {_describe(first.shape)} and {_describe(u.shape)} (branch {i})"
            )
        if u.dtype != first.dtype:
            raise TypeError(f"{op}: branches differ in dtype: {first.dtype} and {u.dtype} (branch {i})")
        if u.device != first.device:
            raise ValueError(f"{op}: branches are on different devices: {first.device} and {u.device} (branch {i})")
    _check_float("branches", op, first)
    _, C, H, W = first.shape
    if C == 0 or H == 0 or W == 0:
        raise ValueError(f"{op}: branches need C, H, W >= 1, got {_describe(first.shape)}")
    if C * H * W >= MAX_IMAGE_ELEMENTS:
        # The batch may be any size; offsets within one image are 32-bit in the kernels.
        raise ValueError(f"{op}: one image of a branch (C*H*W = {C * H * W}) must hold fewer than 2**31 elements")
    return tensors, views


def _check_param(op: str, name: str, t: Optional[Tensor], shape, device, constant: bool = True) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor or None, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must be [M, C] = {_describe(shape)}, got {_describe(t.shape)}")
    _check_float(name, op, t)
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device}, the branches on {device}")
    if constant and t.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            f"{op}: {name} requires grad, but the prologue's scale and bias are constants (eval-mode "
            "BatchNorm folded into the kernels); detach them, or apply BatchNorm before the op"
        )


def _check_inputs(
    op: str, branches: Branches, logits: Optional[Tensor], scale, bias, relu, needs_logits: bool
) -> tuple[list[Tensor], list[Tensor]]:
    """Every check of one call; returns what :func:`_check_branches` does."""
    tensors, views = _check_branches(op, branches)
    M, C, device = len(views), views[0].shape[1], views[0].device
    if needs_logits:
        _check_logits(op, logits, views)
    _check_param(op, "scale", scale, (M, C), device)
    _check_param(op, "bias", bias, (M, C), device)
    if not isinstance(relu, bool):
        raise TypeError(f"{op}: relu must be a bool, got {type(relu).__name__}")
    return tensors, views


def _check_logits(op: str, logits, views: list[Tensor]) -> None:
    B, C = views[0].shape[:2]
    M, device = len(views), views[0].device
    if not isinstance(logits, Tensor):
        raise TypeError(f"{op}: logits must be a Tensor [B, M, C], got {type(logits).__name__}")
    if tuple(logits.shape) != (B, M, C):
        raise ValueError(f"{op}: logits must be [B, M, C] = {_describe((B, M, C))}, got {_describe(logits.shape)}")
    _check_float("logits", op, logits)
    if logits.device != device:
        raise ValueError(f"{op}: logits are on {logits.device}, the branches on {device}")


def _check_batch_norm_inputs(op: str, branches: Branches, weight, bias, eps) -> tuple[list[Tensor], list[Tensor]]:
    """Every check of one :func:`sk_fuse_bn` call; returns what :func:`_check_branches` does."""
    tensors, views = _check_branches(op, branches)
    B, C, H, W = views[0].shape
    _check_param(op, "weight", weight, (len(views), C), views[0].device, constant=False)
    _check_param(op, "bias", bias, (len(views), C), views[0].device, constant=False)
    if not isinstance(eps, float):
        raise TypeError(f"{op}: eps must be a float, got {type(eps).__name__}")
    if B * H * W == 1:
        # nn.BatchNorm2d's refusal, in its words: one value per channel has no variance.
        raise ValueError(f"{op}: Expected more than 1 value per channel when training, got input size {views[0].shape}")
    return tensors, views


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def split_geometry_problem(
    kernel_sizes: Sequence[tuple[int, int]],
    strides: Sequence[object],
    dilations: Optional[Sequence[tuple[int, int]]] = None,
    paddings: Optional[Sequence[tuple[int, int]]] = None,
) -> Optional[str]:
    """Why M convolutions are not the split kernel's, or None when they are: 2 to 4 branches, each a 3x3
    kernel with dilation and padding m + 1 (branch m, m from 0), all with one stride of 1 or 2.

    Args:
        kernel_sizes: each branch's (height, width) of its kernel.
        strides: each branch's stride: an int, or a (height, width) pair of equal ints.
        dilations, paddings: each branch's (height, width) pairs; None where they are implied (``sk_split``
            takes none: its branches have the split kernel's by definition).
    """
    M = len(kernel_sizes)
    if not 2 <= M <= MAX_BRANCHES:
        return f"needs 2 to {MAX_BRANCHES} branches, got {M}"
    for m in range(M):
        if tuple(kernel_sizes[m]) != (3, 3):
            return f"weight must be 3x3 per branch, got {'x'.join(str(k) for k in kernel_sizes[m])} in branch {m}"
        spacing = (m + 1, m + 1)
        if dilations is not None and tuple(dilations[m]) != spacing:
            return f"branch {m} must have dilation {m + 1}, got {tuple(dilations[m])}"
        if paddings is not None and tuple(paddings[m]) != spacing:
            return f"branch {m} must have padding {m + 1}, got {tuple(paddings[m])}"
    stride = strides[0]
    if any(s != stride for s in strides):
        return f"the branches' strides differ: {list(strides)}"
    height, width = stride if isinstance(stride, tuple) else (stride, stride)
    if not (_is_int(height) and height in (1, 2) and height == width):
        return f"stride must be 1 or 2, got {stride!r}"
    return None


def _check_split(x, weight, scale, bias, stride, split_input) -> None:
    """Every check of one :func:`sk_split` call."""
    op = "sk_split"
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"{op}: x must be a 4-D tensor [B, C_in, H, W], got "
                         f"{_describe(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if not isinstance(weight, Tensor) or weight.dim() != 5:
        raise ValueError(f"{op}: weight must be [M, C, C_path / groups, 3, 3], got "
                         f"{_describe(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__}")
    M, C, group_in = weight.shape[:3]
    problem = split_geometry_problem([tuple(weight.shape[3:])] * M, [stride] * M)
    if problem is not None:
        raise ValueError(f"{op}: {problem}")
    _check_float("x", op, x)
    if weight.dtype != x.dtype:
        raise TypeError(f"{op}: weight is {weight.dtype}, x is {x.dtype}: they must match")
    if weight.device != x.device:
        raise ValueError(f"{op}: weight is on {weight.device}, x on {x.device}")
    B, C_in, H, W = x.shape
    if min(C_in, H, W, C, group_in) == 0:
        raise ValueError(f"{op}: needs C_in, H, W, C and the group width >= 1, got x {_describe(x.shape)} and "
                         f"weight {_describe(weight.shape)}")
    if not isinstance(split_input, bool):
        raise TypeError(f"{op}: split_input must be a bool, got {type(split_input).__name__}")
    if split_input and C_in % M:
        raise ValueError(f"{op}: split_input needs C_in ({C_in}) divisible by M ({M})")
    path_in = C_in // M if split_input else C_in
    if path_in % group_in or C % (path_in // group_in):
        raise ValueError(
            f"{op}: weight {_describe(weight.shape)} is no grouped convolution of {path_in} input channels per "
            f"branch: its third size must divide them into groups that also divide its C = {C} output channels"
        )
    Ho, Wo = (H - 1) // stride + 1, (W - 1) // stride + 1
    if C_in * H * W >= MAX_IMAGE_ELEMENTS or M * C * Ho * Wo >= MAX_IMAGE_ELEMENTS:
        raise ValueError(f"{op}: one image of x, and the M branches of one image, must hold fewer than 2**31 elements")
    if scale is None or bias is None:
        raise TypeError(f"{op}: scale and bias are required [M, C] tensors (eval-mode BatchNorm)")
    _check_param(op, "scale", scale, (M, C), x.device)
    _check_param(op, "bias", bias, (M, C), x.device)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        raise ValueError(
            f"{op}: is for inference and has no backward, but x or weight requires grad; call it under "
            "torch.no_grad() or torch.inference_mode(), or detach them"
        )


# --------------------------------------------------------------------------------------------------------
# Public operations.


def sk_split(
    x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor, stride: int = 1, split_input: bool = False
) -> tuple[Tensor, Tensor]:
    """Split in eval mode: M branches ``P_m = max(scale[m] * conv_m(x) + bias[m], 0)`` and their pooled sum.

    ``conv_m`` is a grouped 3x3 convolution with dilation and padding m + 1 (the paper's branches, kernel
    sizes 3, 5, 7, 9) and stride ``stride``; scale and bias are the branch's BatchNorm folded (eval mode).
    Inference only: no gradient flows through it (a clear error says so when one is asked for).

    Args:
        x: [B, C_in, H, W], float32, float16 or bfloat16; contiguous or channels_last (other strides are
            copied once).
        weight: [M, C, C_path / groups, 3, 3] in x's dtype, branch m's convolution weights; M is 2 to 4.
            C_path is C_in, or C_in / M with ``split_input`` (timm's skresnet: branch m reads input channels
            [m * C_path, (m + 1) * C_path)). The groups follow from the shape.
        scale, bias: [M, C], float32, float16 or bfloat16; not requiring grad.
        stride: 1 or 2.
        split_input: give each branch its own slice of x.

    Returns:
        ``branches`` [B, M, C, Ho, Wo] in x's dtype, each branch dense in x's layout (channels_last, else
        contiguous), ready for :func:`sk_select` with no prologue; and ``s`` [B, C] float32, the mean over
        (h, w) of the sum of the branches (:func:`sk_fuse` of them). Ho = (H - 1) // stride + 1, likewise
        Wo. Accumulated in float32; s gathers the shares of position chunks with atomic adds, in no fixed
        order unless ``torch.use_deterministic_algorithms(True)`` is set.
    """
    _check_split(x, weight, scale, bias, stride, split_input)
    if _dispatch_to_kernels(x.device):
        return torch.ops.sknet_triton.sk_split(x, weight, scale, bias, stride, split_input)
    branches, s = reference.sk_split(x, weight, scale, bias, stride, split_input)
    out = empty_stacked(branches.shape, branches.dtype, branches.device, bool(image_layout(x)))
    return out.copy_(branches), s


def sk_fuse(
    branches: Branches, scale: Optional[Tensor] = None, bias: Optional[Tensor] = None, relu: bool = False
) -> Tensor:
    """Fuse: the global average pool of the sum of the branches.

    Args:
        branches: M (2 to 4) tensors [B, C, H, W], or one stacked tensor [B, M, C, H, W]; float32, float16
            or bfloat16; contiguous or channels_last (other strides are copied once).
        scale, bias: optional [M, C] constants of a per-branch prologue ``P_m = scale[m] * U_m + bias[m]``
            (eval-mode BatchNorm); they may not require grad.
        relu: apply ``max(P_m, 0)`` after the prologue.

    Returns:
        ``s`` [B, C], float32: ``mean over (h, w) of sum over m of P_m``, accumulated in float32. Where the
        kernels split H*W across programs (small batches on a large GPU), their float32 partial sums are
        added atomically, in no fixed order, unless ``torch.use_deterministic_algorithms(True)`` is set.
    """
    tensors, views = _check_inputs("sk_fuse", branches, None, scale, bias, relu, needs_logits=False)
    if _dispatch_to_kernels(views[0].device):
        if _launch_directly(views[0]):
            return launch.fuse_forward(tensors, scale, bias, relu)
        return torch.ops.sknet_triton.sk_fuse(tensors, scale, bias, relu)
    return reference.sk_fuse(views, scale, bias, relu)


def sk_select(
    branches: Branches,
    logits: Tensor,
    scale: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    relu: bool = False,
) -> Tensor:
    """Select: the branches weighted by a softmax over the branch axis.

    Args:
        branches: as for :func:`sk_fuse`.
        logits: [B, M, C] attention logits, path-major (timm's ``fc_select`` output viewed [B, M, C]);
            float32, float16 or bfloat16.
        scale, bias, relu: the prologue of :func:`sk_fuse`.

    Returns:
        [B, C, H, W] in the branches' dtype, dense in their memory format (contiguous where the branches
        are neither contiguous nor channels_last):
        ``sum over m of softmax(logits, dim=1)[:, m, :, None, None] * P_m``, computed in float32.
    """
    tensors, views = _check_inputs("sk_select", branches, logits, scale, bias, relu, needs_logits=True)
    if _dispatch_to_kernels(views[0].device):
        if _launch_directly(views[0]):
            return launch.select_forward(tensors, logits, scale, bias, relu)
        return torch.ops.sknet_triton.sk_select(tensors, logits, scale, bias, relu)
    fmt = torch.channels_last if kernel_layout(tensors) else torch.contiguous_format
    return reference.sk_select(views, logits, scale, bias, relu).contiguous(memory_format=fmt)


class BatchNormBranches(NamedTuple):
    """Raw branches and their training-mode BatchNorm, as :func:`sk_fuse_bn` hands them to :func:`sk_select_bn`.

    ``branches``: the raw branches Y_m as the ops take them (M tensors [B, C, H, W], or one stacked tensor).
    ``mean``, ``var``: float32 [M, C], each branch's batch mean and biased variance per channel (NaN for an
    empty batch, which has none), without gradient: for the running statistics.
    ``stats``, ``links``: where the kernels run, the float32 [5, M, C] statistics the kernels apply and the
    two link tensors that pair the ops' backward passes (select's hands fuse's dV and a few sums); else None.
    ``values``: elsewhere, the normalised branches P_m (float32; float64 for float64 input); else None.
    """

    branches: list[Tensor]
    mean: Tensor
    var: Tensor
    stats: Optional[Tensor]
    links: Optional[tuple[Tensor, Tensor]]
    values: Optional[list[Tensor]]


def sk_fuse_bn(
    branches: Branches, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, eps: float = 1e-5
) -> tuple[Tensor, BatchNormBranches]:
    """Fuse over raw branches that need training-mode BatchNorm and ReLU: the first half of the SK unit whose
    second is :func:`sk_select_bn` (the attention runs between them).

    Each branch is ``P_m = max(weight[m] * (Y_m - mean_m) / sqrt(var_m + eps) + bias[m], 0)`` with the batch
    statistics of Y_m (per channel over B, H, W; ``var`` biased), as ``nn.BatchNorm2d`` in training
    followed by ``nn.ReLU``, and ``s = sk_fuse(P)``. Where the kernels run, the normalised branches are never
    in memory: one pass computes the statistics, and the kernels apply BatchNorm and ReLU as they load Y_m.

    Args:
        branches: M (2 to 4) raw branches Y_m [B, C, H, W] (convolution outputs), or one stacked tensor
            [B, M, C, H, W]; float32, float16 or bfloat16, as for :func:`sk_fuse`.
        weight, bias: the BatchNorms' affine parameters [M, C] (None: 1 and 0); they may require grad.
        eps: BatchNorm's eps.

    Returns:
        ``(s, state)``: s [B, C] float32, and the :class:`BatchNormBranches` that :func:`sk_select_bn` takes,
        whose ``mean`` and ``var`` are for the running statistics. A batch with one value per channel
        (B * H * W = 1) raises ValueError, as ``nn.BatchNorm2d`` does in training; B = 0 gives an empty s.
    """
    tensors, views = _check_batch_norm_inputs("sk_fuse_bn", branches, weight, bias, eps)
    if _dispatch_to_kernels(views[0].device):
        s, stats, grad_link, handoff_link = torch.ops.sknet_triton.sk_fuse_bn_train(tensors, weight, bias, eps)
        links = (grad_link, handoff_link)
        return s, BatchNormBranches(tensors, stats[launch.BN_MEAN], stats[launch.BN_VAR], stats, links, None)
    values, mean, var = reference.batch_norm_relu(views, weight, bias, eps)
    return reference.sk_fuse(values), BatchNormBranches(tensors, mean, var, None, None, values)


def sk_select_bn(state: BatchNormBranches, logits: Tensor) -> Tensor:
    """Select over the branches :func:`sk_fuse_bn` normalised: ``sum over m of softmax(logits)[:, m] * P_m``.

    Args:
        state: what :func:`sk_fuse_bn` returned with s; once (through the kernels the two ops' backward passes
            are paired, and a second select would add its logits into the first's handoff).
        logits: [B, M, C] attention logits, path-major (float32, float16 or bfloat16), computed from s.

    Returns:
        out [B, C, H, W] in the branches' dtype and layout, as :func:`sk_select`. Gradients reach the
        branches, ``sk_fuse_bn``'s weight and bias, and the logits; through the kernels the backward keeps
        only Y_m, the statistics and the logits, and is right whichever of s and out the loss reaches.
    """
    op = "sk_select_bn"
    if not isinstance(state, BatchNormBranches):
        raise TypeError(f"{op}: state must be what sk_fuse_bn returned, got {type(state).__name__}")
    views = branch_views(state.branches)
    _check_logits(op, logits, views)
    if state.values is None:
        return torch.ops.sknet_triton.sk_select_bn_train(state.branches, logits, state.stats, *state.links)
    fmt = torch.channels_last if kernel_layout(state.branches) else torch.contiguous_format
    return reference.sk_select(state.values, logits).to(views[0].dtype).contiguous(memory_format=fmt)


# --------------------------------------------------------------------------------------------------------
# The operators around the launchers, their shapes for tracing, and their autograd. With compiled kernels
# they are triton_ops, whose launches torch.compile sees and emits in its own generated code; with
# interpreted kernels (or none) they are opaque custom ops.


def _require_kernels(t: Tensor) -> None:
    if launch is None:
        raise RuntimeError("sknet_triton: the Triton kernels need the triton package, which is not installed")
    if not uses_triton(t.device):
        raise RuntimeError(
            f"sknet_triton: the Triton kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1; "
            f"got a tensor on {t.device}"
        )


def _operator(name: str, fake):
    """Register ``sknet_triton::<name>``: a triton_op where the kernels are compiled (its fake is the
    launcher itself, traced), else a custom op with the ``fake`` shape function."""

    def register(launcher):
        if launch is not None and not launch.INTERPRETED:
            return torch.library.triton_op(f"sknet_triton::{name}", launcher, mutates_args=())
        op = torch.library.custom_op(f"sknet_triton::{name}", launcher, mutates_args=())
        op.register_fake(fake)
        return op

    return register


def _split_shape(x, weight, scale, bias, stride, split_input):
    (B, _, H, W), (M, C) = x.shape, weight.shape[:2]
    shape = (B, M, C, (H - 1) // stride + 1, (W - 1) // stride + 1)
    return empty_stacked(shape, x.dtype, x.device, bool(image_layout(x))), x.new_empty((B, C), dtype=torch.float32)


@_operator("sk_split", _split_shape)
def _sk_split_op(
    x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor, stride: int, split_input: bool
) -> tuple[Tensor, Tensor]:
    _require_kernels(x)
    return launch.split_forward(x, weight, scale, bias, stride, split_input)


def _fuse_shape(branches, scale, bias, relu):
    u = branch_views(branches)[0]
    return u.new_empty((u.shape[0], u.shape[1]), dtype=torch.float32)


@_operator("sk_fuse", _fuse_shape)
def _sk_fuse_op(branches: list[Tensor], scale: Optional[Tensor], bias: Optional[Tensor], relu: bool) -> Tensor:
    _require_kernels(branches[0])
    return launch.fuse_forward(branches, scale, bias, relu)


def _fuse_relu_backward_shape(grad_s, branches, scale, bias):
    return empty_branch_grads(branches, kernel_layout(branches))


@_operator("sk_fuse_relu_backward", _fuse_relu_backward_shape)
def _sk_fuse_relu_backward_op(
    grad_s: Tensor, branches: list[Tensor], scale: Optional[Tensor], bias: Optional[Tensor]
) -> list[Tensor]:
    _require_kernels(branches[0])
    return launch.fuse_relu_backward(grad_s, branches, scale, bias)


def _fuse_setup_context(ctx, inputs, output):
    branches, scale, bias, relu = inputs
    ctx.relu = relu
    ctx.shape = branches[0].shape
    ctx.num_inputs = len(branches)
    ctx.dtype = branches[0].dtype
    # Without ReLU the gradient does not depend on the branches: keep none of them alive.
    ctx.save_for_backward(*(branches if relu else ()), scale, bias)


def _fuse_backward(ctx, grad_s):
    *branches, scale, bias = ctx.saved_tensors
    if ctx.relu:
        grads = torch.ops.sknet_triton.sk_fuse_relu_backward(grad_s, branches, scale, bias)
    else:
        grads = _broadcast_fuse_grad(grad_s, scale, ctx)
    return grads, None, None, None


def _broadcast_fuse_grad(grad_s: Tensor, scale: Optional[Tensor], ctx) -> list[Tensor]:
    """dU_m = ds * scale[m] / HW, the same at every position: expanded views, no memory traffic."""
    H, W = ctx.shape[-2:]
    grad = (grad_s.float() / (H * W))[:, None, :]  # [B, 1, C]
    if scale is not None:
        grad = grad * scale.float()[None]  # [B, M, C]
    return expanded_branch_grads(grad.to(ctx.dtype), ctx.shape, ctx.num_inputs)


_sk_fuse_op.register_autograd(_fuse_backward, setup_context=_fuse_setup_context)


def _select_shape(branches, logits, scale, bias, relu):
    return empty_images(branch_views(branches)[0], kernel_layout(branches))


@_operator("sk_select", _select_shape)
def _sk_select_op(
    branches: list[Tensor], logits: Tensor, scale: Optional[Tensor], bias: Optional[Tensor], relu: bool
) -> Tensor:
    _require_kernels(branches[0])
    return launch.select_forward(branches, logits, scale, bias, relu)


def _select_backward_shape(grad_out, branches, logits, scale, bias, relu):
    dlogits = torch.empty_like(logits, memory_format=torch.contiguous_format)
    return empty_branch_grads(branches, kernel_layout(branches)) + [dlogits]


@_operator("sk_select_backward", _select_backward_shape)
def _sk_select_backward_op(
    grad_out: Tensor,
    branches: list[Tensor],
    logits: Tensor,
    scale: Optional[Tensor],
    bias: Optional[Tensor],
    relu: bool,
) -> list[Tensor]:
    _require_kernels(branches[0])
    return launch.select_backward(grad_out, branches, logits, scale, bias, relu)


def _select_setup_context(ctx, inputs, output):
    branches, logits, scale, bias, relu = inputs
    ctx.relu = relu
    ctx.save_for_backward(*branches, logits, scale, bias)


def _select_backward(ctx, grad_out):
    *branches, logits, scale, bias = ctx.saved_tensors
    grads = torch.ops.sknet_triton.sk_select_backward(grad_out, branches, logits, scale, bias, ctx.relu)
    return grads[:-1], grads[-1], None, None, None


_sk_select_op.register_autograd(_select_backward, setup_context=_select_setup_context)


# Training-mode BatchNorm + ReLU inside the kernels: a coupled pair of ops (see kernels/batchnorm.py).
# sk_fuse_bn_train returns s, the statistics and two link tensors with zero strides (no memory, never read);
# sk_select_bn_train takes the links as inputs. Autograd runs select's backward first: it runs pass A and
# returns, as the links' gradients, dV (by reference) and the handoff of small sums. Fuse's backward then
# receives them with ds, and runs pass B; where the loss does not reach select's output, fuse's backward runs
# pass A itself with dV = 0. Both stay ordinary autograd edges, so torch.compile traces them.


def _links(branches: list[Tensor]) -> tuple[Tensor, Tensor]:
    """The link tensors: [B, C, H, W] in the branches' dtype (its gradient is dV) and float32 [5, B, M, C]
    (its gradient is select's handoff); both have zero strides, hence no memory to speak of."""
    u = branch_views(branches)[0]
    B, C = u.shape[:2]
    M = len(branch_views(branches))
    grad_link = u.new_empty_strided(u.shape, (0, 0, 0, 0))
    handoff_link = u.new_empty_strided((launch.HANDOFF_ROWS, B, M, C), (0, 0, 0, 0), dtype=torch.float32)
    return grad_link, handoff_link


def _fuse_bn_train_shape(branches, weight, bias, eps):
    u = branch_views(branches)[0]
    M = len(branch_views(branches))
    s = u.new_empty((u.shape[0], u.shape[1]), dtype=torch.float32)
    stats = u.new_empty((5, M, u.shape[1]), dtype=torch.float32)
    return s, stats, *_links(branches)


@_operator("sk_fuse_bn_train", _fuse_bn_train_shape)
def _sk_fuse_bn_train_op(
    branches: list[Tensor], weight: Optional[Tensor], bias: Optional[Tensor], eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _require_kernels(branches[0])
    s, stats = launch.batch_norm_train_forward(branches, weight, bias, eps)
    return s, stats, *_links(branches)


def _fuse_bn_train_backward_shape(grad_s, grad_out, branches, stats, handoff):
    C = branch_views(branches)[0].shape[1]
    M = len(branch_views(branches))
    return empty_branch_grads(branches, kernel_layout(branches)), stats.new_empty(M, C), stats.new_empty(M, C)


@_operator("sk_fuse_bn_train_backward", _fuse_bn_train_backward_shape)
def _sk_fuse_bn_train_backward_op(
    grad_s: Tensor, grad_out: Tensor, branches: list[Tensor], stats: Tensor, handoff: Tensor
) -> tuple[list[Tensor], Tensor, Tensor]:
    _require_kernels(branches[0])
    return launch.fuse_bn_backward(grad_s, grad_out, branches, stats, handoff)


def _fuse_bn_train_setup_context(ctx, inputs, output):
    branches, weight, bias, eps = inputs
    _, stats, _, _ = output
    ctx.mark_non_differentiable(stats)
    # Unused outputs arrive as None, not zeros: a missing handoff says select's backward never ran.
    ctx.set_materialize_grads(False)
    ctx.weight_dtype = None if weight is None else weight.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(*branches, stats)


def _fuse_bn_train_backward(ctx, grad_s, grad_stats, grad_out, handoff):
    *branches, stats = ctx.saved_tensors
    u = branch_views(branches)[0]
    B, C = u.shape[:2]
    if grad_s is None:
        grad_s = u.new_zeros((B, C), dtype=torch.float32)
    if handoff is None:
        # The loss reaches the unit only through s: select's backward did not run, and dV is zero. Its pass
        # still gives the sums BatchNorm's backward needs ([P > 0] and [P > 0] x_hat); any logits do.
        grad_out = empty_images(u, kernel_layout(branches)).zero_()
        logits = u.new_zeros((B, len(branch_views(branches)), C), dtype=torch.float32)
        _, handoff = torch.ops.sknet_triton.sk_select_bn_train_backward(grad_out, branches, logits, stats)
    grads, dgamma, dbeta = torch.ops.sknet_triton.sk_fuse_bn_train_backward(grad_s, grad_out, branches, stats, handoff)
    dgamma = None if ctx.weight_dtype is None else dgamma.to(ctx.weight_dtype)
    dbeta = None if ctx.bias_dtype is None else dbeta.to(ctx.bias_dtype)
    return grads, dgamma, dbeta, None


_sk_fuse_bn_train_op.register_autograd(_fuse_bn_train_backward, setup_context=_fuse_bn_train_setup_context)


def _select_bn_train_shape(branches, logits, stats, grad_link, handoff_link):
    return empty_images(branch_views(branches)[0], kernel_layout(branches))


@_operator("sk_select_bn_train", _select_bn_train_shape)
def _sk_select_bn_train_op(
    branches: list[Tensor], logits: Tensor, stats: Tensor, grad_link: Tensor, handoff_link: Tensor
) -> Tensor:
    _require_kernels(branches[0])
    return launch.select_forward(branches, logits, stats[launch.BN_SCALE], stats[launch.BN_SHIFT], True)


def _select_bn_train_backward_shape(grad_out, branches, logits, stats):
    B, M, C = logits.shape
    dlogits = torch.empty_like(logits, memory_format=torch.contiguous_format)
    return dlogits, stats.new_empty(launch.HANDOFF_ROWS, B, M, C)


@_operator("sk_select_bn_train_backward", _select_bn_train_backward_shape)
def _sk_select_bn_train_backward_op(
    grad_out: Tensor, branches: list[Tensor], logits: Tensor, stats: Tensor
) -> tuple[Tensor, Tensor]:
    _require_kernels(branches[0])
    return launch.select_bn_backward(grad_out, branches, logits, stats)


def _select_bn_train_setup_context(ctx, inputs, output):
    branches, logits, stats, _, _ = inputs
    ctx.channels_last = kernel_layout(branches)
    ctx.save_for_backward(*branches, logits, stats)


def _select_bn_train_backward(ctx, grad_out):
    *branches, logits, stats = ctx.saved_tensors
    # Once in the kernels' layout here, so that both passes read the same dV.
    grad_out = grad_out.contiguous(memory_format=torch.channels_last if ctx.channels_last else torch.contiguous_format)
    dlogits, handoff = torch.ops.sknet_triton.sk_select_bn_train_backward(grad_out, branches, logits, stats)
    # The branches' gradient comes whole from fuse's backward, which receives dV and the handoff as the
    # links' gradients.
    return [None] * len(branches), dlogits, None, grad_out, handoff


_sk_select_bn_train_op.register_autograd(_select_bn_train_backward, setup_context=_select_bn_train_setup_context)
