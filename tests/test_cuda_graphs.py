"""torch.compile(mode="reduce-overhead"), i.e. CUDA graphs, on every registered model: inference and a
training step replay the captured graphs (none skipped) and compute what the eager model computes.

CUDA only: without a GPU these tests are skipped (they are not run through Triton's interpreter).
"""
import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import sknet_triton
from sknet_triton import ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")

# Small problems: these tests are about capture and replay, not speed (compilation dominates their time).
BATCH, IMAGE, CLASSES = 4, 64, 10
# Relative L2 error against the eager model: the same float32 kernels, Inductor's fusions round differently.
TOLERANCE = 1e-3
GRAD_TOLERANCE = 1e-2


def relative_error(actual, expected) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def channels_last_images(seed: int):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    images = torch.randn(BATCH, 3, IMAGE, IMAGE, device="cuda", generator=generator)
    return images.contiguous(memory_format=torch.channels_last)


def fresh_model(name: str):
    torch.manual_seed(0)
    model = sknet_triton.create_model(name, num_classes=CLASSES)
    return model.cuda().to(memory_format=torch.channels_last)


@pytest.fixture(autouse=True)
def fresh_compiler_state():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def cudagraph_skips() -> int:
    return counters["inductor"]["cudagraph_skips"]


@pytest.mark.parametrize("name", sknet_triton.list_models())
def test_inference_replays_cuda_graphs(name):
    assert ops.kernel_path(torch.device("cuda")) == "triton"
    model = fresh_model(name).eval()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        for seed in range(3):  # a warm-up run, the recording, then replays
            images = channels_last_images(seed)
            out = compiled(images).clone()
            assert relative_error(out, model(images)) < TOLERANCE, f"call {seed}"
    assert cudagraph_skips() == 0, "Inductor skipped CUDA graphs (run with TORCH_LOGS=perf_hints for why)"


@pytest.mark.parametrize("name", sknet_triton.list_models())
def test_training_step_replays_cuda_graphs(name):
    model, reference = fresh_model(name).train(), fresh_model(name).train()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.01, momentum=0.9)
    targets = torch.arange(BATCH, device="cuda") % CLASSES
    for step in range(3):  # a warm-up run, the recording, then a replay
        images = channels_last_images(step)
        torch.compiler.cudagraph_mark_step_begin()
        loss = F.cross_entropy(compiled(images), targets)
        loss.backward()
        reference_loss = F.cross_entropy(reference(images), targets)
        reference_loss.backward()
        assert relative_error(loss.detach(), reference_loss.detach()) < TOLERANCE, f"step {step}"
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        reference_grads = torch.cat([p.grad.flatten() for p in reference.parameters()])
        assert relative_error(grads, reference_grads) < GRAD_TOLERANCE, f"step {step}"
        for opt in (optimizer, reference_optimizer):
            opt.step()
            opt.zero_grad(set_to_none=True)
    assert cudagraph_skips() == 0, "Inductor skipped CUDA graphs (run with TORCH_LOGS=perf_hints for why)"
