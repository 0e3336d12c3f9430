"""sknet_triton: Selective Kernel Networks for PyTorch, with the SK attention in fused Triton kernels."""
from sknet_triton import ops, reference
from sknet_triton.layers import SKConv, set_backend
from sknet_triton.ops import sk_fuse, sk_select

__all__ = ["ops", "reference", "sk_fuse", "sk_select", "SKConv", "set_backend"]
__version__ = "0.1.0"
