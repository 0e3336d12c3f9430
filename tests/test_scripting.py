"""The models in graphs: torch.jit.script, torch.fx (forward, backward, fx feature extraction, fx then
script), torch.export, and torch.jit.trace's refusal of the kernels' path.

Scripted and traced models are compared with the same model run eagerly on the "torch" backend (plain
PyTorch), on fresh random inputs. Models run on the "auto" backend on DEVICE, so that their SK units run
the Triton kernels; under Triton's interpreter (no CUDA), where a full-size network's SK units would take
minutes, only KERNEL_MODELS do, and the others run on the "torch" backend while
test_auto_backend_graphs checks their "auto" graphs without running them.
"""
import copy
from typing import NamedTuple

import pytest
import timm
import timm.models
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from sknet_triton import SKConv, accelerate, create_model, list_models, ops, set_backend
from sknet_triton.ops.batchnorm import batchnorm_affine
from tests.helpers import DEVICE, requires_kernels
from tests.model_helpers import (
    NUM_CLASSES,
    SMALL_MODEL,
    SK_UNITS,
    TRAINING_BATCH,
    assert_close_relative,
    assert_grads_as_accurate_as,
    batchnorm_folds,
    count_sk_units,
    randomize_batchnorm,
)

# The models that run the kernels under Triton's interpreter (test_accelerated_timm_model_scripts_and_traces
# runs them with split_input), an SK network and a ResNeSt.
KERNEL_MODELS = (SMALL_MODEL, "resnest14d")
STAGES = ("layer1", "layer2", "layer3", "layer4")
CUSTOM_OPS = ("sknet_triton::sk_fuse", "sknet_triton::sk_select")


def backend_for(name: str) -> str:
    return "auto" if DEVICE.type == "cuda" or name in KERNEL_MODELS else "torch"


class Case(NamedTuple):
    model: torch.nn.Module
    images: torch.Tensor
    expected: dict[str, torch.Tensor]  # eager "torch"-backend outputs: each stage's features, "logits"


@pytest.fixture(scope="module", params=list_models())
def case(request):
    """Each registered model in eval mode on DEVICE and its backend (:func:`backend_for`), channels_last
    (fewer programs for the interpreter), with random weights and BatchNorm state; fresh random images;
    and what the model computes for them eagerly on the "torch" backend. Built once per module."""
    model = randomize_batchnorm(create_model(request.param, num_classes=NUM_CLASSES))
    model = set_backend(model.to(DEVICE, memory_format=torch.channels_last), backend_for(request.param)).eval()
    x = images()
    eager = eager_torch(model)
    expected = {}
    for name in STAGES:
        getattr(eager, name).register_forward_hook(lambda module, inputs, output, name=name: expected.update({name: output}))
    with torch.no_grad():
        expected["logits"] = eager(x)
    return Case(model, x, expected)


def images(batch: int = 2, size: int = 32) -> torch.Tensor:
    """Fresh random images [batch, 3, size, size], channels_last, on DEVICE (one batch size throughout but
    where a training step through the kernels is judged, so that the CPU's convolutions are set up once per
    model)."""
    return torch.randn(batch, 3, size, size, device=DEVICE).contiguous(memory_format=torch.channels_last)


def eager_torch(model):
    """A copy of ``model`` on the "torch" backend: the eager computation the graphs are checked against."""
    return set_backend(copy.deepcopy(model), "torch")


def assert_one_node_per_op(graph_module, model) -> None:
    """On the "auto" backend, each SK unit's fuse and select are one call each in the fx graph."""
    targets = [node.target for node in graph_module.graph.nodes if node.op == "call_function"]
    units = count_sk_units(model) if uses_auto(model) else 0
    assert targets.count(ops.fuse.graph_sk_fuse) == units
    assert targets.count(ops.select.graph_sk_select) == units


def uses_auto(model) -> bool:
    return all(module.backend == "auto" for module in model.modules() if isinstance(module, SK_UNITS))


def ran_ops(fn, *args) -> tuple[object, set[str]]:
    """``fn(*args)`` and the names of the operators it ran."""
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        result = fn(*args)
    return result, {event.name for event in profiler.events()}


# --------------------------------------------------------------------------------------------------------
# Every registered model.


def test_script_matches_eager(case):
    scripted = torch.jit.script(case.model)
    with torch.no_grad():
        logits, ran = ran_ops(scripted, case.images)
    assert_close_relative(logits, case.expected["logits"])
    # resnest50d_1s4x24d has no SK unit (radix 1 everywhere): nothing calls the custom ops.
    units = [module for module in scripted.modules() if module.original_name in ("SKConv", "FusedSplitAttn")]
    assert len(units) == count_sk_units(case.model)
    for unit in units:
        assert all(op in str(unit.inlined_graph) for op in CUSTOM_OPS), "a scripted SK unit should call the custom ops"
    kernels = bool(units) and uses_auto(case.model) and ops.uses_triton(DEVICE)
    assert all((op in ran) == kernels for op in CUSTOM_OPS), f"the Triton kernels should run: {kernels}"


def test_fx_feature_extraction_matches_eager(case):
    return_nodes = {stage: stage for stage in STAGES} | {"fc": "logits"}
    extractor = timm.models.create_feature_extractor(case.model, return_nodes)
    assert_one_node_per_op(extractor, case.model)
    with torch.no_grad():
        features = extractor(case.images)
    assert features.keys() == case.expected.keys()
    for name, feature in features.items():
        assert_close_relative(feature, case.expected[name], name=name)


def test_fx_graph_scripts(case):
    with torch.no_grad():  # BatchNorm folded into the ops: the fold is in the graph too
        graph = torch.fx.symbolic_trace(case.model)
        scripted = torch.jit.script(graph)
        logits = scripted(case.images)
    assert_one_node_per_op(graph, case.model)
    assert_close_relative(logits, case.expected["logits"])


def test_fx_backward_matches_eager_and_reaches_every_parameter(case):
    model = copy.deepcopy(case.model).train()
    graph = torch.fx.symbolic_trace(model)  # holds model's own modules and parameters
    assert_one_node_per_op(graph, model)
    # On the "torch" backend the graph and the eager model compute alike, bitwise: the CPU's usual batch will do.
    batch = TRAINING_BATCH if uses_auto(model) else 2
    x, target = images(batch), torch.randint(0, NUM_CLASSES, (batch,), device=DEVICE)

    def train_step(network):
        model.zero_grad(set_to_none=True)
        logits = network(x)
        F.cross_entropy(logits, target).backward()
        return logits.detach(), {name: p.grad for name, p in model.named_parameters()}

    # Eagerly, a training SK unit may run BatchNorm inside the kernels, where the graph records it as its own
    # op: two float32 computations, whose rounding training-mode BatchNorm over two images amplifies. Both
    # are judged against float64, the graph by the eager model's accuracy.
    exact = set_backend(copy.deepcopy(model), "torch").double()
    exact.zero_grad(set_to_none=True)
    F.cross_entropy(exact(x.double()), target).backward()
    exact_grads = {name: p.grad for name, p in exact.named_parameters()}
    expected, expected_grads = train_step(model)
    logits, grads = train_step(graph)
    assert_close_relative(logits, expected)
    for name, grad in grads.items():
        assert grad is not None and grad.abs().sum() > 0, f"{name} has no gradient"
    assert_grads_as_accurate_as(grads, expected_grads, exact_grads)


def test_auto_backend_fx_graphs(case):
    """Every model's "auto" graphs, also where the other tests run it on the "torch" backend: one call per
    op, and BatchNorm folded into the ops when traced in eval mode without grad."""
    model = set_backend(copy.deepcopy(case.model), "auto")
    assert_one_node_per_op(torch.fx.symbolic_trace(model.train()), model)
    with torch.no_grad():
        folded = torch.fx.symbolic_trace(model.eval())
    assert_one_node_per_op(folded, model)
    targets = [node.target for node in folded.graph.nodes if node.op == "call_function"]
    assert targets.count(batchnorm_affine) == batchnorm_folds(model)


# --------------------------------------------------------------------------------------------------------
# One model.


def small_model():
    model = randomize_batchnorm(create_model(SMALL_MODEL, num_classes=NUM_CLASSES))
    return model.to(DEVICE, memory_format=torch.channels_last).eval()


def test_fx_graph_reads_batchnorm_state_when_run():
    model = small_model()
    with torch.no_grad():
        graph = torch.fx.symbolic_trace(model)
    targets = [node.target for node in graph.graph.nodes if node.op == "call_function"]
    assert batchnorm_affine in targets, "traced without grad in eval mode, BatchNorm should be folded"
    randomize_batchnorm(model)  # the graph holds the same modules
    x = images()
    with torch.no_grad():
        assert_close_relative(graph(x), eager_torch(model)(x))


@requires_kernels
def test_jit_trace_of_the_kernels_says_to_use_the_torch_backend():
    model = small_model()
    with pytest.raises(RuntimeError, match=r'sknet_triton\.set_backend\(model, "torch"\)'):
        torch.jit.trace(model, images())
    set_backend(model, "torch")
    traced = torch.jit.trace(model, images())
    x = images()
    with torch.no_grad():
        assert_close_relative(traced(x), model(x))


@requires_kernels
def test_export_keeps_the_kernels_as_calls():
    model = small_model()
    x = images()
    exported = torch.export.export(model, (x,))
    targets = {str(node.target) for node in exported.graph.nodes}
    assert {f"{op.replace('::', '.')}.default" for op in CUSTOM_OPS} <= targets
    plain = torch.export.export(eager_torch(model), (x,))
    assert not any("sknet_triton" in str(node.target) for node in plain.graph.nodes)
    x = images()
    with torch.no_grad():
        assert_close_relative(exported.module()(x), plain.module()(x))


def test_accelerated_timm_model_scripts_and_traces():
    model = accelerate(randomize_batchnorm(timm.create_model("skresnet18", num_classes=NUM_CLASSES)))
    model = model.to(DEVICE, memory_format=torch.channels_last).eval()
    scripted = torch.jit.script(model)
    graph = torch.fx.symbolic_trace(model)
    assert_one_node_per_op(graph, model)
    x = images()
    with torch.no_grad():
        expected = eager_torch(model)(x)
        assert_close_relative(scripted(x), expected)
        assert_close_relative(graph(x), expected)
