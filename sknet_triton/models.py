"""Selective Kernel ResNets and the model registry.

:class:`SKResNet` is a ResNet whose 3x3 convolutions are SKConv units. The registered model functions
configure it as the paper's SKNet-50/101, as timm's SK ResNets (the same architecture and state-dict
keys, so timm weights load unchanged), and as a small network for tests and CPU demos. Every model
returns logits [B, num_classes].

    model = sknet_triton.create_model("sknet50", num_classes=100)
"""
from typing import Any, Callable, Optional, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from sknet_triton.blocks import BlockType, SKBasicBlock, SKBottleneck, make_stage, make_stem
from sknet_triton.layers import paper_attn_width, timm_attn_width

__all__ = ["SKResNet", "create_model", "list_models", "register_model", "MODEL_KWARGS"]

# What create_model passes to a registered model besides num_classes.
MODEL_KWARGS = ("in_chans", "drop_rate")

_MODELS: dict[str, Callable[..., "SKResNet"]] = {}


class SKResNet(nn.Module):
    """A ResNet with Selective Kernel units: stem, four stages of SK residual blocks, average pool, linear.

    Args:
        block: :class:`~sknet_triton.blocks.SKBasicBlock` or :class:`~sknet_triton.blocks.SKBottleneck`.
        layers: blocks per stage (four stages).
        channels: ``planes`` of each stage; a stage outputs ``planes * block.expansion`` channels.
        num_classes: classifier outputs.
        in_chans: input image channels.
        stem_type, stem_width: the stem (see :func:`~sknet_triton.blocks.make_stem`).
        avg_down: average-pool projection shortcuts (ResNet-D) instead of strided 1x1 convolutions.
        cardinality, base_width: bottleneck SK width and groups (see
            :class:`~sknet_triton.blocks.SKBottleneck`).
        sk_args: SKConv arguments for every block (``attn_width``, ``split_input``, ``M``, ...).
        drop_rate: dropout probability before the classifier, in training.

    Input [B, in_chans, H, W] (float, contiguous or channels_last) -> logits [B, num_classes].
    Stages 2 to 4 halve the resolution; the stem divides it by 4 ("7x7", "deep") or keeps it ("small").
    """

    def __init__(
        self,
        block: BlockType,
        layers: Sequence[int],
        channels: Sequence[int] = (64, 128, 256, 512),
        num_classes: int = 1000,
        in_chans: int = 3,
        stem_type: str = "7x7",
        stem_width: int = 64,
        avg_down: bool = False,
        cardinality: int = 1,
        base_width: int = 64,
        sk_args: Optional[dict[str, Any]] = None,
        drop_rate: float = 0.0,
    ):
        super().__init__()
        if len(layers) != 4 or len(channels) != 4:
            raise ValueError(f"SKResNet: needs four stages, got layers={list(layers)}, channels={list(channels)}")
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.conv1, maxpool, width = make_stem(stem_type, in_chans, stem_width)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = maxpool
        block_args = dict(cardinality=cardinality, base_width=base_width, sk_args=sk_args)
        stages = []
        for index, (planes, num_blocks) in enumerate(zip(channels, layers)):
            stride = 1 if index == 0 else 2
            stages.append(make_stage(block, width, planes, num_blocks, stride, avg_down, **block_args))
            width = planes * block.expansion
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.num_features = width
        self.fc = nn.Linear(width, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # He initialisation of every convolution, for ReLU networks; BatchNorm and Linear keep PyTorch's.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: Tensor) -> Tensor:
        """Images [B, in_chans, H, W] -> feature map [B, num_features, H / 32, W / 32] ("small" stem: / 8)."""
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Feature map [B, num_features, h, w] -> logits [B, num_classes] (pooled features if ``pre_logits``)."""
        # A mean rather than AdaptiveAvgPool2d, which has produced NaNs with channels_last under AMP.
        x = x.mean(dim=(2, 3))
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        """Images [B, in_chans, H, W] -> logits [B, num_classes]."""
        return self.forward_head(self.forward_features(x))


# --------------------------------------------------------------------------------------------------------
# Registry.


def register_model(fn: Callable[..., SKResNet]) -> Callable[..., SKResNet]:
    """Register a model function under its own name for :func:`create_model`."""
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    """Names of the registered models, sorted."""
    return sorted(_MODELS)


def create_model(name: str, num_classes: int = 1000, **kwargs: Any) -> SKResNet:
    """The registered model ``name``, freshly initialised.

    Args:
        name: one of :func:`list_models`.
        num_classes: classifier outputs.
        in_chans: input image channels (default 3).
        drop_rate: dropout probability before the classifier (default 0).

    Raises ValueError for an unknown name and TypeError for any other keyword argument.
    """
    if name not in _MODELS:
        raise ValueError(f"create_model: unknown model {name!r}; available: {', '.join(list_models())}")
    unknown = sorted(set(kwargs) - set(MODEL_KWARGS))
    if unknown:
        raise TypeError(
            f"create_model: unknown keyword arguments {unknown}; accepted: num_classes, {', '.join(MODEL_KWARGS)}"
        )
    return _MODELS[name](num_classes=num_classes, **kwargs)


# --------------------------------------------------------------------------------------------------------
# Models. Keyword arguments (num_classes, in_chans, drop_rate) go to SKResNet.


@register_model
def sknet50(**kwargs: Any) -> SKResNet:
    """SKNet-50 of the paper and of the original SKNet reference code: ResNeXt-50 32x4d with SK units,
    M=2 paths (3x3, and 3x3 with dilation 2), G=32 groups, attention width d = max(C / 16, 32).

    The same architecture and state-dict keys as timm's skresnext50_32x4d.
    """
    return SKResNet(
        SKBottleneck, (3, 4, 6, 3), cardinality=32, base_width=4,
        sk_args=dict(attn_width=paper_attn_width(r=16, L=32)), **kwargs,
    )


@register_model
def sknet101(**kwargs: Any) -> SKResNet:
    """SKNet-101 of the paper and of the original SKNet reference code: as :func:`sknet50` with
    [3, 4, 23, 3] blocks."""
    return SKResNet(
        SKBottleneck, (3, 4, 23, 3), cardinality=32, base_width=4,
        sk_args=dict(attn_width=paper_attn_width(r=16, L=32)), **kwargs,
    )


@register_model
def skresnet18(**kwargs: Any) -> SKResNet:
    """timm's skresnet18: ResNet-18 whose first 3x3 of every basic block is an SKConv splitting its input
    across the paths, attention width ``make_divisible(C / 8, 16)``."""
    sk_args = dict(attn_width=timm_attn_width(rd_ratio=1 / 8, rd_divisor=16), split_input=True)
    return SKResNet(SKBasicBlock, (2, 2, 2, 2), sk_args=sk_args, **kwargs)


@register_model
def skresnet34(**kwargs: Any) -> SKResNet:
    """timm's skresnet34: as :func:`skresnet18` with [3, 4, 6, 3] blocks."""
    sk_args = dict(attn_width=timm_attn_width(rd_ratio=1 / 8, rd_divisor=16), split_input=True)
    return SKResNet(SKBasicBlock, (3, 4, 6, 3), sk_args=sk_args, **kwargs)


@register_model
def skresnet50(**kwargs: Any) -> SKResNet:
    """timm's skresnet50: ResNet-50 whose bottleneck 3x3 is an ungrouped SKConv splitting its input across
    the paths, attention width ``make_divisible(C / 16, 8)``."""
    sk_args = dict(attn_width=timm_attn_width(rd_ratio=1 / 16, rd_divisor=8), split_input=True)
    return SKResNet(SKBottleneck, (3, 4, 6, 3), sk_args=sk_args, **kwargs)


@register_model
def skresnet50d(**kwargs: Any) -> SKResNet:
    """timm's skresnet50d: :func:`skresnet50` with the ResNet-D deep stem (32, 32, 64 channels) and
    average-pool shortcuts."""
    sk_args = dict(attn_width=timm_attn_width(rd_ratio=1 / 16, rd_divisor=8), split_input=True)
    return SKResNet(
        SKBottleneck, (3, 4, 6, 3), stem_type="deep", stem_width=32, avg_down=True, sk_args=sk_args, **kwargs
    )


@register_model
def skresnext50_32x4d(**kwargs: Any) -> SKResNet:
    """timm's skresnext50_32x4d: ResNeXt-50 32x4d with SK units, attention width
    ``make_divisible(C / 16, 32)``; the same network as :func:`sknet50`."""
    sk_args = dict(attn_width=timm_attn_width(rd_ratio=1 / 16, rd_divisor=32))
    return SKResNet(SKBottleneck, (3, 4, 6, 3), cardinality=32, base_width=4, sk_args=sk_args, **kwargs)


@register_model
def sknet_tiny(**kwargs: Any) -> SKResNet:
    """A small SK ResNet for 32x32 images, tests and CPU demos (0.55 M parameters): a 3x3 stem of 16
    channels without pooling, then one basic SK block per stage of 16, 32, 64, 128 channels, attention
    width d = max(C / 4, 8)."""
    return SKResNet(
        SKBasicBlock, (1, 1, 1, 1), channels=(16, 32, 64, 128), stem_type="small", stem_width=16,
        sk_args=dict(attn_width=paper_attn_width(r=4, L=8)), **kwargs,
    )
