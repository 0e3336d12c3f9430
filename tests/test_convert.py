"""convert_state_dict (timm and the original SKNet reference code) and accelerate (timm models on SKConv)."""
import copy
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from sknet_triton import SKConv, accelerate, convert_state_dict, create_model, set_backend
from sknet_triton.models import SKNET_MODELS, TIMM_SK_MODELS
from tests import seed_sknet
from tests.helpers import DEVICE
from tests.model_helpers import NUM_CLASSES, assert_close_relative, randomize_batchnorm

SEED_NETWORKS = [("sknet50", seed_sknet.SKNet50), ("sknet101", seed_sknet.SKNet101)]


def seed_keys_only():
    """A state dict of the reference code's SKNet-50, on the meta device (its keys are what matters)."""
    with torch.device("meta"):
        return seed_sknet.SKNet50().state_dict()


# --------------------------------------------------------------------------------------------------------
# convert_state_dict(source="seed").


@pytest.mark.parametrize("name, build_seed", SEED_NETWORKS, ids=[name for name, _ in SEED_NETWORKS])
def test_seed_checkpoint_gives_the_seed_logits(name, build_seed):
    seed = randomize_batchnorm(build_seed(NUM_CLASSES))
    model = set_backend(create_model(name, num_classes=NUM_CLASSES), "torch")
    model.load_state_dict(convert_state_dict(seed.state_dict(), "seed"), strict=True)
    captured = {}
    seed.layer4.register_forward_hook(lambda module, inputs, output: captured.update(seed_features=output))
    seed.fc.register_forward_hook(lambda module, inputs, output: captured.update(seed_logits=output))
    model.layer4.register_forward_hook(lambda module, inputs, output: captured.update(features=output))
    x = torch.randn(2, 3, 72, 72)  # odd sizes from stage 2 on: padding at the borders matters
    for training in (False, True):
        seed.train(training)
        model.train(training)
        with torch.no_grad():
            probabilities = seed(x)
            logits = model(x)
        assert_close_relative(captured["features"], captured["seed_features"])
        assert_close_relative(logits, captured["seed_logits"])
        assert_close_relative(torch.softmax(logits, dim=-1), probabilities)


def test_seed_conversion_strips_a_module_prefix():
    state_dict = seed_keys_only()
    wrapped = {f"module.{key}": value for key, value in state_dict.items()}
    assert list(convert_state_dict(wrapped, "seed")) == list(convert_state_dict(state_dict, "seed"))


def test_seed_conversion_names_unknown_keys():
    state_dict = seed_keys_only()
    state_dict["layer1.0.conv2.conv.2.0.weight"] = torch.empty(0)  # a third path
    state_dict["head.weight"] = torch.empty(0)
    with pytest.raises(ValueError, match=r"2 unknown keys: layer1\.0\.conv2\.conv\.2\.0\.weight, head\.weight"):
        convert_state_dict(state_dict, "seed")


def test_seed_conversion_names_missing_keys():
    state_dict = seed_keys_only()
    del state_dict["layer3.2.conv2.fc2.weight"]
    del state_dict["layer1.0.downsample.1.running_var"]
    missing = r"2 missing keys: layer1\.0\.downsample\.1\.running_var, layer3\.2\.conv2\.fc2\.weight"
    with pytest.raises(ValueError, match=missing):
        convert_state_dict(state_dict, "seed")


def test_seed_conversion_needs_every_stage():
    state_dict = {key: value for key, value in seed_keys_only().items() if not key.startswith("layer4.")}
    with pytest.raises(ValueError, match="no blocks found for layer4"):
        convert_state_dict(state_dict, "seed")


# --------------------------------------------------------------------------------------------------------
# convert_state_dict(source="timm").


@pytest.mark.parametrize("name", ["skresnet18", "skresnet34", "skresnet50", "skresnet50d", "skresnext50_32x4d"])
def test_timm_checkpoint_passes_unchanged(name):
    with torch.device("meta"):
        state_dict = timm.create_model(name).state_dict()
    converted = convert_state_dict({f"module.{key}": value for key, value in state_dict.items()}, "timm")
    assert list(converted) == list(state_dict)
    assert all(converted[key] is value for key, value in state_dict.items())


@pytest.mark.parametrize("name", TIMM_SK_MODELS + SKNET_MODELS)
def test_our_checkpoints_pass_as_timm(name):
    with torch.device("meta"):
        state_dict = create_model(name).state_dict()
    assert list(convert_state_dict(state_dict, "timm")) == list(state_dict)


def test_timm_conversion_names_foreign_keys():
    with pytest.raises(ValueError, match=r"unknown keys: conv\.0\.weight, conv\.1\.weight"):
        convert_state_dict(seed_keys_only(), "timm")


def test_unknown_source():
    with pytest.raises(ValueError, match="source must be one of"):
        convert_state_dict({}, "torchvision")


# --------------------------------------------------------------------------------------------------------
# accelerate.


def train_step(model, x, target):
    """Loss of one cross-entropy step; leaves the gradients in the parameters."""
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), target)
    loss.backward()
    return loss.detach()


def test_accelerate_keeps_outputs_tensors_and_optimizer():
    model = randomize_batchnorm(timm.create_model("skresnet18", num_classes=NUM_CLASSES))
    reference = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    keys = list(model.state_dict())
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())

    assert accelerate(model) is model
    set_backend(model, "torch")
    assert sum(isinstance(module, SKConv) for module in model.modules()) == 8
    assert not any(isinstance(module, timm.layers.SelectiveKernel) for module in model.modules())
    assert list(model.state_dict()) == keys
    accelerated_tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    assert accelerated_tensors.keys() == tensors.keys()
    assert all(accelerated_tensors[key] is tensor for key, tensor in tensors.items())

    x, target = torch.randn(2, 3, 64, 64), torch.randint(0, NUM_CLASSES, (2,))
    model.eval()
    reference.eval()
    with torch.no_grad():
        assert_close_relative(model(x), reference(x))
    model.train()
    reference.train()
    assert_close_relative(train_step(model, x, target), train_step(reference, x, target))
    expected_grads = dict(reference.named_parameters())
    for key, p in model.named_parameters():
        assert_close_relative(p.grad, expected_grads[key].grad, name=key)
    optimizer.step()
    reference_optimizer.step()
    expected_state = reference.state_dict()
    for key, value in model.state_dict().items():
        assert_close_relative(value.float(), expected_state[key].float(), name=key)


def test_accelerate_twice_changes_nothing():
    model = accelerate(timm.create_model("skresnet18", num_classes=NUM_CLASSES))
    modules = [(name, id(module)) for name, module in model.named_modules()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert accelerate(model) is model
    assert [(name, id(module)) for name, module in model.named_modules()] == modules


SELECTIVE_KERNELS = {
    "timm-default": dict(),
    "three-paths-grouped-strided": dict(kernel_size=[3, 5, 7], groups=4, stride=2, split_input=False),
    "true-5x5": dict(kernel_size=[3, 5], keep_3x3=False, rd_channels=8),
    "silu": dict(act_layer=nn.SiLU),
}


@pytest.mark.parametrize("config", SELECTIVE_KERNELS.values(), ids=SELECTIVE_KERNELS.keys())
def test_accelerated_selective_kernel_matches_timm_through_the_kernels(config):
    selective_kernel = randomize_batchnorm(timm.layers.SelectiveKernel(16, 32, **config)).to(DEVICE)
    reference = copy.deepcopy(selective_kernel)
    skconv = accelerate(selective_kernel)  # the module itself is replaced: the SKConv is returned
    assert isinstance(skconv, SKConv) and skconv.backend == "auto"
    assert [type(path.act) for path in skconv.paths] == [type(path.bn.act) for path in reference.paths]
    x = torch.randn(2, 16, 8, 8, device=DEVICE)
    for training in (True, False):
        skconv.train(training)
        reference.train(training)
        x_ours, x_timm = x.clone().requires_grad_(), x.clone().requires_grad_()
        out, expected = skconv(x_ours), reference(x_timm)
        assert_close_relative(out, expected)
        grad_out = torch.randn_like(out)
        out.backward(grad_out)
        expected.backward(grad_out)
        assert_close_relative(x_ours.grad, x_timm.grad)
    with torch.no_grad():  # eval without gradients: BatchNorm folded into the kernels where paths are BatchNorm + ReLU
        assert_close_relative(skconv(x), reference(x))
    expected_grads = dict(reference.named_parameters())
    for key, p in skconv.named_parameters():
        assert_close_relative(p.grad, expected_grads[key].grad, name=key)


@pytest.mark.parametrize("case", ["anti-aliasing", "drop-layer", "group-norm"])
def test_accelerate_leaves_what_it_cannot_represent_with_a_warning(case):
    config = {
        "anti-aliasing": dict(stride=2, aa_layer=timm.layers.BlurPool2d),
        "drop-layer": dict(drop_layer=nn.Dropout),
        "group-norm": dict(norm_layer=nn.GroupNorm),
    }[case]
    selective_kernel = timm.layers.SelectiveKernel(32, 32, **config)
    model = nn.Sequential(nn.Identity(), selective_kernel)
    with pytest.warns(UserWarning, match="accelerate: 1 stays a timm SelectiveKernel"):
        assert accelerate(model) is model
    assert model[1] is selective_kernel


def test_accelerate_leaves_our_models_alone_without_a_warning():
    model = create_model("sknet_tiny", num_classes=NUM_CLASSES)
    modules = list(model.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert accelerate(model) is model
    assert list(model.modules()) == modules


def test_accelerate_warns_about_a_model_without_sk_units():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    modules = list(model.modules())
    with pytest.warns(UserWarning, match=r"accelerate: the Sequential holds no SK unit .*nothing to accelerate"):
        assert accelerate(model) is model
    assert list(model.modules()) == modules


@pytest.mark.parametrize("argument", ["skresnet18", None, [nn.Linear(2, 2)]])
def test_accelerate_refuses_what_is_not_a_module(argument):
    with pytest.raises(TypeError, match="accelerate: model must be a torch.nn.Module, got"):
        accelerate(argument)
