"""Training-mode BatchNorm + ReLU of the SK paths inside the kernels (sk_fuse_bn and sk_select_bn, SKConv in
training).

The oracle is nn.BatchNorm2d (training) + ReLU + the reference fuse and select, in float64 on the CPU.
Without CUDA the kernels run through Triton's interpreter, so shapes stay tiny and each test runs the
kernels once or twice.
"""
import copy
import functools
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from perf.recording import recording
from sknet_triton import SKConv, create_model, device, layers, ops, planning, reference, set_backend
from sknet_triton.families import FAMILIES
from sknet_triton.layers import UnitPath
from tests.helpers import DEVICE, requires_kernels
from tests.model_helpers import TRAINING_BATCH, assert_close_relative, assert_grads_as_accurate_as, randomize_batchnorm
from tests.ops_inputs import as_float64, assert_close, make_branches, poisoned_allocations

pytestmark = requires_kernels

EPS = 1e-5


class LinearAttention:
    """s [B, C] -> logits [B, M, C] = base + s @ weight: ``base``'s gradient is exactly dlogits, and
    ``weight``'s needs ds."""

    def __init__(self, B, M, C, dtype=torch.float32):
        self.base = (2 * torch.randn(B, M, C, device=DEVICE)).to(dtype).requires_grad_()
        self.weight = (torch.randn(C, M * C, device=DEVICE) / C**0.5).to(dtype).requires_grad_()

    def __call__(self, s):
        return self.base + (s.to(self.weight.dtype) @ self.weight).view(self.base.shape)

    def leaves(self):
        return [self.base, self.weight]

    def named_leaves(self):
        return [("logits", self.base), ("attention weight", self.weight)]

    def float64(self):
        copy64 = copy.copy(self)
        copy64.base, copy64.weight = as_float64(self.base), as_float64(self.weight)
        return copy64


def make_affine(M, C, affine):
    if not affine:
        return None, None
    weight = (torch.rand(M, C, device=DEVICE) + 0.5).requires_grad_()
    bias = (0.5 * torch.randn(M, C, device=DEVICE)).requires_grad_()
    return weight, bias


def fuse_select_bn(branches, attention, weight=None, bias=None, eps=EPS):
    """The SK unit over raw branches as SKConv runs it: sk_fuse_bn, the attention, sk_select_bn. Returns
    (out, logits, state)."""
    s, state = ops.sk_fuse_bn(branches, weight, bias, eps)
    logits = attention(s)
    return ops.sk_select_bn(state, logits), logits, state


def oracle(branches, attention, weight, bias):
    """out, logits and the leaves (requiring grad) of nn.BatchNorm2d (training) + ReLU + the reference in
    float64."""
    ys = [as_float64(u) for u in branches]
    attention64 = attention.float64()
    C = ys[0].shape[1]
    norms = [nn.BatchNorm2d(C, eps=EPS, affine=weight is not None, dtype=torch.float64) for _ in ys]
    if weight is not None:
        with torch.no_grad():
            for m, bn in enumerate(norms):
                bn.weight.copy_(weight[m])
                bn.bias.copy_(bias[m])
    values = [torch.relu(bn(y)) for bn, y in zip(norms, ys)]
    logits = attention64(reference.sk_fuse(values))
    out = reference.sk_select(values, logits)
    leaves = ys + [leaf for leaf in attention64.leaves() if leaf.requires_grad]
    if weight is not None:
        leaves += [bn.weight for bn in norms] + [bn.bias for bn in norms]
    return out, logits, leaves


# Which outputs of the unit the loss reaches: select's output, the attention's logits (computed from fuse's
# s), or both. Through the kernels each is its own backward pass.
REACHES = {"out": ("out",), "logits": ("logits",), "both": ("out", "logits")}


def run_and_check(branches, attention, weight, bias, dtype, monkeypatch, reaches=("out",)):
    """Forward and every gradient of sk_fuse_bn + sk_select_bn against the oracle, with a loss that reaches
    the outputs named in ``reaches``; returns the output."""
    expected, expected_logits, leaves64 = oracle(branches, attention, weight, bias)
    M = len(branches)
    names = [f"Y_{m}" for m in range(M)] + [name for name, leaf in attention.named_leaves() if leaf.requires_grad]
    inputs = branches + [leaf for leaf in attention.leaves() if leaf.requires_grad]
    if weight is not None:
        names += ["BN weight", "BN bias"]
        inputs += [weight, bias]
    with poisoned_allocations(monkeypatch):
        out, logits, state = fuse_select_bn(branches, attention, weight, bias)
        grad_outputs = {"out": torch.randn(out.shape, device=DEVICE).to(out.dtype),
                        "logits": torch.randn(logits.shape, device=DEVICE).to(logits.dtype)}
        outputs = {"out": out, "logits": logits}
        grads = torch.autograd.grad([outputs[r] for r in reaches], inputs, [grad_outputs[r] for r in reaches])

    mean, var = state.mean, state.var
    assert out.dtype == dtype and mean.dtype == var.dtype == torch.float32
    assert not mean.requires_grad and not var.requires_grad
    assert_close(out, expected, dtype, "output")
    ys = leaves64[:M]
    assert_close(mean, torch.stack([y.mean((0, 2, 3)) for y in ys]), torch.float32, "batch mean")
    assert_close(var, torch.stack([y.var((0, 2, 3), unbiased=False) for y in ys]), torch.float32, "batch variance")
    expected_outputs = {"out": expected, "logits": expected_logits}
    expected_grads = list(torch.autograd.grad(
        [expected_outputs[r] for r in reaches], leaves64, [as_float64(grad_outputs[r]) for r in reaches]
    ))
    if weight is not None:  # the oracle's BatchNorm parameters are per branch: stack them as [M, C]
        expected_grads[-2 * M:] = [torch.stack(expected_grads[-2 * M:-M]), torch.stack(expected_grads[-M:])]
    for name, grad, want, leaf in zip(names, grads, expected_grads, inputs, strict=True):
        assert grad.dtype == leaf.dtype, name
        assert want.abs().max() > 0, f"{name}: the case should give it a gradient"
        assert_close(grad, want, leaf.dtype if leaf.dtype != torch.float32 else dtype, f"gradient of {name}")
    return out


@pytest.mark.parametrize("M, channels_last", [(2, False), (3, True), (4, False), (4, True)], ids=str)
def test_matches_batchnorm_relu_and_reference(M, channels_last, monkeypatch):
    shape = (2, 12, 5, 7)
    branches = make_branches(shape, M, torch.float32, channels_last, stacked=False)
    weight, bias = make_affine(M, shape[1], affine=True)
    out = run_and_check(branches, LinearAttention(shape[0], M, shape[1]), weight, bias, torch.float32, monkeypatch)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_under_autocast(dtype, monkeypatch):
    # Under autocast the convolutions give half-precision branches and the attention half-precision logits;
    # BatchNorm's parameters stay float32. The kernels compute in float32 and round once.
    shape, M = (2, 16, 4, 5), 2
    branches = make_branches(shape, M, dtype, channels_last=True, stacked=False)
    weight, bias = make_affine(M, shape[1], affine=True)
    with torch.autocast(DEVICE.type, dtype=dtype):
        run_and_check(branches, LinearAttention(shape[0], M, shape[1]), weight, bias, dtype, monkeypatch)


@pytest.mark.parametrize("reaches", list(REACHES))
def test_gradients_whichever_output_the_loss_reaches(reaches, monkeypatch):
    # Through the logits alone, select's backward never runs: fuse's must still give every gradient. Through
    # out alone (the attention's parameters constants), the branches' gradient still flows through s too.
    shape, M = (2, 8, 4, 5), 2
    branches = make_branches(shape, M, torch.float32, channels_last=True, stacked=False)
    weight, bias = make_affine(M, shape[1], affine=True)
    attention = LinearAttention(shape[0], M, shape[1])
    if reaches == "out":
        for leaf in attention.leaves():
            leaf.requires_grad_(False)
    run_and_check(branches, attention, weight, bias, torch.float32, monkeypatch, REACHES[reaches])


class TransposedLogits(LinearAttention):
    """LinearAttention whose logits are a [B, M, C] view of [B, C, M] memory: one branch's channels M apart."""

    def __call__(self, s):
        return super().__call__(s).transpose(1, 2).contiguous().transpose(1, 2)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("M", [2, 3, 4])
@pytest.mark.parametrize("form", ["slices", "stacked_view"])
def test_channel_slices_of_one_tensor_and_strided_logits(form, M, channels_last, monkeypatch):
    # ResNeSt's radix branches: M channel slices of one [B, M*C, H, W] tensor, read where they lie by every
    # launch of training BatchNorm, in NCHW (each image dense) and channels_last (pixels M*C apart: SLICED).
    B, C, H, W = 2, 8, 4, 5
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(B, M * C, H, W, device=DEVICE).contiguous(memory_format=fmt).requires_grad_()
    branches = x.view(B, M, C, H, W) if form == "stacked_view" else list(x.split(C, dim=1))
    where_they_lie = [u.data_ptr() for u in x.split(C, dim=1)]
    weight, bias = make_affine(M, C, affine=True)
    attention = TransposedLogits(B, M, C)
    grad_out = torch.randn(B, C, H, W, device=DEVICE)
    with recording() as launches:  # recorded, not run
        torch.autograd.grad(fuse_select_bn(branches, attention, weight, bias)[0], [x], grad_out)
    assert {r.family for r in launches} == {"bn_stats", "fuse_fwd", "select_fwd", "select_bn_bwd", "fuse_bn_bwd"}
    for r in launches:
        assert [t.data_ptr() for t in r.args[:M]] == where_they_lie, f"{r.family} read copies of the slices"
        assert r.constexprs["SLICED"] == channels_last
    with poisoned_allocations(monkeypatch):
        out = fuse_select_bn(branches, attention, weight, bias)[0]
        [grad_x] = torch.autograd.grad(out, [x], grad_out)
    expected, _, leaves64 = oracle(list(x.split(C, dim=1)), attention, weight, bias)
    assert_close(out, expected, torch.float32, "output")
    expected_grads = torch.autograd.grad(expected, leaves64[:M], as_float64(grad_out))
    assert_close(grad_x, torch.cat(expected_grads, dim=1), torch.float32, "gradient of the sliced tensor")
    if form == "slices":
        run_and_check(branches, TransposedLogits(B, M, C), weight, bias, torch.float32, monkeypatch)


def test_without_affine_parameters(monkeypatch):
    shape, M = (2, 10, 3, 6), 3
    branches = make_branches(shape, M, torch.float32, channels_last=False, stacked=False)
    run_and_check(branches, LinearAttention(shape[0], M, shape[1]), None, None, torch.float32, monkeypatch)


def test_many_splits(min_programs, monkeypatch):
    min_programs(16)
    # Per-program statistics of unequal chunks (the last holds one position) combine into the batch's, and
    # every chunk's share of dlogits and of BatchNorm's sums adds up.
    shape, M = (2, 8, 9, 9), 2
    p = planning.plan(FAMILIES["bn_stats"], 2, 8, 81, M, torch.float32, False, DEVICE)
    assert p.num_splits > 4 and 81 % p.chunk == 1
    branches = make_branches(shape, M, torch.float32, channels_last=False, stacked=False)
    weight, bias = make_affine(M, shape[1], affine=True)
    run_and_check(branches, LinearAttention(shape[0], M, shape[1]), weight, bias, torch.float32, monkeypatch)


@pytest.mark.parametrize("path", ["kernels", "reference"])
@pytest.mark.parametrize("stacked", [False, True], ids=["list", "stacked"])
def test_empty_batch(path, stacked, monkeypatch):
    if path == "reference":
        monkeypatch.setattr(device, "KERNEL_DEVICE_TYPES", ("cuda",))  # the rule without the interpreter
    where = DEVICE if path == "kernels" else torch.device("cpu")
    M, C = 3, 6
    branches = make_branches((0, C, 3, 4), M, torch.float32, True, stacked)
    weight, bias = (t.detach().to(where).requires_grad_() for t in make_affine(M, C, affine=True))
    branches = branches.to(where) if stacked else [u.to(where) for u in branches]
    attention = torch.randn(C, M * C, device=where, requires_grad=True)
    s, state = ops.sk_fuse_bn(branches, weight, bias)
    logits = (s @ attention).view(0, M, C)
    out = ops.sk_select_bn(state, logits)
    assert s.shape == (0, C) and out.shape == (0, C, 3, 4) and out.dtype == torch.float32
    assert state.mean.shape == state.var.shape == (M, C) and state.mean.isnan().all(), "no values, no mean"
    leaves = ([branches] if stacked else branches) + [weight, bias, attention]
    grads = torch.autograd.grad(out.sum() + logits.sum(), leaves)
    assert [g.shape for g in grads] == [t.shape for t in leaves]
    assert all(not g.any() for g in grads[-3:]), "no images, no gradient of the parameters"


def test_one_value_per_channel_is_refused_as_batchnorm_refuses_it():
    branches = make_branches((1, 6, 1, 1), 2, torch.float32, channels_last=False, stacked=False)
    message = "Expected more than 1 value per channel when training"
    with pytest.raises(ValueError, match=message):
        nn.BatchNorm2d(6)(branches[0])
    with pytest.raises(ValueError, match=message):
        ops.sk_fuse_bn(branches)
    unit = SKConv(6, 6, groups=2).train()
    with pytest.raises(ValueError, match=message):
        unit(torch.randn(1, 6, 1, 1, device=DEVICE))


# --------------------------------------------------------------------------------------------------------
# SKConv: which path runs, running statistics, what autograd keeps, torch.compile.


@pytest.fixture
def fused_calls(monkeypatch):
    """How many times SKConv ran the fused training path."""
    calls = []
    original = layers.sk_fuse_bn

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(layers, "sk_fuse_bn", counting)
    return calls


def sk_unit(M=2, norm_layer=nn.BatchNorm2d):
    """A small SKConv with random BatchNorm affine parameters, and its float64 "torch"-backend copy."""
    unit = SKConv(8, 8, M=M, groups=2, L=8, norm_layer=norm_layer).to(DEVICE)
    with torch.no_grad():
        for module in unit.modules():
            if isinstance(module, nn.BatchNorm2d) and module.affine:
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return unit, set_backend(copy.deepcopy(unit), "torch").double()


def assert_training_step_matches(unit, x, forward=None):
    """One forward and backward of ``forward`` (default ``unit``; ``unit``'s parameters) against the float64
    "torch"-backend copy of ``unit``: the output, then the gradients judged by plain float32 PyTorch's
    accuracy (training BatchNorm over a small batch amplifies float32 rounding). Returns the float64 copy,
    stepped alike."""
    baseline = set_backend(copy.deepcopy(unit), "torch")
    exact = copy.deepcopy(baseline).double()
    outputs = {unit: (unit if forward is None else forward)(x), baseline: baseline(x), exact: exact(x.double())}
    assert_close(outputs[unit], outputs[exact], torch.float32, "output")
    grad_out = torch.randn(outputs[unit].shape, device=DEVICE)
    grads = {}
    for module, out in outputs.items():
        out.backward(grad_out.to(out.dtype))
        grads[module] = {name: p.grad for name, p in module.named_parameters()}
    assert_grads_as_accurate_as(grads[unit], grads[baseline], grads[exact])
    return exact


def assert_buffers_match(unit, exact):
    buffers = dict(exact.named_buffers())
    for name, value in unit.named_buffers():
        if value.is_floating_point():
            assert_close_relative(value.double(), buffers[name], 1e-5, name)
        else:
            assert torch.equal(value.cpu(), buffers[name].cpu()), name


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_running_statistics_follow_batchnorm(momentum, fused_calls):
    unit, exact = sk_unit(norm_layer=functools.partial(nn.BatchNorm2d, momentum=momentum))
    unit.train()
    exact.train()
    with torch.no_grad():
        for step in range(3):
            x = torch.randn(2, 8, 5, 4, device=DEVICE) + step  # a new batch, a new mean
            assert_close(unit(x), exact(x.double()), torch.float32, f"step {step}")
    assert len(fused_calls) == 3
    assert_buffers_match(unit, exact)
    assert int(unit.paths[0].bn.num_batches_tracked) == 3


@pytest.mark.parametrize("case", ["affine_false", "no_running_stats_eval"])
def test_layer_variants(case, fused_calls):
    # affine=False: no BatchNorm parameters. track_running_stats=False: BatchNorm uses the batch's statistics
    # in eval mode too, and keeps no running statistics.
    kwargs = {"affine_false": dict(affine=False), "no_running_stats_eval": dict(track_running_stats=False)}[case]
    unit, _ = sk_unit(M=3, norm_layer=functools.partial(nn.BatchNorm2d, **kwargs))
    unit.train(case == "affine_false")
    exact = assert_training_step_matches(unit, torch.randn(TRAINING_BATCH, 8, 5, 5, device=DEVICE))
    assert len(fused_calls) == 1
    assert_buffers_match(unit, exact)


def test_other_norm_layers_stay_separate_ops(fused_calls):
    # A subclass of BatchNorm2d (as SyncBatchNorm is a different class: its statistics span processes) is not
    # folded into the kernels: the unit takes the unfused path, with the same outputs.
    class OtherBatchNorm(nn.BatchNorm2d):
        pass

    unit, exact = sk_unit(norm_layer=OtherBatchNorm)
    unit.train()
    exact.train()
    x = torch.randn(2, 8, 4, 4, device=DEVICE)
    assert_close(unit(x), exact(x.double()), torch.float32, "output")
    assert fused_calls == []
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(sk_unit()[0]).train()
    assert type(synced.paths[0].bn) is nn.SyncBatchNorm
    assert synced.to(DEVICE).unit_path(x) is UnitPath.OPS


def test_backward_keeps_no_normalised_branch():
    unit, _ = sk_unit(M=3)
    unit.train()
    x = torch.randn(2, 8, 4, 5, device=DEVICE)
    branches = [path.conv(x) for path in unit.paths]  # outside the hooks: the convolutions keep x
    weight = torch.stack([path.bn.weight for path in unit.paths])
    bias = torch.stack([path.bn.bias for path in unit.paths])
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out, _, _ = fuse_select_bn(branches, unit.attn, weight, bias)
    large = {t.untyped_storage().data_ptr() for t in saved if t.numel() >= out.numel()}
    assert large == {u.untyped_storage().data_ptr() for u in branches}, "only the raw branches Y_m, no normalised copy"
    # The rest: the [5, M, C] statistics, the logits [B, M, C], and the attention's own weights and activations.
    small = [tuple(t.shape) for t in saved if t.numel() < out.numel()]
    assert (5, 3, 8) in small and (2, 3, 8) in small, small


def test_compiles_to_one_graph_in_training(fused_calls):
    torch._dynamo.reset()
    unit, _ = sk_unit()
    unit.train()
    graphs = []

    def recorder(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    compiled = torch.compile(unit, fullgraph=True, backend=recorder)
    exact = assert_training_step_matches(unit, torch.randn(TRAINING_BATCH, 8, 4, 4, device=DEVICE), compiled)
    assert len(graphs) == 1 and len(fused_calls) == 1
    targets = {str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"}
    assert {"sknet_triton.sk_fuse_bn_train", "sknet_triton.sk_select_bn_train"} <= targets, targets
    assert_buffers_match(unit, exact)


def test_model_trains_through_the_kernels(fused_calls):
    model = randomize_batchnorm(create_model("sknet_tiny", num_classes=10)).to(DEVICE).train()
    baseline = set_backend(copy.deepcopy(model), "torch")
    exact = copy.deepcopy(baseline).double()
    x = torch.randn(TRAINING_BATCH, 3, 32, 32, device=DEVICE)
    target = torch.randint(0, 10, (TRAINING_BATCH,), device=DEVICE)
    grads = {}
    for m, inputs in ((model, x), (baseline, x), (exact, x.double())):
        loss = F.cross_entropy(m(inputs), target)
        loss.backward()
        grads[m] = {name: p.grad for name, p in m.named_parameters()}
    units = sum(isinstance(module, SKConv) for module in model.modules())
    assert len(fused_calls) == units > 0
    assert_grads_as_accurate_as(grads[model], grads[baseline], grads[exact])
    assert_buffers_match(model, exact)


TRACE_SCRIPT = textwrap.dedent('''
    import json, torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch._functorch.aot_autograd import aot_function
    from functorch.compile import make_boxed_func
    from sknet_triton import device, planning, tuned

    assert not device.INTERPRETED
    tuned.arch_name = lambda device: "sm_90"  # no GPU here to ask: an H100's
    planning.min_programs = lambda device, config: 132 * config.programs_per_sm
    T = torch.ops.sknet_triton

    def bn_ops(u0, u1, weight, bias, logits, grad_out, grad_s):
        s, stats, grad_link, handoff_link = T.sk_fuse_bn_train([u0, u1], weight, bias, 1e-5)
        out = T.sk_select_bn_train([u0, u1], logits, stats, grad_link, handoff_link)
        dlogits, handoff = T.sk_select_bn_train_backward(grad_out, [u0, u1], logits, stats)
        grads, dgamma, dbeta = T.sk_fuse_bn_train_backward(grad_s, grad_out, [u0, u1], stats, handoff)
        return s, out, dlogits, *grads, dgamma, dbeta

    graphs = []
    def keep(gm, inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    with FakeTensorMode():
        def cuda(*shape):
            t = torch.empty(*shape, device="cuda")
            return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t
        images = (4, 64, 14, 14)
        aot_function(bn_ops, fw_compiler=keep)(
            cuda(*images), cuda(*images), cuda(2, 64), cuda(2, 64), cuda(4, 2, 64), cuda(*images), cuda(4, 64))
    [gm] = graphs
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    print(json.dumps({"launches": sum("triton_kernel_wrapper" in str(n.target) for n in calls),
                      "opaque": sorted({str(n.target) for n in calls if "sknet_triton" in str(n.target)})}))
''')


def test_triton_ops_trace_to_kernel_launches():
    # On CUDA the ops are triton_ops, which torch.compile traces into their launches: fake CUDA tensors, in a
    # subprocess where the kernels are the real @triton.jit functions (see tests/test_compiled_path.py).
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", TRACE_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    traced = json.loads(result.stdout.strip().splitlines()[-1])
    # statistics, fuse, select, then the two backward passes
    assert traced == {"launches": 5, "opaque": []}, traced
