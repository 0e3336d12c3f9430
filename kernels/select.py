"""Select: out[b, c, hw] = sum over m of a[b, m, c] * P_m[b, c, hw], with a = softmax over m of the logits.

Forward reads the M branches and writes the output once (the bytes floor). Each program recomputes the
softmax of its channels from the logits: M * BLOCK_C values, nothing next to the tiles it streams.

Backward is one pass over dV and the branches: it writes dU_m = a_m * dV (times scale * [P_m > 0] with a
prologue) and accumulates g[b, m, c] = sum over hw of dV * P_m into per-chunk partials; a small second
kernel sums the partials and applies the softmax backward, dlogits = a * (g - sum over k of a_k * g_k).
"""
import triton
import triton.language as tl

from .tile import at_image, load_branch, program_tile, prologue_params, softmax_weights, tile_mask, tile_offsets


@triton.jit
def _weighted_branch(ptrs, mask, weight, offset, AFFINE: tl.constexpr, RELU: tl.constexpr):
    """One branch's share of the output, relu?(weight * U + offset); weight and offset carry the softmax weight."""
    p = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32) * weight[:, None]
    if AFFINE:
        p += offset[:, None]
    if RELU:
        p = tl.where(p < 0.0, 0.0, p)
    return p


@triton.jit
def sk_select_fwd_kernel(
    u0_ptr, u1_ptr, u2_ptr, u3_ptr,  # branches [B, C, H, W]; u2/u3 are read only when M > 2/3
    logits_ptr,  # [B, M, C], contiguous
    scale_ptr, bias_ptr,  # float32 [M, C], read when AFFINE
    out_ptr,  # [B, C, H, W] out, dense in the branches' layout
    C, HW, stride_u, stride_out, chunk,
    M: tl.constexpr, AFFINE: tl.constexpr, RELU: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    b, split, c, c_mask, hw_lo, hw_hi = program_tile(C, HW, chunk, BLOCK_C)
    offs, hw_step = tile_offsets(c, C, HW, CHANNELS_LAST, BLOCK_HW)
    a0, a1, a2, a3 = softmax_weights(logits_ptr, b, c, c_mask, C, M)
    # a * relu(scale * U + bias) = relu(a * scale * U + a * bias) as a >= 0: the softmax weight joins the
    # prologue, and each branch keeps two per-channel vectors instead of three.
    scale0, bias0, scale1, bias1, scale2, bias2, scale3, bias3 = prologue_params(
        scale_ptr, bias_ptr, c, c_mask, C, M, AFFINE
    )
    scale0, bias0 = a0 * scale0, a0 * bias0
    scale1, bias1 = a1 * scale1, a1 * bias1
    scale2, bias2 = a2 * scale2, a2 * bias2
    scale3, bias3 = a3 * scale3, a3 * bias3
    image = b * stride_u
    u0_ptr, u1_ptr, u2_ptr, u3_ptr = at_image(u0_ptr, u1_ptr, u2_ptr, u3_ptr, image)
    out_ptr += b * stride_out

    for hw0 in range(hw_lo, hw_hi, BLOCK_HW):
        mask = tile_mask(c_mask, hw0, hw_hi, BLOCK_HW)
        at = hw0 * hw_step + offs
        v = _weighted_branch(u0_ptr + at, mask, scale0, bias0, AFFINE, RELU)
        v += _weighted_branch(u1_ptr + at, mask, scale1, bias1, AFFINE, RELU)
        if M > 2:
            v += _weighted_branch(u2_ptr + at, mask, scale2, bias2, AFFINE, RELU)
        if M > 3:
            v += _weighted_branch(u3_ptr + at, mask, scale3, bias3, AFFINE, RELU)
        tl.store(out_ptr + at, v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _branch_grad(du_ptrs, u_ptrs, dv, mask, weight, scale, bias, AFFINE: tl.constexpr, RELU: tl.constexpr):
    """Store dU = weight * dV * dP/dU for one branch tile; return dV * P for the logits' gradient."""
    p = load_branch(u_ptrs, mask, scale, bias, AFFINE, RELU)
    du = dv * (weight * scale)[:, None]
    if RELU:
        du = tl.where(p > 0.0, du, 0.0)
    tl.store(du_ptrs, du.to(du_ptrs.dtype.element_ty), mask=mask)
    return dv * p


@triton.jit
def sk_select_bwd_kernel(
    dv_ptr,  # [B, C, H, W]: gradient of the output, in the branches' layout
    u0_ptr, u1_ptr, u2_ptr, u3_ptr,  # branches, as in the forward
    logits_ptr, scale_ptr, bias_ptr,
    du0_ptr, du1_ptr, du2_ptr, du3_ptr,  # out: branch gradients
    g_partial_ptr,  # float32 [B, num_splits, M, C] out: this chunk's share of g
    C, HW, stride_dv, stride_u, stride_du, chunk,
    M: tl.constexpr, AFFINE: tl.constexpr, RELU: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    b, split, c, c_mask, hw_lo, hw_hi = program_tile(C, HW, chunk, BLOCK_C)
    offs, hw_step = tile_offsets(c, C, HW, CHANNELS_LAST, BLOCK_HW)
    a0, a1, a2, a3 = softmax_weights(logits_ptr, b, c, c_mask, C, M)
    scale0, bias0, scale1, bias1, scale2, bias2, scale3, bias3 = prologue_params(
        scale_ptr, bias_ptr, c, c_mask, C, M, AFFINE
    )

    g0 = tl.zeros([BLOCK_C, BLOCK_HW], tl.float32)
    g1 = tl.zeros([BLOCK_C, BLOCK_HW], tl.float32)
    g2 = tl.zeros([BLOCK_C, BLOCK_HW], tl.float32)
    g3 = tl.zeros([BLOCK_C, BLOCK_HW], tl.float32)
    image, grad_image = b * stride_u, b * stride_du
    u0_ptr, u1_ptr, u2_ptr, u3_ptr = at_image(u0_ptr, u1_ptr, u2_ptr, u3_ptr, image)
    du0_ptr, du1_ptr, du2_ptr, du3_ptr = at_image(du0_ptr, du1_ptr, du2_ptr, du3_ptr, grad_image)
    dv_ptr += b * stride_dv

    for hw0 in range(hw_lo, hw_hi, BLOCK_HW):
        mask = tile_mask(c_mask, hw0, hw_hi, BLOCK_HW)
        at = hw0 * hw_step + offs
        dv = tl.load(dv_ptr + at, mask=mask, other=0.0).to(tl.float32)
        g0 += _branch_grad(du0_ptr + at, u0_ptr + at, dv, mask, a0, scale0, bias0, AFFINE, RELU)
        g1 += _branch_grad(du1_ptr + at, u1_ptr + at, dv, mask, a1, scale1, bias1, AFFINE, RELU)
        if M > 2:
            g2 += _branch_grad(du2_ptr + at, u2_ptr + at, dv, mask, a2, scale2, bias2, AFFINE, RELU)
        if M > 3:
            g3 += _branch_grad(du3_ptr + at, u3_ptr + at, dv, mask, a3, scale3, bias3, AFFINE, RELU)

    g_ptrs = g_partial_ptr + ((b * tl.num_programs(2) + split) * M) * C + c
    tl.store(g_ptrs, tl.sum(g0, axis=1), mask=c_mask)
    tl.store(g_ptrs + C, tl.sum(g1, axis=1), mask=c_mask)
    if M > 2:
        tl.store(g_ptrs + 2 * C, tl.sum(g2, axis=1), mask=c_mask)
    if M > 3:
        tl.store(g_ptrs + 3 * C, tl.sum(g3, axis=1), mask=c_mask)


@triton.jit
def sk_select_logits_bwd_kernel(
    g_partial_ptr,  # float32 [B, num_splits, M, C]
    logits_ptr,  # [B, M, C], contiguous
    dlogits_ptr,  # [B, M, C] out, contiguous, in the logits' dtype
    C, num_splits,
    M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b = tl.cast(tl.program_id(0), tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    a0, a1, a2, a3 = softmax_weights(logits_ptr, b, c, c_mask, C, M)

    g0 = tl.zeros([BLOCK_C], tl.float32)
    g1 = tl.zeros([BLOCK_C], tl.float32)
    g2 = tl.zeros([BLOCK_C], tl.float32)
    g3 = tl.zeros([BLOCK_C], tl.float32)
    row = g_partial_ptr + b * num_splits * M * C + c
    for split in range(0, num_splits):
        g0 += tl.load(row, mask=c_mask, other=0.0)
        g1 += tl.load(row + C, mask=c_mask, other=0.0)
        if M > 2:
            g2 += tl.load(row + 2 * C, mask=c_mask, other=0.0)
        if M > 3:
            g3 += tl.load(row + 3 * C, mask=c_mask, other=0.0)
        row += M * C

    mean_g = a0 * g0 + a1 * g1 + a2 * g2 + a3 * g3
    out = dlogits_ptr + b * M * C + c
    dtype = dlogits_ptr.dtype.element_ty
    tl.store(out, (a0 * (g0 - mean_g)).to(dtype), mask=c_mask)
    tl.store(out + C, (a1 * (g1 - mean_g)).to(dtype), mask=c_mask)
    if M > 2:
        tl.store(out + 2 * C, (a2 * (g2 - mean_g)).to(dtype), mask=c_mask)
    if M > 3:
        tl.store(out + 3 * C, (a3 * (g3 - mean_g)).to(dtype), mask=c_mask)
