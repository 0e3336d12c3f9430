"""The launcher's tables: every launch the ops make is a specialization the ahead-of-time check compiles,
and a tuned table steers the launches of its architecture."""
import itertools
import json
import os
from types import SimpleNamespace

import pytest
import torch

from perf.accuracy import relative_error
from perf.aot import Specialization, signature, specializations
from perf.examples import EXAMPLES, Problem, flatten, problem_inputs
from perf.recording import recording
from sknet_triton import planning, targets, tuned
from sknet_triton.device import uses_triton
from sknet_triton.families import FAMILIES
from sknet_triton.ops.launch import FORWARD_DEFAULT
from tests.helpers import DEVICE, requires_kernels
from tests.ops_inputs import poisoned_allocations

pytestmark = requires_kernels

SHAPES = [(2, 24, 9, 11), (1, 130, 5, 7), (3, 16, 32, 32), (1, 1, 1, 1)]


def recorded_launches(family, shape, M, dtype, channels_last, stacked):
    """What ``family``'s launcher launches (recorded, not run) for every call its examples list on
    one problem (for the split: input and output of the branches' shape, every group width and stride)."""
    inputs = problem_inputs(family, Problem(*shape, M, dtype, channels_last, stacked), DEVICE, seed=0)
    with recording() as launches:
        for call in EXAMPLES[family].calls(inputs):
            call()
    assert {recorded.family for recorded in launches} <= {family}, "a launcher launches its family's kernel alone"
    return launches


def key(family, args, constexprs, options):
    types, _ = signature(Specialization(family, args, constexprs, options))
    return family, tuple(sorted(types.items())), tuple(sorted(constexprs.items())), tuple(sorted(options.items()))


@pytest.fixture(scope="module")
def compiled_keys():
    return {key(s.family, s.args, s.constexprs, s.options) for s in specializations()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_launch_is_a_compiled_specialization(dtype, compiled_keys):
    launched = set()
    for family, shape, M, channels_last, stacked in itertools.product(
        FAMILIES, SHAPES, (2, 3, 4), (False, True), (False, True)
    ):
        if stacked and family == "split_fwd":
            continue  # the split kernel reads one image, not branches
        for recorded in recorded_launches(family, shape, M, dtype, channels_last, stacked):
            assert key(recorded.family, recorded.args, recorded.constexprs, recorded.options) in compiled_keys, recorded
            launched.add(recorded.family)
    assert launched == set(FAMILIES)


def test_the_examples_cover_every_family():
    assert set(EXAMPLES) == set(FAMILIES)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_tuned_call_matches_its_oracle(family, monkeypatch):
    """A family's tuned call (what perf/tune.py times and checks) against the entry's float64 oracle, on
    fresh inputs, with outputs poisoned before the kernel writes them: the tuner's check can fail."""
    problem = Problem(2, 24, 5, 7, 2, torch.float32, True)
    inputs = problem_inputs(family, problem, DEVICE, seed=3)
    with poisoned_allocations(monkeypatch):
        actual = flatten(EXAMPLES[family].calls(inputs)[0]())
    assert relative_error(actual, EXAMPLES[family].reference(inputs)) < 1e-5
    # Another problem's oracle is orders of magnitude further.
    other = EXAMPLES[family].reference(problem_inputs(family, problem, DEVICE, seed=4))
    assert relative_error(actual, other) > 1e-1


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
    monkeypatch.setattr(tuned, "arch_name", lambda device: "sm_99")
    tuned.load_tables(tmp_path)
    planning.clear_plans()
    yield tuned.Config(**small), tuned.Config(**large)
    tuned.load_tables()
    planning.clear_plans()


def test_a_tuned_table_picks_the_nearest_problem_of_the_same_kind(tuned_sm_99):
    small, large = tuned_sm_99
    table = tuned.tuned_table("sm_99")
    assert planning.choose_config(table, FAMILIES["select_fwd"], torch.float32, True, 2, 8, 24, 100) == small
    assert planning.choose_config(table, FAMILIES["select_fwd"], torch.float32, True, 2, 64, 256, 784) == large
    # Another family, dtype, layout or M: the defaults.
    assert planning.choose_config(table, FAMILIES["fuse_fwd"], torch.float32, True, 2, 8, 16, 64) == FORWARD_DEFAULT
    assert planning.choose_config(table, FAMILIES["select_fwd"], torch.bfloat16, True, 2, 8, 16, 64) == FORWARD_DEFAULT
    assert planning.choose_config(table, FAMILIES["select_fwd"], torch.float32, False, 2, 8, 16, 64) == FORWARD_DEFAULT
    assert planning.choose_config(table, FAMILIES["select_fwd"], torch.float32, True, 3, 8, 16, 64) == FORWARD_DEFAULT


def test_tuned_configurations_are_launched_and_compiled(tuned_sm_99):
    small, _ = tuned_sm_99
    [select] = [r for r in recorded_launches("select_fwd", (2, 24, 9, 11), 2, torch.float32, True, False)
                if not r.constexprs["AFFINE"] and not r.constexprs["RELU"]]
    assert select.options == dict(num_warps=small.num_warps, num_stages=small.num_stages)
    assert select.constexprs["BLOCK_C"] * select.constexprs["BLOCK_HW"] == small.tile_bytes // 4
    assert small in planning.reachable_configs(FAMILIES["select_fwd"], 2)
    compiled = {key(s.family, s.args, s.constexprs, s.options) for s in specializations((torch.float32,))}
    assert key(select.family, select.args, select.constexprs, select.options) in compiled


# --------------------------------------------------------------------------------------------------------
# Each vendor's chips: the architecture's name, its tuned table and the launch options it takes.


def test_arch_name_names_nvidia_and_amd_gpus(monkeypatch):
    """Under PyTorch's ROCm build AMD GPUs are "cuda" devices: the name is the gcnArchName's processor."""
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (12, 0))
    assert tuned.arch_name(cuda) == "sm_120"
    monkeypatch.setattr(torch.version, "hip", "6.3.42131")
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(gcnArchName="gfx942:sramecc+:xnack-", multi_processor_count=304))
    assert tuned.arch_name(cuda) == "gfx942"
    assert uses_triton(cuda)  # the ops run the kernels there
    assert tuned.arch_name(torch.device("cpu")) is None


def test_arch_name_is_a_constant_under_torch_compile(monkeypatch):
    """SKConv's split decision asks the architecture inside a traced forward: torch.compile must take the
    answer as a constant, not trace the device query (which it cannot)."""
    def device_query(device):
        with open(os.devnull):  # as opaque to torch.compile as the driver's own query
            return (9, 0)

    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", device_query)

    def on_sm_90(x):
        return x + 1 if tuned.arch_name(torch.device("cuda", 0)) == "sm_90" else x - 1

    torch._dynamo.reset()
    assert torch.compile(on_sm_90, fullgraph=True, backend="eager")(torch.zeros(2)).tolist() == [1.0, 1.0]
    torch._dynamo.reset()


def test_targets_know_each_vendors_warp_size():
    assert [targets.parse_arch(a).name for a in ("90", "sm_90", "gfx942")] == ["sm_90", "sm_90", "gfx942"]
    assert targets.parse_arch("80") is targets.TARGETS["sm_80"]
    # Architectures the table lacks: NVIDIA's warps, AMD's wave64 CDNA and wave32 RDNA.
    assert (targets.target("sm_75").backend, targets.target("sm_75").warp_size) == ("cuda", 32)
    assert (targets.target("gfx950").backend, targets.target("gfx950").warp_size) == ("hip", 64)
    assert targets.target("gfx1100").warp_size == 32
    for name in ("gfx942", "sm_120"):
        assert targets.target(name).max_warps * targets.target(name).warp_size == targets.MAX_THREADS
    with pytest.raises(ValueError, match="no GPU architecture 'h100'"):
        targets.parse_arch("h100")


@pytest.fixture
def tuned_gfx942(tmp_path, monkeypatch):
    """A tuned table for gfx942, which every device is taken to be, whose entry an NVIDIA chip could launch as
    it is: 32 warps, a register budget."""
    config = dict(tile_bytes=4096, num_warps=32, num_stages=2, programs_per_sm=2, maxnreg=128)
    write_table(tmp_path / "gfx942.json", [entry("select_fwd", 24, 99, config)])
    monkeypatch.setattr(tuned, "arch_name", lambda device: "gfx942")
    tuned.load_tables(tmp_path)
    planning.clear_plans()
    yield tuned.Config(**config)
    tuned.load_tables()
    planning.clear_plans()


def test_an_amd_table_is_launched_as_the_chip_takes_it(tuned_gfx942, monkeypatch):
    """gfx942's table steers its launches, as 64-thread wavefronts within a workgroup's 1024 threads and
    without ptxas's register budget, and the kernels still compute the select (through the interpreter)."""
    assert tuned.tuned_tables()["gfx942"][0].config == tuned_gfx942
    assert tuned_gfx942 in planning.reachable_configs(FAMILIES["select_fwd"], 2)
    problem = Problem(2, 24, 9, 11, 2, torch.float32, True)
    inputs = problem_inputs("select_fwd", problem, DEVICE, seed=5)
    with recording() as launches:
        EXAMPLES["select_fwd"].calls(inputs)[0]()
    assert [r.options for r in launches] == [dict(num_warps=16, num_stages=2)]
    # The defaults' 8 warps of 32 threads: 4 wavefronts of 64.
    assert planning.launch_options(FORWARD_DEFAULT, DEVICE) == dict(num_warps=4, num_stages=FORWARD_DEFAULT.num_stages)
    with poisoned_allocations(monkeypatch):
        actual = flatten(EXAMPLES["select_fwd"].calls(inputs)[0]())
    assert relative_error(actual, EXAMPLES["select_fwd"].reference(inputs)) < 1e-5
    # The same entry on an NVIDIA chip keeps its warps and budget.
    monkeypatch.setattr(tuned, "arch_name", lambda device: "sm_120")
    assert planning.launch_options(tuned_gfx942, DEVICE) == tuned_gfx942.options()
