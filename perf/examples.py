"""Example calls of every kernel family, for the tools and the tests (never imported by the runtime): fresh
inputs of one problem, the launcher calls that reach every variant of the family's kernel, and the float64
oracle of the first (the call the tuner times). Keyed by the family's name, as
:data:`sknet_triton.families.FAMILIES` is; a test keeps the two keyed alike.

perf/aot.py compiles what these calls launch, perf/tune.py times and verifies the first, perf/ops.py
measures the host's share, and tests/test_launch.py checks each against its oracle.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from sknet_triton import reference
from sknet_triton.layout import branch_views
from sknet_triton.ops.batchnorm import (
    batch_norm_statistics, fold_statistics, fuse_bn_backward, select_bn_backward,
)
from sknet_triton.ops.fuse import fuse_forward, fuse_relu_backward
from sknet_triton.ops.select import select_backward, select_forward
from sknet_triton.ops.split import split_forward

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


def _prologues(i: dict) -> list[tuple]:
    """(scale, bias, relu) of every prologue: none first (the tuned call), then ReLU, affine, both."""
    return [(scale, bias, relu) for scale, bias in ((None, None), (i["scale"], i["bias"])) for relu in (False, True)]


def _batch_norm_inputs(p: Problem, generator: torch.Generator) -> dict:
    """Branch inputs with BatchNorm's affine parameters float32 [M, C], the float32 [5, M, C] statistics of
    the branches (sknet_triton.ops.batchnorm's rows) and select's float32 handoff to fuse's backward."""
    i = branch_inputs(p, generator)
    i["weight"], i["beta"] = _normal(generator, p.M, p.C).abs() + 0.5, _normal(generator, p.M, p.C) * 0.1
    _, mean, var = reference.batch_norm_relu(branch_views(i["branches"]))
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
    return [reference.sk_fuse(_float64(branch_views(i["branches"])))]


def _fuse_relu_backward_reference(i: dict) -> list[Tensor]:
    leaves = _leaves(branch_views(i["branches"]))
    s = reference.sk_fuse(leaves, i["scale"].double(), i["bias"].double(), True)
    return list(torch.autograd.grad(s, leaves, i["grad_s"].double()))


def _select_reference(i: dict) -> list[Tensor]:
    return [reference.sk_select(_float64(branch_views(i["branches"])), i["logits"].double())]


def _select_backward_reference(i: dict) -> list[Tensor]:
    leaves = _leaves(branch_views(i["branches"]))
    logits = i["logits"].detach().double().requires_grad_()
    out = reference.sk_select(leaves, logits)
    return list(torch.autograd.grad(out, leaves + [logits], i["grad_out"].double()))


def _bn_stats_reference(i: dict) -> list[Tensor]:
    _, mean, var = reference.batch_norm_relu(_float64(branch_views(i["branches"])))
    return [mean, var]


def _select_bn_reference(i: dict) -> list[Tensor]:
    """dlogits and the [HANDOFF_ROWS, B, M, C] handoff (sknet_triton.batchnorm's rows: the logits, then
    four sums over hw) of select over BatchNorm + ReLU branches."""
    branches = _float64(branch_views(i["branches"]))
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
    leaves = _leaves(branch_views(i["branches"]))
    weight, beta = i["weight"].double().requires_grad_(), i["beta"].double().requires_grad_()
    values, _, _ = reference.batch_norm_relu(leaves, weight, beta, BN_EPS)
    loss = (reference.sk_fuse(values) * i["grad_s"].double()).sum()
    loss = loss + (reference.sk_select(values, i["logits"].double()) * i["grad_out"].double()).sum()
    return list(torch.autograd.grad(loss, leaves + [weight, beta]))


def _split_reference(i: dict) -> list[Tensor]:
    return list(reference.sk_split(i["x"].double(), i["weights"][0].double(), i["scale"].double(),
                                   i["bias"].double(), 1, False))



# --------------------------------------------------------------------------------------------------------
# The launcher calls of each family: the tuned call first, then every other variant.


def _fuse_calls(i: dict) -> list[Callable]:
    return [lambda p=p: fuse_forward(i["branches"], *p) for p in _prologues(i)]


def _fuse_relu_backward_calls(i: dict) -> list[Callable]:
    return [lambda p=p: fuse_relu_backward(i["grad_s"], i["branches"], *p)
            for p in ((i["scale"], i["bias"]), (None, None))]


def _select_calls(i: dict) -> list[Callable]:
    return [lambda p=p: select_forward(i["branches"], i["logits"], *p) for p in _prologues(i)]


def _select_backward_calls(i: dict) -> list[Callable]:
    return [lambda p=p: select_backward(i["grad_out"], i["branches"], i["logits"], *p) for p in _prologues(i)]


def _bn_stats_calls(i: dict) -> list[Callable]:
    return [lambda: batch_norm_statistics(i["branches"])]


def _select_bn_calls(i: dict) -> list[Callable]:
    return [lambda: select_bn_backward(i["grad_out"], i["branches"], i["logits"], i["stats"])]


def _fuse_bn_backward_calls(i: dict) -> list[Callable]:
    return [lambda: fuse_bn_backward(i["grad_s"], i["grad_out"], i["branches"], i["stats"], i["handoff"])]


def _split_calls(i: dict) -> list[Callable]:
    return [lambda w=w, s=s: split_forward(i["x"], w, i["scale"], i["bias"], s, False)
            for w, s in itertools.product(i["weights"], (1, 2))]


@dataclass(frozen=True)
class Example:
    """A family's examples: fresh inputs of one problem, its launcher calls (the tuned call first) and the
    float64 results of the tuned call."""

    inputs: Callable[[Problem, torch.Generator], dict]
    calls: Callable[[dict], list[Callable[[], object]]]
    reference: Callable[[dict], list[Tensor]]


EXAMPLES = {
    "fuse_fwd": Example(branch_inputs, _fuse_calls, _fuse_reference),
    "fuse_bwd": Example(branch_inputs, _fuse_relu_backward_calls, _fuse_relu_backward_reference),
    "select_fwd": Example(branch_inputs, _select_calls, _select_reference),
    "select_bwd": Example(branch_inputs, _select_backward_calls, _select_backward_reference),
    "bn_stats": Example(branch_inputs, _bn_stats_calls, _bn_stats_reference),
    "select_bn_bwd": Example(_batch_norm_inputs, _select_bn_calls, _select_bn_reference),
    "fuse_bn_bwd": Example(_batch_norm_inputs, _fuse_bn_backward_calls, _fuse_bn_backward_reference),
    "split_fwd": Example(_split_inputs, _split_calls, _split_reference),
}


def problem_inputs(family: str, problem: Problem, device: torch.device, seed: int) -> dict:
    """Fresh inputs of ``problem`` for ``family``'s calls, on ``device``, from ``seed``."""
    return EXAMPLES[family].inputs(problem, torch.Generator(device=device).manual_seed(seed))


def flatten(result) -> list[Tensor]:
    """A launcher's result (a tensor, or tuples and lists of them) as a flat list of tensors."""
    if isinstance(result, Tensor):
        return [result]
    return [t for item in result for t in flatten(item)]
