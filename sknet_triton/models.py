"""The registered models: timm's SK ResNets and ResNeSts and the SK networks timm lacks, built by timm, run on
the fused ops.

Every model is timm's ``ResNet`` with timm's SK blocks (``timm.models.sknet``) or ResNeSt blocks
(``timm.models.resnest``), built by timm's ``build_model_with_cfg`` and given SKConv (FusedSplitAttn) units
by :func:`~sknet_triton.accelerate`. So each has all of timm's
model interface (``features_only``, ``out_indices``, ``output_stride``, ``drop_path_rate``, ``global_pool``,
``feature_info``, ``forward_intermediates``, ``set_grad_checkpointing``, ``group_matcher``, ``pretrained_cfg``,
the head methods) with timm's meaning, and timm's state-dict keys. The networks timm lacks (``sknet50``,
``sknet101``, ``sknet_tiny``) are registered in timm's own registry on import, so that
``timm.create_model("sknet101")`` builds them too; timm's own names stay timm's.

    model = sknet_triton.create_model("sknet50", num_classes=100)
    model = sknet_triton.create_model("sknet50", pretrained=True)  # timm's skresnext50_32x4d weights
    backbone = sknet_triton.create_model("sknet101", features_only=True, out_indices=(2, 3, 4))
"""
from typing import Any

import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import (
    ResNet,
    build_model_with_cfg,
    generate_default_cfgs,
    get_pretrained_cfg,
    is_model_pretrained,
    register_model,
)
from timm.models.sknet import SelectiveKernelBasic, SelectiveKernelBottleneck
from torch import nn

from sknet_triton.checks import check_bool, check_int
from sknet_triton.convert import accelerate

__all__ = [
    "create_model", "list_models", "SmallImageResNet", "TIMM_MODELS", "TIMM_SK_MODELS", "RESNEST_MODELS",
    "SKNET_MODELS", "MODEL_KWARGS", "GLOBAL_POOLS",
    "IMAGENET_MEAN", "IMAGENET_STD", "sknet50", "sknet101", "sknet_tiny",
]

IMAGENET_MEAN = IMAGENET_DEFAULT_MEAN
IMAGENET_STD = IMAGENET_DEFAULT_STD

# timm's own SK ResNets and ResNeSts: create_model builds them with timm, then accelerates them.
TIMM_SK_MODELS = ("skresnet18", "skresnet34", "skresnet50", "skresnet50d", "skresnext50_32x4d")
RESNEST_MODELS = (
    "resnest14d", "resnest26d", "resnest50d", "resnest50d_1s4x24d", "resnest50d_4s2x40d", "resnest101e",
    "resnest200e", "resnest269e",
)
TIMM_MODELS = TIMM_SK_MODELS + RESNEST_MODELS
# The networks timm lacks, registered in timm's registry below.
SKNET_MODELS = ("sknet50", "sknet101", "sknet_tiny")

# What create_model passes to timm besides pretrained and num_classes, each with timm's meaning.
MODEL_KWARGS = ("in_chans", "drop_rate", "drop_path_rate", "global_pool", "features_only", "out_indices", "output_stride")
# timm's global pooling types ("" for none: the model returns the feature map).
GLOBAL_POOLS = ("", "avg", "max", "avgmax", "catavgmax")
# Output strides timm's ResNet builds (stage strides beyond them become dilations), counted from its stem's
# reduction of the input by 4; the small-image stem keeps the full resolution.
RESNET_OUTPUT_STRIDES = (8, 16, 32)
RESNET_STEM_REDUCTION = 4
SMALL_STEM_OUTPUT_STRIDES = tuple(stride // RESNET_STEM_REDUCTION for stride in RESNET_OUTPUT_STRIDES)
# Feature levels of a ResNet (stem, four stages): what out_indices index.
FEATURE_LEVELS = 5

# The paper's attention width max(C / 16, 32) as timm's SK blocks set it: for the SK widths of ResNeXt 32x4d
# (128 to 1024 channels), make_divisible(C / 16, 32) is the same number.
_PAPER_SK_ARGS = dict(rd_ratio=1 / 16, rd_divisor=32, split_input=False)
# sknet_tiny's max(C / 4, 8), for its 16 to 128 channels.
_TINY_SK_ARGS = dict(rd_ratio=1 / 4, rd_divisor=8, split_input=False)

# timm's data configurations (register_model names each after its model): sknet50 is timm's skresnext50_32x4d
# and has its weights (their hub name is kept); the others have no weights and the configuration of timm's
# untrained SK ResNets, at 32x32 for sknet_tiny.
_UNTRAINED_CFG = get_pretrained_cfg("skresnet50").to_dict()
default_cfgs = generate_default_cfgs({
    "sknet50.ra_in1k": get_pretrained_cfg("skresnext50_32x4d.ra_in1k").to_dict(),
    "sknet101.untrained": _UNTRAINED_CFG,
    "sknet_tiny.untrained": {**_UNTRAINED_CFG, "input_size": (3, 32, 32), "pool_size": (4, 4)},
})


class SmallImageResNet(ResNet):
    """timm's ResNet with a stem for small images such as 32x32: one 3x3 stride-1 convolution to
    ``stem_width`` channels (BatchNorm and ReLU follow as in timm's) and no pooling, so that the stages see
    the full resolution: feature reductions 1, 1, 2, 4, 8 and ``output_stride`` 8 (or 4, 2 with dilation).

    Arguments as timm's ResNet's otherwise.
    """

    def __init__(self, *args: Any, in_chans: int = 3, stem_width: int = 16, output_stride: int = 8, **kwargs: Any):
        # timm's ResNet sizes the stages after its stem from stem_width only for its deep stem (2 * stem_width
        # channels), and counts output strides from its stem's reduction: build that, then replace the stem.
        super().__init__(
            *args, in_chans=in_chans, stem_type="deep", stem_width=stem_width // 2,
            output_stride=output_stride * RESNET_STEM_REDUCTION, **kwargs,
        )
        self.conv1 = nn.Conv2d(in_chans, stem_width, kernel_size=3, padding=1, bias=False)
        self.maxpool = nn.Identity()
        self.feature_info[0]["reduction"] = 1
        for info in self.feature_info[1:]:
            info["reduction"] //= RESNET_STEM_REDUCTION
        self.init_weights(zero_init_last=False)  # timm's He initialisation, of the new stem too


def _build(variant: str, pretrained: bool, model_cls: type = ResNet, **kwargs: Any) -> nn.Module:
    """timm's build of ``variant`` (pretrained weights, features_only, ...) with SKConv units."""
    return accelerate(build_model_with_cfg(model_cls, variant, pretrained, **kwargs))



def _build_paper_sknet(variant: str, layers: tuple, pretrained: bool, **kwargs: Any) -> ResNet:
    """The paper's SKNet with ``layers`` bottleneck blocks per stage: ResNeXt 32x4d with SK units."""
    model_args = dict(
        block=SelectiveKernelBottleneck, layers=layers, cardinality=32, base_width=4,
        block_args=dict(sk_kwargs=_PAPER_SK_ARGS), zero_init_last=False,
    )
    return _build(variant, pretrained, **dict(model_args, **kwargs))

@register_model
def sknet50(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """SKNet-50 of the paper and of the original SKNet reference code: ResNeXt-50 32x4d with SK units, M=2
    paths (3x3, and 3x3 with dilation 2), G=32 groups, attention width d = max(C / 16, 32): timm's
    skresnext50_32x4d, with its weights."""
    return _build_paper_sknet("sknet50", (3, 4, 6, 3), pretrained, **kwargs)


@register_model
def sknet101(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """SKNet-101 of the paper and of the original SKNet reference code: :func:`sknet50` with [3, 4, 23, 3]
    blocks."""
    return _build_paper_sknet("sknet101", (3, 4, 23, 3), pretrained, **kwargs)


@register_model
def sknet_tiny(pretrained: bool = False, **kwargs: Any) -> SmallImageResNet:
    """A small SK ResNet for 32x32 images, tests and CPU demos (0.55 M parameters): a 3x3 stem of 16
    channels without pooling, then one basic SK block per stage of 16, 32, 64, 128 channels, attention
    width d = max(C / 4, 8)."""
    model_args = dict(
        block=SelectiveKernelBasic, layers=(1, 1, 1, 1), channels=(16, 32, 64, 128), stem_width=16,
        block_args=dict(sk_kwargs=_TINY_SK_ARGS), zero_init_last=False,
    )
    return _build("sknet_tiny", pretrained, SmallImageResNet, **dict(model_args, **kwargs))


def list_models() -> list[str]:
    """Names of the models :func:`create_model` builds, sorted: timm's SK ResNets and ResNeSts
    (:data:`TIMM_MODELS`) and :data:`SKNET_MODELS`."""
    return sorted(TIMM_MODELS + SKNET_MODELS)


def create_model(name: str, pretrained: bool = False, num_classes: int = 1000, **kwargs: Any) -> nn.Module:
    """The registered model ``name``, built by timm (``timm.create_model``) with SKConv units.

    Args:
        name: one of :func:`list_models`.
        pretrained: load timm's ImageNet weights (downloaded by timm): ``sknet50`` and ``skresnext50_32x4d``
            get timm's ``skresnext50_32x4d``, ``skresnet18`` and ``skresnet34`` timm's own. timm adapts them
            to ``num_classes`` (a new classifier unless 1000) and ``in_chans``.
        num_classes: classifier outputs; 0 for none: the model returns pooled features [B, num_features].
        in_chans: input image channels (default 3).
        drop_rate: dropout probability before the classifier (default 0), at least 0 and below 1.
        drop_path_rate: stochastic depth: the largest probability of dropping a block's residual branch,
            rising linearly over the blocks (default 0), at least 0 and below 1.
        global_pool: one of :data:`GLOBAL_POOLS` (default "avg"); "" returns the feature map.
        features_only: a backbone returning the list of feature maps at ``out_indices`` (timm's
            ``FeatureListNet``) instead of the classifier network.
        out_indices: with ``features_only``, which of the five feature levels (stem, four stages) to return:
            a sequence of indices (negative from the end), or an int n for the last n (default all).
        output_stride: the reduction of the last feature map, 8, 16 or 32 (the default; ``sknet_tiny``: 2, 4
            or 8, the default); stages beyond it dilate their convolutions instead of striding.

    Input [B, in_chans, H, W] -> logits [B, num_classes] (float, contiguous or channels_last). The model's
    ``pretrained_cfg`` (and ``default_cfg``) is timm's data configuration: the weights' own when loaded.

    Raises ValueError for an unknown name, for ``pretrained`` where no weights exist and for arguments out of
    range; TypeError for any other keyword argument or a wrong type; RuntimeError when timm cannot fetch the
    weights. Each is one line naming the argument.
    """
    if name not in list_models():
        raise ValueError(f"create_model: unknown model {name!r}; available: {', '.join(list_models())}")
    unknown = sorted(set(kwargs) - set(MODEL_KWARGS))
    if unknown:
        raise TypeError(
            f"create_model: unknown keyword arguments {unknown}; "
            f"accepted: pretrained, num_classes, {', '.join(MODEL_KWARGS)}"
        )
    pretrained = check_bool("create_model", "pretrained", pretrained)
    num_classes = check_int("create_model", "num_classes", num_classes, 0)
    _check_model_kwargs(name, kwargs)
    if not pretrained:
        return accelerate(timm.create_model(name, num_classes=num_classes, **kwargs))
    if not is_model_pretrained(name):
        with_weights = [model for model in list_models() if is_model_pretrained(model)]
        raise ValueError(
            f"create_model: no pretrained weights exist for {name!r}; pretrained=True loads timm's weights, "
            f"which exist for {', '.join(with_weights)}"
        )
    try:
        model = timm.create_model(name, pretrained=True, num_classes=num_classes, **kwargs)
    except Exception as error:  # no network, no cache, a hub error: any of several types
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise RuntimeError(
            f"create_model: timm could not fetch the pretrained weights of {name!r} "
            f"({type(error).__name__}: {message}); pretrained=False builds the model without them"
        ) from error
    return accelerate(model)


def _check_model_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    """TypeError or ValueError, naming the argument, for a keyword argument of :data:`MODEL_KWARGS` that
    timm would refuse or misread."""
    if "in_chans" in kwargs:
        check_int("create_model", "in_chans", kwargs["in_chans"], 1)
    for rate in ("drop_rate", "drop_path_rate"):
        if rate in kwargs:
            _check_probability(rate, kwargs[rate])
    if "global_pool" in kwargs and kwargs["global_pool"] not in GLOBAL_POOLS:
        raise ValueError(f"create_model: global_pool must be one of {GLOBAL_POOLS}, got {kwargs['global_pool']!r}")
    features_only = check_bool("create_model", "features_only", kwargs.get("features_only", False))
    if "out_indices" in kwargs:
        if not features_only:
            raise ValueError("create_model: out_indices selects the feature maps of features_only=True")
        _check_out_indices(kwargs["out_indices"])
    if "output_stride" in kwargs:
        strides = SMALL_STEM_OUTPUT_STRIDES if name == "sknet_tiny" else RESNET_OUTPUT_STRIDES
        stride = check_int("create_model", "output_stride", kwargs["output_stride"], 1)
        if stride not in strides:
            raise ValueError(f"create_model: output_stride must be one of {strides} for {name!r}, got {stride}")


def _check_probability(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"create_model: {name} must be a number, got {type(value).__name__} {value!r}")
    if not 0 <= value < 1:  # 1 would drop everything: nothing left to learn from
        raise ValueError(f"create_model: {name} must be at least 0 and below 1, got {value}")


def _check_out_indices(out_indices: Any) -> None:
    """An int n in 1..FEATURE_LEVELS (the last n levels), or a non-empty sequence of distinct level indices."""
    if isinstance(out_indices, (list, tuple)):
        indices = [check_int("create_model", "out_indices", index, -FEATURE_LEVELS) for index in out_indices]
        levels = [index % FEATURE_LEVELS for index in indices]
        if not indices or max(indices) >= FEATURE_LEVELS or len(set(levels)) != len(levels):
            raise ValueError(
                f"create_model: out_indices must be distinct feature levels from -{FEATURE_LEVELS} to "
                f"{FEATURE_LEVELS - 1}, got {out_indices!r}"
            )
        return
    count = check_int("create_model", "out_indices", out_indices, 1)
    if count > FEATURE_LEVELS:
        raise ValueError(f"create_model: out_indices as a count must be 1 to {FEATURE_LEVELS}, got {count}")
