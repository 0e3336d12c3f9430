"""Selective Kernel building blocks: SKConv (Split, Fuse, Select) and its attention.

Parameter names and state-dict layout are those of timm's ``SelectiveKernel``
(``paths.{m}.conv``, ``paths.{m}.bn``, ``attn.fc_reduce``, ``attn.bn``, ``attn.fc_select``), so timm
weights load unchanged.
"""
import enum
from typing import Callable, List, Optional, Sequence

import torch
import torch.fx
from torch import Tensor, nn

from sknet_triton import ops, reference
from sknet_triton.attention import AttnWidth, SKAttention, attn_channels
from sknet_triton.checks import check_bool, check_int, is_integer
from sknet_triton.device import uses_triton
from sknet_triton.ops.batchnorm import batchnorm_affine, sk_fuse_bn, sk_select_bn
from sknet_triton.ops.fuse import graph_sk_fuse
from sknet_triton.ops.launch import MAX_BRANCHES, refuse_jit_trace
from sknet_triton.ops.select import graph_sk_select
from sknet_triton.ops.split import prefers_split_kernel, sk_split, split_geometry_problem
from sknet_triton.running_statistics import update_running_statistics

__all__ = ["SKConv", "ConvBnAct", "UnitPath", "set_split_conv", "BACKENDS", "SPLIT_CONVS"]

# "auto": the Triton kernels where sknet_triton.device.uses_triton() says so, plain PyTorch elsewhere.
# "torch": plain PyTorch operations only (TorchScript tracing, ONNX export, any device).
BACKENDS = ("auto", "torch")
# How an eval-mode SKConv computes its paths where the split kernel applies (see SKConv.unit_path):
# "auto": the split kernel where this GPU's tuned table records it faster than cuDNN for the shape;
# "triton": always the split kernel; "cudnn": always the paths' own convolutions.
SPLIT_CONVS = ("auto", "triton", "cudnn")

# One node each in any torch.fx graph of an SKConv, calls that TorchScript compiles when the graph is
# scripted; the fused ops' kernels cannot be traced. BatchNorm's statistics become graph inputs (read by
# an fx tracer, they would be recorded as constants).
torch.fx.wrap("graph_sk_fuse")
torch.fx.wrap("graph_sk_select")
torch.fx.wrap("batchnorm_affine")


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


def _branch_kernels(M: Optional[int], kernel_sizes: Optional[Sequence[int]]) -> list[int]:
    """Each path's kernel size, from ``M`` (3, 5, 7, ...) or ``kernel_sizes``; ValueError if they disagree."""
    if M is not None:
        M = check_int("SKConv", "M", M, 1)
    if kernel_sizes is None:
        M = 2 if M is None else M
        return [2 * m + 3 for m in range(M)]
    if isinstance(kernel_sizes, (str, bytes)) or not hasattr(kernel_sizes, "__iter__"):
        raise TypeError(f"SKConv: kernel_sizes must be a sequence of odd integers, got {kernel_sizes!r}")
    kernel_sizes = list(kernel_sizes)
    if M is not None and M != len(kernel_sizes):
        raise ValueError(f"SKConv: M={M} but {len(kernel_sizes)} kernel sizes {kernel_sizes}")
    for k in kernel_sizes:
        if not is_integer(k) or k < 3 or k % 2 == 0:
            raise ValueError(f"SKConv: kernel sizes must be odd integers >= 3, got {kernel_sizes}")
    return [int(k) for k in kernel_sizes]


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

    An argument of the wrong type raises TypeError, and one out of range (channels, stride, groups, r, L,
    dilation or an attention width below 1; M outside 2 to 4) ValueError, each naming the argument.

    Input [B, C_in, H, W] -> output [B, C, H / stride, W / stride], in the input's dtype and memory format.

    In eval mode, when the paths are BatchNorm2d + ReLU and no BatchNorm parameter needs a gradient, each
    path's BatchNorm and ReLU are folded into the fused ops' prologue: the convolution outputs are read
    once and never normalised in memory. The folded constants are recomputed from the current BatchNorm
    state on every call, so they never go stale. In training mode (and wherever BatchNorm uses the batch's
    statistics), where the ops run the kernels and every path is exactly BatchNorm2d + ReLU, the kernels
    compute the batch statistics and apply BatchNorm and ReLU as they load the convolution outputs
    (:func:`sknet_triton.ops.sk_fuse_bn`, then :func:`sknet_triton.ops.sk_select_bn`); the running
    statistics are updated as BatchNorm2d does. :meth:`unit_path` decides which of these a call runs.
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
        in_channels = check_int("SKConv", "in_channels", in_channels, 1)
        out_channels = in_channels if out_channels is None else check_int("SKConv", "out_channels", out_channels, 1)
        stride = check_int("SKConv", "stride", stride, 1)
        groups = check_int("SKConv", "groups", groups, 1)
        r = check_int("SKConv", "r", r, 1)
        L = check_int("SKConv", "L", L, 1)
        dilation = check_int("SKConv", "dilation", dilation, 1)
        keep_3x3 = check_bool("SKConv", "keep_3x3", keep_3x3)
        split_input = check_bool("SKConv", "split_input", split_input)
        kernels = _branch_kernels(M, kernel_sizes)
        num_paths = len(kernels)
        if not 2 <= num_paths <= MAX_BRANCHES:
            raise ValueError(f"SKConv: M must be 2 to {MAX_BRANCHES}, got {num_paths}")
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
        attn_width = attn_channels("SKConv", attn_width, r, L, out_channels)

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_paths = num_paths
        self.split_input = split_input
        self.backend = "auto"
        self.split_conv = "auto"
        self.paths = nn.ModuleList(
            ConvBnAct(path_in, out_channels, k, stride, d, groups, norm_layer, act_layer) for k, d in branch_specs
        )
        self.attn = SKAttention(out_channels, num_paths, attn_width, norm_layer, act_layer)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            path = self.unit_path(x)
            if path is UnitPath.SPLIT_KERNEL:
                return self._forward_split_kernel(x)
            if path is UnitPath.BATCH_STATISTICS:
                return self._forward_batch_statistics(x)
            if path is UnitPath.FOLDED_BATCHNORM:
                return self._forward_folded_batchnorm(x)
            if path is UnitPath.OPS:
                return self._forward_ops(x)
            return self._forward_plain_torch(x)
        # TorchScript compiles neither the decision nor the whole-unit kernels: a scripted unit runs its paths,
        # then the fused ops as TorchScript calls them (or plain PyTorch on the "torch" backend).
        if self.backend == "torch":
            return self._forward_plain_torch(x)
        return self._forward_ops(x)

    def _forward_plain_torch(self, x: Tensor) -> Tensor:
        """UnitPath.PLAIN_TORCH: the paths, then the reference fuse and select."""
        branches = self._run_paths(self._path_inputs(x))
        return reference.sk_select(branches, self.attn(reference.sk_fuse(branches)))

    def _forward_ops(self, x: Tensor) -> Tensor:
        """UnitPath.OPS: the paths whole, then the fused ops."""
        branches = self._run_paths(self._path_inputs(x))
        return graph_sk_select(branches, self.attn(graph_sk_fuse(branches)))

    def _forward_folded_batchnorm(self, x: Tensor) -> Tensor:
        """UnitPath.FOLDED_BATCHNORM: the convolutions, then the fused ops with each path's eval-mode BatchNorm
        and ReLU as their prologue."""
        branches = [path.conv(xi) for path, xi in zip(self.paths, self._path_inputs(x))]
        scale, bias = self._folded_batchnorm()
        s = graph_sk_fuse(branches, scale, bias, True)
        return graph_sk_select(branches, self.attn(s), scale, bias, True)

    def _forward_batch_statistics(self, x: Tensor) -> Tensor:
        """UnitPath.BATCH_STATISTICS: the convolutions, then the fused ops with each path's BatchNorm (batch
        statistics) and ReLU inside the kernels, and the running statistics updated as nn.BatchNorm2d updates
        them."""
        branches = [path.conv(xi) for path, xi in zip(self.paths, self._path_inputs(x))]
        norms = [path.bn for path in self.paths]
        weight = None if norms[0].weight is None else torch.stack([bn.weight for bn in norms])
        bias = None if norms[0].bias is None else torch.stack([bn.bias for bn in norms])
        s, state = sk_fuse_bn(branches, weight, bias, float(norms[0].eps))
        out = sk_select_bn(state, self.attn(s))
        B, _, H, W = branches[0].shape
        for m, bn in enumerate(norms):
            if bn.training and bn.track_running_stats and bn.running_mean is not None:
                update_running_statistics(bn, state.mean[m], state.var[m], B * H * W)
        return out

    def _forward_split_kernel(self, x: Tensor) -> Tensor:
        """UnitPath.SPLIT_KERNEL: every path's convolution, BatchNorm and ReLU and the pooled sum in one
        launch, then the attention and the select (with no prologue)."""
        dtype = self._split_dtype(x)
        weight = torch.stack([path.conv.weight for path in self.paths]).to(dtype)
        scale, bias = self._folded_batchnorm()
        branches, s = sk_split(x.to(dtype), weight, scale, bias, self.paths[0].conv.stride[0], self.split_input)
        return ops.sk_select(branches, self.attn(s))

    def unit_path(self, x: Tensor) -> "UnitPath":
        """How this unit runs on ``x`` [B, C_in, H, W] (any dtype; a torch.fx Proxy while fx traces) in the
        current mode: the one decision of :meth:`forward` outside TorchScript.

        - the "torch" backend, and ``torch.onnx.export`` (either exporter): plain PyTorch, always, so that an
          exported graph holds standard operators only.
        - torch.fx tracing: the fused ops, one graph node each, with BatchNorm folded where it folds when
          traced; the whole-unit kernels run only eagerly and under torch.compile.
        - torch.jit.trace: refused (RuntimeError) on the kernels' device, whose custom ops a trace would hold;
          plain PyTorch elsewhere, whatever the grad mode (the trace's check reruns it without grad).
        - a device that does not run the kernels: plain PyTorch, the operations of timm's module.
        - on the kernels' device (:func:`sknet_triton.device.uses_triton`): the split kernel where it applies,
          else BatchNorm with batch statistics inside the kernels where the paths allow it, else eval-mode
          BatchNorm folded into the fused ops where it folds, else the paths whole and the ops.
        """
        if self.backend == "torch" or torch.onnx.is_in_onnx_export():
            return UnitPath.PLAIN_TORCH
        if not isinstance(x, torch.fx.Proxy):
            if not uses_triton(x.device):
                return UnitPath.PLAIN_TORCH
            refuse_jit_trace()
            if self._split_kernel_fits(x):
                return UnitPath.SPLIT_KERNEL
            if self._normalises_with_batch_statistics():
                return UnitPath.BATCH_STATISTICS
        return UnitPath.FOLDED_BATCHNORM if self._folds_batchnorm() else UnitPath.OPS

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

    def _normalises_with_batch_statistics(self) -> bool:
        """Whether the paths' BatchNorm uses the batch's statistics (training, or no running statistics) and
        can run inside the kernels with the ReLU: every path's norm is exactly nn.BatchNorm2d (a SyncBatchNorm
        needs statistics from every process and stays a separate op), its activation exactly nn.ReLU, and
        their eps and affine agree."""
        for path in self.paths:
            bn = path.bn
            if type(bn) is not nn.BatchNorm2d or type(path.act) is not nn.ReLU:
                return False
            if not (bn.training or bn.running_mean is None) or _affine_kind(bn) != _affine_kind(self.paths[0].bn):
                return False
        return True

    def split_kernel_applies(self, x: Tensor) -> bool:
        """Whether this call, on ``x`` [B, C_in, H, W] in the current mode, runs the split kernel
        (``sknet_triton.sk_split``): :meth:`unit_path` asked."""
        return self.unit_path(x) is UnitPath.SPLIT_KERNEL

    def _split_kernel_fits(self, x: Tensor) -> bool:
        """Whether the split kernel (``sknet_triton.sk_split``) can replace this call's paths, on the kernels'
        device: eval mode with foldable BatchNorm, the split kernel's geometry
        (:func:`sknet_triton.ops.split_geometry_problem`) with plain zero-padded convolutions, no gradient
        wanted, and ``split_conv`` "triton", or "auto" where the tuned table records it faster."""
        if self.split_conv == "cudnn" or x.dim() != 4 or not self._folds_batchnorm():
            return False
        # Inference only: where autograd needs the paths' gradients, they run as usual.
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.paths.parameters())):
            return False
        convs = [path.conv for path in self.paths]
        if any(conv.bias is not None or conv.padding_mode != "zeros" for conv in convs):
            return False
        geometry = [[conv.kernel_size, conv.stride, conv.dilation, conv.padding] for conv in convs]
        if split_geometry_problem(*zip(*geometry)) is not None:
            return False
        if self.split_conv == "triton":
            return True
        stride = convs[0].stride[0]
        positions = ((x.shape[2] - 1) // stride + 1) * ((x.shape[3] - 1) // stride + 1)
        return prefers_split_kernel(
            x.device, self._split_dtype(x), x.is_contiguous(memory_format=torch.channels_last), self.num_paths,
            self.out_channels, positions,
        )

    def _split_dtype(self, x: Tensor) -> torch.dtype:
        """The dtype the paths' convolutions run in: autocast's where it applies, else x's."""
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return x.dtype

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
            scale, bias = batchnorm_affine(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
            scales.append(scale)
            biases.append(bias)
        return torch.stack(scales), torch.stack(biases)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, M={self.num_paths}, "
            f"backend={self.backend!r}, split_conv={self.split_conv!r}"
        )


class UnitPath(enum.Enum):
    """How one call of an SKConv runs; :meth:`SKConv.unit_path` chooses."""

    PLAIN_TORCH = "plain PyTorch"  # the paths, then the reference fuse and select
    SPLIT_KERNEL = "split kernel"  # sk_split (convolutions, eval-mode BatchNorm, ReLU, fuse), attention, sk_select
    BATCH_STATISTICS = "batch statistics"  # the convolutions, sk_fuse_bn, attention, sk_select_bn
    FOLDED_BATCHNORM = "folded BatchNorm"  # the convolutions, sk_fuse and sk_select with the eval-mode prologue
    OPS = "ops"  # the paths whole, then sk_fuse and sk_select


def _affine_kind(bn: nn.BatchNorm2d) -> tuple:
    """What the paths' BatchNorms must share to run in the kernels together: eps, and which affine
    parameters exist."""
    return bn.eps, bn.weight is None, bn.bias is None


def set_split_conv(model: nn.Module, split_conv: str) -> nn.Module:
    """Choose how every SKConv in ``model`` computes its paths in eval mode; returns ``model``.

    ``"auto"`` (the default) runs the split kernel (``sknet_triton.sk_split``: every path's convolution,
    BatchNorm and ReLU and the pooled sum in one launch) where the GPU's tuned table records it faster than
    cuDNN for the shape, else the paths' own convolutions; ``"triton"`` always runs the split kernel where it
    applies (eval mode, the kernels' device, the paper's 3x3 paths with dilations 1..M), and ``"cudnn"`` never
    does. For tests and benchmarks; the ``"torch"`` backend (:func:`sknet_triton.set_backend`) overrides it.
    """
    if split_conv not in SPLIT_CONVS:
        raise ValueError(f"set_split_conv: split_conv must be one of {SPLIT_CONVS}, got {split_conv!r}")
    for module in model.modules():
        if isinstance(module, SKConv):
            module.split_conv = split_conv
    return model
