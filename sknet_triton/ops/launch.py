"""What every op family shares: the :class:`Family` declaration, the one launch pattern over the branches,
:func:`start`, the rule that picks an eager call's path, and the operator registration.

Each op module (:mod:`.fuse`, :mod:`.select`, :mod:`.batchnorm`, :mod:`.split`) declares its kernel families
as :class:`Family` entries, validates its inputs once, and launches through :func:`launch_branches` (the
kernels over the branches, whose leading and trailing arguments are shared: ``kernels/tile.py``) or
:func:`start` directly (the split kernel). A launch is a plan (:func:`sknet_triton.planning.plan`: the
tuned table of this GPU's architecture, else the family's default, cut into programs), the kernel's
arguments, and :func:`start`.

How a call reaches its launcher (:func:`runs_eagerly`): eager calls on plain tensors call it directly, and
where autograd must record the call, through an ``autograd.Function`` over the same launchers; everything
traced (``torch.compile``, ``torch.export``, ``make_fx``, functorch) goes through the registered
``torch.library`` operator (:func:`operator`), whose launches ``torch.compile`` emits in its own code.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from sknet_triton.device import INTERPRETED
from sknet_triton.layout import channels_last_line, kernel_views
from sknet_triton.planning import plan
from sknet_triton.tiles import reachable_tile_shapes
from sknet_triton.tuned import Config

# The kernels take the branches as this many pointers (kernels/tile.py's BRANCH_ARGS; a test ties them).
MAX_BRANCHES = 4
BRANCH_COUNTS = range(2, MAX_BRANCHES + 1)
# The untuned defaults. Backward kernels stream 2M + 1 tensors (and the select backward holds M float32
# accumulators), hence smaller tiles for more branches.
FORWARD_DEFAULT = Config(tile_bytes=8192, num_warps=8, num_stages=3, programs_per_sm=16)
FORWARD_DEFAULTS = {M: FORWARD_DEFAULT for M in BRANCH_COUNTS}
BACKWARD_DEFAULTS = {
    2: Config(tile_bytes=4096, num_warps=8, num_stages=3, programs_per_sm=16),
    3: Config(tile_bytes=2048, num_warps=8, num_stages=3, programs_per_sm=16),
    4: Config(tile_bytes=2048, num_warps=8, num_stages=3, programs_per_sm=16),
}


@dataclass(frozen=True, eq=False)
class Family:
    """One kernel family, declared once beside its op: the kernel, the launcher that starts it, and its launch
    facts. Everything that loops over kernels (the ahead-of-time check, the tuner, the op table, the launch
    tests) reads :data:`sknet_triton.families.FAMILIES`, the tuple of these. Compared and hashed by identity:
    plans are cached per family object."""

    name: str  # the tuned tables' and the tools' name of the family
    kernel: object  # the @triton.jit function
    launcher: Callable  # the function of the op module that launches it, on validated inputs
    defaults: Mapping[int, Config]  # the untuned configuration for M branches
    variants: Callable[["Family", Config, torch.dtype], list[dict]]  # every constexpr set one config compiles to
    passes: Callable[[int], int]  # the least passes over one branch of the problem's elements, for M branches
    # Streams a backward pass's 2M + 1 tensors or holds float32 accumulator tiles: the tuner sweeps smaller tiles.
    small_tiles: bool = False
    flags: tuple[str, ...] = ()  # the kernel's own boolean constexprs
    # Streams dense tiles, so the ahead-of-time check requires 16-byte loads of it. The split kernel's taps
    # start at offsets no alignment analysis can prove (position - dilation, channel + group * group_in).
    streaming: bool = True
    # Swept by perf/tune.py's grid; the split kernel is timed against the cuDNN path it replaces instead.
    swept: bool = True

    def constexpr_variants(self, config: Config, dtype: torch.dtype) -> list[dict]:
        """Every set of tile constexprs and flags the launcher can pass with ``config`` for ``dtype``."""
        return self.variants(self, config, dtype)


def branch_variants(family: Family, config: Config, dtype: torch.dtype) -> list[dict]:
    """The kernels over the branches: every reachable tile shape, channels_last ones also SLICED, with every
    value of the family's flags."""
    tiles = reachable_tile_shapes(config.tile_bytes // dtype.itemsize)
    layouts = [
        (channels_last, sliced, block_c, block_hw)
        for channels_last, block_c, block_hw in tiles
        for sliced in ((False, True) if channels_last else (False,))
    ]
    return [
        dict(CHANNELS_LAST=channels_last, SLICED=sliced, BLOCK_C=block_c, BLOCK_HW=block_hw,
             **dict(zip(family.flags, flags)))
        for (channels_last, sliced, block_c, block_hw), *flags
        in itertools.product(layouts, *[(False, True)] * len(family.flags))
    ]


# --------------------------------------------------------------------------------------------------------
# Which path a call takes, and the operators.


def runs_eagerly(t: Tensor) -> bool:
    """Whether a call on ``t`` may go straight to the launchers rather than through the registered operator:
    a plain tensor outside ``torch.compile``, ``torch.jit`` tracing and functorch transforms. The operator's
    dispatch costs the host more than the launch itself; only tracers need it."""
    return (
        type(t) is Tensor
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and not torch._C._are_functorch_transforms_active()
    )


def refuse_jit_trace() -> None:
    """Raise RuntimeError while ``torch.jit.trace`` records a computation that would run the kernels
    (an SK unit's, or a fused op's in a torch.fx graph): the trace would hold sknet_triton's custom ops, which
    run only where sknet_triton is imported."""
    if torch.jit.is_tracing():
        raise RuntimeError(
            "sknet_triton: torch.jit.trace would record the Triton kernels as sknet_triton custom ops, which run "
            "only where sknet_triton is imported; call sknet_triton.set_backend(model, \"torch\") before tracing "
            "to trace plain PyTorch operations"
        )


def records_grad(tensors: Sequence[Optional[Tensor]]) -> bool:
    """Whether autograd records a call on ``tensors``: grad mode is on and one of them requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def operator(name: str, fake: Callable):
    """Register the decorated launcher as ``sknet_triton::<name>``: a ``triton_op`` where the kernels are
    compiled (its fake is the launcher itself, traced), else a custom op with the ``fake`` shape function
    (the interpreter cannot run on fake tensors)."""

    def register(launcher: Callable):
        if not INTERPRETED:
            return torch.library.triton_op(f"sknet_triton::{name}", launcher, mutates_args=())
        op = torch.library.custom_op(f"sknet_triton::{name}", launcher, mutates_args=())
        op.register_fake(fake)
        return op

    return register


# --------------------------------------------------------------------------------------------------------
# The launch pattern.


@dataclass(frozen=True)
class Job:
    """The branches of one op call as the kernels read them (see :func:`sknet_triton.layout.kernel_views`)."""

    views: list[Tensor]
    channels_last: bool
    batch_stride: int
    line: int  # the position stride in channels_last; C where the images are dense

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.views[0].shape)

    @property
    def sliced(self) -> bool:
        """Whether the branches are channel slices of wider channels_last tensors: the kernels' SLICED."""
        return self.channels_last and self.line != self.shape[1]

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def grad_pointers(self, grad_views: list[Tensor]) -> list[Tensor]:
        """The four gradient pointers: the M gradients, then the first branch for the unused ones (never
        written). An input, not another output: under torch.compile, one output tensor passed as two
        arguments would leave functionalization unsure which of them holds its value."""
        return grad_views + [self.views[0]] * (MAX_BRANCHES - len(grad_views))

    def grad_strides(self, grad_views: list[Tensor]) -> tuple[int, int]:
        """``stride_du, line_du`` of the gradients :func:`sknet_triton.layout.empty_branch_grads` gave: dense
        images, or the branches' own strides (a stacked tensor read in place), so sliced only if they are."""
        C = self.shape[1]
        line = channels_last_line(grad_views[0]) if self.channels_last else C
        if line != C and not self.sliced:
            raise RuntimeError("sknet_triton: sliced branch gradients of branches read as dense images")
        return grad_views[0].stride(0), line


def job(branches: Sequence[Tensor]) -> Job:
    """Resolve the branches of one op call (M tensors, or one stacked [B, M, C, H, W]) for its launches."""
    return Job(*kernel_views(branches))


def branch_plan(family: Family, j: Job):
    """The plan of ``family``'s launch over the branches of ``j``."""
    B, C, H, W = j.shape
    u = j.views[0]
    return plan(family, B, C, H * W, len(j.views), u.dtype, j.channels_last, u.device,
                torch.are_deterministic_algorithms_enabled())


def _prologue(scale: Optional[Tensor], bias: Optional[Tensor], j: Job) -> tuple[bool, Tensor, Tensor]:
    """AFFINE flag and float32 [M, C] scale and bias; without scale and bias, the first branch stands in
    for both pointers (never read), so no call allocates a placeholder."""
    if scale is None and bias is None:
        return False, j.views[0], j.views[0]
    M, C = len(j.views), j.shape[1]
    device = j.views[0].device
    scale = torch.ones(M, C, device=device) if scale is None else scale.float().contiguous()
    bias = torch.zeros(M, C, device=device) if bias is None else bias.float().contiguous()
    return True, scale, bias


def launch_branches(family: Family, j: Job, *args, prologue: Optional[tuple] = None, **flags) -> None:
    """Launch ``family``'s kernel over the branches of ``j``; ``args`` and ``flags`` are the kernel's own
    (``kernels/tile.py``'s convention puts them between the shared leading and trailing arguments).
    ``prologue``: (scale, bias) for a family with a prologue (either may be None), None for one without."""
    B, C, H, W = j.shape
    M = len(j.views)
    p = branch_plan(family, j)
    pointers = list(j.views) + [j.views[0]] * (MAX_BRANCHES - M)
    prologue_flag = {}
    if prologue is not None:
        affine, scale, bias = _prologue(*prologue, j)
        pointers += [scale, bias]
        prologue_flag = dict(AFFINE=affine)
    constexprs = dict(M=M, **prologue_flag, CHANNELS_LAST=j.channels_last, SLICED=j.sliced, BLOCK_C=p.block_c,
                      BLOCK_HW=p.block_hw, **flags)
    start(family, (B, p.num_c_blocks, p.num_splits), (*pointers, *args, C, H * W, j.batch_stride, j.line, p.chunk),
          constexprs, p.options)


def start(family: Family, grid: tuple, args: tuple, constexprs: dict, options: dict) -> None:
    """Start one kernel of ``family``: every launch goes through here. A plain launch in eager mode; under
    ``torch.compile``, through ``wrap_triton``, a launch Inductor emits in its own code. (The tools capture
    launches by replacing this function: ``perf/recording.py``.)"""
    kernel = family.kernel if INTERPRETED else torch.library.wrap_triton(family.kernel)
    kernel[grid](*args, **constexprs, **options)
