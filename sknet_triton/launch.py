"""Launchers: one pattern for every kernel, and the ops' launchers.

Every launch is a plan (:mod:`sknet_triton.planning`: the tuned table of this GPU's architecture, else
the family's default, cut into programs), the kernel's arguments, and :func:`start`. The kernels over
the branches share their leading and trailing arguments (see ``kernels/tile.py``), so one function,
:func:`_launch`, assembles any of them: it takes the branches as :class:`Job` resolved them, plans, and
passes the kernel's own tensors and flags through; the split kernel, which reads an image rather than
branches, has its own plan (:func:`sknet_triton.planning.split_plan`). Each kernel family is one entry
of :data:`sknet_triton.families.FAMILIES`, which names its launcher here.

Inputs arrive validated (see :mod:`sknet_triton.ops`). Every op function takes the branches as the op
received them (M tensors, or one stacked [B, M, C, H, W] tensor) and reads them in place where
:mod:`sknet_triton.layout` allows. Under ``torch.compile`` the launches go through
``torch.library.wrap_triton``, so Inductor emits them in its own generated code.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor

from sknet_triton import kernels
from sknet_triton.batchnorm import (  # noqa: F401 (the ops read the statistics' rows here)
    BN_MEAN, BN_RSTD, BN_SCALE, BN_SHIFT, BN_VAR, HANDOFF_ROWS, backward_coefficients, combine_partials,
    fold_statistics,
)
from sknet_triton.device import INTERPRETED
from sknet_triton.families import FAMILIES
from sknet_triton.layout import branch_views, empty_branch_grads, empty_images, empty_stacked, image_layout, kernel_views
from sknet_triton.planning import Plan, plan, split_plan
from sknet_triton.tuned import split_measured_faster  # noqa: F401 (the ops ask it here)



# --------------------------------------------------------------------------------------------------------
# The launch pattern.


@dataclass(frozen=True)
class Job:
    """The branches as the kernels read them (see :func:`sknet_triton.layout.kernel_views`) and their shape."""

    views: list[Tensor]
    channels_last: bool
    batch_stride: int

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.views[0].shape)


def job(branches: Sequence[Tensor]) -> Job:
    """Resolve the branches of one op call for its launches."""
    return Job(*kernel_views(branches))


@dataclass(frozen=True)
class Launch:
    """One kernel launch as :func:`recording` captures it: the arguments, constexprs and options."""

    family: str
    args: tuple
    constexprs: dict
    options: dict = field(default_factory=dict)


_recorded: Optional[list[Launch]] = None


@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """Capture launches instead of running them (the ahead-of-time check's specializations, the launch
    tests, the host-time measurement)."""
    global _recorded
    _recorded, previous = [], _recorded
    try:
        yield _recorded
    finally:
        _recorded = previous


def _grad_pointers(j: Job, grad_views: list[Tensor]) -> list[Tensor]:
    """The four gradient pointers: the M gradients, then the first branch for the unused ones (never
    written). An input, not another output: under torch.compile, one output tensor passed as two
    arguments would leave functionalization unsure which of them holds its value."""
    return grad_views + [j.views[0]] * (kernels.MAX_BRANCHES - len(grad_views))


def _prologue(scale: Optional[Tensor], bias: Optional[Tensor], j: Job):
    """AFFINE flag and float32 [M, C] scale and bias; without scale and bias, the first branch stands in
    for both pointers (never read), so no call allocates a placeholder."""
    if scale is None and bias is None:
        return False, j.views[0], j.views[0]
    M, C = len(j.views), j.shape[1]
    device = j.views[0].device
    scale = torch.ones(M, C, device=device) if scale is None else scale.float().contiguous()
    bias = torch.zeros(M, C, device=device) if bias is None else bias.float().contiguous()
    return True, scale, bias


def _plan(family: str, j: Job) -> Plan:
    """The plan of ``family``'s launch over the branches of ``j``."""
    B, C, H, W = j.shape
    u = j.views[0]
    return plan(family, B, C, H * W, len(j.views), u.dtype, j.channels_last, u.device,
                torch.are_deterministic_algorithms_enabled())


def _launch(family: str, j: Job, *args, prologue: Optional[tuple] = None, **flags) -> None:
    """Launch ``family``'s kernel over the branches of ``j``; ``args`` and ``flags`` are the kernel's own.
    ``prologue``: (scale, bias) for a family with a prologue (either may be None), None for one without."""
    B, C, H, W = j.shape
    M = len(j.views)
    p = _plan(family, j)
    pointers = list(j.views) + [j.views[0]] * (kernels.MAX_BRANCHES - M)
    prologue_flag = {}
    if prologue is not None:
        affine, scale, bias = _prologue(*prologue, j)
        pointers += [scale, bias]
        prologue_flag = dict(AFFINE=affine)
    all_args = (*pointers, *args, C, H * W, j.batch_stride, p.chunk)
    constexprs = dict(M=M, **prologue_flag, CHANNELS_LAST=j.channels_last, BLOCK_C=p.block_c, BLOCK_HW=p.block_hw,
                      **flags)
    start(family, (B, p.num_c_blocks, p.num_splits), all_args, constexprs, p.options)


def start(family: str, grid: tuple, args: tuple, constexprs: dict, options: dict) -> None:
    """Start one kernel of ``family``: every launch goes through here (or is recorded, see :func:`recording`)."""
    if _recorded is not None:
        _recorded.append(Launch(family, args, constexprs, options))
        return
    kernel = FAMILIES[family].kernel
    if not INTERPRETED:  # a plain launch in eager mode; a traceable one under torch.compile
        kernel = torch.library.wrap_triton(kernel)
    kernel[grid](*args, **constexprs, **options)


# --------------------------------------------------------------------------------------------------------
# The ops' launchers.


def fuse_forward(branches: Sequence[Tensor], scale: Optional[Tensor], bias: Optional[Tensor], relu: bool) -> Tensor:
    """s [B, C] float32 = mean over (h, w) of sum over m of P_m. See kernels/fuse.py."""
    j = job(branches)
    B, C = j.shape[:2]
    s = torch.zeros(B, C, dtype=torch.float32, device=j.views[0].device)
    if B:
        _launch("fuse_fwd", j, s, prologue=(scale, bias), RELU=relu)
    return s


def fuse_relu_backward(
    grad_s: Tensor, branches: Sequence[Tensor], scale: Optional[Tensor], bias: Optional[Tensor]
) -> list[Tensor]:
    """Branch gradients of :func:`fuse_forward` with relu=True, structured as ``branches``."""
    j = job(branches)
    grads = empty_branch_grads(branches, j.channels_last)
    if j.shape[0]:
        grad_views = branch_views(grads)
        _launch("fuse_bwd", j, grad_s.float().contiguous(), *_grad_pointers(j, grad_views), grad_views[0].stride(0),
                prologue=(scale, bias))
    return grads


def select_forward(
    branches: Sequence[Tensor], logits: Tensor, scale: Optional[Tensor], bias: Optional[Tensor], relu: bool
) -> Tensor:
    """out [B, C, H, W] = sum over m of softmax(logits)[:, m] * P_m, dense in the branches' layout."""
    j = job(branches)
    out = empty_images(j.views[0], j.channels_last)
    if j.shape[0]:
        _launch("select_fwd", j, logits.contiguous(), out, out.stride(0), prologue=(scale, bias), RELU=relu)
    return out


def select_backward(
    grad_out: Tensor,
    branches: Sequence[Tensor],
    logits: Tensor,
    scale: Optional[Tensor],
    bias: Optional[Tensor],
    relu: bool,
) -> list[Tensor]:
    """Gradients of :func:`select_forward`: the branch gradients structured as ``branches``, then dlogits."""
    j = job(branches)
    grads = empty_branch_grads(branches, j.channels_last)
    dlogits = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
    if j.shape[0]:
        fmt = torch.channels_last if j.channels_last else torch.contiguous_format
        grad_out = grad_out.contiguous(memory_format=fmt)
        grad_views = branch_views(grads)
        _launch(
            "select_bwd", j, logits.contiguous(), grad_out, *_grad_pointers(j, grad_views), dlogits,
            grad_out.stride(0), grad_views[0].stride(0), prologue=(scale, bias), RELU=relu,
        )
    return grads + [dlogits.to(logits.dtype)]


def split_forward(
    x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor, stride: int, split_input: bool
) -> tuple[Tensor, Tensor]:
    """(branches [B, M, C, Ho, Wo], s [B, C] float32) of the split in eval mode. See kernels/split.py.

    Each branch image is dense in x's layout (channels_last, else contiguous NCHW; x with other strides is
    copied once), so that :func:`select_forward` reads the M views in place.
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
    p = split_plan(B, C, Ho * Wo, M, group_in, group_out, x.dtype, channels_last, x.device,
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
    start("split_fwd", (B, p.num_c_blocks, p.num_splits), args, constexprs, p.options)
    return branches, s


# --------------------------------------------------------------------------------------------------------
# Training-mode BatchNorm + ReLU of the branches inside the kernels (kernels/batchnorm.py); the host
# arithmetic on the statistics is sknet_triton.batchnorm's.


def batch_norm_statistics(branches: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Each raw branch's per-channel batch mean and biased variance over (B, H, W): float32 [M, C] each."""
    j = job(branches)
    B, C, H, W = j.shape
    M, device = len(j.views), j.views[0].device
    p = _plan("bn_stats", j)
    partial_mean = torch.empty(M, B * p.num_splits, C, dtype=torch.float32, device=device)
    partial_m2 = torch.empty_like(partial_mean)
    if B:
        _launch("bn_stats", j, partial_mean, partial_m2)
    return combine_partials(partial_mean, partial_m2, B, H * W, p.num_splits, p.chunk)


def batch_norm_train_forward(
    branches: Sequence[Tensor], weight: Optional[Tensor], bias: Optional[Tensor], eps: float
) -> tuple[Tensor, Tensor]:
    """s [B, C] float32 of the branches after BatchNorm with their batch statistics and ReLU, and those
    statistics as float32 [5, M, C] (rows BN_SCALE, BN_SHIFT, BN_MEAN, BN_RSTD, BN_VAR)."""
    stats = fold_statistics(*batch_norm_statistics(branches), weight, bias, eps)
    s = fuse_forward(branches, stats[BN_SCALE], stats[BN_SHIFT], True)
    return s, stats


def select_bn_backward(grad_out: Tensor, branches: Sequence[Tensor], logits: Tensor, stats: Tensor) -> tuple[Tensor, Tensor]:
    """Pass A: dlogits (in the logits' dtype) of the select over BatchNorm + ReLU branches, and the float32
    [HANDOFF_ROWS, B, M, C] handoff for :func:`fuse_bn_backward`."""
    j = job(branches)
    B, C = j.shape[:2]
    M = len(j.views)
    dlogits = torch.zeros(B, M, C, dtype=torch.float32, device=logits.device)
    handoff = torch.zeros(HANDOFF_ROWS, B, M, C, dtype=torch.float32, device=logits.device)
    handoff[0].copy_(logits)
    if B:
        fmt = torch.channels_last if j.channels_last else torch.contiguous_format
        grad_out = grad_out.contiguous(memory_format=fmt)
        _launch(
            "select_bn_bwd", j, stats[BN_MEAN], stats[BN_RSTD], logits.contiguous(), grad_out, dlogits, handoff[1:],
            grad_out.stride(0), prologue=(stats[BN_SCALE], stats[BN_SHIFT]),
        )
    return dlogits.to(logits.dtype), handoff


def fuse_bn_backward(
    grad_s: Tensor, grad_out: Tensor, branches: Sequence[Tensor], stats: Tensor, handoff: Tensor
) -> tuple[list[Tensor], Tensor, Tensor]:
    """Pass B: the raw branches' gradients (structured as ``branches``) through BatchNorm with batch
    statistics, ReLU, fuse and select, and float32 [M, C] dgamma, dbeta."""
    j = job(branches)
    B, C, H, W = j.shape
    alpha, offset, dgamma, dbeta = backward_coefficients(grad_s, stats, handoff, H * W)
    grads = empty_branch_grads(branches, j.channels_last)
    if B:
        fmt = torch.channels_last if j.channels_last else torch.contiguous_format
        grad_out = grad_out.contiguous(memory_format=fmt)
        grad_views = branch_views(grads)
        _launch(
            "fuse_bn_bwd", j, alpha.contiguous(), offset.contiguous(), handoff[0], grad_s.float().contiguous(),
            grad_out, *_grad_pointers(j, grad_views), grad_out.stride(0), grad_views[0].stride(0),
            prologue=(stats[BN_SCALE], stats[BN_SHIFT]),
        )
    return grads, dgamma, dbeta


def launcher(family: str) -> Callable:
    """The function of this module that launches ``family``'s kernel (the one its registry entry names)."""
    return globals()[FAMILIES[family].launcher]
