"""Triton device code for the Selective Kernel split (eval mode), fuse and select operations, and for the
branches' training-mode BatchNorm inside them.

Only ``@triton.jit`` functions (and the facts their signatures fix) live here; each kernel's family is
declared beside its op in ``sknet_triton.ops`` (its validation, launcher and autograd), its launch planned in
``sknet_triton.planning`` and started by ``sknet_triton.ops.launch``.
"""
from .batchnorm import sk_bn_stats_kernel, sk_fuse_bn_bwd_kernel, sk_select_bn_bwd_kernel
from .fuse import sk_fuse_bwd_kernel, sk_fuse_fwd_kernel
from .select import sk_select_bwd_kernel, sk_select_fwd_kernel
from .split import sk_split_fwd_kernel

__all__ = [
    "sk_fuse_fwd_kernel",
    "sk_fuse_bwd_kernel",
    "sk_select_fwd_kernel",
    "sk_select_bwd_kernel",
    "sk_bn_stats_kernel",
    "sk_select_bn_bwd_kernel",
    "sk_fuse_bn_bwd_kernel",
    "sk_split_fwd_kernel",
]
