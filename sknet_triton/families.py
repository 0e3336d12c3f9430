"""The kernel families: each declared once, as one :class:`Family` entry of :data:`FAMILIES`.

An entry holds everything that is particular to one kernel: the kernel, the launcher that starts it (a
function of :mod:`sknet_triton.launch`, named), its launch facts (untuned configurations, the constexpr
variants a configuration can compile to, whether it streams dense tiles), its bytes model (the least
passes over one branch it needs), how to build inputs for one problem and call the launcher on them, and
the float64 oracle of that call (from :mod:`sknet_triton.reference`). Everything that loops over kernels
derives from this registry: the planning's defaults, the ahead-of-time check's specializations
(perf/aot.py), the tuner's sweep (perf/tune.py), the op table's byte floors (perf/bytes_model.py) and the
launch tests.

Adding a family is a kernel file, an entry here, a launcher and an op, and their tests.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import Tensor

from sknet_triton import kernels, reference
from sknet_triton.batchnorm import fold_statistics
from sknet_triton.tiles import (
    SPLIT_DOT_BLOCK_C, SPLIT_DOT_BLOCK_K, SPLIT_FMA_BLOCK_C, SPLIT_FMA_BLOCK_K, reachable_tile_shapes, split_block_p,
)
from sknet_triton.tuned import Config

BRANCH_COUNTS = range(2, kernels.MAX_BRANCHES + 1)
# The untuned defaults. Backward kernels stream 2M + 1 tensors (and the select backward holds M float32
# accumulators), hence smaller tiles for more branches.
FORWARD_DEFAULT = Config(tile_bytes=8192, num_warps=8, num_stages=3, programs_per_sm=16)
BACKWARD_DEFAULTS = {
    2: Config(tile_bytes=4096, num_warps=8, num_stages=3, programs_per_sm=16),
    3: Config(tile_bytes=2048, num_warps=8, num_stages=3, programs_per_sm=16),
    4: Config(tile_bytes=2048, num_warps=8, num_stages=3, programs_per_sm=16),
}
FORWARD_DEFAULTS = {M: FORWARD_DEFAULT for M in BRANCH_COUNTS}
BN_EPS = 1e-5  # the BatchNorm problems' eps


@dataclass(frozen=True)
class Problem:
    """One problem of a kernel family: M branches [B, C, H, W] of ``dtype`` in one layout, as M tensors or
    one stacked [B, M, C, H, W] tensor. For the split kernel, the branches it writes (its input x is
    [B, C, H, W] too)."""

    B: int
    C: int
    H: int
    W: int
    M: int
    dtype: torch.dtype
    channels_last: bool
    stacked: bool = False


@dataclass(frozen=True)
class Family:
    """A kernel family: see the module docstring."""

    name: str
    kernel: object
    launcher: str  # the function of sknet_triton.launch that starts the kernel
    defaults: Mapping[int, Config]  # the untuned configuration for M branches
    variants: Callable[["Family", Config, torch.dtype], list[dict]]  # every constexpr set one config compiles to
    passes: Callable[[int], int]  # the least passes over one branch of the problem's elements, for M branches
    inputs: Callable[[Problem, torch.Generator], dict]  # fresh inputs of one problem
    calls: Callable[[dict], list[tuple]]  # launcher arguments: the tuned call first, then every other variant
    reference: Callable[[dict], list[Tensor]]  # float64 results of the tuned call
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
    """The kernels over the branches: every reachable tile shape, with every value of the family's flags."""
    tiles = reachable_tile_shapes(config.tile_bytes // dtype.itemsize)
    return [
        dict(CHANNELS_LAST=channels_last, BLOCK_C=block_c, BLOCK_HW=block_hw, **dict(zip(family.flags, flags)))
        for (channels_last, block_c, block_hw), *flags in itertools.product(tiles, *[(False, True)] * len(family.flags))
    ]


def split_variants(family: Family, config: Config, dtype: torch.dtype) -> list[dict]:
    """The split kernel: in either layout, the FMA loop's one block and every tl.dot block."""
    blocks = [(False, SPLIT_FMA_BLOCK_C[channels_last], SPLIT_FMA_BLOCK_K, channels_last) for channels_last in (False, True)]
    blocks += [(True, block_c, block_k, channels_last) for channels_last in (False, True)
               for block_c in SPLIT_DOT_BLOCK_C for block_k in SPLIT_DOT_BLOCK_K]
    return [
        dict(CHANNELS_LAST=channels_last, USE_DOT=use_dot, BLOCK_P=split_block_p(config, block_c), BLOCK_C=block_c,
             BLOCK_K=block_k)
        for use_dot, block_c, block_k, channels_last in blocks
    ]


# --------------------------------------------------------------------------------------------------------
# Inputs.


def _normal(generator: torch.Generator, *shape, dtype=torch.float32) -> Tensor:
    return torch.randn(*shape, generator=generator, device=generator.device).to(dtype)


def _images(p: Problem, generator: torch.Generator) -> Tensor:
    """One [B, C, H, W] tensor of the problem's dtype and layout."""
    memory_format = torch.channels_last if p.channels_last else torch.contiguous_format
    return _normal(generator, p.B, p.C, p.H, p.W, dtype=p.dtype).contiguous(memory_format=memory_format)


def branch_inputs(p: Problem, generator: torch.Generator) -> dict:
    """The branches (M tensors, or one stacked), logits [B, M, C], a prologue's float32 [M, C] scale (away
    from 0) and bias, and the upstream gradients ds float32 [B, C] and dV [B, C, H, W]."""
    if p.stacked:  # channels last: [B, M, H, W, C] in memory
        order = (0, 1, 3, 4, 2) if p.channels_last else (0, 1, 2, 3, 4)
        sizes = (p.B, p.M, p.C, p.H, p.W)
        stacked = _normal(generator, *[sizes[d] for d in order], dtype=p.dtype)
        branches = [stacked.permute(*[order.index(d) for d in range(5)])]
    else:
        branches = [_images(p, generator) for _ in range(p.M)]
    return {
        "branches": branches,
        "logits": _normal(generator, p.B, p.M, p.C, dtype=p.dtype),
        "scale": _normal(generator, p.M, p.C).abs() + 0.5,
        "bias": _normal(generator, p.M, p.C) * 0.1,
        "grad_s": _normal(generator, p.B, p.C),
        "grad_out": _images(p, generator),
    }


def _float64(tensors: list[Tensor]) -> list[Tensor]:
    return [t.double() for t in tensors]


def branch_list(branches: list[Tensor]) -> list[Tensor]:
    """The M branch tensors of a launcher's branches (one stacked [B, M, C, H, W] tensor, or M tensors)."""
    return list(branches[0].unbind(1)) if branches[0].dim() == 5 else list(branches)


def _prologues(i: dict) -> list[tuple]:
    """(scale, bias, relu) of every prologue: none first (the tuned call), then ReLU, affine, both."""
    return [(scale, bias, relu) for scale, bias in ((None, None), (i["scale"], i["bias"])) for relu in (False, True)]


def _batch_norm_inputs(p: Problem, generator: torch.Generator) -> dict:
    """Branch inputs with BatchNorm's affine parameters float32 [M, C], the float32 [5, M, C] statistics of
    the branches (sknet_triton.batchnorm's rows) and select's float32 handoff to fuse's backward."""
    i = branch_inputs(p, generator)
    i["weight"], i["beta"] = _normal(generator, p.M, p.C).abs() + 0.5, _normal(generator, p.M, p.C) * 0.1
    _, mean, var = reference.batch_norm_relu(branch_list(i["branches"]))
    i["stats"] = fold_statistics(mean.float(), var.float(), i["weight"], i["beta"], BN_EPS)
    i["handoff"] = _select_bn_reference(i)[1].float()
    return i


def _split_inputs(p: Problem, generator: torch.Generator) -> dict:
    """x [B, C, H, W] (stride 1 keeps the problem's H, W), the folded BatchNorm float32 [M, C], and weights
    [M, C, group_in, 3, 3] for every group width that divides C (the FMA loop and each tl.dot block)."""
    widths = sorted({g for g in (1, 4, 8, 16, 32, p.C) if p.C % g == 0}, reverse=True)
    return {
        "x": _images(p, generator),
        "weights": [_normal(generator, p.M, p.C, g, 3, 3, dtype=p.dtype) * (9 * g) ** -0.5 for g in widths],
        "scale": _normal(generator, p.M, p.C).abs() + 0.5,
        "bias": _normal(generator, p.M, p.C) * 0.1,
    }


# --------------------------------------------------------------------------------------------------------
# Float64 oracles of each family's tuned call.


def _leaves(tensors: list[Tensor]) -> list[Tensor]:
    return [t.detach().double().requires_grad_() for t in tensors]


def _fuse_reference(i: dict) -> list[Tensor]:
    return [reference.sk_fuse(_float64(branch_list(i["branches"])))]


def _fuse_relu_backward_reference(i: dict) -> list[Tensor]:
    leaves = _leaves(branch_list(i["branches"]))
    s = reference.sk_fuse(leaves, i["scale"].double(), i["bias"].double(), True)
    return list(torch.autograd.grad(s, leaves, i["grad_s"].double()))


def _select_reference(i: dict) -> list[Tensor]:
    return [reference.sk_select(_float64(branch_list(i["branches"])), i["logits"].double())]


def _select_backward_reference(i: dict) -> list[Tensor]:
    leaves = _leaves(branch_list(i["branches"]))
    logits = i["logits"].detach().double().requires_grad_()
    out = reference.sk_select(leaves, logits)
    return list(torch.autograd.grad(out, leaves + [logits], i["grad_out"].double()))


def _bn_stats_reference(i: dict) -> list[Tensor]:
    _, mean, var = reference.batch_norm_relu(_float64(branch_list(i["branches"])))
    return [mean, var]


def _select_bn_reference(i: dict) -> list[Tensor]:
    """dlogits and the [HANDOFF_ROWS, B, M, C] handoff (sknet_triton.batchnorm's rows: the logits, then
    four sums over hw) of select over BatchNorm + ReLU branches."""
    branches = _float64(branch_list(i["branches"]))
    weight, beta = i["weight"].double(), i["beta"].double()
    values, mean, var = reference.batch_norm_relu(branches, weight, beta, BN_EPS)
    logits = i["logits"].detach().double().requires_grad_()
    out = reference.sk_select([v.detach() for v in values], logits)
    [dlogits] = torch.autograd.grad(out, [logits], i["grad_out"].double())
    attention = torch.softmax(logits.detach(), dim=1)
    dv = i["grad_out"].double()
    rows = [logits.detach()]
    sums = [[], [], [], []]
    for m, (y, p) in enumerate(zip(branches, values)):
        x_hat = (y - mean[m][None, :, None, None]) * torch.rsqrt(var[m] + BN_EPS)[None, :, None, None]
        active = (p > 0).double()
        a = attention[:, m]
        for row, term in zip(sums, (a * (dv * active).sum((2, 3)), a * (dv * active * x_hat).sum((2, 3)),
                                    active.sum((2, 3)), (active * x_hat).sum((2, 3)))):
            row.append(term)
    rows += [torch.stack(row, dim=1) for row in sums]
    return [dlogits, torch.stack(rows)]


def _fuse_bn_backward_reference(i: dict) -> list[Tensor]:
    """The raw branches' gradients and dgamma, dbeta through BatchNorm with batch statistics, ReLU, fuse
    (upstream ds) and select (upstream dV)."""
    leaves = _leaves(branch_list(i["branches"]))
    weight, beta = i["weight"].double().requires_grad_(), i["beta"].double().requires_grad_()
    values, _, _ = reference.batch_norm_relu(leaves, weight, beta, BN_EPS)
    loss = (reference.sk_fuse(values) * i["grad_s"].double()).sum()
    loss = loss + (reference.sk_select(values, i["logits"].double()) * i["grad_out"].double()).sum()
    return list(torch.autograd.grad(loss, leaves + [weight, beta]))


def _split_reference(i: dict) -> list[Tensor]:
    return list(reference.sk_split(i["x"].double(), i["weights"][0].double(), i["scale"].double(),
                                   i["bias"].double(), 1, False))


# --------------------------------------------------------------------------------------------------------
# The registry.

FAMILIES = {f.name: f for f in (
    # Fuse (kernels/fuse.py): s = mean over hw of sum over m of P_m; reads the M branches.
    Family(
        "fuse_fwd", kernels.sk_fuse_fwd_kernel, "fuse_forward", FORWARD_DEFAULTS, branch_variants,
        passes=lambda M: M, inputs=branch_inputs, reference=_fuse_reference, flags=("RELU",),
        calls=lambda i: [(i["branches"], *prologue) for prologue in _prologues(i)],
    ),
    # Fuse's backward with a ReLU prologue: reads the M branches (the ReLU mask), writes M gradients.
    # Without a ReLU the gradient is a broadcast, returned as an expanded view: no kernel.
    Family(
        "fuse_bwd", kernels.sk_fuse_bwd_kernel, "fuse_relu_backward", BACKWARD_DEFAULTS, branch_variants,
        passes=lambda M: 2 * M, inputs=branch_inputs, reference=_fuse_relu_backward_reference, small_tiles=True,
        calls=lambda i: [(i["grad_s"], i["branches"], i["scale"], i["bias"]), (i["grad_s"], i["branches"], None, None)],
    ),
    # Select (kernels/select.py): reads the M branches, writes the output.
    Family(
        "select_fwd", kernels.sk_select_fwd_kernel, "select_forward", FORWARD_DEFAULTS, branch_variants,
        passes=lambda M: M + 1, inputs=branch_inputs, reference=_select_reference, flags=("RELU",),
        calls=lambda i: [(i["branches"], i["logits"], *prologue) for prologue in _prologues(i)],
    ),
    # Select's backward in one pass: reads dV and the M branches, writes the M gradients.
    Family(
        "select_bwd", kernels.sk_select_bwd_kernel, "select_backward", BACKWARD_DEFAULTS, branch_variants,
        passes=lambda M: 2 * M + 1, inputs=branch_inputs, reference=_select_backward_reference, small_tiles=True,
        flags=("RELU",),
        calls=lambda i: [(i["grad_out"], i["branches"], i["logits"], *prologue) for prologue in _prologues(i)],
    ),
    # Training-mode BatchNorm + ReLU of the branches (kernels/batchnorm.py): the batch statistics read each
    # raw branch once. Two float32 accumulator tiles (mean, M2) per branch: half the forward tile, and a
    # register budget above the one ptxas picks for itself, under which a few sm_80 variants spilled 4-8 bytes.
    Family(
        "bn_stats", kernels.sk_bn_stats_kernel, "batch_norm_statistics",
        {M: Config(tile_bytes=4096, num_warps=8, num_stages=3, programs_per_sm=16, maxnreg=168) for M in BRANCH_COUNTS},
        branch_variants, passes=lambda M: M, inputs=branch_inputs, reference=_bn_stats_reference, small_tiles=True,
        calls=lambda i: [(i["branches"],)],
    ),
    # Pass A, select's backward: reads dV and the M raw branches. It holds 5M float32 accumulators: backward tiles.
    Family(
        "select_bn_bwd", kernels.sk_select_bn_bwd_kernel, "select_bn_backward", BACKWARD_DEFAULTS, branch_variants,
        passes=lambda M: M + 1, inputs=_batch_norm_inputs, reference=_select_bn_reference, small_tiles=True,
        calls=lambda i: [(i["grad_out"], i["branches"], i["logits"], i["stats"])],
    ),
    # Pass B, fuse's backward: reads dV and the M raw branches, writes the M gradients dY_m.
    Family(
        "fuse_bn_bwd", kernels.sk_fuse_bn_bwd_kernel, "fuse_bn_backward", BACKWARD_DEFAULTS, branch_variants,
        passes=lambda M: 2 * M + 1, inputs=_batch_norm_inputs, reference=_fuse_bn_backward_reference, small_tiles=True,
        calls=lambda i: [(i["grad_s"], i["grad_out"], i["branches"], i["stats"], i["handoff"])],
    ),
    # The eval-mode split convolution (kernels/split.py): reads x about once, writes the M branches.
    # tile_bytes: its float32 accumulator tile [BLOCK_P, BLOCK_C].
    Family(
        "split_fwd", kernels.sk_split_fwd_kernel, "split_forward",
        {M: Config(tile_bytes=8192, num_warps=8, num_stages=1, programs_per_sm=8, maxnreg=168) for M in BRANCH_COUNTS},
        split_variants, passes=lambda M: M + 1, inputs=_split_inputs, reference=_split_reference,
        streaming=False, swept=False,
        calls=lambda i: [(i["x"], weight, i["scale"], i["bias"], stride, False)
                         for weight, stride in itertools.product(i["weights"], (1, 2))],
    ),
)}


def default_config(family: str, M: int) -> Config:
    """The configuration of ``family`` for M branches where no tuned table applies."""
    return FAMILIES[family].defaults[M]


def problem_inputs(family: str, problem: Problem, device: torch.device, seed: int) -> dict:
    """Fresh inputs of ``problem`` for ``family``'s calls, on ``device``, from ``seed``."""
    return FAMILIES[family].inputs(problem, torch.Generator(device=device).manual_seed(seed))


def flatten(result) -> list[Tensor]:
    """A launcher's result (a tensor, or tuples and lists of them) as a flat list of tensors."""
    if isinstance(result, Tensor):
        return [result]
    return [t for item in result for t in flatten(item)]
