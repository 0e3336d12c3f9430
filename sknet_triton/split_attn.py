"""ResNeSt's split attention (timm's ``SplitAttn``) on the SK kernels.

A SplitAttn of radix R >= 2 is an SK unit. Its grouped convolution writes the R branches as channel slices
of one [B, R*C, H, W] tensor (branch r: channels r*C .. r*C + C - 1), which the kernels read where they lie
as the stacked view [B, R, C, H, W], in both layouts. Its BatchNorm ``bn0`` over the R*C channels and the
ReLU ``act0`` are per (branch, channel), as the kernels' per-branch prologue and training BatchNorm are. Its
attention (fc1 -> bn1 -> act1 -> fc2) gives logits [B, R*C] in ``RadixSoftmax``'s order,
[B, cardinality, R, C / cardinality]: rearranged to the kernels' [B, R, C] (a view for cardinality 1, else
a copy of B*R*C values), the softmax over R is the select's.

:func:`sknet_triton.accelerate` turns timm's SplitAttn modules into :class:`FusedSplitAttn` in place (their
class only: every parameter, buffer, hook and state-dict key stays).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.fx
from timm.layers import DropBlock2d, SplitAttn
from torch import Tensor, nn

from sknet_triton import reference
from sknet_triton.device import uses_triton
from sknet_triton.layers import UnitPath
from sknet_triton.ops.batchnorm import batchnorm_affine, sk_fuse_bn, sk_select_bn
from sknet_triton.ops.fuse import graph_sk_fuse, sk_fuse
from sknet_triton.ops.launch import MAX_BRANCHES, refuse_jit_trace
from sknet_triton.ops.select import graph_sk_select, sk_select
from sknet_triton.running_statistics import update_running_statistics

__all__ = ["FusedSplitAttn", "why_not_fused"]

# One node each in a torch.fx graph of the unit (see sknet_triton.layers).
torch.fx.wrap("graph_sk_fuse")
torch.fx.wrap("graph_sk_select")
torch.fx.wrap("batchnorm_affine")


def why_not_fused(module: SplitAttn) -> Optional[str]:
    """Why a timm SplitAttn cannot run its fuse and select on the kernels; None where it can: radix 2 to
    MAX_BRANCHES, ``bn0`` exactly ``nn.BatchNorm2d`` (a SyncBatchNorm's statistics span processes), ``act0``
    exactly ``nn.ReLU``, ``drop`` an ``nn.Identity`` or a timm ``DropBlock2d`` (which drops only in training
    with a drop probability above 0: then the unit runs timm's computation for that call). accelerate leaves
    a unit with a reason as timm's; a FusedSplitAttn whose modules change later (a SyncBatchNorm conversion)
    asks again on every call."""
    if not 2 <= module.radix <= MAX_BRANCHES:
        return f"radix {module.radix} (the kernels take 2 to {MAX_BRANCHES} branches)"
    if type(module.bn0) is not nn.BatchNorm2d:
        return f"bn0 is a {type(module.bn0).__name__}, not a BatchNorm2d"
    if type(module.act0) is not nn.ReLU:
        return f"act0 is a {type(module.act0).__name__}, not a ReLU"
    if type(module.drop) not in (nn.Identity, DropBlock2d):
        return f"drop is a {type(module.drop).__name__}"
    return None


class FusedSplitAttn(SplitAttn):
    """timm's SplitAttn with its fuse and select in the SK kernels: the same modules, parameters and outputs.

    ``x`` [B, C_in, H, W] -> [B, C, H, W] in the convolution's dtype, dense in its memory format (timm's is
    contiguous NCHW). :meth:`unit_path` chooses how a call runs, as SKConv's does: on the kernels' device,
    ``bn0`` with batch statistics inside the kernels in training (running statistics updated as
    ``nn.BatchNorm2d`` updates them), eval-mode ``bn0`` + ReLU folded into the kernels' prologue, else
    ``bn0`` and ReLU as they are before the fused ops; timm's own computation elsewhere, on the "torch"
    backend, and wherever :func:`why_not_fused` names a reason. Its ``backend`` ("auto" or "torch") is set by
    :func:`sknet_triton.accelerate` and :func:`sknet_triton.set_backend`.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            path = self.unit_path(x)
            if path is UnitPath.BATCH_STATISTICS:
                return self._forward_batch_statistics(x)
            if path is UnitPath.FOLDED_BATCHNORM:
                return self._forward_folded_batchnorm(x)
            if path is UnitPath.OPS:
                return self._forward_ops(x)
            return super().forward(x)
        # TorchScript compiles neither the decision nor the whole-unit kernels: a scripted unit runs bn0 and
        # the ReLU, then the fused ops as TorchScript calls them (plain PyTorch off the kernels' device).
        if self.backend == "torch":
            return self._forward_reference(x)
        return self._forward_ops(x)

    def unit_path(self, x: Tensor) -> UnitPath:
        """How this unit runs on ``x`` [B, C_in, H, W] (a torch.fx Proxy while fx traces) in the current
        mode: PLAIN_TORCH (timm's computation), BATCH_STATISTICS, FOLDED_BATCHNORM or OPS, by the rules of
        :meth:`sknet_triton.SKConv.unit_path` (its split kernel aside; ``torch.onnx.export`` included)."""
        if self.backend == "torch" or torch.onnx.is_in_onnx_export():
            return UnitPath.PLAIN_TORCH
        if why_not_fused(self) is not None or self._drops_blocks():
            return UnitPath.PLAIN_TORCH
        if not isinstance(x, torch.fx.Proxy):
            if not uses_triton(x.device):
                return UnitPath.PLAIN_TORCH
            refuse_jit_trace()
            if self.bn0.training or self.bn0.running_mean is None:
                return UnitPath.BATCH_STATISTICS
        return UnitPath.FOLDED_BATCHNORM if self._folds_batchnorm() else UnitPath.OPS

    def _drops_blocks(self) -> bool:
        """Whether this call's DropBlock would drop anything (timm's DropBlock2d, training, drop_prob > 0)."""
        drop = self.drop
        return isinstance(drop, DropBlock2d) and drop.training and drop.drop_prob > 0

    def _folds_batchnorm(self) -> bool:
        """Whether eval-mode bn0 + ReLU go into the ops' prologue: running statistics, and no bn0 parameter
        that needs a gradient (the prologue's scale and bias are constants)."""
        if self.bn0.training or self.bn0.running_mean is None:
            return False
        return not (torch.is_grad_enabled() and any(p.requires_grad for p in self.bn0.parameters()))

    def _branches(self, y: Tensor) -> Tensor:
        """The radix branches of the convolution output [B, R*C, H, W] as the stacked [B, R, C, H, W], a view
        of it in either layout (as timm's reshape)."""
        B, RC, H, W = y.shape
        return y.reshape(B, self.radix, RC // self.radix, H, W)

    def _branch_list(self, y: Tensor) -> List[Tensor]:
        """The radix branches as R channel slices [B, C, H, W] (read in place too): the form torch.fx and
        TorchScript pass the graph ops."""
        parts = torch.split(y, y.shape[1] // self.radix, dim=1)
        # Indexed rather than iterated: under torch.fx the split is one Proxy, of unknown length.
        return [parts[r] for r in range(self.radix)]

    def _logits(self, s: Tensor) -> Tensor:
        """The attention of the pooled sum s [B, C] (float32): logits [B, R, C], path-major, from fc2's
        [B, R*C] in RadixSoftmax's cardinality-major order."""
        x = s.to(self.fc1.weight.dtype)[:, :, None, None]
        x = self.fc2(self.act1(self.bn1(self.fc1(x))))
        B, RC = x.shape[0], x.shape[1]
        cardinality = self.rsoftmax.cardinality
        x = x.view(B, cardinality, self.radix, RC // (cardinality * self.radix)).transpose(1, 2)
        return x.reshape(B, self.radix, RC // self.radix)

    def _folded_batchnorm(self) -> tuple[Tensor, Tensor]:
        """Eval-mode bn0 as float32 [R, C] scale and bias: bn0(y) = scale * y + bias per (branch, channel)."""
        bn = self.bn0
        scale, bias = batchnorm_affine(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
        return scale.view(self.radix, -1), bias.view(self.radix, -1)

    def _fuse_select(self, y: Tensor, scale: Optional[Tensor], bias: Optional[Tensor], relu: bool) -> Tensor:
        """The fused ops over the branches of ``y`` [B, R*C, H, W] with the prologue (scale, bias, relu): eagerly
        and under torch.compile on the stacked view (whose gradient is then a view of one [B, R*C, H, W]
        tensor); as graph nodes over R slices under torch.fx and TorchScript."""
        if not torch.jit.is_scripting():
            if not isinstance(y, torch.fx.Proxy):
                branches = self._branches(y)
                return sk_select(branches, self._logits(sk_fuse(branches, scale, bias, relu)), scale, bias, relu)
        parts = self._branch_list(y)
        return graph_sk_select(parts, self._logits(graph_sk_fuse(parts, scale, bias, relu)), scale, bias, relu)

    def _forward_reference(self, x: Tensor) -> Tensor:
        """The "torch" backend under TorchScript: timm's computation as the reference ops write it."""
        parts = self._branch_list(self.act0(self.bn0(self.conv(x))))
        return reference.sk_select(parts, self._logits(reference.sk_fuse(parts)))

    def _forward_ops(self, x: Tensor) -> Tensor:
        """UnitPath.OPS: the convolution, bn0 and the ReLU as they are, then the fused ops."""
        return self._fuse_select(self.act0(self.bn0(self.conv(x))), None, None, False)

    def _forward_folded_batchnorm(self, x: Tensor) -> Tensor:
        """UnitPath.FOLDED_BATCHNORM: the convolution, then the fused ops with eval-mode bn0 + ReLU as their
        prologue."""
        scale, bias = self._folded_batchnorm()
        return self._fuse_select(self.conv(x), scale, bias, True)

    def _forward_batch_statistics(self, x: Tensor) -> Tensor:
        """UnitPath.BATCH_STATISTICS: the convolution, then the fused ops with bn0 (batch statistics) and the
        ReLU inside the kernels, and bn0's running statistics updated as nn.BatchNorm2d updates them."""
        y = self.conv(x)
        bn = self.bn0
        weight = None if bn.weight is None else bn.weight.view(self.radix, -1)
        bias = None if bn.bias is None else bn.bias.view(self.radix, -1)
        s, state = sk_fuse_bn(self._branches(y), weight, bias, float(bn.eps))
        out = sk_select_bn(state, self._logits(s))
        if bn.training and bn.track_running_stats and bn.running_mean is not None:
            B, _, H, W = y.shape
            update_running_statistics(bn, state.mean.reshape(-1), state.var.reshape(-1), B * H * W)
        return out

    def extra_repr(self) -> str:
        return f"radix={self.radix}, backend={self.backend!r}"
