"""sk_split (every branch's grouped 3x3 convolution, folded BatchNorm and ReLU, and the pooled sum, in one
kernel) against F.conv2d + BatchNorm + ReLU + the reference fuse in float64; and SKConv and a model in eval
mode with the split kernel forced on, against the paths' own convolutions.

Without CUDA the kernel runs on the CPU through Triton's interpreter (see conftest.py): shapes stay small.
"""
import copy
import dataclasses
import json

import pytest
import torch

from perf.recording import recording
from sknet_triton import SKConv, create_model, families, layers, ops, planning, reference, set_backend, set_split_conv, tuned
from sknet_triton.layout import image_layout
from sknet_triton.ops.split import split_forward
from tests.helpers import DEVICE, requires_kernels
from tests.model_helpers import randomize_batchnorm
from tests.ops_inputs import assert_close, poisoned_allocations

pytestmark = requires_kernels

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# (B, C_in, H, W, C, M, group_in, stride, split_input, dtype, channels_last): every group width of the
# registered models at C = 32 (32 groups of 1, 8 of 4, 4 of 8, 2 of 16, 1 of 32), through both inner products
# (the FMA loop below 16 output channels per group, tensor cores from 16), both strides, odd sizes, 1x1 and
# 2x2 images, every dtype and layout, M = 2..4 and timm's split_input.
CASES = [
    (1, 32, 9, 11, 32, 2, 4, 1, False, F32, True),
    (1, 32, 7, 5, 32, 3, 8, 2, False, F32, False),
    (1, 32, 1, 1, 32, 2, 1, 1, False, F32, True),
    (2, 32, 2, 2, 32, 2, 4, 1, False, BF16, False),
    (1, 32, 9, 7, 32, 4, 8, 2, False, BF16, True),
    (2, 32, 5, 7, 32, 2, 16, 1, False, BF16, True),
    (1, 32, 6, 5, 32, 4, 32, 2, False, F16, False),
    (2, 32, 3, 3, 32, 3, 32, 1, False, F16, True),
    (2, 32, 9, 11, 32, 2, 16, 1, False, F32, False),
    (2, 32, 7, 5, 32, 2, 16, 2, True, F32, True),
    (1, 48, 5, 6, 24, 3, 16, 1, True, BF16, False),
    (2, 16, 2, 3, 8, 2, 16, 1, False, F16, True),
]


def case_id(case):
    B, C_in, H, W, C, M, group_in, stride, split_input, dtype, channels_last = case
    layout = "nhwc" if channels_last else "nchw"
    split = "-split" if split_input else ""
    return f"{B}x{C_in}x{H}x{W}-C{C}-M{M}-gin{group_in}-s{stride}{split}-{str(dtype)[6:]}-{layout}"


def make_inputs(B, C_in, H, W, C, M, group_in, dtype, channels_last):
    """Random x, weight, scale and bias (none requiring grad), scaled so that the branches stay O(1)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(B, C_in, H, W, device=DEVICE).to(dtype).to(memory_format=fmt)
    weight = (torch.randn(M, C, group_in, 3, 3, device=DEVICE) / (3 * group_in**0.5)).to(dtype)
    scale = torch.rand(M, C, device=DEVICE) + 0.5
    bias = torch.randn(M, C, device=DEVICE) * 0.5
    return x, weight, scale, bias


def expected_split(x, weight, scale, bias, stride, split_input):
    """F.conv2d per branch + BatchNorm affine + ReLU and the reference fuse, in float64 on the CPU."""
    as64 = [t.detach().to("cpu", torch.float64) for t in (x, weight, scale, bias)]
    return reference.sk_split(*as64, stride, split_input)


def check_split(x, weight, scale, bias, stride, split_input, monkeypatch):
    branches_expected, s_expected = expected_split(x, weight, scale, bias, stride, split_input)
    with poisoned_allocations(monkeypatch), torch.no_grad():
        branches, s = ops.sk_split(x, weight, scale, bias, stride, split_input)
    assert branches.dtype == x.dtype and s.dtype == torch.float32
    assert branches.shape == branches_expected.shape
    for m in range(weight.shape[0]):
        assert_close(branches[:, m], branches_expected[:, m], x.dtype, f"branch {m}")
        assert image_layout(branches[:, m]) == bool(image_layout(x)), "branches keep x's layout"
    # s sums float32 values the kernel also rounds to the branches' dtype: float32 tolerance for all dtypes,
    # as it is computed from the unrounded float32 branches.
    assert_close(s, s_expected, torch.float32, "pooled sum")
    return branches, s


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_conv_batchnorm_relu_and_fuse(case, monkeypatch):
    B, C_in, H, W, C, M, group_in, stride, split_input, dtype, channels_last = case
    x, weight, scale, bias = make_inputs(B, C_in, H, W, C, M, group_in, dtype, channels_last)
    check_split(x, weight, scale, bias, stride, split_input, monkeypatch)


@pytest.mark.parametrize("group_in, tensor_cores", [(4, False), (16, True)])
def test_each_group_width_takes_its_inner_product(group_in, tensor_cores):
    x, weight, scale, bias = make_inputs(1, 32, 3, 3, 32, 2, group_in, F32, True)
    with recording() as launches:
        split_forward(x, weight, scale, bias, 1, False)
    [split] = launches
    assert split.constexprs["USE_DOT"] is tensor_cores


@pytest.mark.parametrize("group_in", [4, 16])
def test_many_chunks_add_up(group_in, monkeypatch):
    # Every chunk of positions adds its share of s atomically, after several tiles each.
    x, weight, scale, bias = make_inputs(1, 16, 23, 24, 16, 2, group_in, F32, True)
    with recording() as launches:
        split_forward(x, weight, scale, bias, 1, False)
    [split] = launches
    assert split.args[-1] > split.constexprs["BLOCK_P"], "a chunk holds several tiles"
    assert 23 * 24 > 2 * split.args[-1], "several chunks per image"
    check_split(x, weight, scale, bias, 1, False, monkeypatch)


def test_deterministic_algorithms_give_one_chunk_and_repeatable_results(min_programs):
    min_programs(64)
    x, weight, scale, bias = make_inputs(1, 16, 20, 20, 16, 2, 4, F32, True)
    torch.use_deterministic_algorithms(True)
    try:
        with recording() as launches:
            split_forward(x, weight, scale, bias, 1, False)
        assert launches[0].args[-1] >= 20 * 20, "one chunk per image"
        runs = [ops.sk_split(x, weight, scale, bias) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_empty_batch():
    x, weight, scale, bias = make_inputs(0, 8, 3, 4, 8, 2, 8, F32, False)
    branches, s = ops.sk_split(x, weight, scale, bias, 2)
    assert branches.shape == (0, 2, 8, 2, 2) and s.shape == (0, 8)


def bad_calls():
    x, weight, scale, bias = make_inputs(2, 8, 4, 4, 8, 2, 4, F32, False)
    return {
        "requires_grad": (lambda: ops.sk_split(x.requires_grad_(), weight, scale, bias), ValueError, "inference"),
        "weight_not_3x3": (lambda: ops.sk_split(x, weight[..., :1], scale, bias), ValueError, "weight must be"),
        "one_branch": (lambda: ops.sk_split(x, weight[:1], scale[:1], bias[:1]), ValueError, "2 to 4 branches"),
        "dtypes_differ": (lambda: ops.sk_split(x, weight.half(), scale, bias), TypeError, "must match"),
        "stride_3": (lambda: ops.sk_split(x, weight, scale, bias, 3), ValueError, "stride must be 1 or 2"),
        "groups": (lambda: ops.sk_split(x, weight[:, :, :3], scale, bias), ValueError, "grouped convolution"),
        "split_indivisible": (
            lambda: ops.sk_split(x[:, :7], weight[:, :, :1], scale, bias, split_input=True), ValueError, "divisible"
        ),
        "scale_shape": (lambda: ops.sk_split(x, weight, scale[:, :4], bias), ValueError, r"scale must be \[M, C\]"),
        "no_bias": (lambda: ops.sk_split(x, weight, scale, None), TypeError, "required"),
    }


@pytest.mark.parametrize("case", list(bad_calls()))
def test_bad_input_is_named(case):
    call, error, message = bad_calls()[case]
    with pytest.raises(error, match=message):
        call()


# --------------------------------------------------------------------------------------------------------
# Through SKConv and a model.


@pytest.fixture
def split_calls(monkeypatch):
    """Counts SKConv's calls of sk_split."""
    calls = []
    real = layers.sk_split

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(layers, "sk_split", counted)
    return calls


# (in_channels, out_channels, stride, M, groups, split_input, dtype, channels_last)
UNITS = [
    (32, 32, 1, 2, 8, False, F32, True),  # 4 channels per group: the FMA loop
    (32, 32, 2, 3, 2, False, BF16, False),  # 16 per group: tensor cores
    (32, 32, 2, 2, 1, True, F16, True),  # timm's skresnet: the input split across the paths
]


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: f"in{u[0]}-s{u[2]}-M{u[3]}-g{u[4]}-{str(u[6])[6:]}")
def test_skconv_forced_split_kernel_matches_float64(unit, split_calls, monkeypatch):
    in_channels, out_channels, stride, M, groups, split_input, dtype, channels_last = unit
    layer = SKConv(in_channels, out_channels, stride, M=M, groups=groups, split_input=split_input, attn_width=8)
    layer = randomize_batchnorm(layer).to(DEVICE).eval()
    x = torch.randn(2, in_channels, 7, 9, device=DEVICE)
    expected = set_backend(copy.deepcopy(layer), "torch").to("cpu", torch.float64)(x.to("cpu", torch.float64))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.to(dtype).to(memory_format=fmt)
    layer = set_split_conv(layer.to(dtype), "triton")
    with poisoned_allocations(monkeypatch), torch.no_grad():
        out = layer(x)
    assert len(split_calls) == 1, "the split kernel ran"
    assert out.dtype == dtype and out.is_contiguous(memory_format=fmt)
    assert_close(out, expected, dtype, "SKConv output")


def test_skconv_keeps_the_convolutions_where_the_split_kernel_does_not_apply(split_calls):
    layer = randomize_batchnorm(SKConv(16, 16, groups=4, attn_width=8)).to(DEVICE)
    x = torch.randn(2, 16, 5, 5, device=DEVICE)
    with torch.no_grad():
        set_split_conv(layer.eval(), "auto")(x)  # no tuned table here records it faster
        set_split_conv(layer, "cudnn")(x)
        set_split_conv(layer.train(), "triton")(x)  # training mode
    set_split_conv(layer.eval(), "triton")(x)  # the paths' weights want gradients
    assert split_calls == []
    with pytest.raises(ValueError, match="split_conv must be one of"):
        set_split_conv(layer, "cuda")


def test_model_with_forced_split_kernel_matches_its_convolutions(split_calls):
    model = randomize_batchnorm(create_model("sknet_tiny", num_classes=10)).to(DEVICE).eval()
    x = torch.randn(2, 3, 16, 16, device=DEVICE)
    with torch.no_grad():
        expected = set_split_conv(model, "cudnn")(x)
        assert split_calls == []
        out = set_split_conv(model, "triton")(x)
    assert len(split_calls) == 4, "every SK unit ran the split kernel"
    assert_close(out, expected, F32, "logits")


@pytest.fixture
def split_faster_at_5x5(tmp_path, monkeypatch):
    """A tuned table of a made-up sm_99, which every device is taken to be, recording the split kernel faster
    than the convolutions for float32 NCHW, M = 2, C = 16 at 5x5 output positions, and nowhere else."""
    config = dataclasses.asdict(families.FAMILIES["split_fwd"].defaults[2])
    entry = {"family": "split_fwd", "dtype": "fp32", "channels_last": False, "M": 2, "B": 2, "C": 16, "HW": 25,
             "config": {k: v for k, v in config.items() if v is not None}}
    (tmp_path / "sm_99.json").write_text(json.dumps({"arch": "sm_99", "entries": [entry]}))
    monkeypatch.setattr(tuned, "arch_name", lambda device: "sm_99")
    tuned.load_tables(tmp_path)
    planning.clear_plans()
    yield
    tuned.load_tables()
    planning.clear_plans()


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_auto_takes_the_split_kernel_where_the_tuned_table_records_it(split_faster_at_5x5, split_calls, dynamic):
    """"auto" runs the split kernel at the recorded shape only, eagerly and under torch.compile(fullgraph=True),
    whose trace reads the table as constants (no file opened, no graph break), with H and W static or
    symbolic."""
    layer = randomize_batchnorm(SKConv(16, 16, groups=4, attn_width=8)).to(DEVICE).eval()
    recorded, other = torch.randn(2, 16, 5, 5, device=DEVICE), torch.randn(2, 16, 6, 5, device=DEVICE)
    with torch.no_grad():
        expected = [set_split_conv(layer, "cudnn")(x) for x in (recorded, other)]
        eager = [set_split_conv(layer, "auto")(x) for x in (recorded, other)]
        assert [tuple(shape) for shape in split_calls] == [(2, 16, 5, 5)], "the split kernel ran at 5x5 only"

        torch._dynamo.reset()
        graphs = []

        def record(gm, example_inputs):
            graphs.append(gm)
            return gm.forward

        compiled = torch.compile(layer, fullgraph=True, dynamic=dynamic, backend=record)
        outs = [compiled(x) for x in (other, recorded, other)]
    torch._dynamo.reset()
    split_in_graph = [any("sk_split" in str(n.target) for n in gm.graph.nodes) for gm in graphs]
    assert split_in_graph == [False, True], "one graph per decision, the split kernel in the 5x5 one"
    for out, want, label in zip(eager + outs, expected + [expected[1], expected[0], expected[1]], range(5)):
        assert_close(out, want, F32, f"output {label}")
