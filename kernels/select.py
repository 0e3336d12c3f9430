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
    add_softmax_grad_share, branch_pointers, load_branch, per_branch_vectors, program_tile, sliced_offsets,
    softmax_weights, tile_mask, tile_offsets,
)


@triton.jit
def sk_select_fwd_kernel(
    u0_ptr, u1_ptr, u2_ptr, u3_ptr,  # branches [B, C, H, W]; the first M are read
    scale_ptr, bias_ptr,  # float32 [M, C], read when AFFINE
    logits_ptr,  # [B, M, C], element strides stride_lb, stride_lm, stride_lc
    out_ptr,  # [B, C, H, W] out, dense in the branches' layout, batch stride stride_out
    stride_lb, stride_lm, stride_lc, stride_out,
    C, HW, stride_u, line_u, chunk,
    M: tl.constexpr, AFFINE: tl.constexpr, CHANNELS_LAST: tl.constexpr, SLICED: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
    RELU: tl.constexpr,
):
    b, c, c_mask, hw_lo, hw_hi = program_tile(C, HW, chunk, BLOCK_C)
    offs, hw_step = tile_offsets(c, C, HW, CHANNELS_LAST, BLOCK_HW)
    u_offs, u_step = sliced_offsets(offs, hw_step, c, line_u, SLICED, BLOCK_HW)
    a = softmax_weights(logits_ptr, stride_lb, stride_lm, stride_lc, b, c, c_mask, M)
    # a * relu(scale * U + bias) = relu(a * scale * U + a * bias) as a >= 0: the softmax weight joins the
    # prologue, and each branch keeps two per-channel vectors instead of three.
    scales, biases = per_branch_vectors(scale_ptr, bias_ptr, c, c_mask, C, M, AFFINE)
    weighted_scales = ()
    weighted_biases = ()
    for m in tl.static_range(M):
        weighted_scales = weighted_scales + (a[m] * scales[m],)
        weighted_biases = weighted_biases + (a[m] * biases[m],)
    us = branch_pointers(u0_ptr, u1_ptr, u2_ptr, u3_ptr, b * stride_u, M)
    out_ptr += b * stride_out

    for hw0 in range(hw_lo, hw_hi, BLOCK_HW):
        mask = tile_mask(c_mask, hw0, hw_hi, BLOCK_HW)
        at = hw0 * hw_step + offs
        at_u = hw0 * u_step + u_offs
        v = load_branch(us[0] + at_u, mask, weighted_scales[0], weighted_biases[0], True, RELU)
        for m in tl.static_range(1, M):
            v += load_branch(us[m] + at_u, mask, weighted_scales[m], weighted_biases[m], True, RELU)
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
    logits_ptr,  # [B, M, C], element strides stride_lb, stride_lm, stride_lc
    dv_ptr,  # [B, C, H, W]: gradient of the output, dense in the branches' layout, batch stride stride_dv
    du0_ptr, du1_ptr, du2_ptr, du3_ptr,  # out: branch gradients, batch stride stride_du, position stride line_du
    dlogits_ptr,  # float32 [B, M, C], contiguous and zeroed: each program adds its chunk's share
    stride_lb, stride_lm, stride_lc, stride_dv, stride_du, line_du,
    C, HW, stride_u, line_u, chunk,
    M: tl.constexpr, AFFINE: tl.constexpr, CHANNELS_LAST: tl.constexpr, SLICED: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
    RELU: tl.constexpr,
):
    b, c, c_mask, hw_lo, hw_hi = program_tile(C, HW, chunk, BLOCK_C)
    offs, hw_step = tile_offsets(c, C, HW, CHANNELS_LAST, BLOCK_HW)
    u_offs, u_step = sliced_offsets(offs, hw_step, c, line_u, SLICED, BLOCK_HW)
    du_offs, du_step = sliced_offsets(offs, hw_step, c, line_du, SLICED, BLOCK_HW)
    a = softmax_weights(logits_ptr, stride_lb, stride_lm, stride_lc, b, c, c_mask, M)
    scales, biases = per_branch_vectors(scale_ptr, bias_ptr, c, c_mask, C, M, AFFINE)
    us = branch_pointers(u0_ptr, u1_ptr, u2_ptr, u3_ptr, b * stride_u, M)
    dus = branch_pointers(du0_ptr, du1_ptr, du2_ptr, du3_ptr, b * stride_du, M)
    dv_ptr += b * stride_dv

    g = ()
    for m in tl.static_range(M):
        g = g + (tl.zeros([BLOCK_C, BLOCK_HW], tl.float32),)
    for hw0 in range(hw_lo, hw_hi, BLOCK_HW):
        mask = tile_mask(c_mask, hw0, hw_hi, BLOCK_HW)
        at = hw0 * hw_step + offs
        at_u = hw0 * u_step + u_offs
        at_du = hw0 * du_step + du_offs
        dv = tl.load(dv_ptr + at, mask=mask, other=0.0).to(tl.float32)
        summed = ()
        for m in tl.static_range(M):
            summed = summed + (g[m] + _branch_grad(dus[m] + at_du, us[m] + at_u, dv, mask, a[m], scales[m], biases[m],
                                                   AFFINE, RELU),)
        g = summed

    add_softmax_grad_share(dlogits_ptr, b, c, c_mask, C, a, g, M)
