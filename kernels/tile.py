"""Device helpers shared by every kernel over the branches.

Every kernel over the branches takes its arguments in one order, which the launcher relies on:

1. the branches as four pointers ``u0_ptr .. u3_ptr`` (those of branches m >= M repeat another and are
   never read): :data:`BRANCH_ARGS`;
2. for a family with a prologue (P = ReLU?(scale * U + bias) applied as each branch is loaded), its
   ``scale_ptr, bias_ptr`` (:data:`PROLOGUE_ARGS`), read when the constexpr ``AFFINE`` is set; a family
   without one (the BatchNorm statistics read the raw branches) takes neither, nor ``AFFINE``;
3. the kernel's own tensors and scalars;
4. :data:`SHAPE_ARGS`, ``C, HW, stride_u, chunk``;
5. the constexprs :data:`CONSTEXPR_ARGS` (``M``, ``AFFINE`` where there is a prologue, ``CHANNELS_LAST,
   BLOCK_C, BLOCK_HW``), then the kernel's own flags.

Every kernel walks the same work decomposition: one program per (image b, block of BLOCK_C channels,
chunk of the H*W positions), visiting its chunk in [BLOCK_C, BLOCK_HW] tiles. The branches of one image
are [C, HW] (contiguous NCHW) or [HW, C] (channels_last) matrices; CHANNELS_LAST picks the strides, so
the compiler sees which tile axis is contiguous and vectorises along it. An image holds fewer than
2**31 elements (the ops check), so offsets within one are 32-bit, which keeps the loop-invariant
offset tile in half the registers. Anything that grows with the batch (the image's base offset
b * batch stride, a [B, ...] row, a stride of B * M * C elements) is 64-bit: the batch may be any size,
so the image index and the program count along it enter arithmetic only as int64.
"""
import triton
import triton.language as tl

# Every kernel takes the branches as this many pointers.
MAX_BRANCHES = 4
# The argument names of the convention above, in order.
BRANCH_ARGS = tuple(f"u{m}_ptr" for m in range(MAX_BRANCHES))
PROLOGUE_ARGS = ("scale_ptr", "bias_ptr")
SHAPE_ARGS = ("C", "HW", "stride_u", "chunk")
CONSTEXPR_ARGS = ("M", "AFFINE", "CHANNELS_LAST", "BLOCK_C", "BLOCK_HW")


@triton.jit
def program_tile(C, HW, chunk, BLOCK_C: tl.constexpr):
    """This program's image, channel vector, channel mask and [hw_lo, hw_hi) chunk.

    The grid is (B, channel blocks, splits of H*W).
    """
    b = tl.cast(tl.program_id(0), tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    hw_lo = tl.program_id(2) * chunk
    hw_hi = tl.minimum(hw_lo + chunk, HW)
    return b, c, c < C, hw_lo, hw_hi


@triton.jit
def tile_offsets(c, C, HW, CHANNELS_LAST: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Element offsets of the tile at hw = 0 within one image, and the offset step of one hw position."""
    hw = tl.arange(0, BLOCK_HW)
    if CHANNELS_LAST:
        offs = c[:, None] + hw[None, :] * C
        hw_step = C
    else:
        offs = c[:, None] * HW + hw[None, :]
        hw_step = 1
    return offs, hw_step


@triton.jit
def tile_mask(c_mask, hw0, hw_hi, BLOCK_HW: tl.constexpr):
    """Which elements of the tile starting at position hw0 exist."""
    hw = hw0 + tl.arange(0, BLOCK_HW)
    return c_mask[:, None] & (hw < hw_hi)[None, :]


@triton.jit
def _branch_vector_pair(a_ptr, b_ptr, m, c, c_mask, C, LOADED: tl.constexpr):
    if LOADED:
        a = tl.load(a_ptr + m * C + c, mask=c_mask, other=0.0)
        b = tl.load(b_ptr + m * C + c, mask=c_mask, other=0.0)
    else:
        a = tl.full(c.shape, 1.0, tl.float32)
        b = tl.zeros(c.shape, tl.float32)
    return a, b


@triton.jit
def per_branch_vectors(a_ptr, b_ptr, c, c_mask, C, M: tl.constexpr, LOADED: tl.constexpr):
    """Two per-branch, per-channel float32 [M, C] tables (the prologue's scale and bias, BatchNorm's mean
    and rstd, ...) at channels c: eight float32 [BLOCK_C] vectors (a0, b0, ..., a3, b3); 1 and 0 unless
    LOADED (a prologue without AFFINE). Branches m >= M repeat an earlier one and go unused."""
    a0, b0 = _branch_vector_pair(a_ptr, b_ptr, 0, c, c_mask, C, LOADED)
    a1, b1 = _branch_vector_pair(a_ptr, b_ptr, 1, c, c_mask, C, LOADED)
    a2, b2 = _branch_vector_pair(a_ptr, b_ptr, 2 % M, c, c_mask, C, LOADED)
    a3, b3 = _branch_vector_pair(a_ptr, b_ptr, 3 % M, c, c_mask, C, LOADED)
    return a0, b0, a1, b1, a2, b2, a3, b3


@triton.jit
def at_image(p0, p1, p2, p3, offset):
    """The four branch pointers moved by ``offset`` elements, to one image."""
    return p0 + offset, p1 + offset, p2 + offset, p3 + offset


@triton.jit
def load_branch(ptrs, mask, scale, bias, AFFINE: tl.constexpr, RELU: tl.constexpr):
    """P = U, scale*U + bias, and/or max(., 0) as float32, zero outside the mask."""
    p = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    if AFFINE:
        p = tl.where(mask, p * scale[:, None] + bias[:, None], 0.0)
    if RELU:
        # `p < 0` rather than maximum(): NaN stays NaN, as in torch.relu.
        p = tl.where(p < 0.0, 0.0, p)
    return p


@triton.jit
def softmax_weights(logits_ptr, b, c, c_mask, C, M: tl.constexpr):
    """Softmax over the M branches of logits [B, M, C] (contiguous) for image b and channels c.

    Returns four float32 [BLOCK_C] vectors; those of branches m >= M are zero.
    """
    row = logits_ptr + b * M * C + c
    neg_inf = tl.full(c.shape, float("-inf"), tl.float32)
    l0 = tl.load(row, mask=c_mask, other=0.0).to(tl.float32)
    l1 = tl.load(row + C, mask=c_mask, other=0.0).to(tl.float32)
    l2 = neg_inf
    l3 = neg_inf
    if M > 2:
        l2 = tl.load(row + 2 * C, mask=c_mask, other=0.0).to(tl.float32)
    if M > 3:
        l3 = tl.load(row + 3 * C, mask=c_mask, other=0.0).to(tl.float32)
    top = tl.maximum(tl.maximum(l0, l1), tl.maximum(l2, l3))
    e0 = tl.exp(l0 - top)
    e1 = tl.exp(l1 - top)
    e2 = tl.exp(l2 - top)
    e3 = tl.exp(l3 - top)
    inv = 1.0 / (e0 + e1 + e2 + e3)
    return e0 * inv, e1 * inv, e2 * inv, e3 * inv


@triton.jit
def add_softmax_grad_share(dlogits_ptr, b, c, c_mask, C, a0, a1, a2, a3, g0, g1, g2, g3, M: tl.constexpr):
    """Add one chunk's share of dlogits = a * (g - sum over k of a_k * g_k) for image b and channels c into
    the zeroed float32 [B, M, C] at ``dlogits_ptr``, from the chunk's [BLOCK_C, BLOCK_HW] tiles of dV * P_m.

    The softmax backward is linear in g, so the chunks' shares add up to it; branches m >= M have a_m = 0.
    """
    s0, s1, s2, s3 = tl.sum(g0, axis=1), tl.sum(g1, axis=1), tl.sum(g2, axis=1), tl.sum(g3, axis=1)
    mean_g = a0 * s0 + a1 * s1 + a2 * s2 + a3 * s3
    row = dlogits_ptr + b * M * C + c
    tl.atomic_add(row, a0 * (s0 - mean_g), mask=c_mask)
    tl.atomic_add(row + C, a1 * (s1 - mean_g), mask=c_mask)
    if M > 2:
        tl.atomic_add(row + 2 * C, a2 * (s2 - mean_g), mask=c_mask)
    if M > 3:
        tl.atomic_add(row + 3 * C, a3 * (s3 - mean_g), mask=c_mask)
