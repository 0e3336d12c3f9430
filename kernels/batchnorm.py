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
    add_softmax_grad_share, branch_pointers, per_branch_vectors, program_tile, sliced_offsets, softmax_weights,
    tile_mask, tile_offsets,
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
    u0_ptr, u1_ptr, u2_ptr, u3_ptr,  # raw branches Y_m [B, C, H, W] (no prologue); the first M are read
    mean_ptr, m2_ptr,  # out: float32 [M, B * splits, C], one partial per program and branch
    C, HW, stride_u, line_u, chunk,
    M: tl.constexpr, CHANNELS_LAST: tl.constexpr, SLICED: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    b, c, c_mask, hw_lo, hw_hi = program_tile(C, HW, chunk, BLOCK_C)
    offs, hw_step = tile_offsets(c, C, HW, CHANNELS_LAST, BLOCK_HW)
    u_offs, u_step = sliced_offsets(offs, hw_step, c, line_u, SLICED, BLOCK_HW)
    us = branch_pointers(u0_ptr, u1_ptr, u2_ptr, u3_ptr, b * stride_u, M)

    means = ()
    m2s = ()
    for m in tl.static_range(M):
        means = means + (tl.zeros([BLOCK_C], tl.float32),)
        m2s = m2s + (tl.zeros([BLOCK_C], tl.float32),)
    seen = 0.0
    for hw0 in range(hw_lo, hw_hi, BLOCK_HW):
        mask = tile_mask(c_mask, hw0, hw_hi, BLOCK_HW)
        at_u = hw0 * u_step + u_offs
        count = tl.minimum(hw_hi - hw0, BLOCK_HW).to(tl.float32)
        merged_means = ()
        merged_m2s = ()
        for m in tl.static_range(M):
            mean, m2 = _tile_moments(us[m] + at_u, mask, count, means[m], m2s[m], seen)
            merged_means = merged_means + (mean,)
            merged_m2s = merged_m2s + (m2,)
        means = merged_means
        m2s = merged_m2s
        seen += count

    partials = tl.num_programs(0).to(tl.int64) * tl.num_programs(2)  # B * splits: grows with the batch
    at = (b * tl.num_programs(2) + tl.program_id(2)) * C + c
    for m in tl.static_range(M):
        tl.store(mean_ptr + m * partials * C + at, means[m], mask=c_mask)
        tl.store(m2_ptr + m * partials * C + at, m2s[m], mask=c_mask)


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
    logits_ptr,  # [B, M, C], element strides stride_lb, stride_lm, stride_lc
    dv_ptr,  # [B, C, H, W]: gradient of the select output, dense in the branches' layout, batch stride stride_dv
    dlogits_ptr,  # float32 [B, M, C], contiguous and zeroed: each program adds its chunk's share
    sums_ptr,  # float32 [4, B, M, C], zeroed: each program adds its chunk's share of the four sums
    stride_lb, stride_lm, stride_lc, stride_dv,
    C, HW, stride_u, line_u, chunk,
    M: tl.constexpr, AFFINE: tl.constexpr, CHANNELS_LAST: tl.constexpr, SLICED: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    b, c, c_mask, hw_lo, hw_hi = program_tile(C, HW, chunk, BLOCK_C)
    offs, hw_step = tile_offsets(c, C, HW, CHANNELS_LAST, BLOCK_HW)
    u_offs, u_step = sliced_offsets(offs, hw_step, c, line_u, SLICED, BLOCK_HW)
    a = softmax_weights(logits_ptr, stride_lb, stride_lm, stride_lc, b, c, c_mask, M)
    scales, shifts = per_branch_vectors(scale_ptr, bias_ptr, c, c_mask, C, M, AFFINE)
    means, rstds = per_branch_vectors(mean_ptr, rstd_ptr, c, c_mask, C, M, True)
    us = branch_pointers(u0_ptr, u1_ptr, u2_ptr, u3_ptr, b * stride_u, M)
    dv_ptr += b * stride_dv

    # Five running tiles per branch: dV * P, then dV, dV * x_hat, 1, x_hat over the active positions.
    g = ()
    dv_on = ()
    dv_x_on = ()
    on = ()
    x_on = ()
    for m in tl.static_range(M):
        g = g + (tl.zeros([BLOCK_C, BLOCK_HW], tl.float32),)
        dv_on = dv_on + (tl.zeros([BLOCK_C, BLOCK_HW], tl.float32),)
        dv_x_on = dv_x_on + (tl.zeros([BLOCK_C, BLOCK_HW], tl.float32),)
        on = on + (tl.zeros([BLOCK_C, BLOCK_HW], tl.float32),)
        x_on = x_on + (tl.zeros([BLOCK_C, BLOCK_HW], tl.float32),)
    for hw0 in range(hw_lo, hw_hi, BLOCK_HW):
        mask = tile_mask(c_mask, hw0, hw_hi, BLOCK_HW)
        at = hw0 * hw_step + offs
        at_u = hw0 * u_step + u_offs
        dv = tl.load(dv_ptr + at, mask=mask, other=0.0).to(tl.float32)
        new_g = ()
        new_dv_on = ()
        new_dv_x_on = ()
        new_on = ()
        new_x_on = ()
        for m in tl.static_range(M):
            g_m, dv_on_m, dv_x_on_m, on_m, x_on_m = _branch_sums(
                us[m] + at_u, dv, mask, scales[m], shifts[m], means[m], rstds[m], g[m], dv_on[m], dv_x_on[m], on[m],
                x_on[m])
            new_g = new_g + (g_m,)
            new_dv_on = new_dv_on + (dv_on_m,)
            new_dv_x_on = new_dv_x_on + (dv_x_on_m,)
            new_on = new_on + (on_m,)
            new_x_on = new_x_on + (x_on_m,)
        g = new_g
        dv_on = new_dv_on
        dv_x_on = new_dv_x_on
        on = new_on
        x_on = new_x_on

    add_softmax_grad_share(dlogits_ptr, b, c, c_mask, C, a, g, M)

    sums_stride = tl.num_programs(0).to(tl.int64) * M * C  # one of the four [B, M, C] rows
    for m in tl.static_range(M):
        _add_branch_sums(sums_ptr, b * M * C + m * C + c, sums_stride, c_mask, a[m], dv_on[m], dv_x_on[m], on[m],
                         x_on[m])


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
    logits_ptr,  # [B, M, C], element strides stride_lb, stride_lm, stride_lc
    ds_ptr,  # float32 [B, C]: gradient of s
    dv_ptr,  # [B, C, H, W]: gradient of the select output, dense in the branches' layout, batch stride stride_dv
    du0_ptr, du1_ptr, du2_ptr, du3_ptr,  # out: gradients of Y_m, batch stride stride_du, position stride line_du
    stride_lb, stride_lm, stride_lc, stride_dv, stride_du, line_du,
    C, HW, stride_u, line_u, chunk,
    M: tl.constexpr, AFFINE: tl.constexpr, CHANNELS_LAST: tl.constexpr, SLICED: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    b, c, c_mask, hw_lo, hw_hi = program_tile(C, HW, chunk, BLOCK_C)
    offs, hw_step = tile_offsets(c, C, HW, CHANNELS_LAST, BLOCK_HW)
    u_offs, u_step = sliced_offsets(offs, hw_step, c, line_u, SLICED, BLOCK_HW)
    du_offs, du_step = sliced_offsets(offs, hw_step, c, line_du, SLICED, BLOCK_HW)
    a = softmax_weights(logits_ptr, stride_lb, stride_lm, stride_lc, b, c, c_mask, M)
    grad_s = tl.load(ds_ptr + b * C + c, mask=c_mask, other=0.0) / HW
    scales, shifts = per_branch_vectors(scale_ptr, bias_ptr, c, c_mask, C, M, AFFINE)
    alphas, offsets = per_branch_vectors(alpha_ptr, offset_ptr, c, c_mask, C, M, True)
    us = branch_pointers(u0_ptr, u1_ptr, u2_ptr, u3_ptr, b * stride_u, M)
    dus = branch_pointers(du0_ptr, du1_ptr, du2_ptr, du3_ptr, b * stride_du, M)
    dv_ptr += b * stride_dv

    for hw0 in range(hw_lo, hw_hi, BLOCK_HW):
        mask = tile_mask(c_mask, hw0, hw_hi, BLOCK_HW)
        at = hw0 * hw_step + offs
        at_u = hw0 * u_step + u_offs
        at_du = hw0 * du_step + du_offs
        dv = tl.load(dv_ptr + at, mask=mask, other=0.0).to(tl.float32)
        for m in tl.static_range(M):
            _branch_input_grad(dus[m] + at_du, us[m] + at_u, dv, mask, a[m], grad_s, scales[m], shifts[m], alphas[m],
                               offsets[m])
