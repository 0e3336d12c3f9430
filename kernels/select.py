"""Select: out[b, c, hw] = sum over m of a[b, m, c] * P_m[b, c, hw], with a = softmax over m of the logits.

Forward reads the M branches and writes the output once (the bytes floor). Each program recomputes the
softmax of its channels from the logits: M * BLOCK_C values, nothing next to the tiles it streams.

Backward is one pass over dV and the branches: it writes dU_m = a_m * dV (times scale * [P_m > 0] with a
prologue) and sums g[b, m, c] = sum over hw of dV * P_m over its chunk. The softmax backward,
dlogits = a * (g - sum over k of a_k * g_k), is linear in g, so each program adds its chunk's share of
dlogits into the zeroed float32 output with atomic adds: one launch, no partials to reduce afterwards.
"""
import triton
import triton.language as tl

from .tile import (
    add_softmax_grad_share, at_image, load_branch, per_branch_vectors, program_tile, softmax_weights, tile_mask, tile_offsets,
)


@triton.jit
def sk_select_fwd_kernel(
    u0_ptr, u1_ptr, u2_ptr, u3_ptr,  # branches [B, C, H, W]; u2/u3 are read only when M > 2/3
    scale_ptr, bias_ptr,  # float32 [M, C], read when AFFINE
    logits_ptr,  # [B, M, C], contiguous
    out_ptr,  # [B, C, H, W] out, dense in the branches' layout, batch stride stride_out
    stride_out,
    C, HW, stride_u, chunk,
    M: tl.constexpr, AFFINE: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
    RELU: tl.constexpr,
):
    b, c, c_mask, hw_lo, hw_hi = program_tile(C, HW, chunk, BLOCK_C)
    offs, hw_step = tile_offsets(c, C, HW, CHANNELS_LAST, BLOCK_HW)
    a0, a1, a2, a3 = softmax_weights(logits_ptr, b, c, c_mask, C, M)
    # a * relu(scale * U + bias) = relu(a * scale * U + a * bias) as a >= 0: the softmax weight joins the
    # prologue, and each branch keeps two per-channel vectors instead of three.
    scale0, bias0, scale1, bias1, scale2, bias2, scale3, bias3 = per_branch_vectors(
        scale_ptr, bias_ptr, c, c_mask, C, M, AFFINE
    )
    scale0, bias0 = a0 * scale0, a0 * bias0
    scale1, bias1 = a1 * scale1, a1 * bias1
    scale2, bias2 = a2 * scale2, a2 * bias2
    scale3, bias3 = a3 * scale3, a3 * bias3
    u0_ptr, u1_ptr, u2_ptr, u3_ptr = at_image(u0_ptr, u1_ptr, u2_ptr, u3_ptr, b * stride_u)
    out_ptr += b * stride_out

    for hw0 in range(hw_lo, hw_hi, BLOCK_HW):
        mask = tile_mask(c_mask, hw0, hw_hi, BLOCK_HW)
        at = hw0 * hw_step + offs
        v = load_branch(u0_ptr + at, mask, scale0, bias0, True, RELU)
        v += load_branch(u1_ptr + at, mask, scale1, bias1, True, RELU)
        if M > 2:
            v += load_branch(u2_ptr + at, mask, scale2, bias2, True, RELU)
        if M > 3:
            v += load_branch(u3_ptr + at, mask, scale3, bias3, True, RELU)
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
    u0_ptr, u1_ptr, u2_ptr, u3_ptr,  # branches, as in the forward
    scale_ptr, bias_ptr,
    logits_ptr,  # [B, M, C], contiguous
    dv_ptr,  # [B, C, H, W]: gradient of the output, in the branches' layout, batch stride stride_dv
    du0_ptr, du1_ptr, du2_ptr, du3_ptr,  # out: branch gradients, each with batch stride stride_du
    dlogits_ptr,  # float32 [B, M, C], zeroed: each program adds its chunk's share
    stride_dv, stride_du,
    C, HW, stride_u, chunk,
    M: tl.constexpr, AFFINE: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
    RELU: tl.constexpr,
):
    b, c, c_mask, hw_lo, hw_hi = program_tile(C, HW, chunk, BLOCK_C)
    offs, hw_step = tile_offsets(c, C, HW, CHANNELS_LAST, BLOCK_HW)
    a0, a1, a2, a3 = softmax_weights(logits_ptr, b, c, c_mask, C, M)
    scale0, bias0, scale1, bias1, scale2, bias2, scale3, bias3 = per_branch_vectors(
        scale_ptr, bias_ptr, c, c_mask, C, M, AFFINE
    )
    u0_ptr, u1_ptr, u2_ptr, u3_ptr = at_image(u0_ptr, u1_ptr, u2_ptr, u3_ptr, b * stride_u)
    du0_ptr, du1_ptr, du2_ptr, du3_ptr = at_image(du0_ptr, du1_ptr, du2_ptr, du3_ptr, b * stride_du)
    dv_ptr += b * stride_dv

    g0 = tl.zeros([BLOCK_C, BLOCK_HW], tl.float32)
    g1 = tl.zeros([BLOCK_C, BLOCK_HW], tl.float32)
    g2 = tl.zeros([BLOCK_C, BLOCK_HW], tl.float32)
    g3 = tl.zeros([BLOCK_C, BLOCK_HW], tl.float32)
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

    add_softmax_grad_share(dlogits_ptr, b, c, c_mask, C, a0, a1, a2, a3, g0, g1, g2, g3, M)
