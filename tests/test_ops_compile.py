"""The custom ops under torch.compile(fullgraph=True), and torch.library.opcheck of every op."""
import pytest
import torch

from sknet_triton import ops
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
    return cases


@pytest.mark.parametrize("case", list(opcheck_cases()))
def test_opcheck(case):
    op_name, args = opcheck_cases()[case]
    torch.library.opcheck(getattr(torch.ops.sknet_triton, op_name).default, args)
