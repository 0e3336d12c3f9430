"""The registered models: registry, parity with timm, gradients, shapes and layouts, torch.compile,
eval-mode BatchNorm folding, the "torch" backend, and one model end to end through the Triton kernels.

Tests that do not need the kernels run the models with the "torch" backend, so that Triton's CPU
interpreter only runs for the small model.
"""
import copy
import re

import huggingface_hub.constants as hub
import pytest
import timm
import torch
import torch._dynamo
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend
from torch._dynamo.utils import counters

from sknet_triton import create_model, list_models, set_backend
from sknet_triton.models import RESNEST_MODELS
from tests.helpers import DEVICE, requires_kernels
from tests.model_helpers import (
    NUM_CLASSES,
    SMALL_MODEL,
    TRAINING_BATCH,
    assert_as_accurate_as,
    assert_close_relative,
    assert_grads_as_accurate_as,
    randomize_batchnorm,
)

# Our model and the timm model with the same architecture and state-dict keys.
TIMM_EQUIVALENTS = [
    ("skresnet18", "skresnet18"),
    ("skresnet34", "skresnet34"),
    ("skresnet50", "skresnet50"),
    ("skresnet50d", "skresnet50d"),
    ("skresnext50_32x4d", "skresnext50_32x4d"),
    ("sknet50", "skresnext50_32x4d"),
    ("resnest14d", "resnest14d"),  # radix 2, cardinality 1
    ("resnest50d_4s2x40d", "resnest50d_4s2x40d"),  # radix 4, cardinality 2
]


@pytest.fixture(scope="module", params=list_models())
def built_model(request):
    """Each registered model, built once per module (pytest groups the tests by it): random weights and
    random BatchNorm state."""
    return randomize_batchnorm(create_model(request.param, num_classes=NUM_CLASSES))


@pytest.fixture
def model(built_model):
    """A private copy of ``built_model`` on the "torch" backend."""
    return set_backend(copy.deepcopy(built_model), "torch")


def small_model(backend: str = "torch"):
    """The small model with random BatchNorm state, on ``backend``."""
    return set_backend(randomize_batchnorm(create_model(SMALL_MODEL, num_classes=NUM_CLASSES)), backend)


def images(batch: int = 2, size: int = 32, channels: int = 3) -> torch.Tensor:
    return torch.randn(batch, channels, size, size)


def train_step_grads(model, x, target):
    """Loss and every parameter's gradient, by name, of one cross-entropy step."""
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), target)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


# --------------------------------------------------------------------------------------------------------
# Registry.


def test_list_models():
    assert list_models() == sorted([
        "sknet50", "sknet101", "sknet_tiny",
        "skresnet18", "skresnet34", "skresnet50", "skresnet50d", "skresnext50_32x4d",
        "resnest14d", "resnest26d", "resnest50d", "resnest50d_1s4x24d", "resnest50d_4s2x40d", "resnest101e",
        "resnest200e", "resnest269e",
    ])


def test_unknown_model_names_what_exists():
    with pytest.raises(ValueError, match="unknown model 'sknet18'") as error:
        create_model("sknet18")
    assert all(name in str(error.value) for name in list_models())


def test_unknown_keyword_names_what_is_accepted():
    accepted = "pretrained, num_classes, in_chans, drop_rate, drop_path_rate, global_pool, features_only, out_indices"
    with pytest.raises(TypeError, match=re.escape(f"['drop_block_rate']; accepted: {accepted}, output_stride")):
        create_model(SMALL_MODEL, drop_block_rate=0.1)


BAD_MODEL_ARGUMENTS = {
    "drop_rate above 1": (dict(drop_rate=1.5), ValueError, "drop_rate must be at least 0 and below 1, got 1.5"),
    "drop_rate 1": (dict(drop_rate=1.0), ValueError, "drop_rate must be at least 0 and below 1"),
    "negative drop_rate": (dict(drop_rate=-0.1), ValueError, "drop_rate must be at least 0"),
    "NaN drop_rate": (dict(drop_rate=float("nan")), ValueError, "drop_rate must be at least 0"),
    "text drop_rate": (dict(drop_rate="0.1"), TypeError, "drop_rate must be a number, got str"),
    "in_chans 0": (dict(in_chans=0), ValueError, "in_chans must be a positive integer, got 0"),
    "in_chans bool": (dict(in_chans=True), TypeError, "in_chans must be an integer, got bool"),
    "negative num_classes": (dict(num_classes=-1), ValueError, "num_classes must be at least 0, got -1"),
    "float num_classes": (dict(num_classes=10.0), TypeError, "num_classes must be an integer, got float"),
    "pretrained text": (dict(pretrained="yes"), TypeError, "pretrained must be True or False, got str"),
    "drop_path_rate 1": (dict(drop_path_rate=1), ValueError, "drop_path_rate must be at least 0 and below 1, got 1"),
    "text drop_path_rate": (dict(drop_path_rate="0"), TypeError, "drop_path_rate must be a number, got str"),
    "unknown global_pool": (dict(global_pool="mean"), ValueError, "global_pool must be one of ('', 'avg', 'max'"),
    "features_only text": (dict(features_only=1), TypeError, "features_only must be True or False, got int"),
    "out_indices without features_only": (
        dict(out_indices=(1, 2)), ValueError, "out_indices selects the feature maps of features_only=True"
    ),
    "out_indices beyond the levels": (
        dict(features_only=True, out_indices=(1, 5)), ValueError, "out_indices must be distinct feature levels from -5 to 4"
    ),
    "out_indices repeated": (
        dict(features_only=True, out_indices=(4, -1)), ValueError, "got (4, -1)"
    ),
    "out_indices count 0": (dict(features_only=True, out_indices=0), ValueError, "out_indices must be a positive integer"),
    "out_indices float": (dict(features_only=True, out_indices=[1.0]), TypeError, "out_indices must be an integer, got float"),
    "output_stride beyond sknet_tiny's": (
        dict(output_stride=16), ValueError, "output_stride must be one of (2, 4, 8) for 'sknet_tiny', got 16"
    ),
}


@pytest.mark.parametrize("kwargs, error, message", BAD_MODEL_ARGUMENTS.values(), ids=BAD_MODEL_ARGUMENTS.keys())
def test_bad_arguments_are_one_line_errors_naming_them(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)) as raised:
        create_model(SMALL_MODEL, **kwargs)
    assert "\n" not in str(raised.value)


def test_in_chans_and_num_classes():
    model = set_backend(create_model(SMALL_MODEL, num_classes=7, in_chans=1), "torch")
    assert model.conv1.in_channels == 1
    assert model(images(channels=1)).shape == (2, 7)


def test_drop_rate_drops_pooled_features_in_training_only():
    dropping = set_backend(create_model(SMALL_MODEL, num_classes=NUM_CLASSES, drop_rate=0.5), "torch")
    plain = set_backend(create_model(SMALL_MODEL, num_classes=NUM_CLASSES), "torch")
    plain.load_state_dict(dropping.state_dict())
    x = images()
    dropping.eval()
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(dropping(x), plain(x))
        features = plain.forward_features(x)
    dropping.train()
    plain.train()
    dropped = dropping.forward_head(features, pre_logits=True)
    kept = plain.forward_head(features, pre_logits=True)
    torch.testing.assert_close(dropped[dropped != 0], 2 * kept[dropped != 0])
    assert 0 < (dropped == 0).sum() < dropped.numel()


# --------------------------------------------------------------------------------------------------------
# timm's conventions: the head, pretrained weights, the data configuration.


def test_no_classes_gives_pooled_features_and_reset_classifier_adds_a_head():
    model = set_backend(create_model(SMALL_MODEL, num_classes=0), "torch").eval()
    assert isinstance(model.get_classifier(), torch.nn.Identity) and model.get_classifier(name_only=True) == "fc"
    x = images()
    with torch.no_grad():
        features = model(x)
        assert features.shape == (2, model.num_features) == (2, 128)
        torch.testing.assert_close(features, model.forward_features(x).mean(dim=(2, 3)))

        model.double()
        model.reset_classifier(5)
        head = model.get_classifier()
        assert isinstance(head, torch.nn.Linear) and head.weight.dtype == torch.float64 and not head.training
        assert model.num_classes == 5
        logits = model(x.double())
        torch.testing.assert_close(logits, head(features.double()), rtol=1e-4, atol=1e-4)
        model.reset_classifier(0, "max")
        assert model.global_pool.pool_type == "max"
        torch.testing.assert_close(model(x.double()), model.forward_features(x.double()).amax(dim=(2, 3)))


def test_head_matches_timm():
    reference = randomize_batchnorm(timm.create_model("skresnet18", num_classes=0)).eval()
    model = set_backend(create_model("skresnet18", num_classes=0), "torch").eval()
    model.load_state_dict(reference.state_dict())
    assert model.num_features == reference.num_features and model.head_hidden_size == reference.head_hidden_size
    x = images(size=40)
    with torch.no_grad():
        assert_close_relative(model(x), reference(x))
        features = reference.forward_features(x)
        assert_close_relative(
            model.forward_head(features, pre_logits=True), reference.forward_head(features, pre_logits=True)
        )
    reference.reset_classifier(7)
    model.reset_classifier(7)
    model.fc.load_state_dict(reference.fc.state_dict())
    with torch.no_grad():
        assert_close_relative(model(x), reference(x))


def test_data_config_resolves_as_timm_s():
    from timm.data import resolve_data_config, resolve_model_data_config

    with torch.device("meta"):  # configurations only: no weights needed
        for name, timm_name in TIMM_EQUIVALENTS:
            model, reference = create_model(name), timm.create_model(timm_name)
            assert resolve_model_data_config(model) == resolve_model_data_config(reference), name
            assert model.pretrained_cfg["first_conv"] == reference.pretrained_cfg["first_conv"], name
            assert model.default_cfg is model.pretrained_cfg
        tiny = create_model(SMALL_MODEL)
    assert resolve_data_config(model=tiny)["input_size"] == (3, 32, 32)


def test_pretrained_names_are_those_timm_has_weights_for():
    assert [name for name in list_models() if timm.is_model_pretrained(name)] == sorted([
        "sknet50", "skresnet18", "skresnet34", "skresnext50_32x4d", *RESNEST_MODELS
    ])
    for name, timm_name in TIMM_EQUIVALENTS:
        assert timm.is_model_pretrained(name) == timm.is_model_pretrained(timm_name), name


@pytest.mark.parametrize("name", ["sknet101", "sknet_tiny", "skresnet50"])
def test_pretrained_without_weights_says_so(name):
    with pytest.raises(ValueError, match=f"no pretrained weights exist for '{name}'.*sknet50, skresnet18"):
        create_model(name, pretrained=True)


def test_pretrained_download_failure_is_a_clear_error(monkeypatch, tmp_path):
    # timm's own download path, kept off the network and away from any cached weights.
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    expected = "timm could not fetch the pretrained weights of 'skresnet18'"
    with pytest.raises(RuntimeError, match=expected) as error:
        create_model("skresnet18", pretrained=True)
    assert "\n" not in str(error.value) and "pretrained=False" in str(error.value)


def test_pretrained_loads_timm_s_weights_and_config(monkeypatch):
    loads = []
    # timm's skresnext50_32x4d with random weights: what timm's download would give.
    source = randomize_batchnorm(timm.create_model("skresnext50_32x4d", num_classes=NUM_CLASSES))

    def load_pretrained(model, pretrained_cfg=None, num_classes=1000, in_chans=3, **kwargs):
        # Stands in for timm's download and load, with the configuration timm would fetch the weights by.
        loads.append((pretrained_cfg["hf_hub_id"], num_classes, in_chans))
        model.load_state_dict(source.state_dict())

    monkeypatch.setattr(timm.models._builder, "load_pretrained", load_pretrained)
    model = create_model("sknet50", pretrained=True, num_classes=NUM_CLASSES, drop_rate=0.2)
    assert loads == [("timm/skresnext50_32x4d.ra_in1k", NUM_CLASSES, 3)]
    assert model.pretrained_cfg["hf_hub_id"] == "timm/skresnext50_32x4d.ra_in1k"
    assert model.pretrained_cfg["architecture"] == "sknet50" and model.default_cfg is model.pretrained_cfg
    assert model.drop_rate == 0.2
    expected = source.state_dict()
    assert list(model.state_dict()) == list(expected)
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[key]), key


# --------------------------------------------------------------------------------------------------------
# The same networks as timm's.


@pytest.mark.parametrize("name, timm_name", TIMM_EQUIVALENTS)
def test_matches_timm(name, timm_name):
    reference = randomize_batchnorm(timm.create_model(timm_name, num_classes=NUM_CLASSES))
    model = set_backend(create_model(name, num_classes=NUM_CLASSES), "torch")
    assert list(model.state_dict()) == list(reference.state_dict())
    model.load_state_dict(reference.state_dict(), strict=True)
    x = images(size=72)  # odd sizes from stage 2 on: padding and pooling at the borders matter

    model.eval()
    reference.eval()
    with torch.no_grad():
        assert_close_relative(model.forward_features(x), reference.forward_features(x))
        assert_close_relative(model(x), reference(x))

    model.train()
    reference.train()
    target = torch.randint(0, NUM_CLASSES, (2,))
    loss, grads = train_step_grads(model, x, target)
    expected_loss, expected_grads = train_step_grads(reference, x, target)
    assert_close_relative(loss, expected_loss)
    assert grads.keys() == expected_grads.keys()
    for key, grad in grads.items():
        assert_close_relative(grad, expected_grads[key], name=key)
    expected_buffers = dict(reference.named_buffers())
    for key, buffer in model.named_buffers():
        torch.testing.assert_close(buffer, expected_buffers[key], msg=key)


# --------------------------------------------------------------------------------------------------------
# Every registered model.


def test_every_parameter_gets_a_gradient(model):
    model.train()
    loss, grads = train_step_grads(model, images(), torch.randint(0, NUM_CLASSES, (2,)))
    assert torch.isfinite(loss)
    without = [key for key, grad in grads.items() if grad is None or not grad.abs().sum() > 0]
    assert not without, f"parameters without a gradient: {without}"
    assert all(torch.isfinite(grad).all() for grad in grads.values())


def test_batch_of_one_in_eval(model):
    model.eval()
    x = images()
    with torch.no_grad():
        logits = model(x)
        single = model(x[:1])
    assert logits.shape == (2, NUM_CLASSES)
    assert_close_relative(single, logits[:1])


def test_channels_last_in_and_out(model):
    model.eval()
    x = images(size=64)
    with torch.no_grad():
        expected_features = model.forward_features(x)
        expected = model(x)
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
        features = model.forward_features(x)
        logits = model(x)
    assert features.shape[-1] > 1
    assert features.is_contiguous(memory_format=torch.channels_last)
    assert_close_relative(features, expected_features)
    assert_close_relative(logits, expected)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compiles_to_one_graph(model, training):
    torch._dynamo.reset()
    model.train(training)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = images()
    with torch.set_grad_enabled(training):
        torch.testing.assert_close(compiled(x), model(x))
    assert counter.frame_count == 1


# --------------------------------------------------------------------------------------------------------
# The Triton kernels ("auto" backend on DEVICE; under TRITON_INTERPRET=1 on the CPU), on the small model.
# Gradients through training-mode BatchNorm over a small batch amplify float32 rounding, so that two float32
# computations differ more than either differs from float64: gradients are held to plain float32 PyTorch's
# accuracy against float64.


# The models run through the kernels here: an SK network and a ResNeSt (radix 2).
KERNEL_MODELS = (SMALL_MODEL, "resnest14d")


def model_on_device(name: str):
    """Model ``name`` with random BatchNorm state on DEVICE with the "auto" backend, a copy on the "torch"
    backend and one in float64."""
    model = set_backend(randomize_batchnorm(create_model(name, num_classes=NUM_CLASSES)), "auto").to(DEVICE)
    reference = set_backend(copy.deepcopy(model), "torch")
    return model, reference, copy.deepcopy(reference).double()


@requires_kernels
@pytest.mark.parametrize("name", KERNEL_MODELS)
def test_kernels_end_to_end(name):
    model, reference, exact = model_on_device(name)
    x, target = images(TRAINING_BATCH).to(DEVICE), torch.randint(0, NUM_CLASSES, (TRAINING_BATCH,), device=DEVICE)
    loss, grads = train_step_grads(model.train(), x, target)
    expected_loss, expected_grads = train_step_grads(reference.train(), x, target)
    _, exact_grads = train_step_grads(exact.train(), x.double(), target)
    assert_close_relative(loss, expected_loss)
    assert_grads_as_accurate_as(grads, expected_grads, exact_grads)
    expected_buffers = dict(reference.named_buffers())
    for key, buffer in model.named_buffers():  # the running statistics, updated as nn.BatchNorm2d updates them
        torch.testing.assert_close(buffer, expected_buffers[key], msg=key)


@requires_kernels
@pytest.mark.parametrize("name", KERNEL_MODELS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_kernels_compile_to_one_graph_for_any_batch_size(training, name):
    torch._dynamo.reset()
    model, reference, exact = (m.train(training) for m in model_on_device(name))
    graphs_before = counters["stats"]["unique_graphs"]
    compiler_calls = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=compiler_calls, fullgraph=True, dynamic=True)
    with torch.set_grad_enabled(training):
        for batch in (TRAINING_BATCH, TRAINING_BATCH + 1):
            x = images(batch).to(DEVICE)
            logits, expected = compiled(x), reference(x)
            assert_close_relative(logits, expected)
            if training:
                logits.sum().backward()
                expected.sum().backward()
                exact(x.double()).sum().backward()
            if batch == TRAINING_BATCH:
                # Dynamo may restart its analysis once (calling the backend again) to specialize floats.
                calls_for_first_batch = compiler_calls.frame_count
    assert compiler_calls.frame_count == calls_for_first_batch, "recompiled for a new batch size"
    assert counters["stats"]["unique_graphs"] - graphs_before == 1
    if training:
        assert_grads_as_accurate_as(*({key: p.grad for key, p in m.named_parameters()} for m in (model, reference, exact)))


@requires_kernels
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_through_the_kernels(dtype, training):
    model, reference, exact = (m.train(training) for m in model_on_device(SMALL_MODEL))
    x = images().to(DEVICE)
    with torch.set_grad_enabled(training):
        with torch.autocast(DEVICE.type, dtype=dtype):
            logits, baseline = model(x), reference(x)
        expected = exact(x.double())
    assert logits.dtype == dtype
    # Half-precision rounding is amplified by training-mode BatchNorm over a small batch, so the kernels
    # are held to the accuracy of plain PyTorch under the same autocast, both measured against float64.
    assert_as_accurate_as(logits, baseline, expected, name="logits")
    if training:
        logits.float().sum().backward()
        assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


def assert_eval_matches_unfolded(model, x):
    """The eval-mode output with BatchNorm folded into the kernels equals the plain computation of the
    model's current state; returns that output."""
    model.eval()
    unfolded = set_backend(copy.deepcopy(model), "torch")
    with torch.no_grad():
        logits = model(x)
        assert_close_relative(logits, unfolded(x))
    return logits


@requires_kernels
def test_eval_folding_matches_unfolded_computation():
    model, _, _ = model_on_device(SMALL_MODEL)
    x = images().to(DEVICE)
    folded = assert_eval_matches_unfolded(model, x)
    with torch.enable_grad():  # BatchNorm parameters that need a gradient are not folded
        assert_close_relative(model(x), folded)


@requires_kernels
def test_eval_folding_follows_batchnorm_state():
    model, _, _ = model_on_device(SMALL_MODEL)
    x, target = images().to(DEVICE), torch.randint(0, NUM_CLASSES, (2,), device=DEVICE)
    before = assert_eval_matches_unfolded(model, x)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    set_backend(model.train(), "torch")
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(model(x), target).backward()
        optimizer.step()
    set_backend(model, "auto")
    trained = assert_eval_matches_unfolded(model, x)
    assert not torch.allclose(trained, before)

    model.load_state_dict(small_model().state_dict())
    loaded = assert_eval_matches_unfolded(model, x)
    assert not torch.allclose(loaded, trained)

    with torch.no_grad():
        model.train()(images(4).to(DEVICE))  # updates the running statistics
    switched = assert_eval_matches_unfolded(model, x)
    assert not torch.allclose(switched, loaded)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace.*` is deprecated")
def test_torch_backend_matches_auto_and_traces():
    model, _, _ = model_on_device(SMALL_MODEL)
    plain = set_backend(copy.deepcopy(model), "torch").cpu().eval()
    x, other = images(), images()
    with torch.no_grad():
        expected = model.eval()(other.to(DEVICE)).cpu()
        assert_close_relative(plain(other), expected)
        traced = torch.jit.trace(plain, x)
        assert_close_relative(traced(other), expected)
