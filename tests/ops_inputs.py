"""Random inputs for the op tests and the float64 oracle they are checked against."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from sknet_triton import reference
from sknet_triton.layout import branch_views
from tests.helpers import DEVICE

# Relative to the largest magnitude of the expected tensor: the kernels accumulate in float32 and round
# the result to the output dtype once.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

PROLOGUES = {
    "none": (False, False, False),  # (scale, bias, relu)
    "affine": (True, True, False),
    "relu": (False, False, True),
    "affine_relu": (True, True, True),
    "scale_only": (True, False, False),
    "bias_only": (False, True, True),
}


def make_branches(shape, M: int, dtype, channels_last: bool, stacked: bool):
    """Random branches (never zeros) as M tensors or one stacked [B, M, C, H, W] tensor, requiring grad."""
    B, C, H, W = shape
    if stacked:
        if channels_last:
            x = torch.randn(B, M, H, W, C, device=DEVICE).permute(0, 1, 4, 2, 3)
        else:
            x = torch.randn(B, M, C, H, W, device=DEVICE)
        return x.to(dtype).requires_grad_()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return [torch.randn(shape, device=DEVICE).to(dtype).to(memory_format=fmt).requires_grad_() for _ in range(M)]


def make_prologue(name: str, M: int, C: int):
    """(scale, bias, relu) for one of PROLOGUES."""
    has_scale, has_bias, relu = PROLOGUES[name]
    scale = torch.rand(M, C, device=DEVICE) + 0.5 if has_scale else None
    bias = torch.randn(M, C, device=DEVICE) * 0.5 if has_bias else None
    return scale, bias, relu


def make_logits(B: int, M: int, C: int, dtype=torch.float32):
    return (2 * torch.randn(B, M, C, device=DEVICE)).to(dtype).requires_grad_()


def as_float64(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A float64 CPU leaf copy of ``t`` (same values, requiring grad where ``t`` does)."""
    if t is None:
        return None
    return t.detach().to("cpu", torch.float64).requires_grad_(t.requires_grad)


def oracle(branches, logits, scale, bias, relu):
    """(s, out, leaves) computed by the reference in float64 on the CPU."""
    leaves = [as_float64(b) for b in (branches if isinstance(branches, list) else [branches])]
    views = branch_views(leaves)
    logits64 = as_float64(logits)
    s = reference.sk_fuse(views, as_float64(scale), as_float64(bias), relu)
    out = reference.sk_select(views, logits64, as_float64(scale), as_float64(bias), relu)
    return s, out, leaves + [logits64]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = ""):
    """Every element within TOLERANCE[dtype] * max(1, max |expected|), and no NaN anywhere."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual = actual.detach().to("cpu", torch.float64)
    expected = expected.detach().to("cpu", torch.float64)
    assert not actual.isnan().any(), f"{what}: NaN in the result (an element was never written?)"
    bound = TOLERANCE[dtype] * max(1.0, expected.abs().max().item()) if expected.numel() else 0.0
    error = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert error <= bound, f"{what}: max error {error:.3g} > {bound:.3g}"


@contextlib.contextmanager
def poisoned_allocations(monkeypatch):
    """Fill every tensor torch.empty returns with NaN, so that an element no kernel writes is caught."""
    empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    with monkeypatch.context() as patch:
        patch.setattr(torch, "empty", poisoned_empty)
        yield
