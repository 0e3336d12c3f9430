"""sk_fuse and sk_select through the Triton kernels, against the float64 reference.

Without CUDA the kernels run on the CPU through Triton's interpreter (see conftest.py), so the grids
stay small. Every test poisons fresh allocations with NaN before the kernels run.
"""
import pytest
import torch

from perf.recording import recording
from sknet_triton import layout, ops, planning
from sknet_triton.families import FAMILIES
from sknet_triton.ops import launch
from tests.helpers import DEVICE, requires_kernels
from tests.ops_inputs import (
    PROLOGUES,
    as_float64,
    assert_close,
    make_branches,
    make_logits,
    make_prologue,
    oracle,
    poisoned_allocations,
)

pytestmark = requires_kernels

SHAPES = [
    (2, 24, 9, 11),  # odd sizes
    (1, 3, 1, 1),  # 1x1
    (3, 130, 5, 7),  # channels past one channels_last block
    (2, 16, 17, 19),  # several tiles per chunk
    (1, 1, 4, 4),  # one channel
]


def run_and_check(branches, logits, scale, bias, relu, dtype, monkeypatch):
    """Forward and backward of both ops against the oracle; returns the select output."""
    s_expected, out_expected, leaves64 = oracle(branches, logits, scale, bias, relu)
    inputs = (branches if isinstance(branches, list) else [branches]) + [logits]
    grad_s = torch.randn_like(s_expected, dtype=torch.float32, device=DEVICE)
    grad_out = torch.randn(out_expected.shape, device=DEVICE).to(dtype)

    with poisoned_allocations(monkeypatch):
        s = ops.sk_fuse(branches, scale, bias, relu)
        out = ops.sk_select(branches, logits, scale, bias, relu)
        grads = torch.autograd.grad([s, out], inputs, [grad_s, grad_out])

    assert s.dtype == torch.float32 and out.dtype == dtype
    assert_close(s, s_expected, dtype, "sk_fuse")
    assert_close(out, out_expected, dtype, "sk_select")
    expected_grads = torch.autograd.grad(
        [s_expected, out_expected], leaves64, [as_float64(grad_s), as_float64(grad_out)]
    )
    for i, (grad, expected) in enumerate(zip(grads, expected_grads)):
        assert grad.dtype == inputs[i].dtype
        assert_close(grad, expected, inputs[i].dtype, f"gradient of input {i}")
    return out


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("M", [2, 3, 4])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape, M, channels_last, monkeypatch):
    branches = make_branches(shape, M, torch.float32, channels_last, stacked=False)
    out = run_and_check(branches, make_logits(shape[0], M, shape[1]), None, None, False, torch.float32, monkeypatch)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("M", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision(dtype, M, channels_last, monkeypatch):
    shape = (2, 40, 6, 7)
    branches = make_branches(shape, M, dtype, channels_last, stacked=False)
    logits = make_logits(shape[0], M, shape[1], dtype)
    run_and_check(branches, logits, None, None, False, dtype, monkeypatch)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("M", [2, 3])
@pytest.mark.parametrize("prologue", [p for p in PROLOGUES if p != "none"])
def test_prologue(prologue, M, channels_last, monkeypatch):
    shape = (2, 20, 5, 9)
    scale, bias, relu = make_prologue(prologue, M, shape[1])
    branches = make_branches(shape, M, torch.float32, channels_last, stacked=False)
    run_and_check(branches, make_logits(shape[0], M, shape[1]), scale, bias, relu, torch.float32, monkeypatch)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("M", [2, 3, 4])
@pytest.mark.parametrize("prologue", ["none", "affine_relu"])
def test_stacked_input(prologue, M, channels_last, monkeypatch):
    shape = (2, 12, 7, 5)
    x = make_branches(shape, M, torch.bfloat16, channels_last, stacked=True)
    views, kernel_channels_last, _, _ = layout.kernel_views([x])
    assert kernel_channels_last == channels_last
    assert [v.data_ptr() for v in views] == [u.data_ptr() for u in x.unbind(1)], "stacked input was copied"
    scale, bias, relu = make_prologue(prologue, M, shape[1])
    run_and_check(x, make_logits(shape[0], M, shape[1]), scale, bias, relu, torch.bfloat16, monkeypatch)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_layouts_are_read_in_place(channels_last):
    branches = make_branches((2, 8, 5, 6), 3, torch.float32, channels_last, stacked=False)
    views, kernel_channels_last, stride, line = layout.kernel_views(branches)
    assert kernel_channels_last == channels_last and stride == 8 * 5 * 6 and line == 8
    assert [v.data_ptr() for v in views] == [u.data_ptr() for u in branches]


def one_tensor(B, M, C, H, W, channels_last, spare=0):
    """A [B, (M + spare) * C, H, W] tensor, as one convolution writes M branches (ResNeSt's radix splits),
    with ``spare`` more blocks of C channels after them."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.randn(B, (M + spare) * C, H, W, device=DEVICE).contiguous(memory_format=fmt)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("M", [2, 3, 4])
@pytest.mark.parametrize("form", ["slices", "slices_of_wider", "stacked_view"])
def test_channel_slices_of_one_tensor(form, M, channels_last, monkeypatch):
    # Branch m is channels m*C .. m*C + C - 1. In NCHW each of its images is dense; in channels_last its
    # pixels lie (M + spare)*C apart, which the kernels' SLICED variants read. Every launch of both ops, both
    # directions, reads the slices where they lie, and a stacked view's gradient has the view's strides, so
    # that its backward to the [B, M*C, H, W] tensor is a view too.
    B, C, H, W = 2, 12, 5, 7
    spare = 1 if form == "slices_of_wider" else 0
    x = one_tensor(B, M, C, H, W, channels_last, spare).requires_grad_()
    branches = x.view(B, M, C, H, W) if form == "stacked_view" else list(x.split(C, dim=1))[:M]
    views, kernel_channels_last, stride, line = layout.kernel_views([branches] if form == "stacked_view" else branches)
    assert kernel_channels_last == channels_last and stride == (M + spare) * C * H * W
    assert line == ((M + spare) * C if channels_last else C)
    channel_bytes = x.element_size() * (1 if channels_last else H * W)
    where_they_lie = [x.data_ptr() + m * C * channel_bytes for m in range(M)]
    assert [v.data_ptr() for v in views] == where_they_lie, "the slices were copied"
    scale, bias, relu = make_prologue("affine_relu", M, C)
    logits = make_logits(B, M, C)
    with recording() as launches:
        out = ops.sk_select(branches, logits, scale, bias, relu)
        s = ops.sk_fuse(branches, scale, bias, relu)
        torch.autograd.grad([out.sum(), s.sum()], [x, logits])
    assert {r.family for r in launches} == {"select_fwd", "select_bwd", "fuse_fwd", "fuse_bwd"}
    for r in launches:
        assert [t.data_ptr() for t in r.args[:M]] == where_they_lie, f"{r.family} read copies of the slices"
        assert r.constexprs["SLICED"] == channels_last
    run_and_check(branches, make_logits(B, M, C), scale, bias, relu, torch.float32, monkeypatch)
    if form == "stacked_view":
        view_grads = []
        branches.register_hook(view_grads.append)
        [grad_x] = torch.autograd.grad(ops.sk_select(branches, logits, scale, bias, relu).sum(), [x])
        assert view_grads[0].stride() == branches.stride()
        assert grad_x.data_ptr() == view_grads[0].data_ptr(), "the view's backward copied its gradient"


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("M", [2, 3, 4])
def test_logits_are_read_through_their_strides(M, channels_last, monkeypatch):
    # A [B, M, C] view of [B, C, M] logits (channels of one branch M apart), and a slice of wider logits.
    B, C = 2, 12
    branches = make_branches((B, C, 5, 6), M, torch.float32, channels_last, stacked=False)
    transposed = (2 * torch.randn(B, C, M, device=DEVICE)).transpose(1, 2).requires_grad_()
    sliced = (2 * torch.randn(B, M + 1, 2 * C, device=DEVICE))[:, 1:, ::2].requires_grad_()
    for logits in (transposed, sliced):
        assert not logits.is_contiguous()
        with recording() as launches:
            ops.sk_select(branches, logits)
        assert launches[0].args[ops.MAX_BRANCHES + 2].data_ptr() == logits.data_ptr(), "the logits were copied"
        run_and_check(branches, logits, None, None, False, torch.float32, monkeypatch)


def strided_cases():
    base = torch.randn(2, 10, 6, 16, device=DEVICE)
    sliced = base[:, :, :, ::2]  # not dense: copied
    transposed = torch.randn(2, 10, 8, 6, device=DEVICE).transpose(2, 3)  # H and W swapped: copied
    channels_last = torch.randn(2, 10, 6, 8, device=DEVICE).to(memory_format=torch.channels_last)
    contiguous = torch.randn(2, 10, 6, 8, device=DEVICE)
    batch_sliced = torch.randn(4, 10, 6, 8, device=DEVICE)[::2]  # dense images, batch stride 2*C*H*W
    return {
        "sliced": [sliced, contiguous],
        "transposed": [transposed, contiguous],
        "mixed_layouts": [channels_last, contiguous],
        "batch_strides_differ": [batch_sliced, contiguous],
        "batch_sliced": [batch_sliced, torch.randn(4, 10, 6, 8, device=DEVICE)[1::2]],
    }


@pytest.mark.parametrize("case", list(strided_cases()))
def test_other_strides(case, monkeypatch):
    branches = [u.detach().requires_grad_() for u in strided_cases()[case]]
    out = run_and_check(branches, make_logits(2, 2, 10), None, None, False, torch.float32, monkeypatch)
    if case == "batch_sliced":
        views, _, stride, _ = layout.kernel_views(branches)
        assert stride == 2 * 10 * 6 * 8 and views[0].data_ptr() == branches[0].data_ptr(), "read in place"
    elif case != "batch_strides_differ":
        assert out.is_contiguous(), "copied inputs give a contiguous output"


@pytest.mark.parametrize("prologue", ["none", "affine_relu"])
def test_many_splits(prologue, min_programs, monkeypatch):
    min_programs(64)
    # Every chunk adds its share of s and of dlogits atomically: the shares must add up.
    shape = (1, 8, 24, 24)
    p = planning.plan(FAMILIES["select_bwd"], 1, 8, 24 * 24, 2, torch.float32, True, DEVICE)
    assert p.num_splits > 4
    scale, bias, relu = make_prologue(prologue, 2, shape[1])
    branches = make_branches(shape, 2, torch.float32, True, stacked=False)
    run_and_check(branches, make_logits(1, 2, 8), scale, bias, relu, torch.float32, monkeypatch)


def test_deterministic_algorithms_give_one_chunk_and_repeatable_results(min_programs):
    min_programs(64)
    shape = (1, 8, 24, 24)
    assert planning.plan(FAMILIES["fuse_fwd"], 1, 8, 24 * 24, 2, torch.float32, True, DEVICE, deterministic=True).num_splits == 1
    branches = make_branches(shape, 2, torch.float32, True, stacked=False)
    logits = make_logits(1, 2, 8)
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            s = ops.sk_fuse(branches)
            out = ops.sk_select(branches, logits)
            runs.append([s, *torch.autograd.grad([s, out], branches + [logits], [torch.ones_like(s), out.detach()])])
    finally:
        torch.use_deterministic_algorithms(False)
    s_expected, _, _ = oracle(branches, logits, None, None, False)
    assert_close(runs[0][0], s_expected, torch.float32, "sk_fuse")
    for first, second in zip(*runs):
        assert torch.equal(first, second)


@pytest.mark.parametrize("stacked", [False, True], ids=["list", "stacked"])
@pytest.mark.parametrize("relu", [False, True])
def test_empty_batch(stacked, relu):
    branches = make_branches((0, 6, 3, 4), 2, torch.float32, False, stacked)
    logits = make_logits(0, 2, 6)
    s = ops.sk_fuse(branches, relu=relu)
    out = ops.sk_select(branches, logits, relu=relu)
    assert s.shape == (0, 6) and out.shape == (0, 6, 3, 4)
    inputs = branches if isinstance(branches, list) else [branches]
    grads = torch.autograd.grad(s.sum() + out.sum(), inputs + [logits])
    assert [g.shape for g in grads] == [t.shape for t in inputs + [logits]]


def test_autocast_leaves_dtypes_alone(monkeypatch):
    # The ops compute in float32 whatever the autocast state; float32 branches stay float32.
    branches = make_branches((2, 8, 4, 4), 2, torch.float32, True, stacked=False)
    logits = make_logits(2, 2, 8, torch.bfloat16)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out = run_and_check(branches, logits, None, None, False, torch.float32, monkeypatch)
    assert out.dtype == torch.float32


def test_offsets_past_2_31_elements():
    # Two images 2**31 elements apart in one allocation: the second is only reachable with 64-bit
    # offsets. Untouched pages of the allocation are never materialised.
    C, H, W = 4, 3, 5
    image = C * H * W
    storage = torch.empty(2**31 + 2 * image, dtype=torch.float16, device=DEVICE)
    branches = [storage.as_strided((2, C, H, W), (2**31, H * W, W, 1), storage_offset=m * image) for m in range(2)]
    for u in branches:
        u.copy_(torch.randn(u.shape, device=DEVICE))
    logits = torch.randn(2, 2, C, device=DEVICE)
    s_expected, out_expected, _ = oracle([u.detach() for u in branches], logits.detach(), None, None, False)
    assert_close(ops.sk_fuse(branches), s_expected, torch.float16, "sk_fuse")
    assert_close(ops.sk_select(branches, logits), out_expected, torch.float16, "sk_select")


def test_backward_keeps_only_what_it_needs():
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    branches = make_branches((2, 8, 4, 4), 2, torch.float32, False, stacked=False)
    logits = make_logits(2, 2, 8)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ops.sk_fuse(branches)
        assert saved == [], "sk_fuse without ReLU needs no tensor for its backward"
        ops.sk_select(branches, logits)
    assert sorted(saved) == sorted([(2, 8, 4, 4)] * 2 + [(2, 2, 8)]), f"sk_select saved {saved}"


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_eager_calls_skip_the_operator_and_match_it(grad, monkeypatch):
    # Eager calls on plain tensors launch directly (under an autograd.Function where autograd records them);
    # traced calls go through the registered operator. Both run the same launchers and agree.
    branches = [b.requires_grad_(grad) for b in make_branches((2, 12, 5, 6), 2, torch.float32, True, stacked=False)]
    scale, bias, relu = make_prologue("affine_relu", 2, 12)
    logits = make_logits(2, 2, 12).requires_grad_(grad)
    s_expected, out_expected, _ = oracle(branches, logits, scale, bias, relu)

    def run():
        with poisoned_allocations(monkeypatch):
            s, out = ops.sk_fuse(branches, scale, bias, relu), ops.sk_select(branches, logits, scale, bias, relu)
        assert_close(s, s_expected, torch.float32, "sk_fuse")
        assert_close(out, out_expected, torch.float32, "sk_select")
        assert out.is_contiguous(memory_format=torch.channels_last)
        if not grad:
            return [s.grad_fn, out.grad_fn], []
        loss = s.sum() + out.square().sum()
        return [s.grad_fn.name(), out.grad_fn.name()], torch.autograd.grad(loss, branches + [logits])

    eager, eager_grads = run()
    monkeypatch.setattr(launch, "runs_eagerly", lambda t: False)
    through_operator, operator_grads = run()
    if grad:
        assert all("_Eager" in name for name in eager) and all("sknet_triton" in name for name in through_operator)
    else:
        assert eager == through_operator == [None, None]
    for eager_grad, operator_grad in zip(eager_grads, operator_grads, strict=True):
        torch.testing.assert_close(eager_grad, operator_grad, rtol=1e-5, atol=1e-6)
