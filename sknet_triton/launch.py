"""Launchers: one pattern for every kernel over the branches.

Every kernel shares its leading and trailing arguments (see ``kernels/tile.py``), so one function,
:func:`_launch`, starts any of them: it takes the branches as :class:`Job` resolved them, picks the
launch configuration (the tuned table of this GPU's architecture, else the defaults), cuts the work
into programs, and passes the kernel's own tensors and flags through. A kernel family is one entry of
:data:`FAMILIES`; the op functions below build each one's outputs and call :func:`_launch`.

Inputs arrive validated (see :mod:`sknet_triton.ops`). Every op function takes the branches as the op
received them (M tensors, or one stacked [B, M, C, H, W] tensor) and reads them in place where
:mod:`sknet_triton.layout` allows. Under ``torch.compile`` the launches go through
``torch.library.wrap_triton``, so Inductor emits them in its own generated code.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor

from sknet_triton import kernels
from sknet_triton.device import INTERPRETED
from sknet_triton.layout import branch_views, empty_branch_grads, empty_images, empty_stacked, image_layout, kernel_views

# channels_last tiles are BLOCK_C wide along the contiguous channels (the narrowest that covers C);
# NCHW tiles are BLOCK_HW long along the contiguous positions, the longest that pads H*W by at most 1/16
# (else the least padding).
CHANNELS_LAST_BLOCK_C = (32, 64, 128)
NCHW_BLOCK_HW = (256, 64, 16)
# The interpreter runs programs one by one: on the CPU only a few (still more than one chunk, so that
# tests cover the chunked reductions).
CPU_MIN_PROGRAMS = 4
# The split kernel's channel blocks: the FMA loop's by layout (channels_last: wide along the contiguous
# channels; NCHW: narrow, the positions being contiguous), the tensor-core path's within one group (the
# narrowest that covers group_out), and its reduction step over a group's input channels.
SPLIT_FMA_BLOCK_C = {True: 32, False: 16}
SPLIT_FMA_BLOCK_K = 16  # unused by the FMA loop; one value, so that it adds no specialization
SPLIT_DOT_BLOCK_C = (16, 32, 64)
SPLIT_DOT_BLOCK_K = (16, 32)
# Tensor cores need a product of at least 16 along each of its dimensions.
DOT_MIN = 16
# Per-architecture tables written by perf/tune.py: sm_<major><minor>.json.
TUNED_DIR = Path(__file__).with_name("tuned")


@dataclass(frozen=True)
class Config:
    """How one kernel family is launched for one problem: what ``perf/tune.py`` sweeps."""

    tile_bytes: int  # bytes of each streamed tensor in one [BLOCK_C, BLOCK_HW] tile
    num_warps: int
    num_stages: int
    programs_per_sm: int  # the H*W axis is split until the grid has about this many programs per SM
    maxnreg: Optional[int] = None  # registers per thread allowed to ptxas, where its own budget would spill

    def options(self) -> dict:
        """The launch options of this configuration, as Triton takes them."""
        options = dict(num_warps=self.num_warps, num_stages=self.num_stages)
        return options if self.maxnreg is None else dict(options, maxnreg=self.maxnreg)


@dataclass(frozen=True)
class Family:
    """A kernel family: its kernel, whether it streams a backward pass's 2M + 1 tensors, its own flags, and
    the constexpr variants (tile shapes, layouts, flags) its launcher can choose for one configuration."""

    kernel: object
    backward: bool
    flags: tuple[str, ...] = ()
    variants: Callable[["Family", Config, torch.dtype], list[dict]] = None
    default: Optional[Config] = None  # this family's untuned configuration, where it has its own
    # Streams dense tiles, so the ahead-of-time check requires 16-byte loads of it. The split kernel's taps
    # start at offsets no alignment analysis can prove (position - dilation, channel + group * group_in).
    streaming: bool = True

    def constexpr_variants(self, config: Config, dtype: torch.dtype) -> list[dict]:
        """Every set of tile constexprs and flags the launcher can pass with ``config`` for ``dtype``."""
        return self.variants(self, config, dtype)


def branch_variants(family: Family, config: Config, dtype: torch.dtype) -> list[dict]:
    """The kernels over the branches: every reachable tile shape, with every value of the family's flags."""
    tiles = reachable_tile_shapes(config.tile_bytes // dtype.itemsize)
    return [
        dict(CHANNELS_LAST=channels_last, BLOCK_C=block_c, BLOCK_HW=block_hw, **dict(zip(family.flags, flags)))
        for (channels_last, block_c, block_hw), *flags in itertools.product(tiles, *[(False, True)] * len(family.flags))
    ]


def split_variants(family: Family, config: Config, dtype: torch.dtype) -> list[dict]:
    """The split kernel: in either layout, the FMA loop's one block and every tensor-core block."""
    blocks = [(False, SPLIT_FMA_BLOCK_C[channels_last], SPLIT_FMA_BLOCK_K, channels_last) for channels_last in (False, True)]
    blocks += [(True, block_c, block_k, channels_last) for channels_last in (False, True)
               for block_c in SPLIT_DOT_BLOCK_C for block_k in SPLIT_DOT_BLOCK_K]
    return [
        dict(CHANNELS_LAST=channels_last, USE_DOT=use_dot, BLOCK_P=split_block_p(config, block_c), BLOCK_C=block_c,
             BLOCK_K=block_k)
        for use_dot, block_c, block_k, channels_last in blocks
    ]


FAMILIES = {
    "fuse_fwd": Family(kernels.sk_fuse_fwd_kernel, backward=False, flags=("RELU",), variants=branch_variants),
    "fuse_bwd": Family(kernels.sk_fuse_bwd_kernel, backward=True, variants=branch_variants),
    "select_fwd": Family(kernels.sk_select_fwd_kernel, backward=False, flags=("RELU",), variants=branch_variants),
    "select_bwd": Family(kernels.sk_select_bwd_kernel, backward=True, flags=("RELU",), variants=branch_variants),
    # Training-mode BatchNorm + ReLU of the branches (kernels/batchnorm.py): the batch statistics, then the
    # select and fuse backward passes. The select pass holds 5M float32 accumulators: backward tiles.
    # Two float32 accumulator tiles (mean, M2) per branch: half the forward tile, and a register budget above
    # the one ptxas picks for itself, under which a few sm_80 variants spilled 4-8 bytes.
    "bn_stats": Family(kernels.sk_bn_stats_kernel, backward=False, variants=branch_variants,
                       default=Config(tile_bytes=4096, num_warps=8, num_stages=3, programs_per_sm=16, maxnreg=168)),
    "select_bn_bwd": Family(kernels.sk_select_bn_bwd_kernel, backward=True, variants=branch_variants),
    "fuse_bn_bwd": Family(kernels.sk_fuse_bn_bwd_kernel, backward=True, variants=branch_variants),
    # The eval-mode split convolution (kernels/split.py); tile_bytes: its float32 accumulator tile [BLOCK_P, BLOCK_C].
    "split_fwd": Family(kernels.sk_split_fwd_kernel, backward=False, variants=split_variants, streaming=False,
                        default=Config(tile_bytes=8192, num_warps=8, num_stages=1, programs_per_sm=8, maxnreg=168)),
}

# The untuned defaults. Backward kernels stream 2M + 1 tensors (and the select backward holds M float32
# accumulators), hence smaller tiles for more branches.
FORWARD_DEFAULT = Config(tile_bytes=8192, num_warps=8, num_stages=3, programs_per_sm=16)
BACKWARD_DEFAULTS = {
    2: Config(tile_bytes=4096, num_warps=8, num_stages=3, programs_per_sm=16),
    3: Config(tile_bytes=2048, num_warps=8, num_stages=3, programs_per_sm=16),
    4: Config(tile_bytes=2048, num_warps=8, num_stages=3, programs_per_sm=16),
}


def default_config(family: str, M: int) -> Config:
    """The configuration of ``family`` for M branches where no tuned table applies."""
    f = FAMILIES[family]
    if f.default is not None:
        return f.default
    return BACKWARD_DEFAULTS[M] if f.backward else FORWARD_DEFAULT


# --------------------------------------------------------------------------------------------------------
# Tuned tables.


@dataclass(frozen=True)
class TunedEntry:
    """The best configuration perf/tune.py measured for one problem."""

    family: str
    dtype: str  # "fp32", "fp16", "bf16"
    channels_last: bool
    M: int
    B: int
    C: int
    HW: int
    config: Config


DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def arch_name(device: torch.device) -> Optional[str]:
    """``sm_<major><minor>`` of a CUDA device, None for any other device."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def read_table(path: Path) -> list[TunedEntry]:
    """The entries of one tuned table (a JSON file written by perf/tune.py)."""
    data = json.loads(path.read_text())
    return [TunedEntry(**{**e, "config": Config(**e["config"])}) for e in data["entries"]]


@functools.lru_cache(maxsize=None)
def tuned_table(arch: Optional[str]) -> tuple[TunedEntry, ...]:
    """The tuned table for ``arch``; empty where none was written."""
    path = TUNED_DIR / f"{arch}.json"
    return tuple(read_table(path)) if arch and path.exists() else ()


def tuned_tables() -> dict[str, tuple[TunedEntry, ...]]:
    """Every tuned table in the package, by architecture."""
    return {path.stem: tuned_table(path.stem) for path in sorted(TUNED_DIR.glob("sm_*.json"))}


# Set by :func:`forcing_config`: (the family it applies to, None for every family; the configuration).
_forced: Optional[tuple[Optional[str], Config]] = None


@contextlib.contextmanager
def forcing_config(config: Config, family: Optional[str] = None) -> Iterator[None]:
    """Launch ``family``'s kernels (every family's, by default) with ``config`` inside the block, whatever
    the tables say (perf/tune.py times its candidates this way).

    :func:`plan` is cached, so its cache is emptied on entry and on exit: plans made inside the block
    never leak out of it. Compiled graphs (``torch.compile``) keep the plans they were traced with.
    """
    global _forced
    previous, _forced = _forced, (family, config)
    plan.cache_clear()
    try:
        yield
    finally:
        _forced = previous
        plan.cache_clear()


def choose_config(
    table: Sequence[TunedEntry], family: str, dtype: torch.dtype, channels_last: bool, M: int, B: int, C: int, HW: int
) -> Config:
    """The configuration measured for the nearest problem of the same kind (family, dtype, layout, M), by
    distance in log B, log C, log H*W; the default where the table has none of that kind; the forced one
    inside :func:`forcing_config`."""
    if _forced is not None and _forced[0] in (None, family):
        return _forced[1]
    name = DTYPE_NAMES[dtype]
    kind = [e for e in table if (e.family, e.dtype, e.channels_last, e.M) == (family, name, channels_last, M)]
    if not kind:
        return default_config(family, M)

    def distance(e: TunedEntry) -> float:
        return sum(abs(math.log(a / b)) for a, b in ((e.B, max(B, 1)), (e.C, C), (e.HW, HW)))

    return min(kind, key=distance).config


def split_measured_faster(
    device: torch.device, dtype: torch.dtype, channels_last: bool, M: int, C: int, HW: int
) -> bool:
    """Whether this device's tuned table has a "split_fwd" entry for exactly this kind and shape (dtype,
    layout, M, C, output positions HW): perf/tune.py writes one only where the split kernel beat the cuDNN
    convolutions + BatchNorm + ReLU + fuse it replaces."""
    name = DTYPE_NAMES.get(dtype)
    return any(
        (e.family, e.dtype, e.channels_last, e.M, e.C, e.HW) == ("split_fwd", name, channels_last, M, C, HW)
        for e in tuned_table(arch_name(device))
    )


# --------------------------------------------------------------------------------------------------------
# Work decomposition.


@dataclass(frozen=True)
class Plan:
    """One launch: a (B, num_c_blocks, num_splits) grid of programs and the kernel's launch options."""

    block_c: int
    block_hw: int
    num_c_blocks: int
    num_splits: int
    chunk: int  # positions per split, a multiple of block_hw
    options: dict  # Triton's launch options (num_warps, num_stages, ...)


def tile_shape(channels_last: bool, C: int, HW: int, tile: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_HW) for a tile of ``tile`` elements."""
    if channels_last:
        block_c = next((b for b in CHANNELS_LAST_BLOCK_C if b >= C), CHANNELS_LAST_BLOCK_C[-1])
        return block_c, tile // block_c

    def padding(block_hw):
        return -HW % block_hw

    block_hw = next((b for b in NCHW_BLOCK_HW if 16 * padding(b) <= HW), None)
    if block_hw is None:
        block_hw = min(NCHW_BLOCK_HW, key=lambda b: (padding(b), -b))
    return tile // block_hw, block_hw


def reachable_tile_shapes(tile: int) -> list[tuple[bool, int, int]]:
    """Every (CHANNELS_LAST, BLOCK_C, BLOCK_HW) that :func:`tile_shape` can return for this tile."""
    return [(True, b, tile // b) for b in CHANNELS_LAST_BLOCK_C] + [(False, tile // b, b) for b in NCHW_BLOCK_HW]


def min_programs(device: torch.device, config: Config) -> int:
    """How many programs a launch should have at least, when the shape allows."""
    if device.type == "cuda":
        return config.programs_per_sm * torch.cuda.get_device_properties(device).multi_processor_count
    return CPU_MIN_PROGRAMS


@functools.lru_cache(maxsize=4096)
def plan(
    family: str, B: int, C: int, HW: int, M: int, dtype: torch.dtype, channels_last: bool,
    device: torch.device, deterministic: bool = False,
) -> Plan:
    """Cut [B, C, HW] into tiles and the H*W axis into as few chunks as fill the device.

    ``deterministic`` (``torch.use_deterministic_algorithms``) keeps one chunk per image and channel
    block, so that no two programs add into the same output element and results repeat bitwise.
    """
    config = choose_config(tuned_table(arch_name(device)), family, dtype, channels_last, M, B, C, HW)
    block_c, block_hw = tile_shape(channels_last, C, HW, config.tile_bytes // dtype.itemsize)
    num_c_blocks = math.ceil(C / block_c)
    num_splits, chunk = chunking(B * num_c_blocks, HW, block_hw, device, config, deterministic)
    return Plan(block_c, block_hw, num_c_blocks, num_splits, chunk, config.options())


def chunking(
    programs: int, length: int, block: int, device: torch.device, config: Config, deterministic: bool
) -> tuple[int, int]:
    """(number of chunks, chunk length, a multiple of ``block``) of an axis of ``length`` positions, cut into
    as few chunks as give ``programs`` programs per chunk enough to fill the device; one chunk when
    ``deterministic``."""
    blocks = math.ceil(length / block)
    wanted = 1 if deterministic else math.ceil(min_programs(device, config) / max(1, programs))
    chunk = math.ceil(blocks / max(1, min(wanted, blocks))) * block
    return math.ceil(length / chunk), chunk


# --------------------------------------------------------------------------------------------------------
# The launch pattern.


@dataclass(frozen=True)
class Job:
    """The branches as the kernels read them (see :func:`sknet_triton.layout.kernel_views`) and their shape."""

    views: list[Tensor]
    channels_last: bool
    batch_stride: int

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.views[0].shape)


def job(branches: Sequence[Tensor]) -> Job:
    """Resolve the branches of one op call for its launches."""
    return Job(*kernel_views(branches))


@dataclass(frozen=True)
class Launch:
    """One kernel launch as :func:`recording` captures it: the arguments, constexprs and options."""

    family: str
    args: tuple
    constexprs: dict
    options: dict = field(default_factory=dict)


_recorded: Optional[list[Launch]] = None


@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """Capture launches instead of running them (for the ahead-of-time compile check, on meta tensors)."""
    global _recorded
    _recorded, previous = [], _recorded
    try:
        yield _recorded
    finally:
        _recorded = previous


def _grad_pointers(j: Job, grad_views: list[Tensor]) -> list[Tensor]:
    """The four gradient pointers: the M gradients, then the first branch for the unused ones (never
    written). An input, not another output: under torch.compile, one output tensor passed as two
    arguments would leave functionalization unsure which of them holds its value."""
    return grad_views + [j.views[0]] * (kernels.MAX_BRANCHES - len(grad_views))


def _prologue(scale: Optional[Tensor], bias: Optional[Tensor], j: Job):
    """AFFINE flag and float32 [M, C] scale and bias; without a prologue, the first branch stands in for
    both pointers (never read), so no call allocates a placeholder."""
    if scale is None and bias is None:
        return False, j.views[0], j.views[0]
    M, C = len(j.views), j.shape[1]
    device = j.views[0].device
    scale = torch.ones(M, C, device=device) if scale is None else scale.float().contiguous()
    bias = torch.zeros(M, C, device=device) if bias is None else bias.float().contiguous()
    return True, scale, bias


def _plan(family: str, j: Job) -> Plan:
    """The plan of ``family``'s launch over the branches of ``j``."""
    B, C, H, W = j.shape
    u = j.views[0]
    return plan(family, B, C, H * W, len(j.views), u.dtype, j.channels_last, u.device,
                torch.are_deterministic_algorithms_enabled())


def _launch(family: str, j: Job, scale: Optional[Tensor], bias: Optional[Tensor], *args, **flags) -> None:
    """Launch ``family``'s kernel over the branches of ``j``; ``args`` and ``flags`` are the kernel's own."""
    B, C, H, W = j.shape
    M, u = len(j.views), j.views[0]
    p = _plan(family, j)
    affine, scale, bias = _prologue(scale, bias, j)
    pointers = list(j.views) + [u] * (kernels.MAX_BRANCHES - M)
    all_args = (*pointers, scale, bias, *args, C, H * W, j.batch_stride, p.chunk)
    constexprs = dict(M=M, AFFINE=affine, CHANNELS_LAST=j.channels_last, BLOCK_C=p.block_c, BLOCK_HW=p.block_hw,
                      **flags)
    options = p.options
    start(family, (B, p.num_c_blocks, p.num_splits), all_args, constexprs, options)


def start(family: str, grid: tuple, args: tuple, constexprs: dict, options: dict) -> None:
    """Start one kernel of ``family``: every launch goes through here (or is recorded, see :func:`recording`)."""
    if _recorded is not None:
        _recorded.append(Launch(family, args, constexprs, options))
        return
    kernel = FAMILIES[family].kernel
    if not INTERPRETED:  # a plain launch in eager mode; a traceable one under torch.compile
        kernel = torch.library.wrap_triton(kernel)
    kernel[grid](*args, **constexprs, **options)


# --------------------------------------------------------------------------------------------------------
# The ops' launchers.


def fuse_forward(branches: Sequence[Tensor], scale: Optional[Tensor], bias: Optional[Tensor], relu: bool) -> Tensor:
    """s [B, C] float32 = mean over (h, w) of sum over m of P_m. See kernels/fuse.py."""
    j = job(branches)
    B, C = j.shape[:2]
    s = torch.zeros(B, C, dtype=torch.float32, device=j.views[0].device)
    if B:
        _launch("fuse_fwd", j, scale, bias, s, RELU=relu)
    return s


def fuse_relu_backward(
    grad_s: Tensor, branches: Sequence[Tensor], scale: Optional[Tensor], bias: Optional[Tensor]
) -> list[Tensor]:
    """Branch gradients of :func:`fuse_forward` with relu=True, structured as ``branches``."""
    j = job(branches)
    grads = empty_branch_grads(branches, j.channels_last)
    if j.shape[0]:
        grad_views = branch_views(grads)
        _launch("fuse_bwd", j, scale, bias, grad_s.float().contiguous(), *_grad_pointers(j, grad_views),
                grad_views[0].stride(0))
    return grads


def select_forward(
    branches: Sequence[Tensor], logits: Tensor, scale: Optional[Tensor], bias: Optional[Tensor], relu: bool
) -> Tensor:
    """out [B, C, H, W] = sum over m of softmax(logits)[:, m] * P_m, dense in the branches' layout."""
    j = job(branches)
    out = empty_images(j.views[0], j.channels_last)
    if j.shape[0]:
        _launch("select_fwd", j, scale, bias, logits.contiguous(), out, out.stride(0), RELU=relu)
    return out


def select_backward(
    grad_out: Tensor,
    branches: Sequence[Tensor],
    logits: Tensor,
    scale: Optional[Tensor],
    bias: Optional[Tensor],
    relu: bool,
) -> list[Tensor]:
    """Gradients of :func:`select_forward`: the branch gradients structured as ``branches``, then dlogits."""
    j = job(branches)
    grads = empty_branch_grads(branches, j.channels_last)
    dlogits = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
    if j.shape[0]:
        fmt = torch.channels_last if j.channels_last else torch.contiguous_format
        grad_out = grad_out.contiguous(memory_format=fmt)
        grad_views = branch_views(grads)
        _launch(
            "select_bwd", j, scale, bias, logits.contiguous(), grad_out, *_grad_pointers(j, grad_views), dlogits,
            grad_out.stride(0), grad_views[0].stride(0), RELU=relu,
        )
    return grads + [dlogits.to(logits.dtype)]


def split_block_p(config: Config, block_c: int) -> int:
    """BLOCK_P of the split kernel: the positions of a float32 [BLOCK_P, BLOCK_C] tile of config.tile_bytes."""
    return max(DOT_MIN, config.tile_bytes // 4 // block_c)


def split_forward(
    x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor, stride: int, split_input: bool
) -> tuple[Tensor, Tensor]:
    """(branches [B, M, C, Ho, Wo], s [B, C] float32) of the split in eval mode. See kernels/split.py.

    Each branch image is dense in x's layout (channels_last, else contiguous NCHW; x with other strides is
    copied once), so that :func:`select_forward` reads the M views in place.
    """
    channels_last = image_layout(x) is True
    if image_layout(x) is None:
        x = x.contiguous()
    B, C_in, H, W = x.shape
    M, C, group_in = weight.shape[:3]
    groups = (C_in // M if split_input else C_in) // group_in
    group_out = C // groups
    Ho, Wo = (H - 1) // stride + 1, (W - 1) // stride + 1
    branches = empty_stacked((B, M, C, Ho, Wo), x.dtype, x.device, channels_last)
    s = torch.zeros(B, C, dtype=torch.float32, device=x.device)
    if not B:
        return branches, s

    config = choose_config(tuned_table(arch_name(x.device)), "split_fwd", x.dtype, channels_last, M, B, C, Ho * Wo)
    use_dot = group_out >= DOT_MIN and 9 * group_in >= DOT_MIN
    if use_dot:
        block_c = next((b for b in SPLIT_DOT_BLOCK_C if b >= group_out), SPLIT_DOT_BLOCK_C[-1])
        block_k = next((b for b in SPLIT_DOT_BLOCK_K if b >= group_in), SPLIT_DOT_BLOCK_K[-1])
        num_c_blocks = groups * math.ceil(group_out / block_c)
    else:
        block_c, block_k = SPLIT_FMA_BLOCK_C[channels_last], SPLIT_FMA_BLOCK_K
        num_c_blocks = math.ceil(C / block_c)
    block_p = split_block_p(config, block_c)
    num_splits, chunk = chunking(B * num_c_blocks, Ho * Wo, block_p, x.device, config,
                                 torch.are_deterministic_algorithms_enabled())
    # [M, 3, 3, group_in, C]: each (branch, tap, input channel) a contiguous row over the output channels.
    taps_first = weight.permute(0, 3, 4, 2, 1).contiguous()
    args = (
        x, taps_first, scale.float().contiguous(), bias.float().contiguous(), branches, s,
        C_in, H, W, C, Ho, Wo, group_in, group_out, C_in // M if split_input else 0, stride, M,
        x.stride(0), branches.stride(0), branches.stride(1), chunk,
    )
    constexprs = dict(CHANNELS_LAST=channels_last, USE_DOT=use_dot, BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_K=block_k)
    options = config.options()
    start("split_fwd", (B, num_c_blocks, num_splits), args, constexprs, options)
    return branches, s


# --------------------------------------------------------------------------------------------------------
# Training-mode BatchNorm + ReLU of the branches inside the kernels (kernels/batchnorm.py). The statistics
# travel as one float32 [5, M, C] tensor, rows indexed by these names.

BN_SCALE, BN_SHIFT, BN_MEAN, BN_RSTD, BN_VAR = range(5)
# Select's backward hands fuse's backward a float32 [5, B, M, C] tensor: the logits, then the four sums of
# kernels/batchnorm.py (a_m * sum dV [P > 0], a_m * sum dV [P > 0] x_hat, sum [P > 0], sum [P > 0] x_hat).
HANDOFF_ROWS = 5


def batch_norm_statistics(branches: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Each raw branch's per-channel batch mean and biased variance over (B, H, W): float32 [M, C] each.

    The kernel leaves one (mean, M2) per program; they are combined here with Chan's formula, as the
    kernel combines its tiles."""
    j = job(branches)
    B, C, H, W = j.shape
    M, device = len(j.views), j.views[0].device
    p = _plan("bn_stats", j)
    partial_mean = torch.empty(M, B * p.num_splits, C, dtype=torch.float32, device=device)
    partial_m2 = torch.empty_like(partial_mean)
    if B:
        _launch("bn_stats", j, None, None, partial_mean, partial_m2)
    # Positions each split of H*W covers (the last may be short); partial b * num_splits + k is split k.
    split_counts = (H * W - torch.arange(p.num_splits, device=device) * p.chunk).clamp(max=p.chunk).float()
    counts = split_counts.repeat(B)[None, :, None]
    total = B * H * W
    mean = (partial_mean * counts).sum(1) / total
    m2 = partial_m2.sum(1) + (counts * (partial_mean - mean[:, None]).square()).sum(1)
    return mean, m2 / total


def batch_norm_train_forward(
    branches: Sequence[Tensor], weight: Optional[Tensor], bias: Optional[Tensor], eps: float
) -> tuple[Tensor, Tensor]:
    """s [B, C] float32 of the branches after BatchNorm with their batch statistics and ReLU, and those
    statistics as float32 [5, M, C] (rows BN_SCALE, BN_SHIFT, BN_MEAN, BN_RSTD, BN_VAR)."""
    mean, var = batch_norm_statistics(branches)
    rstd = torch.rsqrt(var + eps)
    scale = rstd if weight is None else rstd * weight.float()
    shift = -mean * scale if bias is None else bias.float() - mean * scale
    s = fuse_forward(branches, scale, shift, True)
    return s, torch.stack([scale, shift, mean, rstd, var])


def select_bn_backward(grad_out: Tensor, branches: Sequence[Tensor], logits: Tensor, stats: Tensor) -> tuple[Tensor, Tensor]:
    """Pass A: dlogits (in the logits' dtype) of the select over BatchNorm + ReLU branches, and the float32
    [5, B, M, C] handoff for :func:`fuse_bn_backward`."""
    j = job(branches)
    B, C = j.shape[:2]
    M = len(j.views)
    dlogits = torch.zeros(B, M, C, dtype=torch.float32, device=logits.device)
    handoff = torch.zeros(HANDOFF_ROWS, B, M, C, dtype=torch.float32, device=logits.device)
    handoff[0].copy_(logits)
    if B:
        fmt = torch.channels_last if j.channels_last else torch.contiguous_format
        grad_out = grad_out.contiguous(memory_format=fmt)
        _launch(
            "select_bn_bwd", j, stats[BN_SCALE], stats[BN_SHIFT], stats[BN_MEAN], stats[BN_RSTD],
            logits.contiguous(), grad_out, dlogits, handoff[1:], grad_out.stride(0),
        )
    return dlogits.to(logits.dtype), handoff


def fuse_bn_backward(
    grad_s: Tensor, grad_out: Tensor, branches: Sequence[Tensor], stats: Tensor, handoff: Tensor
) -> tuple[list[Tensor], Tensor, Tensor]:
    """Pass B: the raw branches' gradients (structured as ``branches``) through BatchNorm with batch
    statistics, ReLU, fuse and select, and float32 [M, C] dgamma, dbeta."""
    j = job(branches)
    B, C, H, W = j.shape
    logits, dv_active, dv_x_hat_active, active, x_hat_active = handoff
    grad_position = (grad_s.float() / (H * W))[:, None]  # ds / HW: fuse's part of dP, [B, 1, C]
    dbeta = (dv_active + grad_position * active).sum(0)
    dgamma = (dv_x_hat_active + grad_position * x_hat_active).sum(0)
    # dY = scale * (dZ - dbeta / n - x_hat * dgamma / n), x_hat = (Y - mean) * rstd: scale * dZ + alpha * Y + offset.
    scale, mean, rstd = stats[BN_SCALE], stats[BN_MEAN], stats[BN_RSTD]
    total = B * H * W
    alpha = -scale * rstd * dgamma / total
    offset = -scale * dbeta / total - alpha * mean
    grads = empty_branch_grads(branches, j.channels_last)
    if B:
        fmt = torch.channels_last if j.channels_last else torch.contiguous_format
        grad_out = grad_out.contiguous(memory_format=fmt)
        grad_views = branch_views(grads)
        _launch(
            "fuse_bn_bwd", j, scale, stats[BN_SHIFT], alpha.contiguous(), offset.contiguous(), logits,
            grad_s.float().contiguous(), grad_out, *_grad_pointers(j, grad_views), grad_out.stride(0),
            grad_views[0].stride(0),
        )
    return grads, dgamma, dbeta


# --------------------------------------------------------------------------------------------------------
# What can be launched, for the ahead-of-time compile check.


def example_launches(dtype: torch.dtype, M: int) -> list[Launch]:
    """Recorded launches of every family for M branches of ``dtype``, without and with a prologue, on meta
    tensors: the argument types each launch passes."""
    meta = torch.device("meta")
    branches = [torch.empty(2, 8, 4, 4, dtype=dtype, device=meta) for _ in range(M)]
    logits = torch.empty(2, M, 8, dtype=dtype, device=meta)
    grad_s, grad_out = torch.empty(2, 8, device=meta), torch.empty(2, 8, 4, 4, dtype=dtype, device=meta)
    stats, handoff = torch.empty(5, M, 8, device=meta), torch.empty(HANDOFF_ROWS, 2, M, 8, device=meta)
    x, weight = torch.empty(2, 8, 4, 4, dtype=dtype, device=meta), torch.empty(M, 8, 8, 3, 3, dtype=dtype, device=meta)
    with recording() as launches:
        for prologue in (None, torch.empty(M, 8, device=meta)):
            fuse_forward(branches, prologue, prologue, False)
            fuse_relu_backward(grad_s, branches, prologue, prologue)
            select_forward(branches, logits, prologue, prologue, False)
            select_backward(grad_out, branches, logits, prologue, prologue, False)
        batch_norm_statistics(branches)
        select_bn_backward(grad_out, branches, logits, stats)
        fuse_bn_backward(grad_s, grad_out, branches, stats, handoff)
        split_forward(x, weight, torch.empty(M, 8, device=meta), torch.empty(M, 8, device=meta), 1, False)
    return launches


def reachable_configs(family: str, M: int) -> set[Config]:
    """The configurations :func:`plan` can choose for ``family`` and M: the default and every tuned one."""
    tuned = {e.config for table in tuned_tables().values() for e in table if (e.family, e.M) == (family, M)}
    return {default_config(family, M)} | tuned


@dataclass(frozen=True)
class Specialization:
    """One compiled variant of a kernel: a recorded launch's arguments with one set of constexprs and options."""

    family: str
    args: tuple
    constexprs: dict
    options: dict

    @property
    def kernel(self):
        return FAMILIES[self.family].kernel

    @property
    def name(self) -> str:
        flags = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in self.constexprs.items())
        options = ",".join(f"{k}={v}" for k, v in self.options.items())
        dtype = DTYPE_NAMES[self.args[0].dtype]
        return f"{self.kernel.__name__}[{dtype},{flags},{options}]"


def specializations(dtypes=tuple(DTYPE_NAMES)) -> Iterator[Specialization]:
    """Every kernel specialization the launchers above can launch, once each: each recorded launch's
    arguments (and so its AFFINE flag) with every reachable configuration and every constexpr variant
    (tile shape, layout, flags) its family's launcher can choose. (The split kernel takes M as an
    argument: its launches for different M are one specialization.)"""
    seen = set()
    for dtype, M in itertools.product(dtypes, range(2, kernels.MAX_BRANCHES + 1)):
        for recorded in example_launches(dtype, M):
            family = FAMILIES[recorded.family]
            for config in sorted(reachable_configs(recorded.family, M), key=repr):
                options = config.options()
                for variant in family.constexpr_variants(config, dtype):
                    spec = Specialization(recorded.family, recorded.args, dict(recorded.constexprs, **variant), options)
                    if spec.name not in seen:
                        seen.add(spec.name)
                        yield spec
