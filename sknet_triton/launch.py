"""Launchers: how each kernel's work is cut into programs, and the calls themselves.

Inputs arrive validated (see :mod:`sknet_triton.ops`). Every launcher takes the branches as the op
received them (M tensors, or one stacked [B, M, C, H, W] tensor) and reads them in place where
:mod:`sknet_triton.layout` allows.

Tile shapes come from a small fixed table, so the set of compiled specializations is finite and
:func:`specializations` can list all of them for the ahead-of-time compile check.
"""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

from sknet_triton import kernels
from sknet_triton.layout import MAX_BRANCHES, branch_views, empty_branch_grads, empty_images, kernel_views

# Bytes of each streamed tensor in one [BLOCK_C, BLOCK_HW] tile. The backward kernels stream 2M + 1
# tensors (and the select backward holds M float32 accumulators), hence smaller tiles for more branches.
FORWARD_TILE_BYTES = 8192
BACKWARD_TILE_BYTES = {2: 4096, 3: 2048, 4: 2048}
NUM_WARPS = 8
# channels_last tiles are BLOCK_C wide along the contiguous channels; NCHW tiles are BLOCK_HW long
# along the contiguous positions, the longest that pads H*W by at most 1/16 (else the least padding).
CHANNELS_LAST_BLOCK_C = (32, 64, 128)
NCHW_BLOCK_HW = (256, 64, 16)
LOGITS_BLOCK_C = 128
LOGITS_NUM_WARPS = 4
# Enough programs to keep every SM streaming; the interpreter runs programs one by one, so on the CPU
# only a few (still more than one chunk, so that tests cover the chunked reductions).
PROGRAMS_PER_SM = 16
CPU_MIN_PROGRAMS = 4


@dataclass(frozen=True)
class Plan:
    """One launch's decomposition: a (B, num_c_blocks, num_splits) grid of programs."""

    block_c: int
    block_hw: int
    num_c_blocks: int
    num_splits: int
    chunk: int  # positions per split, a multiple of block_hw


def tile_elements(dtype: torch.dtype, M: int, backward: bool = False) -> int:
    """Elements per tile for branches of ``dtype``."""
    return (BACKWARD_TILE_BYTES[M] if backward else FORWARD_TILE_BYTES) // dtype.itemsize


def tile_shape(channels_last: bool, C: int, HW: int, tile: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_HW) for a tile of ``tile`` elements."""
    if channels_last:
        block_c = next((b for b in CHANNELS_LAST_BLOCK_C if b >= C), CHANNELS_LAST_BLOCK_C[-1])
        return block_c, tile // block_c

    def padding(block_hw):
        return -HW % block_hw

    block_hw = next((b for b in NCHW_BLOCK_HW if 16 * padding(b) <= HW), None)
    if block_hw is None:
        block_hw = min(NCHW_BLOCK_HW, key=lambda b: (padding(b), -b))
    return tile // block_hw, block_hw


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def min_programs(device: torch.device) -> int:
    """How many programs a launch should have at least, when the shape allows."""
    if device.type == "cuda":
        return PROGRAMS_PER_SM * _sm_count(device.index if device.index is not None else 0)
    return CPU_MIN_PROGRAMS


def plan(B: int, C: int, HW: int, channels_last: bool, tile: int, device: torch.device) -> Plan:
    """Cut [B, C, HW] into tiles and the H*W axis into as few chunks as fill the device."""
    block_c, block_hw = tile_shape(channels_last, C, HW, tile)
    num_c_blocks = math.ceil(C / block_c)
    hw_blocks = math.ceil(HW / block_hw)
    wanted = math.ceil(min_programs(device) / (B * num_c_blocks))
    splits = max(1, min(wanted, hw_blocks))
    chunk = math.ceil(hw_blocks / splits) * block_hw
    return Plan(block_c, block_hw, num_c_blocks, math.ceil(HW / chunk), chunk)


def _padded(views: Sequence[Tensor]) -> list[Tensor]:
    """The four branch pointer arguments: unused ones repeat the first branch and are never read."""
    return list(views) + [views[0]] * (MAX_BRANCHES - len(views))


def _prologue(scale: Optional[Tensor], bias: Optional[Tensor], M: int, C: int, device):
    """AFFINE flag and float32 [M, C] scale and bias for the kernels (dummies when not AFFINE)."""
    if scale is None and bias is None:
        dummy = torch.empty(0, dtype=torch.float32, device=device)
        return False, dummy, dummy
    scale = torch.ones(M, C, device=device) if scale is None else scale.float().contiguous()
    bias = torch.zeros(M, C, device=device) if bias is None else bias.float().contiguous()
    return True, scale, bias


def fuse_forward(branches: Sequence[Tensor], scale: Optional[Tensor], bias: Optional[Tensor], relu: bool) -> Tensor:
    """s [B, C] float32 = mean over (h, w) of sum over m of P_m. See kernels/fuse.py."""
    views, channels_last, stride_u = kernel_views(branches)
    B, C, H, W = views[0].shape
    HW, M, device = H * W, len(views), views[0].device
    if B == 0:
        return torch.empty(0, C, dtype=torch.float32, device=device)
    affine, scale, bias = _prologue(scale, bias, M, C, device)
    p = plan(B, C, HW, channels_last, tile_elements(views[0].dtype, M), device)
    partial = torch.empty(B, p.num_splits, C, dtype=torch.float32, device=device)
    grid = (B, p.num_c_blocks, p.num_splits)
    kernels.sk_fuse_fwd_kernel[grid](
        *_padded(views), scale, bias, partial,
        C, HW, stride_u, p.chunk, 1.0 / HW,
        M=M, AFFINE=affine, RELU=relu, CHANNELS_LAST=channels_last,
        BLOCK_C=p.block_c, BLOCK_HW=p.block_hw, num_warps=NUM_WARPS,
    )
    return partial.sum(dim=1) if p.num_splits > 1 else partial.view(B, C)


def fuse_relu_backward(
    grad_s: Tensor, branches: Sequence[Tensor], scale: Optional[Tensor], bias: Optional[Tensor]
) -> list[Tensor]:
    """Branch gradients of :func:`fuse_forward` with relu=True, structured as ``branches``."""
    views, channels_last, stride_u = kernel_views(branches)
    B, C, H, W = views[0].shape
    HW, M, device = H * W, len(views), views[0].device
    grads = empty_branch_grads(branches, channels_last)
    if B == 0:
        return grads
    grad_views = _padded(branch_views(grads))
    affine, scale, bias = _prologue(scale, bias, M, C, device)
    p = plan(B, C, HW, channels_last, tile_elements(views[0].dtype, M, backward=True), device)
    grid = (B, p.num_c_blocks, p.num_splits)
    kernels.sk_fuse_bwd_kernel[grid](
        grad_s.float().contiguous(), *_padded(views), scale, bias, *grad_views,
        C, HW, stride_u, grad_views[0].stride(0), p.chunk, 1.0 / HW,
        M=M, AFFINE=affine, CHANNELS_LAST=channels_last,
        BLOCK_C=p.block_c, BLOCK_HW=p.block_hw, num_warps=NUM_WARPS,
    )
    return grads


def select_forward(
    branches: Sequence[Tensor], logits: Tensor, scale: Optional[Tensor], bias: Optional[Tensor], relu: bool
) -> Tensor:
    """out [B, C, H, W] = sum over m of softmax(logits)[:, m] * P_m, dense in the branches' layout."""
    views, channels_last, stride_u = kernel_views(branches)
    B, C, H, W = views[0].shape
    HW, M, device = H * W, len(views), views[0].device
    out = empty_images(views[0], channels_last)
    if B == 0:
        return out
    affine, scale, bias = _prologue(scale, bias, M, C, device)
    p = plan(B, C, HW, channels_last, tile_elements(views[0].dtype, M), device)
    grid = (B, p.num_c_blocks, p.num_splits)
    kernels.sk_select_fwd_kernel[grid](
        *_padded(views), logits.contiguous(), scale, bias, out,
        C, HW, stride_u, out.stride(0), p.chunk,
        M=M, AFFINE=affine, RELU=relu, CHANNELS_LAST=channels_last,
        BLOCK_C=p.block_c, BLOCK_HW=p.block_hw, num_warps=NUM_WARPS,
    )
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
    views, channels_last, stride_u = kernel_views(branches)
    B, C, H, W = views[0].shape
    HW, M, device = H * W, len(views), views[0].device
    grads = empty_branch_grads(branches, channels_last)
    dlogits = torch.empty(logits.shape, dtype=logits.dtype, device=device)
    if B == 0:
        return grads + [dlogits]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    grad_out = grad_out.contiguous(memory_format=fmt)
    logits = logits.contiguous()
    grad_views = _padded(branch_views(grads))
    affine, scale, bias = _prologue(scale, bias, M, C, device)
    p = plan(B, C, HW, channels_last, tile_elements(views[0].dtype, M, backward=True), device)
    g_partial = torch.empty(B, p.num_splits, M, C, dtype=torch.float32, device=device)
    grid = (B, p.num_c_blocks, p.num_splits)
    kernels.sk_select_bwd_kernel[grid](
        grad_out, *_padded(views), logits, scale, bias, *grad_views, g_partial,
        C, HW, grad_out.stride(0), stride_u, grad_views[0].stride(0), p.chunk,
        M=M, AFFINE=affine, RELU=relu, CHANNELS_LAST=channels_last,
        BLOCK_C=p.block_c, BLOCK_HW=p.block_hw, num_warps=NUM_WARPS,
    )
    num_c_blocks = math.ceil(C / LOGITS_BLOCK_C)
    kernels.sk_select_logits_bwd_kernel[(B, num_c_blocks)](
        g_partial, logits, dlogits, C, p.num_splits,
        M=M, BLOCK_C=LOGITS_BLOCK_C, num_warps=LOGITS_NUM_WARPS,
    )
    return grads + [dlogits]


@dataclass(frozen=True)
class Specialization:
    """One compiled variant of a kernel: its constexpr values, warps, and the dtype of its data pointers."""

    kernel: object
    constexprs: dict
    num_warps: int
    dtype: torch.dtype

    @property
    def name(self) -> str:
        flags = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in self.constexprs.items())
        return f"{self.kernel.__name__}[{str(self.dtype).removeprefix('torch.')},{flags}]"


def _tile_shapes(tile: int) -> list[tuple[bool, int, int]]:
    """Every (CHANNELS_LAST, BLOCK_C, BLOCK_HW) that :func:`tile_shape` can return for this tile."""
    return [(True, b, tile // b) for b in CHANNELS_LAST_BLOCK_C] + [(False, tile // b, b) for b in NCHW_BLOCK_HW]


def specializations(dtypes=(torch.float32, torch.float16, torch.bfloat16)) -> Iterator[Specialization]:
    """Every kernel specialization the launchers above can launch."""
    branch_counts = range(2, MAX_BRANCHES + 1)
    flags = (False, True)
    for dtype, M in itertools.product(dtypes, branch_counts):
        for kernel, tile, with_relu_flag in (
            (kernels.sk_fuse_fwd_kernel, tile_elements(dtype, M), True),
            (kernels.sk_select_fwd_kernel, tile_elements(dtype, M), True),
            (kernels.sk_select_bwd_kernel, tile_elements(dtype, M, backward=True), True),
            (kernels.sk_fuse_bwd_kernel, tile_elements(dtype, M, backward=True), False),
        ):
            for (channels_last, block_c, block_hw), affine in itertools.product(_tile_shapes(tile), flags):
                for relu in flags if with_relu_flag else (None,):
                    constexprs = dict(M=M, AFFINE=affine, RELU=relu, CHANNELS_LAST=channels_last,
                                      BLOCK_C=block_c, BLOCK_HW=block_hw)
                    if relu is None:
                        del constexprs["RELU"]
                    yield Specialization(kernel, constexprs, NUM_WARPS, dtype)
        yield Specialization(
            kernels.sk_select_logits_bwd_kernel, dict(M=M, BLOCK_C=LOGITS_BLOCK_C), LOGITS_NUM_WARPS, dtype
        )
