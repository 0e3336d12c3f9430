"""Shared test helpers."""
import pytest
import torch

from sknet_triton import ops

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

requires_kernels = pytest.mark.skipif(
    not ops.uses_triton(DEVICE),
    reason="the Triton kernels need a CUDA device or TRITON_INTERPRET=1 (tests/conftest.py sets it without CUDA)",
)
