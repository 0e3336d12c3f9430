"""ResNet building blocks around SKConv: convolution units, SK residual blocks, shortcuts and stems.

Module names follow timm's ResNet and SK blocks (``conv1``/``conv2``/``conv3`` with ``.conv`` and ``.bn``,
``downsample.{i}``, stem ``conv1``/``bn1``), so timm state dicts load unchanged.
"""
from __future__ import annotations

from typing import Any, Optional, Union

from torch import Tensor, nn

from sknet_triton.layers import ConvBnAct, SKConv, check_int

__all__ = [
    "ConvBnAct", "SKBasicBlock", "SKBottleneck", "BlockType", "make_shortcut", "make_stage", "make_stem", "STEM_TYPES",
]

STEM_TYPES = ("7x7", "deep", "small")


class SKBasicBlock(nn.Module):
    """Basic residual block with SKConv as its first 3x3: SKConv -> 3x3 ConvBn -> + shortcut -> ReLU.

    [B, in_channels, H, W] -> [B, planes, H / stride, W / stride]. ``sk_args`` go to SKConv (its
    convolutions are ungrouped here).
    """

    expansion = 1

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        cardinality: int = 1,
        base_width: int = 64,
        sk_args: Optional[dict[str, Any]] = None,
    ):
        super().__init__()
        if cardinality != 1 or base_width != 64:
            raise ValueError(
                "SKBasicBlock: cardinality and base_width are for bottleneck blocks, "
                f"got {cardinality} and {base_width}"
            )
        self.conv1 = SKConv(in_channels, planes, stride, groups=1, **(sk_args or {}))
        self.conv2 = ConvBnAct(planes, planes, kernel_size=3, act_layer=None)
        self.downsample = downsample
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.act(self.conv2(self.conv1(x)) + shortcut)


class SKBottleneck(nn.Module):
    """Bottleneck residual block with SKConv as its 3x3: 1x1 ConvBnAct -> SKConv -> 1x1 ConvBn -> + shortcut -> ReLU.

    [B, in_channels, H, W] -> [B, 4 * planes, H / stride, W / stride]. The SK width is
    ``floor(planes * base_width / 64) * cardinality`` and its convolutions have ``cardinality`` groups
    (ResNeXt 32x4d: cardinality 32, base_width 4). ``sk_args`` go to SKConv.
    """

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        cardinality: int = 1,
        base_width: int = 64,
        sk_args: Optional[dict[str, Any]] = None,
    ):
        super().__init__()
        width = int(planes * base_width / 64) * cardinality
        out_channels = planes * self.expansion
        self.conv1 = ConvBnAct(in_channels, width)
        self.conv2 = SKConv(width, width, stride, groups=cardinality, **(sk_args or {}))
        self.conv3 = ConvBnAct(width, out_channels, act_layer=None)
        self.downsample = downsample
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.act(self.conv3(self.conv2(self.conv1(x))) + shortcut)


def make_shortcut(in_channels: int, out_channels: int, stride: int, avg_down: bool) -> nn.Sequential:
    """Projection shortcut [B, in_channels, H, W] -> [B, out_channels, H / stride, W / stride].

    ``avg_down=False``: strided 1x1 convolution + BatchNorm (keys ``0``, ``1``). ``avg_down=True`` (ResNet-D):
    2x2 average pool (identity at stride 1), then 1x1 convolution + BatchNorm (keys ``1``, ``2``), so that
    no input position is skipped.
    """
    if not avg_down:
        return nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
        )
    pool = nn.Identity() if stride == 1 else nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False)
    return nn.Sequential(pool, nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))


BlockType = Union[type[SKBasicBlock], type[SKBottleneck]]


def make_stage(
    block: BlockType,
    in_channels: int,
    planes: int,
    num_blocks: int,
    stride: int,
    avg_down: bool = False,
    **block_args: Any,
) -> nn.Sequential:
    """``num_blocks`` residual blocks, the first with ``stride`` and, where the shape changes, a projection
    shortcut (see :func:`make_shortcut`). [B, in_channels, H, W] -> [B, planes * block.expansion, H / stride,
    W / stride]. ``block_args`` (cardinality, base_width, sk_args) go to every block.
    """
    num_blocks = check_int("make_stage", "num_blocks", num_blocks, 1)
    out_channels = planes * block.expansion
    downsample = None
    if stride != 1 or in_channels != out_channels:
        downsample = make_shortcut(in_channels, out_channels, stride, avg_down)
    blocks = [block(in_channels, planes, stride, downsample, **block_args)]
    blocks += [block(out_channels, planes, **block_args) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


def make_stem(stem_type: str, in_chans: int, stem_width: int) -> tuple[nn.Module, nn.Module, int]:
    """The stem's convolution (the network's ``conv1``), its pooling (``maxpool``) and output channels.

    The network applies ``conv1``, then BatchNorm and ReLU (``bn1``, ``act1``), then ``maxpool``.

    - ``"7x7"``: one 7x7 stride-2 convolution to ``stem_width`` channels, 3x3 stride-2 max pool (ResNet).
      Output stride 4.
    - ``"deep"``: 3x3 convolutions to ``stem_width``, ``stem_width``, ``2 * stem_width`` channels, the
      first with stride 2 and BatchNorm + ReLU between them (ResNet-D), then the max pool. Output stride 4.
    - ``"small"``: one 3x3 stride-1 convolution to ``stem_width`` channels and no pooling, for small
      images such as 32x32. Output stride 1.
    """
    max_pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    if stem_type == "7x7":
        return nn.Conv2d(in_chans, stem_width, 7, stride=2, padding=3, bias=False), max_pool, stem_width
    if stem_type == "deep":
        out_channels = 2 * stem_width
        conv = nn.Sequential(
            nn.Conv2d(in_chans, stem_width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(stem_width),
            nn.ReLU(inplace=True),
            nn.Conv2d(stem_width, stem_width, 3, padding=1, bias=False),
            nn.BatchNorm2d(stem_width),
            nn.ReLU(inplace=True),
            nn.Conv2d(stem_width, out_channels, 3, padding=1, bias=False),
        )
        return conv, max_pool, out_channels
    if stem_type == "small":
        return nn.Conv2d(in_chans, stem_width, 3, padding=1, bias=False), nn.Identity(), stem_width
    raise ValueError(f"make_stem: stem_type must be one of {STEM_TYPES}, got {stem_type!r}")
