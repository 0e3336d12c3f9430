"""Selective Kernel ResNets and the model registry.

:class:`SKResNet` is a ResNet whose 3x3 convolutions are SKConv units. The registered model functions
configure it as the paper's SKNet-50/101, as timm's SK ResNets (the same architecture and state-dict
keys, so timm weights load unchanged), and as a small network for tests and CPU demos. Every model
returns logits [B, num_classes], or with ``num_classes=0`` the pooled features [B, num_features], and has
timm's head interface (``forward_features``, ``forward_head``, ``reset_classifier``, ``get_classifier``)
and data configuration (``pretrained_cfg``).

    model = sknet_triton.create_model("sknet50", num_classes=100)
    model = sknet_triton.create_model("sknet50", pretrained=True)  # timm's skresnext50_32x4d weights
"""
from typing import Any, Callable, Optional, Sequence, Union

import torch.nn.functional as F
from torch import Tensor, nn

from sknet_triton.blocks import BlockType, SKBasicBlock, SKBottleneck, make_stage, make_stem
from sknet_triton.layers import check_bool, check_int, paper_attn_width, timm_attn_width

__all__ = [
    "SKResNet", "create_model", "list_models", "register_model", "default_pretrained_cfg", "MODEL_KWARGS", "PRETRAINED",
    "IMAGENET_MEAN", "IMAGENET_STD",
]

# What create_model passes to a registered model besides num_classes.
MODEL_KWARGS = ("in_chans", "drop_rate")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The registered models with pretrained weights, and the timm model whose weights they are: the same
# network with the same state-dict keys. (timm has no weights for skresnet50 and skresnet50d.)
PRETRAINED = {
    "sknet50": "skresnext50_32x4d",
    "skresnext50_32x4d": "skresnext50_32x4d",
    "skresnet18": "skresnet18",
    "skresnet34": "skresnet34",
}

# timm's data configuration of its SK ResNets (timm.models.sknet), which timm.data.resolve_data_config
# and resolve_model_data_config read from a model's pretrained_cfg; then each model's differences.
_DATA_CFG = dict(
    input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875, crop_mode="center", interpolation="bicubic",
    mean=IMAGENET_MEAN, std=IMAGENET_STD, first_conv="conv1", classifier="fc",
)
_DATA_CFG_CHANGES = {
    "skresnet50d": dict(first_conv="conv1.0"),
    "sknet_tiny": dict(input_size=(3, 32, 32), pool_size=(4, 4)),
}

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
        drop_rate: dropout probability before the classifier, in training, at least 0 and below 1.

    Input [B, in_chans, H, W] (float, contiguous or channels_last) -> logits [B, num_classes], or the
    pooled features [B, num_features] when ``num_classes`` is 0. Stages 2 to 4 halve the resolution; the
    stem divides it by 4 ("7x7", "deep") or keeps it ("small").

    An argument of the wrong type raises TypeError and one out of range ValueError, naming it.
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
        layers = [check_int("SKResNet", "layers", depth, 1) for depth in layers]
        channels = [check_int("SKResNet", "channels", planes, 1) for planes in channels]
        num_classes = check_int("SKResNet", "num_classes", num_classes, 0)
        in_chans = check_int("SKResNet", "in_chans", in_chans, 1)
        stem_width = check_int("SKResNet", "stem_width", stem_width, 1)
        cardinality = check_int("SKResNet", "cardinality", cardinality, 1)
        base_width = check_int("SKResNet", "base_width", base_width, 1)
        avg_down = check_bool("SKResNet", "avg_down", avg_down)
        if isinstance(drop_rate, bool) or not isinstance(drop_rate, (int, float)):
            raise TypeError(f"SKResNet: drop_rate must be a number, got {type(drop_rate).__name__} {drop_rate!r}")
        if not 0 <= drop_rate < 1:  # 1 would zero every feature: nothing left to classify
            raise ValueError(f"SKResNet: drop_rate must be at least 0 and below 1, got {drop_rate}")
        self.num_classes = num_classes
        self.drop_rate = float(drop_rate)
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
        self.num_features = self.head_hidden_size = width
        self.fc = _classifier(width, num_classes)
        self._init_weights()
        # timm's data configuration (see default_pretrained_cfg); create_model sets each model's own.
        self.pretrained_cfg = self.default_cfg = dict(_DATA_CFG)

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
        """Feature map [B, num_features, h, w] -> logits [B, num_classes]; the pooled features
        [B, num_features] (after dropout, in training) if ``pre_logits`` or if ``num_classes`` is 0."""
        # A mean rather than AdaptiveAvgPool2d, which has produced NaNs with channels_last under AMP.
        x = x.mean(dim=(2, 3))
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        """Images [B, in_chans, H, W] -> logits [B, num_classes] (``num_classes`` 0: features [B, num_features])."""
        return self.forward_head(self.forward_features(x))

    def get_classifier(self, name_only: bool = False) -> Union[nn.Module, str]:
        """The classifier: ``fc``, a Linear [B, num_features] -> [B, num_classes] (an Identity when
        ``num_classes`` is 0), or its name if ``name_only``."""
        return "fc" if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the classifier by a new one with ``num_classes`` outputs (0: none, the model then returns
        the pooled features [B, num_features]), on the model's device and dtype, as timm's models do.
        ``global_pool``: None (keep the pooling) or "avg", the only pooling of these models."""
        num_classes = check_int("reset_classifier", "num_classes", num_classes, 0)
        if global_pool not in (None, "avg"):
            raise ValueError(
                f"reset_classifier: global_pool must be None or 'avg' (the only pooling), got {global_pool!r}"
            )
        first = next(self.parameters())
        self.num_classes = num_classes
        self.fc = _classifier(self.num_features, num_classes).to(device=first.device, dtype=first.dtype)
        self.fc.train(self.training)


def _classifier(num_features: int, num_classes: int) -> nn.Module:
    """Linear [B, num_features] -> [B, num_classes], or an Identity for ``num_classes`` 0 (timm's convention)."""
    return nn.Linear(num_features, num_classes) if num_classes else nn.Identity()


# --------------------------------------------------------------------------------------------------------
# Registry.


def register_model(fn: Callable[..., SKResNet]) -> Callable[..., SKResNet]:
    """Register a model function under its own name for :func:`create_model`."""
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    """Names of the registered models, sorted."""
    return sorted(_MODELS)


def default_pretrained_cfg(name: str) -> dict:
    """timm's data configuration of the registered model ``name``: input size, mean, std, crop, interpolation,
    first convolution and classifier names, as timm's own SK ResNets have it."""
    if name not in _MODELS:
        raise ValueError(f"default_pretrained_cfg: unknown model {name!r}; available: {', '.join(list_models())}")
    return {**_DATA_CFG, **_DATA_CFG_CHANGES.get(name, {}), "architecture": name}


def create_model(name: str, pretrained: bool = False, num_classes: int = 1000, **kwargs: Any) -> SKResNet:
    """The registered model ``name``, freshly initialised or with timm's pretrained weights.

    Args:
        name: one of :func:`list_models`.
        pretrained: load the ImageNet weights of the same network from timm (downloaded by timm, which
            must be installed): ``sknet50`` and ``skresnext50_32x4d`` get timm's ``skresnext50_32x4d``,
            ``skresnet18`` and ``skresnet34`` timm's own (see :data:`PRETRAINED`). timm adapts them to
            ``num_classes`` (a new classifier unless 1000) and ``in_chans`` as for its own models.
        num_classes: classifier outputs; 0 for none: the model returns pooled features [B, num_features].
        in_chans: input image channels (default 3).
        drop_rate: dropout probability before the classifier (default 0).

    The model's ``pretrained_cfg`` (and ``default_cfg``) is timm's data configuration: that of the
    pretrained weights if loaded, else :func:`default_pretrained_cfg`, so that ``timm.data.resolve_data_config``
    works on it.

    Raises ValueError for an unknown name, for ``pretrained`` where no weights exist and for arguments out of
    range; TypeError for any other keyword argument or a wrong type; ImportError for ``pretrained`` without
    timm; RuntimeError when timm cannot fetch the weights.
    """
    if name not in _MODELS:
        raise ValueError(f"create_model: unknown model {name!r}; available: {', '.join(list_models())}")
    unknown = sorted(set(kwargs) - set(MODEL_KWARGS))
    if unknown:
        raise TypeError(
            f"create_model: unknown keyword arguments {unknown}; "
            f"accepted: pretrained, num_classes, {', '.join(MODEL_KWARGS)}"
        )
    pretrained = check_bool("create_model", "pretrained", pretrained)
    if pretrained and name not in PRETRAINED:
        raise ValueError(
            f"create_model: no pretrained weights exist for {name!r}; pretrained=True loads timm's weights, "
            f"which exist for {', '.join(sorted(PRETRAINED))}"
        )
    model = _MODELS[name](num_classes=num_classes, **kwargs)
    model.pretrained_cfg = model.default_cfg = default_pretrained_cfg(name)
    if pretrained:
        _load_timm_weights(model, name, num_classes, kwargs.get("in_chans", 3))
    return model


def _load_timm_weights(model: SKResNet, name: str, num_classes: int, in_chans: int) -> None:
    """Copy into ``model`` the pretrained weights of its timm equivalent, and their pretrained_cfg."""
    timm_name = PRETRAINED[name]
    try:
        import timm  # optional: only pretrained weights need it
    except ImportError:
        raise ImportError(
            f"create_model({name!r}, pretrained=True) loads timm's {timm_name} weights and needs timm: pip install timm"
        ) from None
    try:
        source = timm.create_model(timm_name, pretrained=True, num_classes=num_classes, in_chans=in_chans)
    except Exception as error:  # no network, no cache, a hub error: any of several types
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise RuntimeError(
            f"create_model: timm could not fetch the pretrained weights of {timm_name} for {name!r} "
            f"({type(error).__name__}: {message}); pretrained=False builds the model without them"
        ) from error
    model.load_state_dict(source.state_dict())
    model.pretrained_cfg = model.default_cfg = dict(source.pretrained_cfg)


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
