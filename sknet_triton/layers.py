"""Selective Kernel building blocks: SKConv (Split, Fuse, Select) and its attention.

Parameter names and state-dict layout are those of timm's ``SelectiveKernel``
(``paths.{m}.conv``, ``paths.{m}.bn``, ``attn.fc_reduce``, ``attn.bn``, ``attn.fc_select``), so timm
weights load unchanged.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from sknet_triton import ops, reference

__all__ = [
    "SKConv", "SKAttention", "ConvBnAct", "set_backend", "set_split_conv", "make_divisible", "paper_attn_width",
    "timm_attn_width", "BACKENDS", "SPLIT_CONVS",
]

# "auto": the Triton kernels where ops.uses_triton() says so, the plain-PyTorch reference elsewhere.
# "torch": plain PyTorch operations only (TorchScript tracing, ONNX export, any device).
BACKENDS = ("auto", "torch")
# How an eval-mode SKConv computes its paths where the split kernel applies (see SKConv.split_kernel_applies):
# "auto": the split kernel where this GPU's tuned table records it faster than cuDNN for the shape;
# "triton": always the split kernel; "cudnn": always the paths' own convolutions.
SPLIT_CONVS = ("auto", "triton", "cudnn")

AttnWidth = Union[None, int, Callable[[int], int]]


def make_divisible(value: float, divisor: int = 8, min_value: Optional[int] = None, round_limit: float = 0.9) -> int:
    """``value`` rounded to the nearest multiple of ``divisor`` (at least ``min_value``, default ``divisor``),
    rounded up by one more ``divisor`` if rounding lost more than ``1 - round_limit`` of it."""
    min_value = min_value or divisor
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < round_limit * value:
        rounded += divisor
    return rounded


def paper_attn_width(r: int = 16, L: int = 32) -> Callable[[int], int]:
    """The paper's attention width, ``d = max(C // r, L)``."""
    return lambda channels: max(channels // r, L)


def timm_attn_width(rd_ratio: float = 1 / 16, rd_divisor: int = 8) -> Callable[[int], int]:
    """timm's attention width, ``make_divisible(C * rd_ratio, rd_divisor)``."""
    return lambda channels: make_divisible(channels * rd_ratio, rd_divisor)


class ConvBnAct(nn.Module):
    """Convolution (no bias), BatchNorm, activation: timm's ConvNormAct layout (``conv``, ``bn``).

    [B, in_channels, H, W] -> [B, out_channels, H / stride, W / stride] ("same" padding). ``act_layer``
    None leaves the activation out. A Split path of SKConv is one of these.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
        act_layer: Optional[Callable[..., nn.Module]] = nn.ReLU,
    ):
        super().__init__()
        padding = ((stride - 1) + dilation * (kernel_size - 1)) // 2
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups=groups, bias=False
        )
        self.bn = norm_layer(out_channels)
        self.act = act_layer(inplace=True) if act_layer is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class SKAttention(nn.Module):
    """Fuse's squeeze and Select's logits: s [B, C] -> fc_reduce -> BN -> act -> fc_select -> [B, M, C]."""

    def __init__(
        self,
        channels: int,
        num_paths: int,
        attn_channels: int,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
        act_layer: Callable[..., nn.Module] = nn.ReLU,
    ):
        super().__init__()
        self.num_paths = num_paths
        self.fc_reduce = nn.Conv2d(channels, attn_channels, kernel_size=1, bias=False)
        self.bn = norm_layer(attn_channels)
        self.act = act_layer(inplace=True)
        self.fc_select = nn.Conv2d(attn_channels, channels * num_paths, kernel_size=1, bias=False)

    def forward(self, s: Tensor) -> Tensor:
        """s: [B, C] (float32 from sk_fuse). Returns logits [B, M, C]."""
        x = s.to(self.fc_reduce.weight.dtype)[:, :, None, None]
        x = self.fc_select(self.act(self.bn(self.fc_reduce(x))))
        return x.view(x.shape[0], self.num_paths, -1)


def _branch_kernels(M: Optional[int], kernel_sizes: Optional[Sequence[int]]) -> list[int]:
    if kernel_sizes is None:
        M = 2 if M is None else M
        return [2 * m + 3 for m in range(M)]
    kernel_sizes = list(kernel_sizes)
    if M is not None and M != len(kernel_sizes):
        raise ValueError(f"SKConv: M={M} but {len(kernel_sizes)} kernel sizes {kernel_sizes}")
    for k in kernel_sizes:
        if not isinstance(k, int) or k < 3 or k % 2 == 0:
            raise ValueError(f"SKConv: kernel sizes must be odd integers >= 3, got {kernel_sizes}")
    return kernel_sizes


class SKConv(nn.Module):
    """Selective Kernel convolution: Split into M convolution paths, Fuse, Select.

    Args:
        in_channels: input channels C_in.
        out_channels: output channels C (default: ``in_channels``).
        stride: stride of every path.
        M: number of paths, 2 to 4 (default 2, or ``len(kernel_sizes)``).
        groups: convolution groups G of every path (the paper's 32), capped at ``out_channels`` as in timm.
        r, L: the paper's attention width ``d = max(C // r, L)``, used when ``attn_width`` is None.
        kernel_sizes: each path's kernel size (default 3, 5, 7, ...: the paper's).
        keep_3x3: realise a k x k path as a 3x3 convolution with dilation (k - 1) / 2 (the paper's choice
            and timm's default); False gives true k x k kernels.
        dilation: dilation of the block as a whole; multiplies each path's.
        split_input: give each path its own ``in_channels / M`` slice of the input (timm's skresnet).
        attn_width: the attention width: None for the paper's rule, an int, or a callable C -> d such as
            :func:`timm_attn_width`.
        norm_layer, act_layer: BatchNorm and activation of the paths and the attention.

    Input [B, C_in, H, W] -> output [B, C, H / stride, W / stride], in the input's dtype and memory format.

    In eval mode, when the paths are BatchNorm2d + ReLU and no BatchNorm parameter needs a gradient, each
    path's BatchNorm and ReLU are folded into the fused ops' prologue: the convolution outputs are read
    once and never normalised in memory. The folded constants are recomputed from the current BatchNorm
    state on every call, so they never go stale.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: Optional[int] = None,
        stride: int = 1,
        M: Optional[int] = None,
        groups: int = 32,
        r: int = 16,
        L: int = 32,
        kernel_sizes: Optional[Sequence[int]] = None,
        keep_3x3: bool = True,
        dilation: int = 1,
        split_input: bool = False,
        attn_width: AttnWidth = None,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
        act_layer: Callable[..., nn.Module] = nn.ReLU,
    ):
        super().__init__()
        out_channels = out_channels or in_channels
        kernels = _branch_kernels(M, kernel_sizes)
        num_paths = len(kernels)
        if not 2 <= num_paths <= ops.MAX_BRANCHES:
            raise ValueError(f"SKConv: M must be 2 to {ops.MAX_BRANCHES}, got {num_paths}")
        if split_input and in_channels % num_paths:
            raise ValueError(f"SKConv: split_input needs in_channels ({in_channels}) divisible by M ({num_paths})")
        path_in = in_channels // num_paths if split_input else in_channels
        groups = min(out_channels, groups)
        if path_in % groups or out_channels % groups:
            raise ValueError(
                f"SKConv: groups={groups} must divide the path's input ({path_in}) and output ({out_channels}) channels"
            )
        if keep_3x3:
            branch_specs = [(3, dilation * (k - 1) // 2) for k in kernels]
        else:
            branch_specs = [(k, dilation) for k in kernels]
        if attn_width is None:
            attn_width = paper_attn_width(r, L)
        attn_channels = attn_width if isinstance(attn_width, int) else attn_width(out_channels)

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_paths = num_paths
        self.split_input = split_input
        self.backend = "auto"
        self.split_conv = "auto"
        self.paths = nn.ModuleList(
            ConvBnAct(path_in, out_channels, k, stride, d, groups, norm_layer, act_layer) for k, d in branch_specs
        )
        self.attn = SKAttention(out_channels, num_paths, attn_channels, norm_layer, act_layer)

    def forward(self, x: Tensor) -> Tensor:
        if self.split_kernel_applies(x):
            return self._forward_split_kernel(x)
        if self.split_input:
            inputs = torch.split(x, self.in_channels // self.num_paths, dim=1)
        else:
            inputs = [x] * self.num_paths
        if self.backend == "torch":
            branches = [path(xi) for path, xi in zip(self.paths, inputs)]
            s = reference.sk_fuse(branches)
            return reference.sk_select(branches, self.attn(s))
        if self._folds_batchnorm():
            branches = [path.conv(xi) for path, xi in zip(self.paths, inputs)]
            scale, bias = self._folded_batchnorm()
            relu = True
        else:
            branches = [path(xi) for path, xi in zip(self.paths, inputs)]
            scale = bias = None
            relu = False
        s = ops.sk_fuse(branches, scale, bias, relu)
        return ops.sk_select(branches, self.attn(s), scale, bias, relu)

    def split_kernel_applies(self, x: Tensor) -> bool:
        """Whether this call runs the split kernel (``sknet_triton.sk_split``): eval mode with foldable
        BatchNorm, the kernels' device, the paper's paths (3x3, dilation and padding m + 1, no bias, as in
        the default ``keep_3x3``), no gradient wanted, and ``split_conv`` "triton", or "auto" where the tuned
        table says so."""
        if self.backend != "auto" or self.split_conv == "cudnn" or not ops.uses_triton(x.device):
            return False
        if x.dim() != 4 or not self._folds_batchnorm():
            return False
        # Inference only: where autograd needs the paths' gradients, they run as usual.
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.paths.parameters())):
            return False
        for m, path in enumerate(self.paths):
            conv = path.conv
            if (conv.kernel_size, conv.dilation, conv.padding) != ((3, 3), (m + 1, m + 1), (m + 1, m + 1)):
                return False
            if conv.bias is not None or conv.padding_mode != "zeros" or conv.stride not in ((1, 1), (2, 2)):
                return False
        if self.split_conv == "triton":
            return True
        stride = self.paths[0].conv.stride[0]
        positions = ((x.shape[2] - 1) // stride + 1) * ((x.shape[3] - 1) // stride + 1)
        return ops.prefers_split_kernel(
            x.device, self._split_dtype(x), x.is_contiguous(memory_format=torch.channels_last), self.num_paths,
            self.out_channels, positions,
        )

    def _split_dtype(self, x: Tensor) -> torch.dtype:
        """The dtype the paths' convolutions run in: autocast's where it applies, else x's."""
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return x.dtype

    def _forward_split_kernel(self, x: Tensor) -> Tensor:
        """The forward pass with the split kernel: every path's convolution, BatchNorm and ReLU and the pooled
        sum in one launch, then the attention and the select (with no prologue). Output as :meth:`forward`."""
        dtype = self._split_dtype(x)
        weight = torch.stack([path.conv.weight for path in self.paths]).to(dtype)
        scale, bias = self._folded_batchnorm()
        branches, s = ops.sk_split(x.to(dtype), weight, scale, bias, self.paths[0].conv.stride[0], self.split_input)
        return ops.sk_select(branches, self.attn(s))

    def _folds_batchnorm(self) -> bool:
        """Whether eval-mode BatchNorm + ReLU of the paths go into the ops' prologue."""
        if self.training:
            return False
        for path in self.paths:
            bn = path.bn
            if type(bn) is not nn.BatchNorm2d or bn.running_mean is None or type(path.act) is not nn.ReLU:
                return False
            if torch.is_grad_enabled() and bn.affine and (bn.weight.requires_grad or bn.bias.requires_grad):
                return False
        return True

    def _folded_batchnorm(self) -> tuple[Tensor, Tensor]:
        """Eval-mode BatchNorm of every path as float32 [M, C] scale and bias: BN(y) = scale * y + bias."""
        scales, biases = [], []
        for path in self.paths:
            bn = path.bn
            scale = torch.rsqrt(bn.running_var.float() + bn.eps)
            bias = -bn.running_mean.float() * scale
            if bn.affine:
                scale = scale * bn.weight.float()
                bias = bias * bn.weight.float() + bn.bias.float()
            scales.append(scale)
            biases.append(bias)
        return torch.stack(scales), torch.stack(biases)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, M={self.num_paths}, "
            f"backend={self.backend!r}, split_conv={self.split_conv!r}"
        )


def set_split_conv(model: nn.Module, split_conv: str) -> nn.Module:
    """Choose how every SKConv in ``model`` computes its paths in eval mode; returns ``model``.

    ``"auto"`` (the default) runs the split kernel (``sknet_triton.sk_split``: every path's convolution,
    BatchNorm and ReLU and the pooled sum in one launch) where the GPU's tuned table records it faster than
    cuDNN for the shape, else the paths' own convolutions; ``"triton"`` always runs the split kernel where it
    applies (eval mode, the kernels' device, the paper's 3x3 paths with dilations 1..M), and ``"cudnn"`` never
    does. For tests and benchmarks; the ``"torch"`` backend (:func:`set_backend`) overrides it.
    """
    if split_conv not in SPLIT_CONVS:
        raise ValueError(f"set_split_conv: split_conv must be one of {SPLIT_CONVS}, got {split_conv!r}")
    for module in model.modules():
        if isinstance(module, SKConv):
            module.split_conv = split_conv
    return model


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Choose how every SKConv in ``model`` runs; returns ``model``.

    ``"auto"`` (the default) runs the Triton kernels for CUDA tensors (and for CPU tensors under
    ``TRITON_INTERPRET=1``) and the plain-PyTorch reference elsewhere. ``"torch"`` runs plain PyTorch
    operations only, with the same outputs: for ``torch.jit.trace``, ONNX export, or any device.
    """
    if backend not in BACKENDS:
        raise ValueError(f"set_backend: backend must be one of {BACKENDS}, got {backend!r}")
    for module in model.modules():
        if isinstance(module, SKConv):
            module.backend = backend
    return model
