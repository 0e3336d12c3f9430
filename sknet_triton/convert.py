"""Weights and models from other SKNet implementations.

- :func:`convert_state_dict`: a checkpoint of timm's SK ResNets or of the original SKNet reference code
  as a state dict the models of :mod:`sknet_triton.models` load with ``strict=True``.
- :func:`accelerate`: an existing model (timm's, or any other) with every timm ``SelectiveKernel``
  replaced in place by an SKConv that holds the same parameter and buffer tensors, and every timm
  ``SplitAttn`` (ResNeSt) made a ``FusedSplitAttn`` in place.
"""
from __future__ import annotations

import re
import warnings
from collections import OrderedDict
from typing import Mapping, Optional

import torch
from timm.layers import BatchNormAct2d, ConvNormAct, SelectiveKernel, SplitAttn
from timm.layers.selective_kernel import SelectiveKernelAttn
from torch import Tensor, nn

from sknet_triton.layers import SKConv
from sknet_triton.split_attn import FusedSplitAttn, why_not_fused
from sknet_triton.ops import MAX_BRANCHES

__all__ = ["convert_state_dict", "accelerate", "SOURCES"]

SOURCES = ("timm", "seed")

_BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_BN = "(weight|bias|running_mean|running_var|num_batches_tracked)"
# Every key of an SK ResNet (timm's and ours): stem, SK blocks, shortcuts, classifier.
_SK_RESNET_KEY = re.compile(
    rf"""(
        conv1\.weight | conv1\.[036]\.weight | conv1\.[14]\.{_BN} | bn1\.{_BN}
      | layer[1-4]\.\d+\.(
            conv[123]\.conv\.weight | conv[123]\.bn\.{_BN}
          | conv[12]\.paths\.\d+\.conv\.weight | conv[12]\.paths\.\d+\.bn\.{_BN}
          | conv[12]\.attn\.fc_reduce\.weight | conv[12]\.attn\.bn\.{_BN} | conv[12]\.attn\.fc_select\.weight
          | downsample\.\d+\.{_BN}
        )
      | fc\.(weight|bias)
    )""",
    re.VERBOSE,
)
# Stage and block of a key of the original SKNet reference code.
_SEED_BLOCK = re.compile(r"layer([1-4])\.(\d+)\.")
# Paths per SK unit in the original SKNet reference code (its blocks build SKConv with the default M=2).
_SEED_PATHS = 2


def convert_state_dict(state_dict: Mapping[str, Tensor], source: str) -> OrderedDict[str, Tensor]:
    """A state dict of another SKNet implementation, keyed for :mod:`sknet_triton.models`.

    Args:
        state_dict: parameter and buffer tensors by name. A ``module.`` prefix on every key (from
            ``DataParallel`` or ``DistributedDataParallel``) is removed.
        source: ``"timm"``: a timm SK ResNet (skresnet18/34/50/50d, skresnext50_32x4d); the keys are already
            ours, and are checked to be SK ResNet keys. ``"seed"``: the original SKNet reference code's
            SKNet-50 or SKNet-101 (keys ``conv.0.weight``, ``layer1.0.conv2.conv.0.0.weight``,
            ``layer1.0.conv2.fc1.0.weight``, ...), for ``sknet50`` or ``sknet101``.

    Returns:
        A new ordered dict holding the same tensor objects under the new names. The reference code's
        final softmax has no parameters: the converted model returns the logits before it.

    Raises:
        ValueError: an unknown ``source``, keys that belong to no SK ResNet of that source, or (``"seed"``)
            keys the network that the checkpoint describes would need but that are missing.
    """
    if source not in SOURCES:
        raise ValueError(f"convert_state_dict: source must be one of {SOURCES}, got {source!r}")
    state_dict = _strip_prefix(state_dict, "module.")
    if source == "timm":
        unknown = [key for key in state_dict if not _SK_RESNET_KEY.fullmatch(key)]
        _raise_on_mismatch("timm", unknown, [])
        return OrderedDict(state_dict)
    key_map = _seed_key_map(_seed_stage_depths(state_dict))
    unknown = [key for key in state_dict if key not in key_map]
    missing = [key for key in key_map if key not in state_dict]
    _raise_on_mismatch("seed", unknown, missing)
    return OrderedDict((key_map[key], state_dict[key]) for key in key_map)


def _strip_prefix(state_dict: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    if state_dict and all(key.startswith(prefix) for key in state_dict):
        return {key[len(prefix):]: value for key, value in state_dict.items()}
    return dict(state_dict)


def _raise_on_mismatch(source: str, unknown: list[str], missing: list[str], shown: int = 10) -> None:
    problems = []
    for what, keys in (("unknown", unknown), ("missing", missing)):
        if keys:
            more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
            problems.append(f"{len(keys)} {what} keys: {', '.join(keys[:shown])}{more}")
    if problems:
        raise ValueError(f"convert_state_dict(source={source!r}): " + "; ".join(problems))


def _seed_stage_depths(state_dict: Mapping[str, Tensor]) -> list[int]:
    """Blocks per stage of a reference-code checkpoint: one more than the highest block index seen."""
    depths = [0, 0, 0, 0]
    for key in state_dict:
        match = _SEED_BLOCK.match(key)
        if match:
            stage, block = int(match[1]) - 1, int(match[2])
            depths[stage] = max(depths[stage], block + 1)
    empty = [f"layer{stage + 1}" for stage, depth in enumerate(depths) if depth == 0]
    if empty:
        raise ValueError(f"convert_state_dict(source='seed'): no blocks found for {', '.join(empty)}")
    return depths


def _seed_key_map(depths: list[int]) -> OrderedDict[str, str]:
    """Reference-code key -> our key, for every key of a reference-code SKNet with these stage depths."""
    key_map: OrderedDict[str, str] = OrderedDict()

    def conv_bn(seed: str, conv: str, bn: str) -> None:
        """The reference code's Sequential(conv, BatchNorm, ...) at ``seed`` -> our ``conv`` and ``bn``."""
        key_map[f"{seed}.0.weight"] = f"{conv}.weight"
        for name in _BN_KEYS:
            key_map[f"{seed}.1.{name}"] = f"{bn}.{name}"

    conv_bn("conv", "conv1", "bn1")
    for stage, depth in enumerate(depths, start=1):
        for index in range(depth):
            block = f"layer{stage}.{index}"
            conv_bn(f"{block}.conv1", f"{block}.conv1.conv", f"{block}.conv1.bn")
            for path in range(_SEED_PATHS):
                ours = f"{block}.conv2.paths.{path}"
                conv_bn(f"{block}.conv2.conv.{path}", f"{ours}.conv", f"{ours}.bn")
            conv_bn(f"{block}.conv2.fc1", f"{block}.conv2.attn.fc_reduce", f"{block}.conv2.attn.bn")
            key_map[f"{block}.conv2.fc2.weight"] = f"{block}.conv2.attn.fc_select.weight"
            conv_bn(f"{block}.conv3", f"{block}.conv3.conv", f"{block}.conv3.bn")
            if index == 0:  # every stage's first block projects its shortcut
                conv_bn(f"{block}.downsample", f"{block}.downsample.0", f"{block}.downsample.1")
    key_map["fc.weight"] = "fc.weight"
    key_map["fc.bias"] = "fc.bias"
    return key_map


# --------------------------------------------------------------------------------------------------------
# accelerate: timm SelectiveKernel -> SKConv, timm SplitAttn -> FusedSplitAttn.


def accelerate(model: nn.Module) -> nn.Module:
    """Put the SK units of ``model`` on the fused ops, in place: every timm ``SelectiveKernel`` becomes an
    equivalent SKConv, and every timm ``SplitAttn`` (ResNeSt's) a :class:`~sknet_triton.split_attn.FusedSplitAttn`.

    Each SKConv holds the timm module's own parameter and buffer tensors (the convolutions, activations
    and attention layers are moved in as they are; each path's ``BatchNormAct2d`` becomes a plain
    ``BatchNorm2d`` sharing its weight, bias and running statistics), so state-dict keys and existing
    optimizers keep working, outputs in training and evaluation stay the same (up to float rounding in the
    fused ops), and the fused ops run the SK attention. Hooks registered on a replaced module are not
    carried over. SelectiveKernels the SKConv cannot represent exactly (anti-aliasing or drop layers,
    normalizations other than BatchNorm, subclasses) are left as they are, with a warning.

    A SplitAttn only changes class (its modules, tensors and hooks are untouched) and runs its fuse and select
    on the kernels, timm's computation while a DropBlock drops; one that
    :func:`~sknet_triton.split_attn.why_not_fused` gives a reason for (radix 1, another norm or activation)
    stays timm's, with one warning per reason, as does a subclass of SplitAttn.

    Works on any ``nn.Module``. Calling it again changes nothing. Returns ``model``, or the SKConv when
    ``model`` itself is a SelectiveKernel. A model with no SK unit at all (a SelectiveKernel, an SKConv or a
    SplitAttn) is returned as it is, with a UserWarning; an argument that is not an ``nn.Module`` raises
    TypeError.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"accelerate: model must be a torch.nn.Module, got {type(model).__name__}")
    if not any(isinstance(module, (SKConv, SelectiveKernel, SplitAttn)) for module in model.modules()):
        warnings.warn(
            f"accelerate: the {type(model).__name__} holds no SK unit (timm SelectiveKernel or SplitAttn, or "
            "SKConv): nothing to accelerate", stacklevel=2,
        )
        return model
    unfused: dict[str, list[str]] = {}  # why_not_fused's reason -> the units it holds for: one warning each
    for name, module in model.named_modules():
        if isinstance(module, SplitAttn) and not isinstance(module, FusedSplitAttn):
            reason = _fuse_split_attn(module, name or "model")
            if reason is not None:
                unfused.setdefault(reason, []).append(name or "model")
    for reason, names in unfused.items():
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        warnings.warn(f"accelerate: {shown} stay timm's SplitAttn: {reason}", stacklevel=2)
    if isinstance(model, SelectiveKernel):
        return _as_skconv(model, "model")
    replaced: dict[int, nn.Module] = {}  # a module shared by several parents is converted once
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, SelectiveKernel):
                if id(child) not in replaced:
                    qualified = f"{parent_name}.{name}" if parent_name else name
                    replaced[id(child)] = _as_skconv(child, qualified)
                setattr(parent, name, replaced[id(child)])
    return model


def _fuse_split_attn(module: SplitAttn, name: str) -> Optional[str]:
    """Make a timm SplitAttn a FusedSplitAttn in place, unless it is a subclass (a warning says so) or
    :func:`why_not_fused` names a reason (returned, for one warning per reason): then it stays timm's."""
    if type(module) is not SplitAttn:
        warnings.warn(f"accelerate: {name} stays a {type(module).__name__}: a subclass of timm's SplitAttn",
                      stacklevel=3)
        return None
    reason = why_not_fused(module)
    if reason is None:
        module.__class__ = FusedSplitAttn
        module.backend = "auto"
    return reason


def _unsupported(sk: nn.Module) -> Optional[str]:
    """Why ``sk`` cannot become an SKConv computing exactly the same, or None."""
    if type(sk) is not SelectiveKernel or type(sk.attn) is not SelectiveKernelAttn:
        return f"{type(sk).__name__} is a subclass of timm's SelectiveKernel"
    if not 2 <= sk.num_paths <= MAX_BRANCHES:
        return f"{sk.num_paths} paths (SKConv takes 2 to {MAX_BRANCHES})"
    for path in sk.paths:
        if type(path) is not ConvNormAct or not isinstance(path.conv, nn.Conv2d):
            return f"its path {type(path).__name__} is not a ConvNormAct with a Conv2d"
        if getattr(path, "aa", None) is not None:
            return "its paths have anti-aliasing layers"
        if type(path.bn) is not BatchNormAct2d:
            return f"its paths normalize with {type(path.bn).__name__}, not BatchNormAct2d"
        if not isinstance(path.bn.drop, nn.Identity):
            return "its paths have drop layers"
    return None


def _as_skconv(sk: nn.Module, name: str) -> nn.Module:
    """An SKConv made of ``sk``'s own modules and tensors, or ``sk`` itself (with a warning) if unsupported."""
    reason = _unsupported(sk)
    if reason is not None:
        warnings.warn(f"accelerate: {name} stays a timm SelectiveKernel: {reason}", stacklevel=3)
        return sk
    first = sk.paths[0].conv
    # Built on the meta device: every submodule with tensors is replaced by sk's own just below.
    with torch.device("meta"):
        skconv = SKConv(
            sk.in_channels,
            sk.out_channels,
            stride=first.stride[0],
            M=sk.num_paths,
            groups=first.groups,
            split_input=sk.split_input,
            attn_width=sk.attn.fc_reduce.out_channels,
        )
    for ours, theirs in zip(skconv.paths, sk.paths):
        ours.conv = theirs.conv
        ours.bn = _plain_batchnorm(theirs.bn)
        ours.act = theirs.bn.act
        ours.training = theirs.training
    for layer in ("fc_reduce", "bn", "act", "fc_select"):
        setattr(skconv.attn, layer, getattr(sk.attn, layer))
    skconv.attn.training = sk.attn.training
    skconv.training = sk.training
    return skconv


def _plain_batchnorm(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    """A BatchNorm2d sharing ``bn``'s parameters, running statistics and settings (timm's BatchNormAct2d
    without its activation)."""
    with torch.device("meta"):
        plain = nn.BatchNorm2d(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    plain.weight, plain.bias = bn.weight, bn.bias
    plain.running_mean, plain.running_var = bn.running_mean, bn.running_var
    plain.num_batches_tracked = bn.num_batches_tracked
    plain.training = bn.training
    return plain
