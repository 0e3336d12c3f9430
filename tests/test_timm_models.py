"""The registered models as timm models: timm's registry, timm's checks on every model (data configuration,
head, feature extraction), and timm's training features (gradient checkpointing through the kernels,
stochastic depth, pooling, output stride, parameter groups, intermediate features).

TorchScript and torch.fx of every model are in tests/test_scripting.py. Models run on the "torch" backend
except where a test says it runs the kernels (the small model), so that Triton's interpreter stays cheap.
"""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.data import resolve_model_data_config
from timm.layers import SelectiveKernel
from timm.models import group_parameters
from timm.optim import create_optimizer_v2

from sknet_triton import SKConv, create_model, list_models, set_backend
from sknet_triton.models import SKNET_MODELS
from tests.helpers import DEVICE, requires_kernels
from tests.model_helpers import (
    NUM_CLASSES,
    SMALL_MODEL,
    assert_as_accurate_as,
    assert_close_relative,
    assert_grads_as_accurate_as,
    count_sk_units,
    randomize_batchnorm,
)

STAGES = ("layer1", "layer2", "layer3", "layer4")


def images(batch: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size)


def small_model(**kwargs):
    """The small model on the "torch" backend with random BatchNorm state (``num_classes`` 10 by default)."""
    kwargs.setdefault("num_classes", NUM_CLASSES)
    return set_backend(randomize_batchnorm(create_model(SMALL_MODEL, **kwargs)), "torch")


# --------------------------------------------------------------------------------------------------------
# timm's registry.


def test_timm_builds_our_models_by_name():
    for name in SKNET_MODELS:
        assert timm.is_model(name)
        with torch.device("meta"):  # the modules, not the weights, matter here
            model = timm.create_model(name)
        assert count_sk_units(model) > 0, name
        assert not any(isinstance(module, SelectiveKernel) for module in model.modules()), name
        assert model.pretrained_cfg["architecture"] == name
    with torch.device("meta"):  # timm's own names stay timm's
        assert any(isinstance(module, SelectiveKernel) for module in timm.create_model("skresnet18").modules())


def test_timm_data_config_of_our_names():
    with torch.device("meta"):
        tiny, paper = timm.create_model(SMALL_MODEL), timm.create_model("sknet50")
        reference = timm.create_model("skresnext50_32x4d")
    assert resolve_model_data_config(tiny)["input_size"] == (3, 32, 32)
    assert resolve_model_data_config(paper) == resolve_model_data_config(reference)


# --------------------------------------------------------------------------------------------------------
# timm's checks on every registered model, at small sizes: the data configuration against the feature map,
# the head with and without pooling and classifier, and features_only against feature_info.


@pytest.fixture(scope="module", params=list_models())
def name(request):
    return request.param


def test_default_cfg_head_and_features_only(name):
    model = set_backend(randomize_batchnorm(create_model(name, num_classes=NUM_CLASSES)), "torch").eval()
    cfg, state_dict = model.pretrained_cfg, model.state_dict()
    assert model.default_cfg is cfg
    reduction = model.feature_info[-1]["reduction"]
    assert tuple(size // reduction for size in cfg["input_size"][1:]) == cfg["pool_size"]
    assert f"{cfg['first_conv']}.weight" in state_dict and f"{cfg['classifier']}.weight" in state_dict
    x = images()  # 32x32: the whole network at any model's smallest sizes
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, model.num_features, 32 // reduction, 32 // reduction)
        pooled = model.forward_head(features, pre_logits=True)
        assert pooled.shape == (2, model.head_hidden_size)
        model.reset_classifier(0)
        assert_close_relative(model(x), pooled)
        model.reset_classifier(0, "")
        assert_close_relative(model(x), features)

    backbone = set_backend(create_model(name, features_only=True), "torch").eval()
    assert count_sk_units(backbone) == count_sk_units(model)
    backbone.load_state_dict(model.state_dict())  # the classifier is gone from both
    with torch.no_grad():
        feature_maps = backbone(x)
    assert len(feature_maps) == 5 == len(backbone.feature_info.channels())
    for feature, channels, reduction in zip(
        feature_maps, backbone.feature_info.channels(), backbone.feature_info.reduction()
    ):
        assert feature.shape == (2, channels, max(1, 32 // reduction), max(1, 32 // reduction))
    assert_close_relative(feature_maps[-1], features)


# --------------------------------------------------------------------------------------------------------
# Feature extraction and dilation.


def test_out_indices_and_forward_intermediates_give_the_stage_outputs():
    model = small_model().eval()
    stage_outputs = {}
    for stage in STAGES:
        getattr(model, stage).register_forward_hook(
            lambda module, inputs, output, stage=stage: stage_outputs.update({stage: output})
        )
    backbone = set_backend(create_model(SMALL_MODEL, features_only=True, out_indices=(1, -1)), "torch").eval()
    loaded = backbone.load_state_dict(model.state_dict(), strict=False)
    assert not loaded.missing_keys and sorted(loaded.unexpected_keys) == ["fc.bias", "fc.weight"]
    assert backbone.feature_info.module_name() == ["layer1", "layer4"]
    x = images()
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        features = backbone(x)
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
    assert [feature.shape[1] for feature in intermediates] == [16, 16, 32, 64, 128]
    for stage, feature in zip(STAGES, intermediates[1:]):
        torch.testing.assert_close(feature, stage_outputs[stage])
    torch.testing.assert_close(final, stage_outputs["layer4"])
    torch.testing.assert_close(features[0], stage_outputs["layer1"])
    torch.testing.assert_close(features[1], stage_outputs["layer4"])
    torch.testing.assert_close(last_two, [stage_outputs["layer3"], stage_outputs["layer4"]])


def test_output_stride_dilates_the_last_stages():
    model = set_backend(create_model("sknet50", features_only=True, output_stride=16, out_indices=(3, 4)), "torch")
    assert model.feature_info.reduction() == [16, 16]
    # timm's rule: the stage's first block keeps the dilation before it, and none strides.
    first, last = model.layer4[0].conv2, model.layer4[-1].conv2
    assert isinstance(first, SKConv) and isinstance(last, SKConv)
    assert [path.conv.stride for path in first.paths] == [(1, 1), (1, 1)]
    assert [path.conv.dilation for path in first.paths] == [(1, 1), (2, 2)]
    assert [path.conv.dilation for path in last.paths] == [(2, 2), (4, 4)]
    with torch.no_grad():
        features = model.eval()(images(size=64))
    assert [feature.shape[-1] for feature in features] == [4, 4]


# --------------------------------------------------------------------------------------------------------
# Training features.


def test_global_pool_is_timm_s():
    x = images()
    for pool, reduce in (("max", lambda f: f.amax(dim=(2, 3))), ("avgmax", lambda f: (f.amax(dim=(2, 3)) + f.mean(dim=(2, 3))) / 2)):
        model = small_model(global_pool=pool).eval()
        with torch.no_grad():
            assert_close_relative(model(x), model.fc(reduce(model.forward_features(x))), name=pool)
    doubled = small_model(global_pool="catavgmax")
    assert doubled.head_hidden_size == 2 * doubled.num_features == doubled.fc.in_features
    unpooled = small_model(num_classes=0, global_pool="").eval()
    with torch.no_grad():
        assert_close_relative(unpooled(x), unpooled.forward_features(x))


def test_drop_path_rate_is_stochastic_depth_in_training_only():
    dropping = small_model(drop_path_rate=0.5)
    plain = small_model()
    plain.load_state_dict(dropping.state_dict())
    # timm's rule: rates rising linearly over the blocks, from 0 to drop_path_rate.
    rates = [getattr(getattr(dropping, stage)[0].drop_path, "drop_prob", 0.0) for stage in STAGES]
    assert rates == pytest.approx([0.0, 0.5 / 3, 1.0 / 3, 0.5])
    x = images(batch=8)
    with torch.no_grad():
        torch.testing.assert_close(dropping.eval()(x), plain.eval()(x))
        features = dropping.train().forward_features(x)
        kept = plain.train().forward_features(x)
    assert not torch.allclose(features, kept)


def test_group_matcher_groups_every_parameter_by_stage_and_block():
    model = small_model()
    coarse = group_parameters(model, model.group_matcher(coarse=True))
    fine = group_parameters(model, model.group_matcher())
    names = sorted(name for name, _ in model.named_parameters())
    assert sorted(name for group in coarse.values() for name in group) == names
    assert len(coarse) == len(fine) == 6  # stem, four stages of one block, the classifier
    assert any(name.startswith("layer2.0.conv1.paths.1.") for name in fine[2])  # the SK unit's own parameters
    optimizer = create_optimizer_v2(model, "sgd", lr=1.0, weight_decay=0.0, layer_decay=0.5)
    assert len({group["lr_scale"] for group in optimizer.param_groups}) == 6


def test_weight_decay_groups_are_timm_s():
    # timm's optimizer factory asks the model for no_weight_decay() and leaves biases and norms undecayed.
    model = create_model("skresnet18", num_classes=NUM_CLASSES)
    reference = timm.create_model("skresnet18", num_classes=NUM_CLASSES)
    assert hasattr(model, "no_weight_decay") == hasattr(reference, "no_weight_decay")

    def decay_by_shape(module):
        optimizer = create_optimizer_v2(module, "sgd", lr=0.1, weight_decay=1e-4)
        return sorted((group["weight_decay"], tuple(p.shape)) for group in optimizer.param_groups for p in group["params"])

    groups = decay_by_shape(model)
    assert groups == decay_by_shape(reference)
    assert all((decay > 0) == (len(shape) > 1) for decay, shape in groups)


@requires_kernels
def test_grad_checkpointing_through_the_kernels_gives_batchnorm_s_gradients_and_statistics():
    model = randomize_batchnorm(create_model(SMALL_MODEL, num_classes=NUM_CLASSES)).to(DEVICE)
    model.set_grad_checkpointing()
    reference = set_backend(copy.deepcopy(model), "torch")  # nn.BatchNorm2d under the same checkpointing
    exact = copy.deepcopy(reference).double()
    uncheckpointed = copy.deepcopy(reference)
    uncheckpointed.set_grad_checkpointing(False)
    x, target = images(batch=4).to(DEVICE), torch.randint(0, NUM_CLASSES, (4,), device=DEVICE)
    losses = {}
    for key, network, inputs in (
        ("kernels", model, x), ("torch", reference, x), ("exact", exact, x.double()), ("plain", uncheckpointed, x),
    ):
        network.train().zero_grad(set_to_none=True)
        losses[key] = F.cross_entropy(network(inputs), target)
        losses[key].backward()
    assert_as_accurate_as(losses["kernels"], losses["torch"], losses["exact"], name="loss")
    grads = [{key: p.grad for key, p in network.named_parameters()} for network in (model, reference, exact)]
    assert_grads_as_accurate_as(*grads)
    # Non-reentrant checkpointing recomputes each stage's forward pass, and BatchNorm updates its running
    # statistics again each time: as timm's models with nn.BatchNorm2d, twice per step inside the stages.
    buffers = [dict(network.named_buffers()) for network in (model, reference, exact, uncheckpointed)]
    assert buffers[0]["layer2.0.conv1.paths.0.bn.num_batches_tracked"] == 2
    assert buffers[0]["bn1.num_batches_tracked"] == 1  # the stem runs outside the checkpoints
    for key, buffer in buffers[0].items():
        if key.endswith("num_batches_tracked"):
            assert torch.equal(buffer, buffers[1][key]), key
        else:
            assert_as_accurate_as(buffer, buffers[1][key], buffers[2][key], name=key)
    moved_twice = buffers[0]["layer1.0.conv1.paths.1.bn.running_mean"]
    assert not torch.allclose(moved_twice, buffers[3]["layer1.0.conv1.paths.1.bn.running_mean"].to(DEVICE))
