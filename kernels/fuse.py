"""Fuse: s[b, c] = mean over hw of sum over m of P_m[b, c, hw].

Forward reads the M branches once (the bytes floor). Each program adds its chunk's share of s into the
zeroed float32 output with one atomic add per channel, so a chunked H*W (enough programs to fill the
GPU when B * C is small) needs no second pass over partial sums.

Backward with a ReLU prologue needs the branches again for the mask [P_m > 0]:
dU_m = ds[b, c] / HW * scale[m, c] * [P_m > 0]. Without ReLU the gradient is a broadcast and never
reaches a kernel (see sknet_triton.ops).
"""
import triton
import triton.language as tl

from .tile import at_image, load_branch, per_branch_vectors, program_tile, tile_mask, tile_offsets


@triton.jit
def sk_fuse_fwd_kernel(
    u0_ptr, u1_ptr, u2_ptr, u3_ptr,  # branches [B, C, H, W]; u2/u3 are read only when M > 2/3
    scale_ptr, bias_ptr,  # float32 [M, C], read when AFFINE
    s_ptr,  # float32 [B, C], zeroed: each program adds its chunk's share
    C, HW, stride_u, chunk,
    M: tl.constexpr, AFFINE: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
    RELU: tl.constexpr,
):
    b, c, c_mask, hw_lo, hw_hi = program_tile(C, HW, chunk, BLOCK_C)
    offs, hw_step = tile_offsets(c, C, HW, CHANNELS_LAST, BLOCK_HW)
    scale0, bias0, scale1, bias1, scale2, bias2, scale3, bias3 = per_branch_vectors(
        scale_ptr, bias_ptr, c, c_mask, C, M, AFFINE
    )
    u0_ptr, u1_ptr, u2_ptr, u3_ptr = at_image(u0_ptr, u1_ptr, u2_ptr, u3_ptr, b * stride_u)

    acc = tl.zeros([BLOCK_C, BLOCK_HW], tl.float32)
    for hw0 in range(hw_lo, hw_hi, BLOCK_HW):
        mask = tile_mask(c_mask, hw0, hw_hi, BLOCK_HW)
        at = hw0 * hw_step + offs
        acc += load_branch(u0_ptr + at, mask, scale0, bias0, AFFINE, RELU)
        acc += load_branch(u1_ptr + at, mask, scale1, bias1, AFFINE, RELU)
        if M > 2:
            acc += load_branch(u2_ptr + at, mask, scale2, bias2, AFFINE, RELU)
        if M > 3:
            acc += load_branch(u3_ptr + at, mask, scale3, bias3, AFFINE, RELU)

    tl.atomic_add(s_ptr + b * C + c, tl.sum(acc, axis=1) / HW, mask=c_mask)


@triton.jit
def _relu_grad(du_ptrs, u_ptrs, mask, grad, scale, bias, AFFINE: tl.constexpr):
    p = load_branch(u_ptrs, mask, scale, bias, AFFINE, False)
    du = tl.where(p > 0.0, grad[:, None], 0.0)
    tl.store(du_ptrs, du.to(du_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def sk_fuse_bwd_kernel(
    u0_ptr, u1_ptr, u2_ptr, u3_ptr,  # branches, as in the forward
    scale_ptr, bias_ptr,
    ds_ptr,  # float32 [B, C]: gradient of s
    du0_ptr, du1_ptr, du2_ptr, du3_ptr,  # out: branch gradients, each with batch stride stride_du
    stride_du,
    C, HW, stride_u, chunk,
    M: tl.constexpr, AFFINE: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    b, c, c_mask, hw_lo, hw_hi = program_tile(C, HW, chunk, BLOCK_C)
    offs, hw_step = tile_offsets(c, C, HW, CHANNELS_LAST, BLOCK_HW)
    grad = tl.load(ds_ptr + b * C + c, mask=c_mask, other=0.0) / HW
    scale0, bias0, scale1, bias1, scale2, bias2, scale3, bias3 = per_branch_vectors(
        scale_ptr, bias_ptr, c, c_mask, C, M, AFFINE
    )
    u0_ptr, u1_ptr, u2_ptr, u3_ptr = at_image(u0_ptr, u1_ptr, u2_ptr, u3_ptr, b * stride_u)
    du0_ptr, du1_ptr, du2_ptr, du3_ptr = at_image(du0_ptr, du1_ptr, du2_ptr, du3_ptr, b * stride_du)

    for hw0 in range(hw_lo, hw_hi, BLOCK_HW):
        mask = tile_mask(c_mask, hw0, hw_hi, BLOCK_HW)
        at = hw0 * hw_step + offs
        _relu_grad(du0_ptr + at, u0_ptr + at, mask, grad * scale0, scale0, bias0, AFFINE)
        _relu_grad(du1_ptr + at, u1_ptr + at, mask, grad * scale1, scale1, bias1, AFFINE)
        if M > 2:
            _relu_grad(du2_ptr + at, u2_ptr + at, mask, grad * scale2, scale2, bias2, AFFINE)
        if M > 3:
            _relu_grad(du3_ptr + at, u3_ptr + at, mask, grad * scale3, scale3, bias3, AFFINE)
