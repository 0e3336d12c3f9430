"""The Selective Kernel operations, one module per kernel family: the split in eval mode (:mod:`.split`),
the fuse (:mod:`.fuse`), the select (:mod:`.select`), and both over branches that still need training-mode
BatchNorm and ReLU (:mod:`.batchnorm`). Each op checks its inputs once (:mod:`.checks`), then runs the
Triton kernels where :func:`sknet_triton.device.uses_triton` says so, through the launch pattern they share
(:mod:`.launch`), or the plain-PyTorch reference (:mod:`sknet_triton.reference`) everywhere else.

The ops take the branches as M tensors [B, C, H, W], or one stacked [B, M, C, H, W] tensor; gradients are
structured the same way.
"""
from sknet_triton.device import kernel_path, uses_triton
from sknet_triton.ops.batchnorm import BatchNormBranches, sk_fuse_bn, sk_select_bn
from sknet_triton.ops.checks import SUPPORTED_DTYPES
from sknet_triton.ops.fuse import sk_fuse
from sknet_triton.ops.launch import MAX_BRANCHES
from sknet_triton.ops.select import sk_select
from sknet_triton.ops.split import prefers_split_kernel, sk_split, split_geometry_problem

__all__ = [
    "sk_split", "sk_fuse", "sk_select", "sk_fuse_bn", "sk_select_bn", "BatchNormBranches", "uses_triton",
    "prefers_split_kernel", "split_geometry_problem", "kernel_path", "SUPPORTED_DTYPES", "MAX_BRANCHES",
]
