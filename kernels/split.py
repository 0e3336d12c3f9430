"""Split in eval mode: every branch's grouped 3x3 convolution, its folded BatchNorm and ReLU, and the
pooled sum of the branches, in one kernel.

Branch m (m = 0 .. M-1) is a 3x3 convolution with dilation and padding m + 1 and stride ``stride``:
P_m = max(scale[m] * conv_m(x) + bias[m], 0). The kernel writes every P_m and adds
s[b, c] = mean over the output positions of sum over m of P_m into a zeroed float32 [B, C], so that no
fuse pass has to read the branches again.

One program per (image b, block of output channels, chunk of the output positions), visiting its chunk
in tiles of BLOCK_P positions. For each tile it computes the M branches one after the other from the
same neighbourhood of x (the largest dilation's halo), so x comes from DRAM about once and the other
branches find it in cache. Output tiles are [BLOCK_P, BLOCK_C]; CHANNELS_LAST makes channels the
contiguous axis of x and of the branches, else positions.

Two inner products:

- ``USE_DOT`` (group_out >= 16 and 9 * group_in >= 16): the program's channels lie in one group; per
  tap, the [BLOCK_P, BLOCK_K] slice of the group's input channels times the [BLOCK_K, BLOCK_C] weights
  with ``tl.dot``: on tensor cores in float16 and bfloat16; in float32 with ``input_precision="ieee"``
  (the float32 accuracy the tests hold it to, where TF32 would round the operands to 10 bits), which
  Triton lowers to an FMA loop, not to tensor cores.
- otherwise a plain FMA loop: the channel block may span many narrow groups; per tap and per input
  channel of a group, each output channel's input is gathered and multiplied by its weight.

The weights arrive as [M, 3, 3, group_in, C] (tap-major, output channels contiguous), so every weight
vector a program loads is contiguous. ``split_offset`` moves branch m's input channels by
m * split_offset (timm's split_input: each path reads its own slice of x).
"""
import triton
import triton.language as tl


@triton.jit
def sk_split_fwd_kernel(
    x_ptr,  # [B, C_in, H, W], dense images in the layout, batch stride stride_x
    w_ptr,  # [M, 3, 3, group_in, C], contiguous, x's dtype
    scale_ptr, bias_ptr,  # float32 [M, C]: folded BatchNorm
    out_ptr,  # out: [B, M, C, Ho, Wo], branch images dense in the layout; batch stride stride_out, branch stride stride_m
    s_ptr,  # float32 [B, C], zeroed: each program adds its chunk's share
    C_in, H, W, C, Ho, Wo,
    group_in, group_out, split_offset, stride, M,
    stride_x, stride_out, stride_m, chunk,
    CHANNELS_LAST: tl.constexpr, USE_DOT: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    b = tl.cast(tl.program_id(0), tl.int64)
    if USE_DOT:
        # Channel blocks never straddle a group: block j of group g covers [j * BLOCK_C, (j + 1) * BLOCK_C).
        blocks_per_group = tl.cdiv(group_out, BLOCK_C)
        group = tl.program_id(1) // blocks_per_group
        n = (tl.program_id(1) % blocks_per_group) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_mask = n < group_out
        c = group * group_out + n
        in_base = group * group_in  # first input channel of the program's group
    else:
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_mask = c < C
        in_base = (c // group_out) * group_in  # [BLOCK_C]: first input channel of each channel's group
    HWo = Ho * Wo
    p_lo = tl.program_id(2) * chunk
    p_hi = tl.minimum(p_lo + chunk, HWo)
    x_ptr += b * stride_x
    out_ptr += b * stride_out

    pooled = tl.zeros([BLOCK_C], tl.float32)
    for p0 in range(p_lo, p_hi, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        p_mask = p < p_hi
        oh = p // Wo
        ow = p % Wo
        if CHANNELS_LAST:
            out_offs = p[:, None] * C + c[None, :]
        else:
            out_offs = c[None, :] * HWo + p[:, None]
        out_mask = p_mask[:, None] & c_mask[None, :]
        for m in range(M):
            dilation = m + 1
            branch_in = in_base + m * split_offset
            acc = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
            for tap in range(9):
                ih = oh * stride + (tap // 3 - 1) * dilation
                iw = ow * stride + (tap % 3 - 1) * dilation
                inside = p_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                position = ih * W + iw
                w_tap = w_ptr + (m * 9 + tap) * group_in * C
                if USE_DOT:
                    for k0 in range(0, group_in, BLOCK_K):
                        k = k0 + tl.arange(0, BLOCK_K)
                        k_mask = k < group_in
                        if CHANNELS_LAST:
                            x_offs = position[:, None] * C_in + (branch_in + k)[None, :]
                        else:
                            x_offs = (branch_in + k)[None, :] * (H * W) + position[:, None]
                        a = tl.load(x_ptr + x_offs, mask=inside[:, None] & k_mask[None, :], other=0.0)
                        w = tl.load(w_tap + k[:, None] * C + c[None, :], mask=k_mask[:, None] & c_mask[None, :],
                                    other=0.0)
                        if x_ptr.dtype.element_ty == tl.float32:
                            acc = tl.dot(a, w, acc, input_precision="ieee")
                        elif INTERPRETED:
                            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc)
                        else:
                            acc = tl.dot(a, w, acc)
                else:
                    for ci in range(group_in):
                        channel = branch_in + ci
                        if CHANNELS_LAST:
                            x_offs = position[:, None] * C_in + channel[None, :]
                        else:
                            x_offs = channel[None, :] * (H * W) + position[:, None]
                        xv = tl.load(x_ptr + x_offs, mask=inside[:, None] & c_mask[None, :], other=0.0)
                        w = tl.load(w_tap + ci * C + c, mask=c_mask, other=0.0)
                        acc += xv.to(tl.float32) * w.to(tl.float32)[None, :]
            scale = tl.load(scale_ptr + m * C + c, mask=c_mask, other=0.0)
            bias = tl.load(bias_ptr + m * C + c, mask=c_mask, other=0.0)
            y = acc * scale[None, :] + bias[None, :]
            # `y < 0` rather than maximum(): NaN stays NaN, as in torch.relu.
            y = tl.where(y < 0.0, 0.0, y)
            tl.store(out_ptr + m * stride_m + out_offs, y.to(out_ptr.dtype.element_ty), mask=out_mask)
            # Positions past the image hold relu(bias), not 0: leave them out of the pooled sum.
            pooled += tl.sum(tl.where(out_mask, y, 0.0), axis=0)

    tl.atomic_add(s_ptr + b * C + c, pooled / HWo, mask=c_mask)


# Triton's interpreter stores bfloat16 as uint16 and its tl.dot multiplies those integers: there the
# operands go to float32 first. (Read by the kernel when it runs, so it can follow the definition.)
INTERPRETED = tl.constexpr(not isinstance(sk_split_fwd_kernel, triton.runtime.JITFunction))
