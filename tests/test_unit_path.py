"""SKConv's one path decision (sknet_triton.layers.SKConv.unit_path): which path each mode takes, every path on an
empty batch, and torch.jit.trace on the reference path and on the kernels'.

In this process the kernels run (CUDA, or Triton's interpreter on the CPU); the reference path of the
"auto" backend is reached by switching the device rule's interpreter flag off, or in a subprocess without
TRITON_INTERPRET.
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
from torch import nn

from sknet_triton import SKConv, device, set_backend, set_split_conv
from sknet_triton.layers import UnitPath
from tests.helpers import DEVICE, requires_kernels
from tests.model_helpers import randomize_batchnorm

pytestmark = requires_kernels

C_IN, C, H, W = 8, 8, 5, 6


def make_unit(norm_layer=nn.BatchNorm2d, stride=1):
    """A small SKConv (M = 2, the paper's 3x3 paths) on DEVICE with random BatchNorm state."""
    return randomize_batchnorm(SKConv(C_IN, C, stride, M=2, groups=2, L=8, norm_layer=norm_layer)).to(DEVICE)


def test_each_mode_takes_its_path():
    unit = make_unit()
    x = torch.randn(2, C_IN, H, W, device=DEVICE)
    assert unit.train().unit_path(x) is UnitPath.BATCH_STATISTICS
    assert unit.eval().unit_path(x) is UnitPath.OPS  # BatchNorm's parameters want gradients: not folded
    with torch.no_grad():
        assert set_split_conv(unit, "triton").unit_path(x) is UnitPath.SPLIT_KERNEL
        assert unit.split_kernel_applies(x)
        assert set_split_conv(unit, "cudnn").unit_path(x) is UnitPath.FOLDED_BATCHNORM
        assert not unit.split_kernel_applies(x)
        assert set_split_conv(unit, "auto").unit_path(x) is UnitPath.FOLDED_BATCHNORM  # no tuned table here
        assert set_backend(copy.deepcopy(unit), "torch").unit_path(x) is UnitPath.PLAIN_TORCH
        # Not the split kernel's geometry: the layer asks the op's own check.
        unit.paths[1].conv.dilation = (1, 1)
        assert set_split_conv(unit, "triton").unit_path(x) is UnitPath.FOLDED_BATCHNORM
    other = make_unit(norm_layer=type("OtherBatchNorm", (nn.BatchNorm2d,), {})).train()
    assert other.unit_path(x) is UnitPath.OPS


def test_off_the_kernels_device_a_unit_runs_plain_torch(monkeypatch):
    # The operations of timm's module, nothing more: no folded BatchNorm applied twice, in either mode.
    monkeypatch.setattr(device, "KERNEL_DEVICE_TYPES", ("cuda",))  # the rule without the interpreter
    unit = make_unit().cpu()
    x = torch.randn(2, C_IN, H, W)
    plain = set_backend(copy.deepcopy(unit), "torch")
    for mode in (True, False):
        unit.train(mode), plain.train(mode)
        with torch.no_grad():
            assert set_split_conv(unit, "triton").unit_path(x) is UnitPath.PLAIN_TORCH
            assert torch.equal(unit(x), plain(x))


def test_an_interpreter_that_cannot_run_the_kernels_is_named():
    """Triton's interpreter before 3.7 fails every kernel under NumPy 2.4: importing sknet_triton with
    TRITON_INTERPRET=1 there says so and how to fix it, rather than each kernel failing on its own."""
    problem = device.interpreter_problem("3.6.0", "2.4.1")
    assert problem is not None and "'numpy<2.4'" in problem and "'triton>=3.7'" in problem
    assert device.interpreter_problem("3.6.0", "2.3.5") is None
    assert device.interpreter_problem("3.7.0", "2.4.1") is None
    assert device.interpreter_problem("3.10.0", "2.10.0") is None


# (mode, backend, split_conv, grad, reference device) -> the path an empty batch takes.
EMPTY_BATCH_CASES = {
    "train-kernels": (("train", "auto", "auto", True, False), UnitPath.BATCH_STATISTICS),
    "eval-split-kernel": (("eval", "auto", "triton", False, False), UnitPath.SPLIT_KERNEL),
    "eval-folded": (("eval", "auto", "cudnn", False, False), UnitPath.FOLDED_BATCHNORM),
    "eval-ops-with-grad": (("eval", "auto", "auto", True, False), UnitPath.OPS),
    "train-torch": (("train", "torch", "auto", True, False), UnitPath.PLAIN_TORCH),
    "eval-torch": (("eval", "torch", "auto", False, False), UnitPath.PLAIN_TORCH),
    "train-reference": (("train", "auto", "auto", True, True), UnitPath.PLAIN_TORCH),
    "eval-reference": (("eval", "auto", "auto", False, True), UnitPath.PLAIN_TORCH),
}


@pytest.mark.parametrize("case", list(EMPTY_BATCH_CASES))
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_empty_batch_on_every_path(case, momentum, monkeypatch):
    (mode, backend, split_conv, grad, reference_device), path = EMPTY_BATCH_CASES[case]
    if reference_device:
        monkeypatch.setattr(device, "KERNEL_DEVICE_TYPES", ("cuda",))
    where = torch.device("cpu") if reference_device else DEVICE
    unit = make_unit(norm_layer=functools.partial(nn.BatchNorm2d, momentum=momentum), stride=2).to(where)
    unit = set_split_conv(set_backend(unit.train(mode == "train"), backend), split_conv)
    plain = set_backend(copy.deepcopy(unit), "torch")  # nn.BatchNorm2d's own handling of an empty batch
    x = torch.randn(0, C_IN, H, W, device=where).contiguous(memory_format=torch.channels_last).requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        assert unit.unit_path(x) is path
        out, expected = unit(x), plain(x)
    assert out.shape == expected.shape == (0, C, (H - 1) // 2 + 1, (W - 1) // 2 + 1)
    assert out.dtype == x.dtype and out.device == x.device
    if grad:
        out.sum().backward()
        expected.sum().backward()
        assert x.grad.shape == x.shape
        expected_grads = dict(plain.named_parameters())
        for name, p in unit.named_parameters():
            want = expected_grads[name].grad
            assert (p.grad is None) == (want is None), name
            if want is not None:
                assert torch.equal(p.grad, want) and not p.grad.any(), f"{name}: no images, no gradient"
    buffers = dict(plain.named_buffers())
    for name, value in unit.named_buffers():
        assert torch.equal(value, buffers[name]), f"{name}: as nn.BatchNorm2d keeps it on an empty batch"
    assert int(unit.paths[0].bn.num_batches_tracked) == (mode == "train")


@pytest.mark.filterwarnings("ignore:`torch.jit.trace.*` is deprecated")
def test_jit_trace_refuses_every_kernel_path():
    message = r'sknet_triton\.set_backend\(model, "torch"\)'
    x = torch.randn(2, C_IN, H, W, device=DEVICE)
    with pytest.raises(RuntimeError, match=message):
        torch.jit.trace(make_unit().train(), x)  # BatchNorm inside the kernels
    with torch.no_grad(), pytest.raises(RuntimeError, match=message):
        torch.jit.trace(set_split_conv(make_unit().eval(), "triton"), x)  # the split kernel
    with torch.no_grad(), pytest.raises(RuntimeError, match=message):
        torch.jit.trace(set_split_conv(make_unit().eval(), "cudnn"), x)  # the fused ops, BatchNorm folded


TRACE_SCRIPT = textwrap.dedent('''
    import json, warnings, torch
    import sknet_triton
    from sknet_triton.ops import kernel_path
    from tests.model_helpers import randomize_batchnorm

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model = randomize_batchnorm(sknet_triton.create_model("sknet_tiny", num_classes=10))
    x, other = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    errors = {}
    for mode in ("eval", "train"):
        model.train(mode == "train")
        traced = torch.jit.trace(model, x)  # grad mode on: the trace's check reruns it without grad
        plain = sknet_triton.set_backend(__import__("copy").deepcopy(model), "torch")
        with torch.no_grad():
            errors[mode] = (traced(other) - plain(other)).abs().max().item() / plain(other).abs().max().item()
    print(json.dumps({"path": kernel_path(torch.device("cpu")), "errors": errors}))
''')


def test_jit_trace_on_the_reference_path():
    # Without TRITON_INTERPRET the CPU runs the reference: an "auto" model traces there as it is, in either
    # mode, whatever the grad mode.
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", TRACE_SCRIPT], env=env, capture_output=True, text=True, timeout=600,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0, result.stderr[-4000:]
    traced = json.loads(result.stdout.strip().splitlines()[-1])
    assert traced["path"] == "reference"
    assert all(error < 1e-5 for error in traced["errors"].values()), traced
