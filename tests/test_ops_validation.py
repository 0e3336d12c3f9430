"""Bad input gets a TypeError or ValueError naming the problem, before any kernel starts; and the
plain-PyTorch path that CPU tensors take without the interpreter."""
import re
import warnings

import pytest
import torch

from sknet_triton import device, families, ops, reference
from sknet_triton.ops import launch


def good(B=2, M=2, C=6, H=3, W=4, dtype=torch.float32):
    branches = [torch.randn(B, C, H, W, dtype=dtype) for _ in range(M)]
    return branches, torch.randn(B, M, C)


def cases():
    branches, logits = good()
    u = branches[0]
    values, mean, var = reference.batch_norm_relu(branches)
    state = ops.BatchNormBranches(branches, mean, var, None, None, values)  # as sk_fuse_bn's reference path gives it
    return {
        "not_a_sequence": (lambda: ops.sk_fuse("branches"), TypeError, "list or tuple"),
        "not_a_tensor": (lambda: ops.sk_fuse([u, 3.0]), TypeError, "branch 1 must be a Tensor"),
        "one_branch": (lambda: ops.sk_fuse([u]), ValueError, "2 to 4 branches, got 1"),
        "five_branches": (lambda: ops.sk_fuse([u] * 5), ValueError, "2 to 4 branches, got 5"),
        "stacked_not_5d": (lambda: ops.sk_fuse(u), ValueError, "5-D"),
        "stacked_one_branch": (lambda: ops.sk_fuse(u[:, None]), ValueError, "got 1"),
        "not_4d": (lambda: ops.sk_fuse([u[0], u[0]]), ValueError, "4-D"),
        "shapes_differ": (lambda: ops.sk_fuse([u, u[:, :3]]), ValueError, "differ in shape"),
        "dtypes_differ": (lambda: ops.sk_fuse([u, u.half()]), TypeError, "differ in dtype"),
        "integer": (lambda: ops.sk_fuse([u.int(), u.int()]), TypeError, "float32, float16 or bfloat16"),
        "float64": (lambda: ops.sk_fuse([u.double(), u.double()]), TypeError, "float32, float16 or bfloat16"),
        "empty_channels": (lambda: ops.sk_fuse([u[:, :0], u[:, :0]]), ValueError, "C, H, W >= 1"),
        "image_too_large": (
            lambda: ops.sk_fuse([u.new_empty(1).expand(1, 2**16, 2**8, 2**7)] * 2), ValueError, "fewer than 2**31"
        ),
        "devices_differ": (lambda: ops.sk_fuse([u, u.to("meta")]), ValueError, "different devices"),
        "logits_shape": (lambda: ops.sk_select(branches, logits[:, :, :5]), ValueError, "logits must be [B, M, C]"),
        "logits_2d": (lambda: ops.sk_select(branches, logits.flatten(1)), ValueError, "logits must be [B, M, C]"),
        "logits_none": (lambda: ops.sk_select(branches, None), TypeError, "logits must be a Tensor [B, M, C], got NoneType"),
        "no_branches": (lambda: ops.sk_fuse([]), ValueError, "2 to 4 branches, got 0"),
        "logits_not_tensor": (lambda: ops.sk_select(branches, [1.0]), TypeError, "logits must be a Tensor"),
        "logits_integer": (lambda: ops.sk_select(branches, logits.long()), TypeError, "logits must be float32"),
        "logits_device": (lambda: ops.sk_select(branches, logits.to("meta")), ValueError, "logits are on meta"),
        "scale_shape": (lambda: ops.sk_fuse(branches, scale=torch.ones(6)), ValueError, "scale must be [M, C]"),
        "bias_shape": (lambda: ops.sk_fuse(branches, bias=torch.ones(3, 6)), ValueError, "bias must be [M, C]"),
        "scale_integer": (lambda: ops.sk_fuse(branches, scale=torch.ones(2, 6, dtype=torch.int64)), TypeError, "scale"),
        "bias_device": (lambda: ops.sk_fuse(branches, bias=torch.ones(2, 6, device="meta")), ValueError, "bias is on meta"),
        "scale_requires_grad": (
            lambda: ops.sk_select(branches, logits, scale=torch.ones(2, 6, requires_grad=True)),
            ValueError,
            "scale requires grad",
        ),
        "relu_not_bool": (lambda: ops.sk_fuse(branches, relu=1), TypeError, "relu must be a bool"),
        "bn_weight_shape": (lambda: ops.sk_fuse_bn(branches, torch.ones(6)), ValueError, "weight must be [M, C]"),
        "bn_eps_int": (lambda: ops.sk_fuse_bn(branches, eps=0), TypeError, "eps must be a float"),
        "bn_one_value": (
            lambda: ops.sk_fuse_bn([u[:1, :, :1, :1]] * 2), ValueError, "Expected more than 1 value per channel"
        ),
        "bn_state_not_state": (lambda: ops.sk_select_bn(branches, logits), TypeError, "what sk_fuse_bn returned"),
        "bn_logits_shape": (lambda: ops.sk_select_bn(state, logits[:, :, :5]), ValueError, "logits must be [B, M, C]"),
    }


@pytest.fixture
def no_kernel_launches(monkeypatch):
    """Any kernel launch fails the test: validation must come first."""

    def launched(*args, **kwargs):
        raise AssertionError("a kernel was launched before the input was rejected")

    monkeypatch.setattr(launch, "start", launched)  # every launch goes through it


@pytest.mark.parametrize("case", list(cases()))
def test_bad_input(case, no_kernel_launches):
    call, error, message = cases()[case]
    with pytest.raises(error, match=re.escape(message)):
        call()


def test_scale_without_grad_mode_is_accepted():
    branches, logits = good()
    scale = torch.ones(2, 6, requires_grad=True)
    with torch.no_grad():
        out = ops.sk_select(branches, logits, scale=scale)
    torch.testing.assert_close(out, reference.sk_select(branches, logits, scale.detach()))


def test_one_device_rule():
    # The interpreter is what the kernels were defined as; every view of the rule agrees with it.
    from sknet_triton.kernels import split

    assert device.INTERPRETED is bool(split.INTERPRETED.value) and launch.INTERPRETED is device.INTERPRETED
    assert ops.uses_triton is device.uses_triton and ops.kernel_path is device.kernel_path
    assert ops.fuse.KERNEL_DEVICE_TYPES is ops.select.KERNEL_DEVICE_TYPES is device.KERNEL_DEVICE_TYPES
    for kind in ("cpu", "cuda", "meta"):
        assert (kind in device.KERNEL_DEVICE_TYPES) == device.uses_triton(torch.device(kind))
    assert device.uses_triton(torch.device("cuda")) and not device.uses_triton(torch.device("meta"))
    assert device.uses_triton(torch.device("cpu")) == device.INTERPRETED


def test_cpu_tensors_without_interpreter_use_the_reference(monkeypatch, no_kernel_launches):
    monkeypatch.setattr(device, "KERNEL_DEVICE_TYPES", ("cuda",))  # the rule without the interpreter
    assert ops.kernel_path(torch.device("cpu")) == "reference"
    branches = [torch.randn(2, 6, 3, 3, requires_grad=True) for _ in range(3)]
    logits = torch.randn(2, 3, 6, requires_grad=True)
    scale, bias = torch.rand(3, 6) + 0.5, torch.randn(3, 6)
    s = ops.sk_fuse(branches, scale, bias, relu=True)
    out = ops.sk_select(branches, logits, scale, bias, relu=True)
    # The same math written out here, independently of sknet_triton.reference.
    values = torch.stack(branches, 1).mul(scale[None, :, :, None, None]).add(bias[None, :, :, None, None]).clamp(min=0)
    torch.testing.assert_close(s, values.sum(1).mean((2, 3)))
    torch.testing.assert_close(out, torch.einsum("bmc,bmchw->bchw", logits.softmax(1), values))
    (s.sum() + out.sum()).backward()
    assert all(b.grad is not None and b.grad.abs().sum() > 0 for b in branches) and logits.grad is not None


def test_cuda_without_the_triton_package_falls_back_and_says_so_once(monkeypatch):
    monkeypatch.setattr(device, "KERNEL_DEVICE_TYPES", ())  # the rule without the triton package
    monkeypatch.setattr(device, "_warned_no_triton", False)
    cuda = torch.device("cuda")
    with pytest.warns(RuntimeWarning, match="triton package is not installed"):
        assert not device.uses_triton(cuda)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not device.uses_triton(cuda)
    assert ops.kernel_path(cuda) == "reference"


def test_the_kernels_take_as_many_branches_as_the_ops_allow():
    from sknet_triton.kernels import tile

    assert len(tile.BRANCH_ARGS) == ops.MAX_BRANCHES
    for name, family in families.FAMILIES.items():
        if name != "split_fwd":  # it reads one image, not branches
            pointers = [arg for arg in family.kernel.arg_names if re.fullmatch(r"u\d_ptr", arg)]
            assert len(pointers) == ops.MAX_BRANCHES, name


def test_split_geometry_problem_names_what_is_not_the_split_kernels():
    paper = dict(kernel_sizes=[(3, 3)] * 3, strides=[(2, 2)] * 3, dilations=[(1, 1), (2, 2), (3, 3)],
                 paddings=[(1, 1), (2, 2), (3, 3)])
    assert ops.split_geometry_problem(**paper) is None
    assert ops.split_geometry_problem([(3, 3)] * 2, [1, 1]) is None  # sk_split's own dilations and paddings
    problems = {
        "needs 2 to 4 branches, got 1": dict(paper, kernel_sizes=[(3, 3)]),
        "needs 2 to 4 branches, got 5": dict(paper, kernel_sizes=[(3, 3)] * 5),
        "weight must be 3x3 per branch, got 5x5 in branch 1": dict(paper, kernel_sizes=[(3, 3), (5, 5), (3, 3)]),
        "branch 2 must have dilation 3, got (2, 2)": dict(paper, dilations=[(1, 1), (2, 2), (2, 2)]),
        "branch 0 must have padding 1, got (0, 0)": dict(paper, paddings=[(0, 0), (2, 2), (3, 3)]),
        "stride must be 1 or 2, got (3, 3)": dict(paper, strides=[(3, 3)] * 3),
        "stride must be 1 or 2, got (1, 2)": dict(paper, strides=[(1, 2)] * 3),
        "stride must be 1 or 2, got True": dict(paper, strides=[True] * 3),
        "the branches' strides differ: [(1, 1), (2, 2), (2, 2)]": dict(paper, strides=[(1, 1), (2, 2), (2, 2)]),
    }
    for problem, geometry in problems.items():
        assert ops.split_geometry_problem(**geometry) == problem
