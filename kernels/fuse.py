"""Fuse: s[b, c] = mean over hw of sum over m of P_m[b, c, hw].

Forward reads the M branches once (the bytes floor) and writes one float32 partial sum per program;
a chunked H*W gives enough programs to fill the GPU when B * C is small, and the partials of the
chunks are summed on the host side (a [B, splits, C] tensor, tiny next to the branches).

Backward with a ReLU prologue needs the branches again for the mask [P_m > 0]:
dU_m = ds[b, c] / HW * scale[m, c] * [P_m > 0]. Without ReLU the gradient is a broadcast and never
reaches a kernel (see sknet_triton.ops).
"""
import triton
import triton.language as tl

from .tile import at_image, load_branch, program_tile, prologue_params, tile_mask, tile_offsets


@triton.jit
def sk_fuse_fwd_kernel(
    u0_ptr, u1_ptr, u2_ptr, u3_ptr,  # branches [B, C, H, W]; u2/u3 are read only when M > 2/3
    scale_ptr, bias_ptr,  # float32 [M, C], read when AFFINE
    partial_ptr,  # float32 [B, num_splits, C] out: this chunk's share of s
    C, HW, stride_u, chunk, inv_hw,
    M: tl.constexpr, AFFINE: tl.constexpr, RELU: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    b, split, c, c_mask, hw_lo, hw_hi = program_tile(C, HW, chunk, BLOCK_C)
    offs, hw_step = tile_offsets(c, C, HW, CHANNELS_LAST, BLOCK_HW)
    scale0, bias0, scale1, bias1, scale2, bias2, scale3, bias3 = prologue_params(
        scale_ptr, bias_ptr, c, c_mask, C, M, AFFINE
    )

    image = b * stride_u
    u0_ptr, u1_ptr, u2_ptr, u3_ptr = at_image(u0_ptr, u1_ptr, u2_ptr, u3_ptr, image)

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

    s = tl.sum(acc, axis=1) * inv_hw
    tl.store(partial_ptr + (b * tl.num_programs(2) + split) * C + c, s, mask=c_mask)


@triton.jit
def _relu_grad(du_ptrs, u_ptrs, mask, grad, scale, bias, AFFINE: tl.constexpr):
    p = load_branch(u_ptrs, mask, scale, bias, AFFINE, False)
    du = tl.where(p > 0.0, grad[:, None], 0.0)
    tl.store(du_ptrs, du.to(du_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def sk_fuse_bwd_kernel(
    ds_ptr,  # float32 [B, C]: gradient of s
    u0_ptr, u1_ptr, u2_ptr, u3_ptr,  # branches, as in the forward
    scale_ptr, bias_ptr,
    du0_ptr, du1_ptr, du2_ptr, du3_ptr,  # out: branch gradients, each with batch stride stride_du
    C, HW, stride_u, stride_du, chunk, inv_hw,
    M: tl.constexpr, AFFINE: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    b, split, c, c_mask, hw_lo, hw_hi = program_tile(C, HW, chunk, BLOCK_C)
    offs, hw_step = tile_offsets(c, C, HW, CHANNELS_LAST, BLOCK_HW)
    grad = tl.load(ds_ptr + b * C + c, mask=c_mask, other=0.0) * inv_hw
    scale0, bias0, scale1, bias1, scale2, bias2, scale3, bias3 = prologue_params(
        scale_ptr, bias_ptr, c, c_mask, C, M, AFFINE
    )

    image, grad_image = b * stride_u, b * stride_du
    u0_ptr, u1_ptr, u2_ptr, u3_ptr = at_image(u0_ptr, u1_ptr, u2_ptr, u3_ptr, image)
    du0_ptr, du1_ptr, du2_ptr, du3_ptr = at_image(du0_ptr, du1_ptr, du2_ptr, du3_ptr, grad_image)

    for hw0 in range(hw_lo, hw_hi, BLOCK_HW):
        mask = tile_mask(c_mask, hw0, hw_hi, BLOCK_HW)
        at = hw0 * hw_step + offs
        _relu_grad(du0_ptr + at, u0_ptr + at, mask, grad * scale0, scale0, bias0, AFFINE)
        _relu_grad(du1_ptr + at, u1_ptr + at, mask, grad * scale1, scale1, bias1, AFFINE)
        if M > 2:
            _relu_grad(du2_ptr + at, u2_ptr + at, mask, grad * scale2, scale2, bias2, AFFINE)
        if M > 3:
            _relu_grad(du3_ptr + at, u3_ptr + at, mask, grad * scale3, scale3, bias3, AFFINE)
