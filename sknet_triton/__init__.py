"""sknet_triton: Selective Kernel Networks for PyTorch, with the SK attention in fused Triton kernels."""
from sknet_triton import ops, reference
from sknet_triton.backend import set_backend
from sknet_triton.convert import accelerate, convert_state_dict
from sknet_triton.layers import SKConv, set_split_conv
from sknet_triton.models import create_model, list_models
from sknet_triton.ops import sk_fuse, sk_fuse_bn, sk_select, sk_select_bn, sk_split
from sknet_triton.split_attn import FusedSplitAttn

__all__ = [
    "ops", "reference", "sk_split", "sk_fuse", "sk_select", "sk_fuse_bn", "sk_select_bn", "SKConv", "FusedSplitAttn",
    "set_backend", "set_split_conv", "create_model", "list_models", "convert_state_dict", "accelerate",
]
__version__ = "0.1.0"
