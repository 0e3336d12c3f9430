"""Device helpers shared by every kernel over the branches.

Every kernel over the branches takes its arguments in one order, which the launcher relies on:

1. the branches as four pointers ``u0_ptr .. u3_ptr`` (those of branches m >= M repeat another and are
   never read): :data:`BRANCH_ARGS`. They are separate arguments because torch.compile's traced launches
   take tensors one by one; inside, :func:`branch_pointers` makes them a tuple and the kernels loop over
   the M branches with ``tl.static_range``, unrolled at compile time;
2. for a family with a prologue (P = ReLU?(scale * U + bias) applied as each branch is loaded), its
   ``scale_ptr, bias_ptr`` (:data:`PROLOGUE_ARGS`), read when the constexpr ``AFFINE`` is set; a family
   without one (the BatchNorm statistics read the raw branches) takes neither, nor ``AFFINE``;
3. the kernel's own tensors and scalars (a kernel that writes branch gradients takes their batch stride
   and position stride, ``stride_du, line_du``);
4. :data:`SHAPE_ARGS`, ``C, HW, stride_u, line_u, chunk``;
5. the constexprs :data:`CONSTEXPR_ARGS` (``M``, ``AFFINE`` where there is a prologue, ``CHANNELS_LAST,
   SLICED, BLOCK_C, BLOCK_HW``), then the kernel's own flags.

Every kernel walks the same work decomposition: one program per (image b, block of BLOCK_C channels,
chunk of the H*W positions), visiting its chunk in [BLOCK_C, BLOCK_HW] tiles. Each image of every tensor
the kernels stream is a dense [C, HW] (contiguous NCHW) or [HW, C] (channels_last) matrix, with one
exception: with SLICED (channels_last only), the branches and their gradients are channel slices of wider
channels_last tensors (ResNeSt's radix branches, channels m*C .. m*C + C - 1 of one [B, M*C, H, W]
convolution output), [HW, C] matrices whose rows lie ``line_u`` (``line_du``) elements apart. So one
loop-invariant offset tile addresses every dense tensor, and without SLICED the branches too (the default
specializations hold one offset tile); SLICED adds one tile per position stride. CHANNELS_LAST picks the
strides, so the compiler sees which tile axis is contiguous and vectorises along it. An image (up to its
last element, line included) holds fewer than 2**31 elements (the launcher checks), so offsets within one
are 32-bit, which keeps the offset tiles in half the registers. Anything that grows with the batch (the
image's base offset b * batch stride, a [B, ...] row, a stride of B * M * C elements) is 64-bit: the batch
may be any size, so the image index and the program count along it enter arithmetic only as int64.
"""
import triton
import triton.language as tl

# The argument names of the convention above, in order. The four branch pointers fix the most branches a
# kernel takes: sknet_triton.ops.launch.MAX_BRANCHES, which a test ties to them.
BRANCH_ARGS = ("u0_ptr", "u1_ptr", "u2_ptr", "u3_ptr")
PROLOGUE_ARGS = ("scale_ptr", "bias_ptr")
SHAPE_ARGS = ("C", "HW", "stride_u", "line_u", "chunk")
CONSTEXPR_ARGS = ("M", "AFFINE", "CHANNELS_LAST", "SLICED", "BLOCK_C", "BLOCK_HW")


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
def sliced_offsets(offs, hw_step, c, line, SLICED: tl.constexpr, BLOCK_HW: tl.constexpr):
    """The offsets and position step of a channels_last tensor whose positions lie ``line`` elements apart
    where SLICED; else the dense tile's own ``offs, hw_step`` (so the default specializations keep one)."""
    if SLICED:
        sliced = c[:, None] + tl.arange(0, BLOCK_HW)[None, :] * line
        step = line
    else:
        sliced = offs
        step = hw_step
    return sliced, step


@triton.jit
def tile_mask(c_mask, hw0, hw_hi, BLOCK_HW: tl.constexpr):
    """Which elements of the tile starting at position hw0 exist."""
    hw = hw0 + tl.arange(0, BLOCK_HW)
    return c_mask[:, None] & (hw < hw_hi)[None, :]


@triton.jit
def branch_pointers(u0_ptr, u1_ptr, u2_ptr, u3_ptr, offset, M: tl.constexpr):
    """The first M of the four branch pointers, each moved by ``offset`` elements (to one image): a tuple."""
    every = (u0_ptr, u1_ptr, u2_ptr, u3_ptr)
    ptrs = ()
    for m in tl.static_range(M):
        ptrs = ptrs + (every[m] + offset,)
    return ptrs


@triton.jit
def per_branch_vectors(a_ptr, b_ptr, c, c_mask, C, M: tl.constexpr, LOADED: tl.constexpr):
    """Two per-branch, per-channel float32 [M, C] tables (the prologue's scale and bias, BatchNorm's mean
    and rstd, ...) at channels c: two tuples of M float32 [BLOCK_C] vectors; 1 and 0 unless LOADED (a
    prologue without AFFINE)."""
    a = ()
    b = ()
    for m in tl.static_range(M):
        if LOADED:
            a = a + (tl.load(a_ptr + m * C + c, mask=c_mask, other=0.0),)
            b = b + (tl.load(b_ptr + m * C + c, mask=c_mask, other=0.0),)
        else:
            a = a + (tl.full(c.shape, 1.0, tl.float32),)
            b = b + (tl.zeros(c.shape, tl.float32),)
    return a, b


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
def softmax_weights(logits_ptr, stride_lb, stride_lm, stride_lc, b, c, c_mask, M: tl.constexpr):
    """Softmax over the M branches of the logits [B, M, C] (any strides) for image b and channels c: a
    tuple of M float32 [BLOCK_C] vectors."""
    row = logits_ptr + b * stride_lb + c * stride_lc
    logits = ()
    for m in tl.static_range(M):
        logits = logits + (tl.load(row + m * stride_lm, mask=c_mask, other=0.0).to(tl.float32),)
    top = logits[0]
    for m in tl.static_range(1, M):
        top = tl.maximum(top, logits[m])
    exps = ()
    total = tl.zeros(c.shape, tl.float32)
    for m in tl.static_range(M):
        e = tl.exp(logits[m] - top)
        exps = exps + (e,)
        total += e
    inv = 1.0 / total
    weights = ()
    for m in tl.static_range(M):
        weights = weights + (exps[m] * inv,)
    return weights


@triton.jit
def add_softmax_grad_share(dlogits_ptr, b, c, c_mask, C, a, g, M: tl.constexpr):
    """Add one chunk's share of dlogits = a * (g - sum over k of a_k * g_k) for image b and channels c into
    the zeroed float32 [B, M, C] at ``dlogits_ptr``, from the chunk's [BLOCK_C, BLOCK_HW] tiles of dV * P_m
    (``g``, and the softmax weights ``a``: tuples of M).

    The softmax backward is linear in g, so the chunks' shares add up to it.
    """
    sums = ()
    mean_g = tl.zeros(c.shape, tl.float32)
    for m in tl.static_range(M):
        sums = sums + (tl.sum(g[m], axis=1),)
        mean_g += a[m] * sums[m]
    row = dlogits_ptr + b * M * C + c
    for m in tl.static_range(M):
        tl.atomic_add(row + m * C, a[m] * (sums[m] - mean_g), mask=c_mask)
