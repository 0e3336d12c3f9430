"""How the benchmarks decide that an output agrees with its reference before they time it."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

# Relative L2 error allowed against the reference, by the precision the work runs in. A wrong result is
# off by order 1 (unrelated outputs of equal norm: 1.41); rounding differences stay well below: for a whole
# network, bf16 storage between layers and TF32 convolutions give a few percent and a fraction of one
# percent of the logits; a single op rounds only its output.
MODEL_TOLERANCE = {"bf16": 0.1, "fp32": 0.02}
OP_TOLERANCE = {"bf16": 1e-2, "fp32": 1e-4}


def relative_error(actual: Sequence[Tensor], expected: Sequence[Tensor]) -> float:
    """||actual - expected|| / ||expected|| over all the tensors together, in float64, on each expected
    tensor's device."""
    difference = torch.zeros((), dtype=torch.float64)
    norm = torch.zeros((), dtype=torch.float64)
    for a, e in zip(actual, expected, strict=True):
        a, e = a.detach().to(e.device, torch.float64), e.detach().double()
        difference += (a - e).square().sum().cpu()
        norm += e.square().sum().cpu()
    if not torch.isfinite(difference):
        return float("inf")
    return float(difference.sqrt() / norm.sqrt().clamp_min(torch.finfo(torch.float64).tiny))
