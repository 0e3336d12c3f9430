"""Training-mode BatchNorm + ReLU of the branches inside the kernels: ``sk_fuse_bn`` then ``sk_select_bn``,
their validation, launchers, host arithmetic, operators, autograd and kernel families (device code:
``kernels/batchnorm.py``).

One pass computes each raw branch's batch statistics; the fuse and select kernels then apply BatchNorm and
ReLU as their prologue, so the normalised branches are never in memory. The statistics travel as one
float32 [5, M, C] tensor, rows indexed by BN_SCALE .. BN_VAR. The backward is two passes: pass A (select's
backward) hands pass B (fuse's backward) a float32 [HANDOFF_ROWS, B, M, C] tensor: the logits, then four
sums over (h, w) (a_m * sum dV [P > 0], a_m * sum dV [P > 0] x_hat, sum [P > 0], sum [P > 0] x_hat).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from sknet_triton import reference
from sknet_triton.device import TRITON_INSTALLED, uses_triton
from sknet_triton.layout import branch_views, empty_branch_grads, empty_images, kernel_layout
from sknet_triton.ops import launch
from sknet_triton.ops.checks import Branches, check_branches, check_logits, check_param
from sknet_triton.ops.fuse import fuse_forward
from sknet_triton.ops.select import select_forward
from sknet_triton.tuned import Config

if TRITON_INSTALLED:
    from sknet_triton.kernels.batchnorm import sk_bn_stats_kernel, sk_fuse_bn_bwd_kernel, sk_select_bn_bwd_kernel

BN_SCALE, BN_SHIFT, BN_MEAN, BN_RSTD, BN_VAR = range(5)
HANDOFF_ROWS = 5


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
    followed by ``nn.ReLU``, and ``s = sk_fuse(P)``.

    Args:
        branches: M (2 to 4) raw branches Y_m [B, C, H, W] (convolution outputs), or one stacked tensor
            [B, M, C, H, W]; float32, float16 or bfloat16, as for :func:`sknet_triton.ops.sk_fuse`.
        weight, bias: the BatchNorms' affine parameters [M, C] (None: 1 and 0); they may require grad.
        eps: BatchNorm's eps.

    Returns:
        ``(s, state)``: s [B, C] float32, and the :class:`BatchNormBranches` that :func:`sk_select_bn` takes,
        whose ``mean`` and ``var`` are for the running statistics. A batch with one value per channel
        (B * H * W = 1) raises ValueError, as ``nn.BatchNorm2d`` does in training; B = 0 gives an empty s.
    """
    op = "sk_fuse_bn"
    tensors, views = check_branches(op, branches)
    B, C, H, W = views[0].shape
    check_param(op, "weight", weight, (len(views), C), views[0].device, constant=False)
    check_param(op, "bias", bias, (len(views), C), views[0].device, constant=False)
    if not isinstance(eps, float):
        raise TypeError(f"{op}: eps must be a float, got {type(eps).__name__}")
    if B * H * W == 1:
        # nn.BatchNorm2d's refusal, in its words: one value per channel has no variance.
        raise ValueError(f"{op}: Expected more than 1 value per channel when training, got input size {views[0].shape}")
    if uses_triton(views[0].device):
        s, stats, grad_link, handoff_link = torch.ops.sknet_triton.sk_fuse_bn_train(tensors, weight, bias, eps)
        return s, BatchNormBranches(tensors, stats[BN_MEAN], stats[BN_VAR], stats, (grad_link, handoff_link), None)
    values, mean, var = reference.batch_norm_relu(views, weight, bias, eps)
    return reference.sk_fuse(values), BatchNormBranches(tensors, mean, var, None, None, values)


def sk_select_bn(state: BatchNormBranches, logits: Tensor) -> Tensor:
    """Select over the branches :func:`sk_fuse_bn` normalised: ``sum over m of softmax(logits)[:, m] * P_m``.

    Args:
        state: what :func:`sk_fuse_bn` returned with s; once (through the kernels the two ops' backward passes
            are paired, and a second select would add its logits into the first's handoff).
        logits: [B, M, C] attention logits, path-major (float32, float16 or bfloat16), computed from s.

    Returns:
        out [B, C, H, W] in the branches' dtype and layout, as :func:`sknet_triton.ops.sk_select`. Gradients
        reach the branches, ``sk_fuse_bn``'s weight and bias, and the logits; through the kernels the backward
        keeps only Y_m, the statistics and the logits, and is right whichever of s and out the loss reaches.
    """
    op = "sk_select_bn"
    if not isinstance(state, BatchNormBranches):
        raise TypeError(f"{op}: state must be what sk_fuse_bn returned, got {type(state).__name__}")
    views = branch_views(state.branches)
    check_logits(op, logits, views)
    if state.values is None:
        return torch.ops.sknet_triton.sk_select_bn_train(state.branches, logits, state.stats, *state.links)
    fmt = torch.channels_last if kernel_layout(state.branches) else torch.contiguous_format
    return reference.sk_select(state.values, logits).to(views[0].dtype).contiguous(memory_format=fmt)


# --------------------------------------------------------------------------------------------------------
# Host arithmetic on the small per-channel tensors.


def batchnorm_affine(
    mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float
) -> tuple[Tensor, Tensor]:
    """BatchNorm with statistics ``mean`` and ``var`` (any shape, e.g. [C] or [M, C]) and the optional affine
    parameters of that shape, as float32 ``scale`` and ``shift``: ``BN(y) = scale * y + shift``."""
    scale = torch.rsqrt(var.float() + eps)
    if weight is not None:
        scale = scale * weight.float()
    shift = -mean.float() * scale
    if bias is not None:
        shift = shift + bias.float()
    return scale, shift


def fold_statistics(mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    """The float32 [5, M, C] statistics (rows BN_SCALE .. BN_VAR) of float32 [M, C] batch ``mean`` and
    ``var`` and the optional [M, C] affine parameters: BatchNorm + ReLU is then the prologue
    max(scale * Y + shift, 0)."""
    scale, shift = batchnorm_affine(mean, var, weight, bias, eps)
    return torch.stack([scale, shift, mean, torch.rsqrt(var + eps), var])


def combine_partials(
    partial_mean: Tensor, partial_m2: Tensor, B: int, HW: int, num_splits: int, chunk: int
) -> tuple[Tensor, Tensor]:
    """Per-channel batch mean and biased variance, float32 [M, C] each, from the statistics kernel's
    float32 [M, B * num_splits, C] partial means and M2 (partial b * num_splits + k: split k of image b,
    ``chunk`` positions of the HW, the last maybe fewer), combined with Chan's formula as the kernel
    combines its tiles."""
    positions = HW - torch.arange(num_splits, device=partial_mean.device) * chunk
    counts = positions.clamp(max=chunk).float().repeat(B)[None, :, None]
    total = B * HW
    mean = (partial_mean * counts).sum(1) / total
    m2 = partial_m2.sum(1) + (counts * (partial_mean - mean[:, None]).square()).sum(1)
    return mean, m2 / total


def backward_coefficients(
    grad_s: Tensor, stats: Tensor, handoff: Tensor, HW: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(alpha, offset, dgamma, dbeta), float32 [M, C] each, of BatchNorm's backward once ds (float32
    [B, C]) is known: dY = scale * dZ + alpha * Y + offset, the form the fuse backward kernel takes."""
    _, dv_active, dv_x_hat_active, active, x_hat_active = handoff
    grad_position = (grad_s.float() / HW)[:, None]  # ds / HW: fuse's part of dP, [B, 1, C]
    dbeta = (dv_active + grad_position * active).sum(0)
    dgamma = (dv_x_hat_active + grad_position * x_hat_active).sum(0)
    # dY = scale * (dZ - dbeta / n - x_hat * dgamma / n), x_hat = (Y - mean) * rstd: scale * dZ + alpha * Y + offset.
    scale, mean, rstd = stats[BN_SCALE], stats[BN_MEAN], stats[BN_RSTD]
    total = grad_s.shape[0] * HW
    alpha = -scale * rstd * dgamma / total
    offset = -scale * dbeta / total - alpha * mean
    return alpha, offset, dgamma, dbeta


# --------------------------------------------------------------------------------------------------------
# Launchers, on validated inputs.


def batch_norm_statistics(branches: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Each raw branch's per-channel batch mean and biased variance over (B, H, W): float32 [M, C] each."""
    j = launch.job(branches)
    B, C, H, W = j.shape
    M, device = len(j.views), j.views[0].device
    p = launch.branch_plan(BN_STATISTICS, j)
    partial_mean = torch.empty(M, B * p.num_splits, C, dtype=torch.float32, device=device)
    partial_m2 = torch.empty_like(partial_mean)
    if B:
        launch.launch_branches(BN_STATISTICS, j, partial_mean, partial_m2)
    return combine_partials(partial_mean, partial_m2, B, H * W, p.num_splits, p.chunk)


def batch_norm_train_forward(
    branches: Sequence[Tensor], weight: Optional[Tensor], bias: Optional[Tensor], eps: float
) -> tuple[Tensor, Tensor]:
    """s [B, C] float32 of the branches after BatchNorm with their batch statistics and ReLU, and those
    statistics as float32 [5, M, C] (rows BN_SCALE .. BN_VAR)."""
    stats = fold_statistics(*batch_norm_statistics(branches), weight, bias, eps)
    return fuse_forward(branches, stats[BN_SCALE], stats[BN_SHIFT], True), stats


def select_bn_backward(grad_out: Tensor, branches: Sequence[Tensor], logits: Tensor, stats: Tensor) -> tuple[Tensor, Tensor]:
    """Pass A: dlogits (in the logits' dtype) of the select over BatchNorm + ReLU branches, and the float32
    [HANDOFF_ROWS, B, M, C] handoff for :func:`fuse_bn_backward`."""
    j = launch.job(branches)
    B, C = j.shape[:2]
    M = len(j.views)
    dlogits = torch.zeros(B, M, C, dtype=torch.float32, device=logits.device)
    handoff = torch.zeros(HANDOFF_ROWS, B, M, C, dtype=torch.float32, device=logits.device)
    handoff[0].copy_(logits)
    if B:
        grad_out = grad_out.contiguous(memory_format=j.memory_format)
        launch.launch_branches(
            SELECT_BN_BACKWARD, j, stats[BN_MEAN], stats[BN_RSTD], logits, grad_out, dlogits, handoff[1:],
            *logits.stride(), grad_out.stride(0), prologue=(stats[BN_SCALE], stats[BN_SHIFT]),
        )
    return dlogits.to(logits.dtype), handoff


def fuse_bn_backward(
    grad_s: Tensor, grad_out: Tensor, branches: Sequence[Tensor], stats: Tensor, handoff: Tensor
) -> tuple[list[Tensor], Tensor, Tensor]:
    """Pass B: the raw branches' gradients (structured as ``branches``) through BatchNorm with batch
    statistics, ReLU, fuse and select, and float32 [M, C] dgamma, dbeta."""
    j = launch.job(branches)
    B, C, H, W = j.shape
    alpha, offset, dgamma, dbeta = backward_coefficients(grad_s, stats, handoff, H * W)
    grads = empty_branch_grads(branches)
    if B:
        grad_out = grad_out.contiguous(memory_format=j.memory_format)
        grad_views = branch_views(grads)
        launch.launch_branches(
            FUSE_BN_BACKWARD, j, alpha.contiguous(), offset.contiguous(), handoff[0], grad_s.float().contiguous(),
            grad_out, *j.grad_pointers(grad_views), *handoff[0].stride(), grad_out.stride(0),
            *j.grad_strides(grad_views), prologue=(stats[BN_SCALE], stats[BN_SHIFT]),
        )
    return grads, dgamma, dbeta


# --------------------------------------------------------------------------------------------------------
# The operators: a coupled pair. sk_fuse_bn_train returns s, the statistics and two link tensors with zero
# strides (no memory, never read); sk_select_bn_train takes the links as inputs. Autograd runs select's
# backward first: it runs pass A and returns, as the links' gradients, dV (by reference) and the handoff.
# Fuse's backward then receives them with ds, and runs pass B; where the loss does not reach select's
# output, fuse's backward runs pass A itself with dV = 0. Both stay ordinary autograd edges, so
# torch.compile traces them.


def _links(branches: list[Tensor]) -> tuple[Tensor, Tensor]:
    """The link tensors: [B, C, H, W] in the branches' dtype (its gradient is dV) and float32 [5, B, M, C]
    (its gradient is select's handoff); both have zero strides, hence no memory to speak of."""
    views = branch_views(branches)
    u = views[0]
    B, C = u.shape[:2]
    grad_link = u.new_empty_strided(u.shape, (0, 0, 0, 0))
    handoff_link = u.new_empty_strided((HANDOFF_ROWS, B, len(views), C), (0, 0, 0, 0), dtype=torch.float32)
    return grad_link, handoff_link


def _fuse_bn_train_shape(branches, weight, bias, eps):
    views = branch_views(branches)
    B, C = views[0].shape[:2]
    s = views[0].new_empty((B, C), dtype=torch.float32)
    return s, views[0].new_empty((5, len(views), C), dtype=torch.float32), *_links(branches)


@launch.operator("sk_fuse_bn_train", _fuse_bn_train_shape)
def _sk_fuse_bn_train_op(
    branches: list[Tensor], weight: Optional[Tensor], bias: Optional[Tensor], eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    s, stats = batch_norm_train_forward(branches, weight, bias, eps)
    return s, stats, *_links(branches)


def _fuse_bn_train_backward_shape(grad_s, grad_out, branches, stats, handoff):
    views = branch_views(branches)
    M, C = len(views), views[0].shape[1]
    return empty_branch_grads(branches), stats.new_empty(M, C), stats.new_empty(M, C)


@launch.operator("sk_fuse_bn_train_backward", _fuse_bn_train_backward_shape)
def _sk_fuse_bn_train_backward_op(
    grad_s: Tensor, grad_out: Tensor, branches: list[Tensor], stats: Tensor, handoff: Tensor
) -> tuple[list[Tensor], Tensor, Tensor]:
    return fuse_bn_backward(grad_s, grad_out, branches, stats, handoff)


def _fuse_bn_train_setup_context(ctx, inputs, output):
    branches, weight, bias, eps = inputs
    ctx.mark_non_differentiable(output[1])
    # Unused outputs arrive as None, not zeros: a missing handoff says select's backward never ran.
    ctx.set_materialize_grads(False)
    ctx.weight_dtype = None if weight is None else weight.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(*branches, output[1])


def _fuse_bn_train_backward(ctx, grad_s, grad_stats, grad_out, handoff):
    *branches, stats = ctx.saved_tensors
    views = branch_views(branches)
    B, C = views[0].shape[:2]
    if grad_s is None:
        grad_s = views[0].new_zeros((B, C), dtype=torch.float32)
    if handoff is None:
        # The loss reaches the unit only through s: select's backward did not run, and dV is zero. Its pass
        # still gives the sums BatchNorm's backward needs ([P > 0] and [P > 0] x_hat); any logits do.
        grad_out = empty_images(views[0], kernel_layout(branches)).zero_()
        logits = views[0].new_zeros((B, len(views), C), dtype=torch.float32)
        _, handoff = torch.ops.sknet_triton.sk_select_bn_train_backward(grad_out, branches, logits, stats)
    grads, dgamma, dbeta = torch.ops.sknet_triton.sk_fuse_bn_train_backward(grad_s, grad_out, branches, stats, handoff)
    dgamma = None if ctx.weight_dtype is None else dgamma.to(ctx.weight_dtype)
    dbeta = None if ctx.bias_dtype is None else dbeta.to(ctx.bias_dtype)
    return grads, dgamma, dbeta, None


_sk_fuse_bn_train_op.register_autograd(_fuse_bn_train_backward, setup_context=_fuse_bn_train_setup_context)


def _select_bn_train_shape(branches, logits, stats, grad_link, handoff_link):
    return empty_images(branch_views(branches)[0], kernel_layout(branches))


@launch.operator("sk_select_bn_train", _select_bn_train_shape)
def _sk_select_bn_train_op(
    branches: list[Tensor], logits: Tensor, stats: Tensor, grad_link: Tensor, handoff_link: Tensor
) -> Tensor:
    return select_forward(branches, logits, stats[BN_SCALE], stats[BN_SHIFT], True)


def _select_bn_train_backward_shape(grad_out, branches, logits, stats):
    B, M, C = logits.shape
    dlogits = torch.empty_like(logits, memory_format=torch.contiguous_format)
    return dlogits, stats.new_empty(HANDOFF_ROWS, B, M, C)


@launch.operator("sk_select_bn_train_backward", _select_bn_train_backward_shape)
def _sk_select_bn_train_backward_op(
    grad_out: Tensor, branches: list[Tensor], logits: Tensor, stats: Tensor
) -> tuple[Tensor, Tensor]:
    return select_bn_backward(grad_out, branches, logits, stats)


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


# --------------------------------------------------------------------------------------------------------
# The kernel families.

if TRITON_INSTALLED:
    # The batch statistics read each raw branch once. Two float32 accumulator tiles (mean, M2) per branch:
    # half the forward tile, and a register budget above the one ptxas picks for itself, under which a few
    # sm_80 variants spilled 4-8 bytes.
    BN_STATISTICS = launch.Family(
        "bn_stats", sk_bn_stats_kernel, batch_norm_statistics,
        {M: Config(tile_bytes=4096, num_warps=8, num_stages=3, programs_per_sm=16, maxnreg=168)
         for M in launch.BRANCH_COUNTS},
        launch.branch_variants, passes=lambda M: M, small_tiles=True,
    )
    # Pass A, select's backward: reads dV and the M raw branches. It holds 5M float32 accumulators; the
    # largest variants need up to 216 registers, and without a budget ptxas capped a few at 80 or 128 and
    # spilled 4 bytes (sm_80, sm_90): the budget is the most a thread may have.
    SELECT_BN_BACKWARD = launch.Family(
        "select_bn_bwd", sk_select_bn_bwd_kernel, select_bn_backward,
        {M: dataclasses.replace(config, maxnreg=255) for M, config in launch.BACKWARD_DEFAULTS.items()},
        launch.branch_variants, passes=lambda M: M + 1, small_tiles=True,
    )
    # Pass B, fuse's backward: reads dV and the M raw branches, writes the M gradients dY_m.
    FUSE_BN_BACKWARD = launch.Family(
        "fuse_bn_bwd", sk_fuse_bn_bwd_kernel, fuse_bn_backward, launch.BACKWARD_DEFAULTS, launch.branch_variants,
        passes=lambda M: 2 * M + 1, small_tiles=True,
    )
    FAMILIES = (BN_STATISTICS, SELECT_BN_BACKWARD, FUSE_BN_BACKWARD)
else:
    FAMILIES = ()
