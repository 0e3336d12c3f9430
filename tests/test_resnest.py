"""ResNeSt's split attention on the kernels: FusedSplitAttn against timm's SplitAttn in float64, and accelerate
on timm's ResNeSt models."""
import copy
import warnings

import pytest
import timm
import torch
from timm.layers import DropBlock2d, SplitAttn
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from sknet_triton import FusedSplitAttn, accelerate, create_model, set_backend
from sknet_triton.layers import UnitPath
from sknet_triton.ops import launch
from tests.helpers import DEVICE, requires_kernels
from tests.model_helpers import (
    NUM_CLASSES,
    TRAINING_BATCH,
    assert_close_relative,
    assert_grads_as_accurate_as,
    count_sk_units,
    randomize_batchnorm,
)
from tests.ops_inputs import poisoned_allocations

# (radix, cardinality): resnest50d's and resnest50d_4s2x40d's.
SPLITS = [(2, 1), (4, 2)]


def split_attn(radix: int, cardinality: int, channels: int = 16, **kwargs) -> SplitAttn:
    """A small timm SplitAttn as ResNeSt's blocks build it, with random BatchNorm state, on DEVICE."""
    module = SplitAttn(channels, channels, kernel_size=3, padding=1, groups=cardinality, radix=radix,
                       norm_layer=nn.BatchNorm2d, **kwargs)
    return randomize_batchnorm(module).to(DEVICE)


def launches_reading(monkeypatch) -> list:
    """(family, first branch's address, SLICED) of every kernel launch from now on; they still run."""
    started = []
    run = launch.start

    def start(family, grid, args, constexprs, options):
        started.append((family.name, args[0].data_ptr(), constexprs.get("SLICED")))
        run(family, grid, args, constexprs, options)

    monkeypatch.setattr(launch, "start", start)
    return started


def run_step(module, x, grad_out, reference: bool = False):
    """Output, and the gradients of x and of every parameter by name, for ``grad_out``."""
    module.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    out = module(x)
    out.backward(grad_out)
    return out.detach(), x.grad, {name: p.grad for name, p in module.named_parameters()}


@requires_kernels
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("radix, cardinality", SPLITS, ids=lambda v: str(v))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fused_split_attn_matches_timm(training, radix, cardinality, channels_last, monkeypatch):
    timm_module = split_attn(radix, cardinality).train(training)
    exact = copy.deepcopy(timm_module).double()
    baseline = copy.deepcopy(timm_module)  # timm's computation in float32, for the gradients' accuracy
    fused = accelerate(copy.deepcopy(timm_module))
    assert type(fused) is FusedSplitAttn
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(TRAINING_BATCH, 16, 6, 5, device=DEVICE).contiguous(memory_format=fmt)
    grad_out = torch.randn(TRAINING_BATCH, 16, 6, 5, device=DEVICE)
    assert fused.unit_path(x) is (UnitPath.BATCH_STATISTICS if training else UnitPath.OPS)

    started = launches_reading(monkeypatch)
    with poisoned_allocations(monkeypatch):
        out, grad_x, grads = run_step(fused, x, grad_out)
    conv_output = {ptr for _, ptr, _ in started}
    assert len(conv_output) == 1, "every launch reads the branches where the convolution wrote them"
    assert all(sliced == channels_last for _, _, sliced in started)
    expected, expected_grad_x, expected_grads = run_step(exact, x.double(), grad_out.double())
    _, baseline_grad_x, baseline_grads = run_step(baseline, x, grad_out)

    assert out.is_contiguous(memory_format=fmt)
    assert_close_relative(out, expected.float(), name="output")
    assert_grads_as_accurate_as({"x": grad_x, **grads}, {"x": baseline_grad_x, **baseline_grads},
                                {"x": expected_grad_x, **expected_grads})
    exact_buffers = dict(exact.named_buffers())
    for name, buffer in fused.named_buffers():
        torch.testing.assert_close(buffer.to(exact_buffers[name].dtype), exact_buffers[name], rtol=1e-5, atol=1e-6,
                                   msg=name)


@requires_kernels
@pytest.mark.parametrize("radix, cardinality", SPLITS, ids=lambda v: str(v))
def test_eval_folds_bn0_into_the_kernels(radix, cardinality):
    timm_module = split_attn(radix, cardinality).eval()
    exact = copy.deepcopy(timm_module).double()
    fused = accelerate(copy.deepcopy(timm_module))
    x = torch.randn(2, 16, 7, 7, device=DEVICE).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert fused.unit_path(x) is UnitPath.FOLDED_BATCHNORM
        assert_close_relative(fused(x), exact(x.double()).float(), name="output")


@requires_kernels
def test_units_that_cannot_fuse_run_timm_s_computation():
    x = torch.randn(2, 16, 6, 6, device=DEVICE)
    dropping = accelerate(split_attn(2, 1, drop_layer=lambda: DropBlock2d(drop_prob=0.5, block_size=3)))
    assert dropping.unit_path(x) is UnitPath.PLAIN_TORCH
    assert dropping.eval().unit_path(x) is UnitPath.OPS, "an inactive DropBlock drops nothing"
    with pytest.warns(UserWarning, match="bn0 is a GroupNorm"):
        grouped = accelerate(SplitAttn(16, 16, radix=2, norm_layer=lambda c, **kw: nn.GroupNorm(4, c, **kw)).to(DEVICE))
    with pytest.warns(UserWarning, match="radix 1"):
        single = accelerate(split_attn(1, 1))
    assert type(grouped) is SplitAttn and type(single) is SplitAttn, "they stay timm's modules"
    # A unit whose BatchNorm becomes a SyncBatchNorm after accelerate runs timm's computation from then on.
    synced = accelerate(split_attn(2, 1))
    synced.bn0 = nn.SyncBatchNorm.convert_sync_batchnorm(synced.bn0)
    assert synced.eval().unit_path(x) is UnitPath.PLAIN_TORCH
    with torch.no_grad():
        torch.testing.assert_close(synced(x), SplitAttn.forward(synced, x))


def test_accelerate_keeps_tensors_optimizer_and_outputs():
    model = randomize_batchnorm(timm.create_model("resnest14d", num_classes=NUM_CLASSES))
    reference = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    keys = list(model.state_dict())
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert accelerate(model) is model
    assert count_sk_units(model) == 4 == sum(isinstance(m, SplitAttn) for m in model.modules())
    assert list(model.state_dict()) == keys
    assert all(t is tensors[name] for name, t in (dict(model.named_parameters()) | dict(model.named_buffers())).items())
    assert [p for group in optimizer.param_groups for p in group["params"]] == list(model.parameters())
    again = copy.deepcopy(model)
    accelerate(model)
    assert [type(m) for m in model.modules()] == [type(m) for m in again.modules()], "a second call changes nothing"

    set_backend(model, "torch")
    assert all(unit.backend == "torch" for unit in model.modules() if isinstance(unit, FusedSplitAttn))
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


def test_create_model_builds_every_resnest_accelerated():
    for name in ("resnest14d", "resnest26d", "resnest50d", "resnest50d_1s4x24d", "resnest50d_4s2x40d",
                 "resnest101e", "resnest200e", "resnest269e"):
        with torch.device("meta"), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = create_model(name)
            timm_model = timm.create_model(name)
        # Its units have one split each (radix 1, a sigmoid attention): they stay timm's, with one warning.
        assert [str(w.message).endswith("radix 1 (the kernels take 2 to 4 branches)") for w in caught] == (
            [True] if name == "resnest50d_1s4x24d" else []), name
        assert list(model.state_dict()) == list(timm_model.state_dict()), name
        units = [m for m in model.modules() if isinstance(m, SplitAttn)]
        # resnest50d_1s4x24d's units have one split each (radix 1, a sigmoid attention): timm's, as they are.
        assert units and all(type(m) is (SplitAttn if name == "resnest50d_1s4x24d" else FusedSplitAttn)
                             for m in units), name


@requires_kernels
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compiles_to_one_graph_through_the_kernels(training):
    torch._dynamo.reset()
    fused = accelerate(split_attn(2, 1)).train(training)
    eager = copy.deepcopy(fused)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fused, backend=counter, fullgraph=True)
    x = torch.randn(TRAINING_BATCH, 16, 5, 6, device=DEVICE).contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn(TRAINING_BATCH, 16, 5, 6, device=DEVICE)
    out, grad_x, grads = run_step(compiled, x, grad_out)
    expected, expected_grad_x, expected_grads = run_step(eager, x, grad_out)
    assert counter.frame_count == 1
    assert_close_relative(out, expected, name="output")
    assert_close_relative(grad_x, expected_grad_x, rtol=1e-3, name="input gradient")
    for name, grad in grads.items():  # the compiled module's names: the original's under _orig_mod.
        assert_close_relative(grad, expected_grads[name.removeprefix("_orig_mod.")], rtol=1e-3, name=name)
    for name, buffer in eager.named_buffers():
        torch.testing.assert_close(dict(fused.named_buffers())[name], buffer, msg=name)


@requires_kernels
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_autocast_through_the_kernels(training):
    # bfloat16 autocast: the convolution writes bfloat16 branches, which the kernels read and accumulate in
    # float32; judged against float64 at bfloat16's precision (8 bits: 2**-8 = 0.4 %).
    timm_module = split_attn(2, 1).train(training)
    exact = copy.deepcopy(timm_module).double()
    fused = accelerate(copy.deepcopy(timm_module))
    x = torch.randn(TRAINING_BATCH, 16, 6, 5, device=DEVICE).contiguous(memory_format=torch.channels_last)
    with torch.autocast(DEVICE.type, torch.bfloat16):
        out = fused(x)
    assert out.dtype == torch.bfloat16
    assert_close_relative(out.float(), exact(x.double()).float(), rtol=3e-2, name="output")
