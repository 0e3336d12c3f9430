"""Selective Kernel building blocks: SKConv (Split, Fuse, Select) and its attention.

Parameter names and state-dict layout are those of timm's ``SelectiveKernel``
(``paths.{m}.conv``, ``paths.{m}.bn``, ``attn.fc_reduce``, ``attn.bn``, ``attn.fc_select``), so timm
weights load unchanged.
"""
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx
from torch import Tensor, nn

from sknet_triton import ops, reference
from sknet_triton.graph_ops import sk_fuse, sk_select

__all__ = [
    "SKConv", "SKAttention", "SKBranch", "set_backend", "make_divisible", "paper_attn_width", "timm_attn_width",
    "BACKENDS",
]

# "auto": the Triton kernels where ops.uses_triton() says so, the plain-PyTorch reference elsewhere.
# "torch": plain PyTorch operations only (TorchScript tracing, ONNX export, any device).
BACKENDS = ("auto", "torch")

AttnWidth = Union[None, int, Callable[[int], int]]


def _batchnorm_affine(
    running_mean: Tensor, running_var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float
) -> Tuple[Tensor, Tensor]:
    """Eval-mode BatchNorm as float32 ``scale`` and ``shift`` [C] (``BN(y) = scale * y + shift``), from its
    running statistics [C], optional affine weight and bias [C] (any floating dtype) and ``eps``."""
    scale = torch.rsqrt(running_var.float() + eps)
    shift = -running_mean.float() * scale
    if weight is not None and bias is not None:
        scale = scale * weight.float()
        shift = shift * weight.float() + bias.float()
    return scale, shift


# One node each in any torch.fx graph of an SKConv. The fused ops' kernels cannot be traced; BatchNorm's
# statistics become graph inputs (read by an fx tracer, they would be recorded as constants).
torch.fx.wrap("sk_fuse")
torch.fx.wrap("sk_select")
torch.fx.wrap("_batchnorm_affine")


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


class SKBranch(nn.Module):
    """One Split path: convolution, BatchNorm, activation (timm's ConvNormAct layout: ``conv``, ``bn``)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        dilation: int,
        groups: int,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
        act_layer: Callable[..., nn.Module] = nn.ReLU,
    ):
        super().__init__()
        padding = ((stride - 1) + dilation * (kernel_size - 1)) // 2
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups=groups, bias=False
        )
        self.bn = norm_layer(out_channels)
        self.act = act_layer(inplace=True)

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
        self.paths = nn.ModuleList(
            SKBranch(path_in, out_channels, k, stride, d, groups, norm_layer, act_layer) for k, d in branch_specs
        )
        self.attn = SKAttention(out_channels, num_paths, attn_channels, norm_layer, act_layer)

    def forward(self, x: Tensor) -> Tensor:
        inputs = self._path_inputs(x)
        if self.backend == "torch":
            branches = self._run_paths(inputs)
            return reference.sk_select(branches, self.attn(reference.sk_fuse(branches)))
        if not torch.jit.is_scripting():
            # TorchScript cannot compile the eligibility checks, so scripted SK units keep BatchNorm unfolded.
            if self._folds_batchnorm():
                branches = [path.conv(xi) for path, xi in zip(self.paths, inputs)]
                scale, bias = self._folded_batchnorm()
                s = sk_fuse(branches, scale, bias, True)
                return sk_select(branches, self.attn(s), scale, bias, True)
        branches = self._run_paths(inputs)
        return sk_select(branches, self.attn(sk_fuse(branches)))

    def _path_inputs(self, x: Tensor) -> List[Tensor]:
        """Each path's input: its channel slice of ``x`` with ``split_input``, else ``x`` itself."""
        if self.split_input:
            # Indexed rather than iterated: under torch.fx the split is one Proxy, of unknown length.
            parts = torch.split(x, self.in_channels // self.num_paths, dim=1)
            return [parts[m] for m in range(self.num_paths)]
        return [x] * self.num_paths

    def _run_paths(self, inputs: List[Tensor]) -> List[Tensor]:
        """Each path (convolution, BatchNorm, activation) on its input."""
        branches: List[Tensor] = []
        # enumerate: TorchScript unrolls a loop over a ModuleList, but cannot zip one with a list.
        for m, path in enumerate(self.paths):
            branches.append(path(inputs[m]))
        return branches

    def _folds_batchnorm(self) -> bool:
        """Whether eval-mode BatchNorm + ReLU of the paths go into the ops' prologue."""
        if self.training:
            return False
        for path in self.paths:
            bn = path.bn
            if type(bn) is not nn.BatchNorm2d or bn.running_mean is None or type(path.act) is not nn.ReLU:
                return False
            # parameters() yields the tensors themselves, also while torch.fx traces (attributes give proxies).
            if torch.is_grad_enabled() and any(p.requires_grad for p in bn.parameters()):
                return False
        return True

    def _folded_batchnorm(self) -> tuple[Tensor, Tensor]:
        """Eval-mode BatchNorm of every path as float32 [M, C] scale and bias: BN(y) = scale * y + bias."""
        scales, biases = [], []
        for path in self.paths:
            bn = path.bn
            scale, bias = _batchnorm_affine(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
            scales.append(scale)
            biases.append(bias)
        return torch.stack(scales), torch.stack(biases)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, M={self.num_paths}, "
            f"backend={self.backend!r}"
        )


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
