"""Training-mode BatchNorm + ReLU of every branch inside the SK kernels: statistics, and the two backward passes.

In training, branch m is P_m = ReLU(BN_m(Y_m)) with Y_m the raw convolution output and BN_m using the batch
statistics: per channel, mu = mean(Y) and var = biased variance over (B, H, W), x_hat = (Y - mu) * rstd with
rstd = 1 / sqrt(var + eps), P = max(gamma * x_hat + beta, 0) = max(scale * Y + shift, 0) with
scale = gamma * rstd and shift = beta - mu * scale. The normalised branches are never written:

Forward (three reads of the M branches, one write):
    1. ``sk_bn_stats_kernel`` reads Y_m once: each program merges its chunk's tiles into one per-channel mean
       and sum of squared deviations (M2) with Chan's formula and stores them as a partial; the launcher
       combines the partials the same way (small tensors) and folds gamma, beta into scale, shift.
    2. The fuse forward kernel with the AFFINE + RELU prologue (scale, shift): s.
    3. The select forward kernel with the same prologue: V.

Backward (DESIGN.md §3), given dV and ds: dP_m = a_m * dV + ds / HW, dZ = dP * [P > 0], dbeta = sum dZ,
dgamma = sum dZ * x_hat over (B, H, W), dY = scale * (dZ - dbeta / n - x_hat * dgamma / n), n = B * H * W.
Autograd runs select's backward first (the attention MLP needs dlogits before it can give ds), fuse's after,
so the work is split between them:

    A. ``sk_select_bn_bwd_kernel`` (select's backward) reads dV and Y_m once: dlogits (atomically per chunk,
       as the select backward does), and per (b, m, c) the select part of BatchNorm's sums, a_m * sum dV * [P > 0]
       and a_m * sum dV * [P > 0] * x_hat, with the sums the fuse part needs once ds is known,
       sum [P > 0] and sum [P > 0] * x_hat (all over hw; ds / HW is constant over hw).
    B. ``sk_fuse_bn_bwd_kernel`` (fuse's backward) reads dV and Y_m again and writes dY_m, once the launcher has
       finished dbeta and dgamma from those sums and ds (small tensors) and folded them into two per-channel
       coefficients: dY = scale * dZ + alpha * Y + offset.

Pass A hands dV and its sums to pass B as the gradient of link tensors that the fuse op returns and the select
op takes (see ``sknet_triton.ops``). Backward moves (M + 1) + (2M + 1) = (3M + 2) branch-sized tensors.
"""
import triton
import triton.language as tl

from .tile import (
    add_softmax_grad_share, at_image, per_branch_vectors, program_tile, softmax_weights, tile_mask, tile_offsets,
)


@triton.jit
def _merge_moments(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    """Chan's combination of two (count, mean, M2) summaries; the counts are scalars, the rest [BLOCK_C]."""
    weight_b = count_b / (count_a + count_b)
    delta = mean_b - mean_a
    return mean_a + delta * weight_b, m2_a + m2_b + delta * delta * (count_a * weight_b)


@triton.jit
def _tile_moments(ptrs, mask, count, mean_a, m2_a, count_a):
    """Merge one tile of one branch ([BLOCK_C, BLOCK_HW], ``count`` positions) into (mean_a, m2_a)."""
    y = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(y, axis=1) / count
    deviation = tl.where(mask, y - mean[:, None], 0.0)
    return _merge_moments(count_a, mean_a, m2_a, count, mean, tl.sum(deviation * deviation, axis=1))


@triton.jit
def sk_bn_stats_kernel(
    u0_ptr, u1_ptr, u2_ptr, u3_ptr,  # raw branches Y_m [B, C, H, W] (no prologue); u2/u3 are read only when M > 2/3
    mean_ptr, m2_ptr,  # out: float32 [M, B * splits, C], one partial per program and branch
    C, HW, stride_u, chunk,
    M: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    b, c, c_mask, hw_lo, hw_hi = program_tile(C, HW, chunk, BLOCK_C)
    offs, hw_step = tile_offsets(c, C, HW, CHANNELS_LAST, BLOCK_HW)
    u0_ptr, u1_ptr, u2_ptr, u3_ptr = at_image(u0_ptr, u1_ptr, u2_ptr, u3_ptr, b * stride_u)

    zeros = tl.zeros([BLOCK_C], tl.float32)
    mean0, m20, mean1, m21, mean2, m22, mean3, m23 = zeros, zeros, zeros, zeros, zeros, zeros, zeros, zeros
    seen = 0.0
    for hw0 in range(hw_lo, hw_hi, BLOCK_HW):
        mask = tile_mask(c_mask, hw0, hw_hi, BLOCK_HW)
        at = hw0 * hw_step + offs
        count = tl.minimum(hw_hi - hw0, BLOCK_HW).to(tl.float32)
        mean0, m20 = _tile_moments(u0_ptr + at, mask, count, mean0, m20, seen)
        mean1, m21 = _tile_moments(u1_ptr + at, mask, count, mean1, m21, seen)
        if M > 2:
            mean2, m22 = _tile_moments(u2_ptr + at, mask, count, mean2, m22, seen)
        if M > 3:
            mean3, m23 = _tile_moments(u3_ptr + at, mask, count, mean3, m23, seen)
        seen += count

    partials = tl.num_programs(0).to(tl.int64) * tl.num_programs(2)  # B * splits: grows with the batch
    at = (b * tl.num_programs(2) + tl.program_id(2)) * C + c
    tl.store(mean_ptr + at, mean0, mask=c_mask)
    tl.store(m2_ptr + at, m20, mask=c_mask)
    tl.store(mean_ptr + partials * C + at, mean1, mask=c_mask)
    tl.store(m2_ptr + partials * C + at, m21, mask=c_mask)
    if M > 2:
        tl.store(mean_ptr + 2 * partials * C + at, mean2, mask=c_mask)
        tl.store(m2_ptr + 2 * partials * C + at, m22, mask=c_mask)
    if M > 3:
        tl.store(mean_ptr + 3 * partials * C + at, mean3, mask=c_mask)
        tl.store(m2_ptr + 3 * partials * C + at, m23, mask=c_mask)


@triton.jit
def _pre_activation(u_ptrs, mask, scale, shift):
    """(Y, Z = scale * Y + shift) of one branch tile as float32, zero outside the mask: P = max(Z, 0)."""
    y = tl.load(u_ptrs, mask=mask, other=0.0).to(tl.float32)
    return y, tl.where(mask, y * scale[:, None] + shift[:, None], 0.0)


@triton.jit
def _branch_sums(u_ptrs, dv, mask, scale, shift, mean, rstd, g, dv_on, dv_x_on, on, x_on):
    """Add one branch tile's terms to its five running tiles: dV * P (for dlogits), then over the active
    positions [P > 0]: dV, dV * x_hat, 1, x_hat."""
    y, z = _pre_activation(u_ptrs, mask, scale, shift)
    x_hat = (y - mean[:, None]) * rstd[:, None]
    active = z > 0.0
    g += dv * tl.where(z < 0.0, 0.0, z)
    dv_on += tl.where(active, dv, 0.0)
    dv_x_on += tl.where(active, dv * x_hat, 0.0)
    on += active.to(tl.float32)
    x_on += tl.where(active, x_hat, 0.0)
    return g, dv_on, dv_x_on, on, x_on


@triton.jit
def _add_branch_sums(sums_ptr, at, branch_stride, c_mask, weight, dv_on, dv_x_on, on, x_on):
    """Add one branch's chunk sums into rows 0..3 of the [4, B, M, C] sums (the first two times a_m)."""
    tl.atomic_add(sums_ptr + at, weight * tl.sum(dv_on, axis=1), mask=c_mask)
    tl.atomic_add(sums_ptr + branch_stride + at, weight * tl.sum(dv_x_on, axis=1), mask=c_mask)
    tl.atomic_add(sums_ptr + 2 * branch_stride + at, tl.sum(on, axis=1), mask=c_mask)
    tl.atomic_add(sums_ptr + 3 * branch_stride + at, tl.sum(x_on, axis=1), mask=c_mask)


@triton.jit
def sk_select_bn_bwd_kernel(
    u0_ptr, u1_ptr, u2_ptr, u3_ptr,  # raw branches Y_m, as in the forward
    scale_ptr, bias_ptr,  # float32 [M, C]: the prologue's scale and shift
    mean_ptr, rstd_ptr,  # float32 [M, C]: batch mean and 1 / sqrt(var + eps)
    logits_ptr,  # [B, M, C], contiguous
    dv_ptr,  # [B, C, H, W]: gradient of the select output, in the branches' layout, batch stride stride_dv
    dlogits_ptr,  # float32 [B, M, C], zeroed: each program adds its chunk's share
    sums_ptr,  # float32 [4, B, M, C], zeroed: each program adds its chunk's share of the four sums
    stride_dv,
    C, HW, stride_u, chunk,
    M: tl.constexpr, AFFINE: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    b, c, c_mask, hw_lo, hw_hi = program_tile(C, HW, chunk, BLOCK_C)
    offs, hw_step = tile_offsets(c, C, HW, CHANNELS_LAST, BLOCK_HW)
    a0, a1, a2, a3 = softmax_weights(logits_ptr, b, c, c_mask, C, M)
    scale0, shift0, scale1, shift1, scale2, shift2, scale3, shift3 = per_branch_vectors(
        scale_ptr, bias_ptr, c, c_mask, C, M, AFFINE
    )
    mean0, rstd0, mean1, rstd1, mean2, rstd2, mean3, rstd3 = per_branch_vectors(
        mean_ptr, rstd_ptr, c, c_mask, C, M, True
    )
    u0_ptr, u1_ptr, u2_ptr, u3_ptr = at_image(u0_ptr, u1_ptr, u2_ptr, u3_ptr, b * stride_u)
    dv_ptr += b * stride_dv

    zeros = tl.zeros([BLOCK_C, BLOCK_HW], tl.float32)
    g0, dv_on0, dv_x_on0, on0, x_on0 = zeros, zeros, zeros, zeros, zeros
    g1, dv_on1, dv_x_on1, on1, x_on1 = zeros, zeros, zeros, zeros, zeros
    g2, dv_on2, dv_x_on2, on2, x_on2 = zeros, zeros, zeros, zeros, zeros
    g3, dv_on3, dv_x_on3, on3, x_on3 = zeros, zeros, zeros, zeros, zeros
    for hw0 in range(hw_lo, hw_hi, BLOCK_HW):
        mask = tile_mask(c_mask, hw0, hw_hi, BLOCK_HW)
        at = hw0 * hw_step + offs
        dv = tl.load(dv_ptr + at, mask=mask, other=0.0).to(tl.float32)
        g0, dv_on0, dv_x_on0, on0, x_on0 = _branch_sums(
            u0_ptr + at, dv, mask, scale0, shift0, mean0, rstd0, g0, dv_on0, dv_x_on0, on0, x_on0)
        g1, dv_on1, dv_x_on1, on1, x_on1 = _branch_sums(
            u1_ptr + at, dv, mask, scale1, shift1, mean1, rstd1, g1, dv_on1, dv_x_on1, on1, x_on1)
        if M > 2:
            g2, dv_on2, dv_x_on2, on2, x_on2 = _branch_sums(
                u2_ptr + at, dv, mask, scale2, shift2, mean2, rstd2, g2, dv_on2, dv_x_on2, on2, x_on2)
        if M > 3:
            g3, dv_on3, dv_x_on3, on3, x_on3 = _branch_sums(
                u3_ptr + at, dv, mask, scale3, shift3, mean3, rstd3, g3, dv_on3, dv_x_on3, on3, x_on3)

    add_softmax_grad_share(dlogits_ptr, b, c, c_mask, C, a0, a1, a2, a3, g0, g1, g2, g3, M)

    sums_stride = tl.num_programs(0).to(tl.int64) * M * C  # one of the four [B, M, C] rows
    at = b * M * C + c
    _add_branch_sums(sums_ptr, at, sums_stride, c_mask, a0, dv_on0, dv_x_on0, on0, x_on0)
    _add_branch_sums(sums_ptr, at + C, sums_stride, c_mask, a1, dv_on1, dv_x_on1, on1, x_on1)
    if M > 2:
        _add_branch_sums(sums_ptr, at + 2 * C, sums_stride, c_mask, a2, dv_on2, dv_x_on2, on2, x_on2)
    if M > 3:
        _add_branch_sums(sums_ptr, at + 3 * C, sums_stride, c_mask, a3, dv_on3, dv_x_on3, on3, x_on3)


@triton.jit
def _branch_input_grad(du_ptrs, u_ptrs, dv, mask, weight, grad_s, scale, shift, alpha, offset):
    """Store dY = scale * [Z > 0] * (a_m * dV + ds / HW) + alpha * Y + offset for one branch tile."""
    y, z = _pre_activation(u_ptrs, mask, scale, shift)
    dz = tl.where(z > 0.0, dv * weight[:, None] + grad_s[:, None], 0.0)
    dy = dz * scale[:, None] + y * alpha[:, None] + offset[:, None]
    tl.store(du_ptrs, dy.to(du_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def sk_fuse_bn_bwd_kernel(
    u0_ptr, u1_ptr, u2_ptr, u3_ptr,  # raw branches Y_m, as in the forward
    scale_ptr, bias_ptr,  # float32 [M, C]: the prologue's scale and shift
    alpha_ptr, offset_ptr,  # float32 [M, C]: BatchNorm's backward through the batch statistics
    logits_ptr,  # [B, M, C], contiguous
    ds_ptr,  # float32 [B, C]: gradient of s
    dv_ptr,  # [B, C, H, W]: gradient of the select output, in the branches' layout, batch stride stride_dv
    du0_ptr, du1_ptr, du2_ptr, du3_ptr,  # out: gradients of Y_m, each with batch stride stride_du
    stride_dv, stride_du,
    C, HW, stride_u, chunk,
    M: tl.constexpr, AFFINE: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    b, c, c_mask, hw_lo, hw_hi = program_tile(C, HW, chunk, BLOCK_C)
    offs, hw_step = tile_offsets(c, C, HW, CHANNELS_LAST, BLOCK_HW)
    a0, a1, a2, a3 = softmax_weights(logits_ptr, b, c, c_mask, C, M)
    grad_s = tl.load(ds_ptr + b * C + c, mask=c_mask, other=0.0) / HW
    scale0, shift0, scale1, shift1, scale2, shift2, scale3, shift3 = per_branch_vectors(
        scale_ptr, bias_ptr, c, c_mask, C, M, AFFINE
    )
    alpha0, offset0, alpha1, offset1, alpha2, offset2, alpha3, offset3 = per_branch_vectors(
        alpha_ptr, offset_ptr, c, c_mask, C, M, True
    )
    u0_ptr, u1_ptr, u2_ptr, u3_ptr = at_image(u0_ptr, u1_ptr, u2_ptr, u3_ptr, b * stride_u)
    du0_ptr, du1_ptr, du2_ptr, du3_ptr = at_image(du0_ptr, du1_ptr, du2_ptr, du3_ptr, b * stride_du)
    dv_ptr += b * stride_dv

    for hw0 in range(hw_lo, hw_hi, BLOCK_HW):
        mask = tile_mask(c_mask, hw0, hw_hi, BLOCK_HW)
        at = hw0 * hw_step + offs
        dv = tl.load(dv_ptr + at, mask=mask, other=0.0).to(tl.float32)
        _branch_input_grad(du0_ptr + at, u0_ptr + at, dv, mask, a0, grad_s, scale0, shift0, alpha0, offset0)
        _branch_input_grad(du1_ptr + at, u1_ptr + at, dv, mask, a1, grad_s, scale1, shift1, alpha1, offset1)
        if M > 2:
            _branch_input_grad(du2_ptr + at, u2_ptr + at, dv, mask, a2, grad_s, scale2, shift2, alpha2, offset2)
        if M > 3:
            _branch_input_grad(du3_ptr + at, u3_ptr + at, dv, mask, a3, grad_s, scale3, shift3, alpha3, offset3)
