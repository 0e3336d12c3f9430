"""Which devices run the Triton kernels: the one rule every dispatch asks.

CUDA tensors run the kernels (NVIDIA GPUs, and AMD GPUs under PyTorch's ROCm build, where they are "cuda"
devices with ``torch.version.hip`` set and Triton's AMD backend compiles the same kernels), and CPU tensors
too where Triton interprets them (``TRITON_INTERPRET=1`` set before the kernels were defined); every other
device, and every device without the triton package, runs the plain-PyTorch reference. Whether the
kernels are interpreted is what the kernel package itself was defined as (``kernels/split.py`` reads it
inside its kernel), so the host never guesses it again.
"""
from __future__ import annotations

import importlib.util
import re
import warnings
from typing import Optional

import torch

__all__ = [
    "TRITON_INSTALLED", "INTERPRETED", "KERNEL_DEVICE_TYPES", "uses_triton", "kernel_path", "interpreter_problem",
]

# Triton is published for Linux only: without the package every device runs the reference.
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None

if TRITON_INSTALLED:
    from sknet_triton.kernels.split import INTERPRETED as _KERNELS_INTERPRETED

    INTERPRETED = bool(_KERNELS_INTERPRETED.value)
else:
    INTERPRETED = False


def interpreter_problem(triton_version: str, numpy_version: str) -> Optional[str]:
    """Why Triton's interpreter cannot run the kernels with these releases, or None. Before Triton 3.7 it
    takes a loop bound as ``int()`` of a one-element array, which NumPy 2.4 refuses: every kernel fails."""
    def release(version: str) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", version)[:2])

    if release(triton_version) < (3, 7) and release(numpy_version) >= (2, 4):
        return (f"TRITON_INTERPRET=1 with triton {triton_version} and numpy {numpy_version}: Triton's interpreter "
                f"before 3.7 cannot run kernels under NumPy 2.4 or newer; install 'numpy<2.4' or 'triton>=3.7'")
    return None


if INTERPRETED:
    import numpy
    import triton

    _problem = interpreter_problem(triton.__version__, numpy.__version__)
    if _problem is not None:
        raise ImportError(f"sknet_triton: {_problem}")


# The rule: the device types whose tensors run the kernels. Fixed at import (it depends on nothing else), so
# TorchScript, which cannot call uses_triton, reads the same answer.
KERNEL_DEVICE_TYPES = (("cuda", "cpu") if INTERPRETED else ("cuda",)) if TRITON_INSTALLED else ()

_warned_no_triton = False


def uses_triton(device: torch.device) -> bool:
    """Whether tensors on ``device`` run the Triton kernels rather than the plain-PyTorch reference. Warns
    once when CUDA tensors fall back for want of the triton package."""
    if device.type in KERNEL_DEVICE_TYPES:
        return True
    global _warned_no_triton
    if device.type == "cuda" and not _warned_no_triton:
        _warned_no_triton = True
        warnings.warn("sknet_triton: the triton package is not installed; CUDA tensors run the plain-PyTorch "
                      "reference instead of the fused kernels", RuntimeWarning, stacklevel=3)
    return False


def kernel_path(device: torch.device) -> str:
    """What the ops run for tensors on ``device``: "triton", "triton-interpreter" or "reference"."""
    if not uses_triton(device):
        return "reference"
    return "triton-interpreter" if INTERPRETED else "triton"
