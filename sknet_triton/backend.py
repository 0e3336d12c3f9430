"""set_backend: how every SK unit of a model runs (SKConv, and ResNeSt's FusedSplitAttn)."""
from torch import nn

from sknet_triton.layers import BACKENDS, SKConv
from sknet_triton.split_attn import FusedSplitAttn


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Choose how every SK unit in ``model`` (SKConv, FusedSplitAttn) runs; returns ``model``.

    ``"auto"`` (the default) runs the Triton kernels for CUDA tensors (and for CPU tensors under
    ``TRITON_INTERPRET=1``) and the plain-PyTorch reference elsewhere (a FusedSplitAttn: timm's own
    computation). ``"torch"`` runs plain PyTorch operations only, with the same outputs: for
    ``torch.jit.trace``, ONNX export, or any device.
    """
    if backend not in BACKENDS:
        raise ValueError(f"set_backend: backend must be one of {BACKENDS}, got {backend!r}")
    for module in model.modules():
        if isinstance(module, (SKConv, FusedSplitAttn)):
            module.backend = backend
    return model
