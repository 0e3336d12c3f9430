"""Test setup: without a CUDA device, the Triton kernels run on the CPU through Triton's interpreter.

TRITON_INTERPRET must be set before the kernels are defined, so this runs before sknet_triton is imported.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
