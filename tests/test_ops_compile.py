"""The custom ops under torch.compile(fullgraph=True), and torch.library.opcheck of every op."""
import pytest
import torch

from sknet_triton import ops
from sknet_triton.ops import launch
from tests.helpers import DEVICE, requires_kernels
from tests.ops_inputs import assert_close, make_branches, make_logits, make_prologue

pytestmark = requires_kernels

# Inductor on the CPU generates and builds C++, too slow for CI; aot_eager still traces the fake
# implementations and the registered autograd.
BACKEND = "inductor" if DEVICE.type == "cuda" else "aot_eager"
SK_OPS = ("sknet_triton.sk_fuse", "sknet_triton.sk_select")


def sk_unit(branches, weight):
    """Fuse, a linear attention, select: the data flow of an SK unit."""
    s = ops.sk_fuse(branches)
    logits = (s @ weight).view(s.shape[0], -1, s.shape[1])
    return ops.sk_select(branches, logits)


class GraphRecorder:
    """A torch.compile backend that records each graph it is given, then hands it to BACKEND."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return torch._dynamo.lookup_backend(BACKEND)(gm, example_inputs)

    def op_names(self):
        return {str(node.target) for gm in self.graphs for node in gm.graph.nodes if node.op == "call_function"}


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_compile_one_graph_forward_and_backward(channels_last):
    torch._dynamo.reset()
    branches = make_branches((2, 8, 5, 6), 2, torch.float32, channels_last, stacked=False)
    weight = torch.randn(8, 16, device=DEVICE, requires_grad=True)
    recorder = GraphRecorder()
    compiled = torch.compile(sk_unit, fullgraph=True, backend=recorder)

    out = compiled(branches, weight)
    grads = torch.autograd.grad(out.square().sum(), branches + [weight])
    expected = sk_unit(branches, weight)
    expected_grads = torch.autograd.grad(expected.square().sum(), branches + [weight])

    assert len(recorder.graphs) == 1
    assert set(SK_OPS) <= recorder.op_names(), "the custom ops should be in the graph"
    assert_close(out, expected, torch.float32, "output")
    for grad, want in zip(grads, expected_grads):
        assert_close(grad, want, torch.float32, "gradient")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_compile_channel_slices_of_one_tensor(channels_last, monkeypatch):
    # ResNeSt's radix branches: a stacked view of one [B, M*C, H, W] tensor, read in place (in channels_last
    # by the SLICED variants) by the traced launches, both directions, in one graph.
    torch._dynamo.reset()
    started = []
    run = launch.start

    def start(family, grid, args, constexprs, options):
        started.append((family.name, args[0].data_ptr(), constexprs["SLICED"]))
        run(family, grid, args, constexprs, options)

    monkeypatch.setattr(launch, "start", start)
    B, M, C, H, W = 2, 2, 8, 5, 6
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(B, M * C, H, W, device=DEVICE).contiguous(memory_format=fmt).requires_grad_()
    weight = torch.randn(C, M * C, device=DEVICE, requires_grad=True)

    def unit(x, weight):
        return sk_unit(x.view(B, M, C, H, W), weight)

    recorder = GraphRecorder()
    compiled = torch.compile(unit, fullgraph=True, backend=recorder)
    out = compiled(x, weight)
    grads = torch.autograd.grad(out.square().sum(), [x, weight])
    compiled_launches = list(started)
    expected = unit(x, weight)
    expected_grads = torch.autograd.grad(expected.square().sum(), [x, weight])

    assert len(recorder.graphs) == 1
    assert set(SK_OPS) <= recorder.op_names(), "the custom ops should be in the graph"
    assert {name for name, _, _ in compiled_launches} == {"fuse_fwd", "select_fwd", "select_bwd"}
    for name, first_branch, sliced in compiled_launches:
        assert first_branch == x.data_ptr() and sliced == channels_last, f"{name} read a copy of the slices"
    assert_close(out, expected, torch.float32, "output")
    for grad, want in zip(grads, expected_grads):
        assert_close(grad, want, torch.float32, "gradient")


def test_compile_dynamic_batch_does_not_recompile():
    torch._dynamo.reset()
    recorder = GraphRecorder()
    compiled = torch.compile(sk_unit, fullgraph=True, dynamic=True, backend=recorder)
    weight = torch.randn(8, 24, device=DEVICE)
    for batch in (2, 3, 5):
        branches = make_branches((batch, 8, 4, 4), 3, torch.float32, True, stacked=False)
        assert_close(compiled(branches, weight), sk_unit(branches, weight), torch.float32, f"batch {batch}")
    assert len(recorder.graphs) == 1


def opcheck_cases():
    """Each op on list and stacked branches (stacked ones channels_last), without and with the prologue."""
    shape, M = (2, 6, 3, 5), 3
    cases = {}
    for stacked in (False, True):
        for prologue in ("none", "affine_relu"):
            name = f"{'stacked' if stacked else 'list'}-{prologue}"
            branches = make_branches(shape, M, torch.float32, channels_last=stacked, stacked=stacked)
            listed = [branches] if stacked else branches
            detached = [b.detach() for b in listed]
            scale, bias, relu = make_prologue(prologue, M, shape[1])
            logits = make_logits(shape[0], M, shape[1])
            grad_out = torch.randn(shape, device=DEVICE)
            grad_s = torch.randn(shape[:2], device=DEVICE)
            cases[f"sk_fuse-{name}"] = ("sk_fuse", (listed, scale, bias, relu))
            cases[f"sk_select-{name}"] = ("sk_select", (listed, logits, scale, bias, relu))
            cases[f"sk_select_backward-{name}"] = (
                "sk_select_backward", (grad_out, detached, logits.detach(), scale, bias, relu)
            )
            cases[f"sk_fuse_relu_backward-{name}"] = ("sk_fuse_relu_backward", (grad_s, detached, scale, bias))
    # Channel slices of one channels_last [B, M*C, H, W] tensor, as a stacked view: the SLICED variants.
    B, C, H, W = shape
    sliced = [torch.randn(B, M * C, H, W, device=DEVICE).contiguous(memory_format=torch.channels_last)
              .view(B, M, C, H, W)]
    scale, bias, relu = make_prologue("affine_relu", M, C)
    logits = make_logits(B, M, C).detach()
    cases["sk_fuse-sliced"] = ("sk_fuse", (sliced, scale, bias, relu))
    cases["sk_select-sliced"] = ("sk_select", (sliced, logits, scale, bias, relu))
    cases["sk_select_backward-sliced"] = (
        "sk_select_backward", (torch.randn(shape, device=DEVICE), sliced, logits, scale, bias, relu)
    )
    cases["sk_fuse_relu_backward-sliced"] = (
        "sk_fuse_relu_backward", (torch.randn(B, C, device=DEVICE), sliced, scale, bias)
    )
    return cases


@pytest.mark.parametrize("case", list(opcheck_cases()))
def test_opcheck(case):
    op_name, args = opcheck_cases()[case]
    torch.library.opcheck(getattr(torch.ops.sknet_triton, op_name).default, args)
