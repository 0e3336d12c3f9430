"""The launcher's tables: every launch the ops make is a specialization the ahead-of-time check compiles,
and a tuned table steers the launches of its architecture."""
import itertools
import json

import pytest
import torch

from perf.aot import signature
from sknet_triton import launch
from tests.helpers import DEVICE, requires_kernels
from tests.ops_inputs import make_branches, make_logits, make_prologue

pytestmark = requires_kernels

SHAPES = [(2, 24, 9, 11), (1, 130, 5, 7), (3, 16, 32, 32), (1, 1, 1, 1)]


def recorded_launches(shape, M, dtype, channels_last, prologue, stacked):
    """What the op launchers launch for one problem (recorded, not run); the split with input and output
    of the branches' shape, with every group width (the FMA loop and each tensor-core block) and stride."""
    branches = make_branches(shape, M, dtype, channels_last, stacked)
    branches = [branches] if stacked else branches
    logits = make_logits(shape[0], M, shape[1], dtype)
    scale, bias, relu = make_prologue(prologue, M, shape[1])
    grad_out = torch.randn(shape, device=DEVICE).to(dtype)
    with launch.recording() as launches:
        launch.fuse_forward(branches, scale, bias, relu)
        launch.fuse_relu_backward(torch.randn(shape[:2], device=DEVICE), branches, scale, bias)
        launch.select_forward(branches, logits, scale, bias, relu)
        launch.select_backward(grad_out, branches, logits, scale, bias, relu)
        s, stats = launch.batch_norm_train_forward(branches, scale, bias, 1e-5)
        launch.select_forward(branches, logits, stats[launch.BN_SCALE], stats[launch.BN_SHIFT], True)
        _, handoff = launch.select_bn_backward(grad_out, branches, logits, stats)
        launch.fuse_bn_backward(s, grad_out, branches, stats, handoff)
        C = shape[1]
        x = torch.randn(shape, device=DEVICE).to(dtype)
        x = x.to(memory_format=torch.channels_last) if channels_last else x
        folded = torch.rand(M, C, device=DEVICE)
        for group_in, stride in itertools.product(sorted({g for g in (1, 4, 8, 16, C) if C % g == 0}), (1, 2)):
            weight = torch.randn(M, C, group_in, 3, 3, device=DEVICE).to(dtype)
            launch.split_forward(x, weight, folded, folded, stride, False)
    return launches


def key(family, args, constexprs, options):
    types, _ = signature(launch.Specialization(family, args, constexprs, options))
    return family, tuple(sorted(types.items())), tuple(sorted(constexprs.items())), tuple(sorted(options.items()))


@pytest.fixture(scope="module")
def compiled_keys():
    return {key(s.family, s.args, s.constexprs, s.options) for s in launch.specializations()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_launch_is_a_compiled_specialization(dtype, compiled_keys):
    checked = 0
    for shape, M, channels_last, prologue, stacked in itertools.product(
        SHAPES, (2, 3, 4), (False, True), ("none", "affine_relu", "relu"), (False, True)
    ):
        for recorded in recorded_launches(shape, M, dtype, channels_last, prologue, stacked):
            assert key(recorded.family, recorded.args, recorded.constexprs, recorded.options) in compiled_keys, recorded
            checked += 1
    assert checked > 500


def write_table(path, entries):
    path.write_text(json.dumps({"arch": path.stem, "entries": entries}))


def entry(family, C, HW, config, dtype="fp32", channels_last=True, M=2, B=8):
    return {"family": family, "dtype": dtype, "channels_last": channels_last, "M": M, "B": B, "C": C, "HW": HW,
            "config": config}


@pytest.fixture
def tuned_sm_99(tmp_path, monkeypatch):
    """A tuned table for a made-up architecture sm_99, which every device is taken to be."""
    small = dict(tile_bytes=2048, num_warps=2, num_stages=2, programs_per_sm=2)
    large = dict(tile_bytes=16384, num_warps=4, num_stages=4, programs_per_sm=8)
    write_table(tmp_path / "sm_99.json", [entry("select_fwd", 16, 64, small), entry("select_fwd", 512, 3136, large)])
    monkeypatch.setattr(launch, "TUNED_DIR", tmp_path)
    monkeypatch.setattr(launch, "arch_name", lambda device: "sm_99")
    for cached in (launch.tuned_table, launch.plan):
        cached.cache_clear()
    yield launch.Config(**small), launch.Config(**large)
    for cached in (launch.tuned_table, launch.plan):
        cached.cache_clear()


def test_a_tuned_table_picks_the_nearest_problem_of_the_same_kind(tuned_sm_99):
    small, large = tuned_sm_99
    table = launch.tuned_table("sm_99")
    assert launch.choose_config(table, "select_fwd", torch.float32, True, 2, 8, 24, 100) == small
    assert launch.choose_config(table, "select_fwd", torch.float32, True, 2, 64, 256, 784) == large
    # Another family, dtype, layout or M: the defaults.
    assert launch.choose_config(table, "fuse_fwd", torch.float32, True, 2, 8, 16, 64) == launch.FORWARD_DEFAULT
    assert launch.choose_config(table, "select_fwd", torch.bfloat16, True, 2, 8, 16, 64) == launch.FORWARD_DEFAULT
    assert launch.choose_config(table, "select_fwd", torch.float32, False, 2, 8, 16, 64) == launch.FORWARD_DEFAULT
    assert launch.choose_config(table, "select_fwd", torch.float32, True, 3, 8, 16, 64) == launch.FORWARD_DEFAULT


def test_tuned_configurations_are_launched_and_compiled(tuned_sm_99):
    small, _ = tuned_sm_99
    [select] = [r for r in recorded_launches((2, 24, 9, 11), 2, torch.float32, True, "none", False)
                if r.family == "select_fwd" and not r.constexprs["AFFINE"]]
    assert select.options == dict(num_warps=small.num_warps, num_stages=small.num_stages)
    assert select.constexprs["BLOCK_C"] * select.constexprs["BLOCK_HW"] == small.tile_bytes // 4
    assert small in launch.reachable_configs("select_fwd", 2)
    compiled = {key(s.family, s.args, s.constexprs, s.options) for s in launch.specializations((torch.float32,))}
    assert key(select.family, select.args, select.constexprs, select.options) in compiled
