"""Test setup: without a CUDA device, the Triton kernels run on the CPU through Triton's interpreter.

TRITON_INTERPRET must be set before the kernels are defined, so this runs before sknet_triton is imported.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from sknet_triton import ops  # noqa: E402  (after TRITON_INTERPRET is decided)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device() -> torch.device:
    """The device the tests run on: CUDA when present, else the CPU."""
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


requires_kernels = pytest.mark.skipif(
    not ops.uses_triton(DEVICE),
    reason="the Triton kernels need a CUDA device or TRITON_INTERPRET=1 (which conftest sets without CUDA)",
)
