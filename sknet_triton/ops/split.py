"""The split in eval mode, ``P_m = max(scale[m] * conv_m(x) + bias[m], 0)`` and their pooled sum in one
launch: its validation, launcher, operator and kernel family (device code: ``kernels/split.py``)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from sknet_triton import reference, tuned
from sknet_triton.checks import is_integer
from sknet_triton.device import TRITON_INSTALLED, uses_triton
from sknet_triton.layout import MAX_IMAGE_ELEMENTS, empty_stacked, image_layout
from sknet_triton.ops import launch
from sknet_triton.ops.checks import check_float, check_param, describe
from sknet_triton.planning import split_plan
from sknet_triton.tiles import (
    SPLIT_DOT_BLOCK_C, SPLIT_DOT_BLOCK_K, SPLIT_FMA_BLOCK_C, SPLIT_FMA_BLOCK_K, split_block_p,
)
from sknet_triton.tuned import Config

if TRITON_INSTALLED:
    from sknet_triton.kernels.split import sk_split_fwd_kernel


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
        contiguous), ready for :func:`sknet_triton.ops.sk_select` with no prologue; and ``s`` [B, C] float32,
        the mean over (h, w) of the sum of the branches (``sk_fuse`` of them). Ho = (H - 1) // stride + 1,
        likewise Wo. Accumulated in float32; s gathers the shares of position chunks with atomic adds, in no
        fixed order unless ``torch.use_deterministic_algorithms(True)`` is set.
    """
    _check_split(x, weight, scale, bias, stride, split_input)
    if uses_triton(x.device):
        return torch.ops.sknet_triton.sk_split(x, weight, scale, bias, stride, split_input)
    branches, s = reference.sk_split(x, weight, scale, bias, stride, split_input)
    out = empty_stacked(branches.shape, branches.dtype, branches.device, bool(image_layout(x)))
    return out.copy_(branches), s


def prefers_split_kernel(device: torch.device, dtype: torch.dtype, channels_last: bool, M: int, C: int, HW: int) -> bool:
    """Whether the tuned table of this CUDA device's architecture records :func:`sk_split` faster than the
    cuDNN convolutions it replaces, for M branches of C channels and HW output positions (see
    ``sknet_triton/tuned/README.md``). False without such a record, and on any other device."""
    return uses_triton(device) and tuned.split_measured_faster(device, dtype, channels_last, M, C, HW)


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
    if not 2 <= M <= launch.MAX_BRANCHES:
        return f"needs 2 to {launch.MAX_BRANCHES} branches, got {M}"
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
    if not (is_integer(height) and height in (1, 2) and height == width):
        return f"stride must be 1 or 2, got {stride!r}"
    return None


def _check_split(x, weight, scale, bias, stride, split_input) -> None:
    """Every check of one :func:`sk_split` call."""
    op = "sk_split"
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"{op}: x must be a 4-D tensor [B, C_in, H, W], got "
                         f"{describe(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if not isinstance(weight, Tensor) or weight.dim() != 5:
        raise ValueError(f"{op}: weight must be [M, C, C_path / groups, 3, 3], got "
                         f"{describe(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__}")
    M, C, group_in = weight.shape[:3]
    problem = split_geometry_problem([tuple(weight.shape[3:])] * M, [stride] * M)
    if problem is not None:
        raise ValueError(f"{op}: {problem}")
    check_float(op, "x", x)
    if weight.dtype != x.dtype:
        raise TypeError(f"{op}: weight is {weight.dtype}, x is {x.dtype}: they must match")
    if weight.device != x.device:
        raise ValueError(f"{op}: weight is on {weight.device}, x on {x.device}")
    B, C_in, H, W = x.shape
    if min(C_in, H, W, C, group_in) == 0:
        raise ValueError(f"{op}: needs C_in, H, W, C and the group width >= 1, got x {describe(x.shape)} and "
                         f"weight {describe(weight.shape)}")
    if not isinstance(split_input, bool):
        raise TypeError(f"{op}: split_input must be a bool, got {type(split_input).__name__}")
    if split_input and C_in % M:
        raise ValueError(f"{op}: split_input needs C_in ({C_in}) divisible by M ({M})")
    path_in = C_in // M if split_input else C_in
    if path_in % group_in or C % (path_in // group_in):
        raise ValueError(
            f"{op}: weight {describe(weight.shape)} is no grouped convolution of {path_in} input channels per "
            f"branch: its third size must divide them into groups that also divide its C = {C} output channels"
        )
    Ho, Wo = (H - 1) // stride + 1, (W - 1) // stride + 1
    if C_in * H * W >= MAX_IMAGE_ELEMENTS or M * C * Ho * Wo >= MAX_IMAGE_ELEMENTS:
        raise ValueError(f"{op}: one image of x, and the M branches of one image, must hold fewer than 2**31 elements")
    if scale is None or bias is None:
        raise TypeError(f"{op}: scale and bias are required [M, C] tensors (eval-mode BatchNorm)")
    check_param(op, "scale", scale, (M, C), x.device)
    check_param(op, "bias", bias, (M, C), x.device)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        raise ValueError(
            f"{op}: is for inference and has no backward, but x or weight requires grad; call it under "
            "torch.no_grad() or torch.inference_mode(), or detach them"
        )


def split_forward(
    x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor, stride: int, split_input: bool
) -> tuple[Tensor, Tensor]:
    """(branches [B, M, C, Ho, Wo], s [B, C] float32) of the split on validated inputs.

    Each branch image is dense in x's layout (channels_last, else contiguous NCHW; x with other strides is
    copied once), so that the select reads the M views in place.
    """
    channels_last = image_layout(x) is True
    if image_layout(x) is None:
        x = x.contiguous()
    B, C_in, H, W = x.shape
    M, C, group_in = weight.shape[:3]
    groups = (C_in // M if split_input else C_in) // group_in
    group_out = C // groups
    Ho, Wo = (H - 1) // stride + 1, (W - 1) // stride + 1
    branches = empty_stacked((B, M, C, Ho, Wo), x.dtype, x.device, channels_last)
    s = torch.zeros(B, C, dtype=torch.float32, device=x.device)
    if not B:
        return branches, s
    p = split_plan(SPLIT_FORWARD, B, C, Ho * Wo, M, group_in, group_out, x.dtype, channels_last, x.device,
                   torch.are_deterministic_algorithms_enabled())
    # [M, 3, 3, group_in, C]: each (branch, tap, input channel) a contiguous row over the output channels.
    taps_first = weight.permute(0, 3, 4, 2, 1).contiguous()
    args = (
        x, taps_first, scale.float().contiguous(), bias.float().contiguous(), branches, s,
        C_in, H, W, C, Ho, Wo, group_in, group_out, C_in // M if split_input else 0, stride, M,
        x.stride(0), branches.stride(0), branches.stride(1), p.chunk,
    )
    constexprs = dict(CHANNELS_LAST=channels_last, USE_DOT=p.use_dot, BLOCK_P=p.block_hw, BLOCK_C=p.block_c,
                      BLOCK_K=p.block_k)
    launch.start(SPLIT_FORWARD, (B, p.num_c_blocks, p.num_splits), args, constexprs, p.options)
    return branches, s


def _split_shape(x, weight, scale, bias, stride, split_input):
    (B, _, H, W), (M, C) = x.shape, weight.shape[:2]
    shape = (B, M, C, (H - 1) // stride + 1, (W - 1) // stride + 1)
    return empty_stacked(shape, x.dtype, x.device, bool(image_layout(x))), x.new_empty((B, C), dtype=torch.float32)


@launch.operator("sk_split", _split_shape)
def _sk_split_op(
    x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor, stride: int, split_input: bool
) -> tuple[Tensor, Tensor]:
    return split_forward(x, weight, scale, bias, stride, split_input)


def split_variants(family: launch.Family, config: Config, dtype: torch.dtype) -> list[dict]:
    """The split kernel's constexpr sets: in either layout, the FMA loop's one block and every tl.dot block."""
    blocks = [(False, SPLIT_FMA_BLOCK_C[channels_last], SPLIT_FMA_BLOCK_K, channels_last) for channels_last in (False, True)]
    blocks += [(True, block_c, block_k, channels_last) for channels_last in (False, True)
               for block_c in SPLIT_DOT_BLOCK_C for block_k in SPLIT_DOT_BLOCK_K]
    return [
        dict(CHANNELS_LAST=channels_last, USE_DOT=use_dot, BLOCK_P=split_block_p(config, block_c), BLOCK_C=block_c,
             BLOCK_K=block_k)
        for use_dot, block_c, block_k, channels_last in blocks
    ]


if TRITON_INSTALLED:
    # Reads x about once, writes the M branches. tile_bytes: its float32 accumulator tile [BLOCK_P, BLOCK_C].
    SPLIT_FORWARD = launch.Family(
        "split_fwd", sk_split_fwd_kernel, split_forward,
        {M: Config(tile_bytes=8192, num_warps=8, num_stages=1, programs_per_sm=8, maxnreg=168)
         for M in launch.BRANCH_COUNTS},
        split_variants, passes=lambda M: M + 1, streaming=False, swept=False,
    )
    FAMILIES = (SPLIT_FORWARD,)
else:
    FAMILIES = ()
