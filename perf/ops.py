"""Op-level benchmark: the fused SK ops' GPU time, host time and time as a user sees it, beside the reference.

For each op (fuse forward, fuse backward with its BatchNorm + ReLU prologue, select forward, select
backward; backward as autograd runs it), SKNet-50 shape, dtype and layout, four implementations are
checked against the eager reference and timed: sknet_triton eager and under ``torch.compile``, and the
plain-PyTorch reference (``sknet_triton.reference``) eager and under ``torch.compile``. Three times each
(perf/timing.py's clocks):

- **GPU time**: every call captured once into a CUDA graph (one call per input set, enough sets that
  they overflow the L2 cache several times), the graph replayed between CUDA events; the median replay
  over the number of calls. No host work is timed. Its share of the copy bandwidth measured in the same
  run is the op's minimum bytes (perf/bytes_model.py) over that time.
- **host time** (sknet_triton only): the wall time of issuing a burst of back-to-back calls without
  synchronising, over the burst's length; the burst is short enough that the launch queue never fills,
  so the host never waits for the GPU. Median of several bursts.
- **call time**: the wall time of many back-to-back calls, synchronised at both ends, over their number:
  what a loop of calls costs a user, the larger of host and GPU time plus whatever else stalls.

``limit`` says in words which of them sets the call time. ``--host-only`` runs without a GPU: the Python
host cost of one call up to the kernel launch, with the launch recorded instead of run
(perf/recording.py), on CPU tensors through the interpreter's dispatch.

    python perf/ops.py [--quick] [--dtypes bf16,fp32] [--layouts channels_last,contiguous] [--out DIR]
                       [--budget-s SECONDS]
    python perf/ops.py --host-only [--calls N] [--out DIR]
"""
from __future__ import annotations

import argparse
import functools
import itertools
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# --host-only runs the kernels on the CPU through Triton's interpreter, which must be chosen before sknet_triton
# (imported below) defines them.
if __name__ == "__main__" and "--host-only" in sys.argv[1:]:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pandas as pd
import torch
from tqdm import tqdm

from perf import bytes_model, report
from perf.accuracy import OP_TOLERANCE, relative_error
from perf.model_bench import describe_error
from perf.timing import call_time_us, gpu_time_us, host_time_us, input_sets_needed
from sknet_triton.dtypes import DTYPES as ALL_DTYPES
from perf.examples import EXAMPLES, Problem, branch_inputs, flatten
from perf.recording import recording

# SKNet-50's SK units at 224x224: (C, H, W) of each stage.
SHAPES = ((128, 56, 56), (256, 28, 28), (512, 14, 14), (1024, 7, 7))
BATCH = 128
BRANCHES = 2
# The public ops' calls (op_call), each named for the kernel family it launches ("fuse fwd": fuse_fwd).
OPS = ("fuse fwd", "fuse bwd", "select fwd", "select bwd")
DTYPES = {name: ALL_DTYPES[name] for name in ("bf16", "fp32")}
LAYOUTS = ("channels_last", "contiguous")
# The eager reference runs first: the others are checked against it.
IMPLEMENTATIONS = ("eager", "sknet_triton", "sknet_triton compiled", "compiled")
# The columns of one row, in order. "µs" and "% copy BW" without "call" are GPU times (CUDA-graph replay):
# sknet_triton's, the eager reference's ("eager") and the compiled reference's ("compiled").
TIMED_COLUMNS = (
    "sknet_triton µs", "sknet_triton GB/s", "sknet_triton % copy BW", "sknet_triton compiled µs",
    "eager µs", "eager % copy BW", "compiled µs", "compiled % copy BW", "× vs eager", "× vs compiled",
    "host µs", "host compiled µs",
    "call µs", "call compiled µs", "ref call µs", "ref call compiled µs",
    "× call vs ref", "× call compiled vs ref compiled", "limit", "limit compiled",
)
# The copy that measures the GPU's bandwidth: large enough that launch overhead and caches do not count.
COPY_BYTES = 2**30
# do_bench budgets of the copy in ms (warm-up, repetitions); --quick trades precision for time.
BENCH_MS = {False: (25, 100), True: (10, 40)}
# perf/timing.py's clocks: graph replays, host bursts and call timings, by --quick.
GRAPH_REPLAYS = {False: 20, True: 8}
HOST_BURSTS = {False: 10, True: 5}
CALL_TIMINGS = {False: 5, True: 3}
# limit: a call within this factor of its GPU time is GPU-bound; a host time over this share of the call
# time makes it host-bound; a GPU time at this share of copy bandwidth is at the bandwidth limit.
GPU_BOUND_FACTOR = 1.2
HOST_BOUND_SHARE = 0.8
BANDWIDTH_BOUND_PERCENT = 70
# --host-only: a small problem (the host path does not depend on its size, and small CPU tensors keep the
# CPU's allocator out of the numbers), and the number of calls each figure is the median of.
HOST_ONLY_SHAPE = (2, 64, 8, 8)
HOST_ONLY_CALLS = 2000
NEEDS_GPU = "the Triton kernels need an NVIDIA GPU"


@dataclass(frozen=True)
class Selection:
    """The configurations the op table measures."""

    dtypes: tuple = tuple(DTYPES)
    layouts: tuple = LAYOUTS
    shapes: tuple = SHAPES
    batch: int = BATCH
    quick: bool = False  # fewer replays, bursts and timings

    @property
    def rows(self) -> int:
        return len(self.dtypes) * len(self.layouts) * len(self.shapes) * len(OPS)

    def configurations(self) -> list[tuple[tuple, str, str]]:
        """(shape, layout, dtype) in the order they are measured: shape by shape, largest first, so that a
        run cut short by its budget has measured the shapes the targets name."""
        return list(itertools.product(self.shapes, self.layouts, self.dtypes))


# --quick: the models' default dtype and layout, and the largest and the smallest SK unit.
QUICK = Selection(dtypes=("bf16",), layouts=("channels_last",), shapes=(SHAPES[0], SHAPES[-1]), quick=True)


def skip_reason(device: torch.device) -> Optional[str]:
    """Why the op table cannot run on ``device``, or None."""
    if device.type != "cuda":
        return f"{NEEDS_GPU}; this run is on {device.type.upper()}"
    return None


def copy_bandwidth(device: torch.device, quick: bool = False) -> float:
    """GB/s of a large device-to-device copy, counting the bytes read and the bytes written."""
    from triton.testing import do_bench  # here, not at the top: Triton is published for Linux only

    source = torch.empty(COPY_BYTES, dtype=torch.uint8, device=device).random_()
    target = torch.empty_like(source)
    warmup, rep = BENCH_MS[quick]
    ms = do_bench(lambda: target.copy_(source), warmup=warmup, rep=rep, return_mode="median")
    return 2 * COPY_BYTES / ms / 1e6


# --------------------------------------------------------------------------------------------------------
# The calls.


def functions(implementation: str) -> tuple[Callable, Callable]:
    """(fuse, select) of one implementation. Compiled ones are new wrappers: call ``torch._dynamo.reset()``
    before each problem so that each compiles statically for it."""
    import sknet_triton
    from sknet_triton import reference

    if implementation.startswith("sknet_triton"):
        fuse, select = sknet_triton.sk_fuse, sknet_triton.sk_select
    else:
        fuse, select = reference.sk_fuse, reference.sk_select
    if implementation.endswith("compiled"):
        return torch.compile(fuse, dynamic=False), torch.compile(select, dynamic=False)
    return fuse, select


def op_call(op: str, fuse: Callable, select: Callable, inputs: dict) -> Callable[[], object]:
    """A closure that runs ``op`` once; backward closures run the autograd graph of one forward again."""
    branches, logits = inputs["branches"], inputs["logits"]
    if op == "fuse fwd":
        return lambda: fuse(branches)
    if op == "select fwd":
        return lambda: select(branches, logits)
    leaves = [b.detach().requires_grad_() for b in branches]
    if op == "fuse bwd":
        # With the BatchNorm + ReLU prologue: without it the gradient is an expanded view, no kernel.
        out, wrt, grad = fuse(leaves, inputs["scale"], inputs["bias"], True), leaves, inputs["grad_s"]
    else:
        logits_leaf = logits.detach().requires_grad_()
        out, wrt, grad = select(leaves, logits_leaf), leaves + [logits_leaf], inputs["grad_out"]
    return lambda: torch.autograd.grad(out, wrt, grad, retain_graph=True)


def make_inputs(batch: int, C: int, H: int, W: int, dtype: torch.dtype, layout: str, device: torch.device,
                seed: int = 0) -> dict:
    """Seeded branches, logits, prologue constants and upstream gradients of one configuration: the fuse
    and select families' inputs (perf/examples.py)."""
    problem = Problem(batch, C, H, W, BRANCHES, dtype, layout == "channels_last")
    return branch_inputs(problem, torch.Generator(device=device).manual_seed(seed))


def limit(call_us: float, gpu_us: float, host_us: float, percent_copy: float) -> str:
    """Which time sets a call's time, in words."""
    if not all(math.isfinite(x) for x in (call_us, gpu_us)):
        return ""
    if call_us <= GPU_BOUND_FACTOR * gpu_us:
        if percent_copy >= BANDWIDTH_BOUND_PERCENT:
            return "GPU, at bandwidth"
        return "GPU, kernels under bandwidth"
    if math.isfinite(host_us) and host_us >= HOST_BOUND_SHARE * call_us:
        return "host"
    return "launch/other"


# --------------------------------------------------------------------------------------------------------
# The table.


def _row_times(op: str, sets: list[dict], implementations: dict, quick: bool) -> tuple[dict, list[str], list[str]]:
    """Check and time every implementation of ``op`` on the input sets: (times, wrong, failed)."""
    times, wrong, failed, expected = {}, [], [], None
    replays, bursts, timings = GRAPH_REPLAYS[quick], HOST_BURSTS[quick], CALL_TIMINGS[quick]
    for implementation, (fuse, select) in implementations.items():
        try:
            calls = [op_call(op, fuse, select, inputs) for inputs in sets]
            result = flatten(calls[0]())
            expected = result if expected is None else expected
            error = relative_error(result, expected)
            if not error <= OP_TOLERANCE[sets[0]["dtype name"]]:
                wrong.append(f"{implementation} differs from eager by {error:.3g}")
                continue
            del result
            times[implementation, "gpu"] = gpu_time_us(calls, replays)
            times[implementation, "call"] = call_time_us(calls, timings)
            if implementation.startswith("sknet_triton"):
                times[implementation, "host"] = host_time_us(calls[0], bursts, torch.cuda.synchronize)
        except Exception as exception:  # reported in the row; the other implementations still run
            failed.append(f"{implementation}: {describe_error(exception)}")
    return times, wrong, failed


def _columns(times: dict, min_bytes: int, copy_gbps: float) -> dict:
    """The TIMED_COLUMNS of one row from its measured times (NaN where one is missing)."""
    def t(implementation, clock):
        return times.get((implementation, clock), float("nan"))

    def percent(us):
        return 100 * min_bytes / (us * 1e3) / copy_gbps

    gpu, gpu_compiled = t("sknet_triton", "gpu"), t("sknet_triton compiled", "gpu")
    columns = {
        "sknet_triton µs": gpu, "sknet_triton GB/s": min_bytes / (gpu * 1e3), "sknet_triton % copy BW": percent(gpu),
        "sknet_triton compiled µs": gpu_compiled,
        "eager µs": t("eager", "gpu"), "eager % copy BW": percent(t("eager", "gpu")),
        "compiled µs": t("compiled", "gpu"), "compiled % copy BW": percent(t("compiled", "gpu")),
        "× vs eager": t("eager", "gpu") / gpu, "× vs compiled": t("compiled", "gpu") / gpu,
        "host µs": t("sknet_triton", "host"), "host compiled µs": t("sknet_triton compiled", "host"),
        "call µs": t("sknet_triton", "call"), "call compiled µs": t("sknet_triton compiled", "call"),
        "ref call µs": t("eager", "call"), "ref call compiled µs": t("compiled", "call"),
    }
    columns["× call vs ref"] = columns["ref call µs"] / columns["call µs"]
    columns["× call compiled vs ref compiled"] = columns["ref call compiled µs"] / columns["call compiled µs"]
    columns["limit"] = limit(columns["call µs"], gpu, columns["host µs"], percent(gpu))
    columns["limit compiled"] = limit(columns["call compiled µs"], gpu_compiled, columns["host compiled µs"],
                                      percent(gpu_compiled))
    return columns


def op_rows(device: torch.device, selection: Selection, copy_gbps: float, progress=None,
            budget_s: Optional[float] = None, on_rows: Optional[Callable[[list[dict]], None]] = None) -> list[dict]:
    """One row per (op, shape, dtype, layout), checked against the eager reference, then timed.

    ``progress`` (a tqdm bar) advances by one per row. With ``budget_s``, a configuration is started only
    while that many seconds have not passed; the rows left out say so. ``on_rows`` is given the rows so far
    after each configuration (to write them as the run goes).
    """
    # Everything on one side stream: graph capture needs one, and backward closures must run their forward
    # on the stream their backward is captured on (see gpu_time_us).
    with torch.cuda.stream(torch.cuda.Stream(device)):
        rows = _op_rows(device, selection, copy_gbps, progress, budget_s, on_rows)
    torch.cuda.synchronize(device)
    torch._dynamo.reset()
    return rows


def _op_rows(device, selection, copy_gbps, progress, budget_s, on_rows) -> list[dict]:
    """:func:`op_rows` on the current stream."""
    started = time.perf_counter()
    batch, rows = selection.batch, []
    for (C, H, W), layout, dtype_name in selection.configurations():
        over_budget = budget_s is not None and time.perf_counter() - started > budget_s
        dtype = DTYPES[dtype_name]
        element_size = torch.empty((), dtype=dtype).element_size()
        sets: list[dict] = []
        if not over_budget:
            torch._dynamo.reset()  # each problem compiles statically, and never hits the recompile limit
            implementations = {name: functions(name) for name in IMPLEMENTATIONS}
        for op in OPS:
            min_bytes = bytes_model.op_min_bytes(op, BRANCHES, batch * C * H * W, element_size)
            row = {"op": op, "C×H×W": f"{C}×{H}×{W}", "B": batch, "M": BRANCHES, "dtype": dtype_name,
                   "layout": layout, "prologue": "BN+ReLU" if op == "fuse bwd" else "none", "min MB": min_bytes / 1e6}
            if over_budget:
                rows.append({**row, "status": "not run", "reason": f"the {budget_s:.0f} s budget was spent"})
            else:
                count = input_sets_needed(min_bytes, device)
                while len(sets) < count:
                    sets.append({**make_inputs(batch, C, H, W, dtype, layout, device, seed=len(sets)),
                                 "dtype name": dtype_name})
                times, wrong, failed = _row_times(op, sets[:count], implementations, selection.quick)
                rows.append({**row, "input sets": count, **_columns(times, min_bytes, copy_gbps),
                             "status": "error" if failed else "wrong" if wrong else "ok",
                             "reason": "; ".join(failed + wrong)})
            if progress is not None:
                progress.update(1)
        del sets
        torch.cuda.empty_cache()
        if on_rows is not None:
            on_rows(rows)
    return rows


# --------------------------------------------------------------------------------------------------------
# --host-only: the host path without a GPU.


def host_only_rows(calls: int = HOST_ONLY_CALLS, progress=None) -> list[dict]:
    """µs of host work per call, each op, dtype and layout, with every kernel launch recorded instead of run.

    The figures of a row, each the median of ``calls`` calls timed one by one: the public call as a user
    makes it (validation, dispatch, launcher; for backward, ``torch.autograd.grad`` of one forward); for
    forward ops the same call on inputs that require grad (autograd records it), and without grad mode
    (eager inference); the launcher alone (planning, allocation, argument assembly), and the validation
    alone (forward ops). Needs the kernel path on CPU tensors (TRITON_INTERPRET=1 set before sknet_triton
    is imported).
    """
    import sknet_triton
    from sknet_triton.ops import checks

    if sknet_triton.ops.kernel_path(torch.device("cpu")) != "triton-interpreter":
        raise RuntimeError("--host-only needs TRITON_INTERPRET=1 set before sknet_triton is imported")
    B, C, H, W = HOST_ONLY_SHAPE
    rows = []
    for dtype_name, layout, op in itertools.product(DTYPES, LAYOUTS, OPS):
        inputs = make_inputs(B, C, H, W, DTYPES[dtype_name], layout, torch.device("cpu"))
        branches, logits = inputs["branches"], inputs["logits"]
        with recording() as launches:
            call = op_call(op, sknet_triton.sk_fuse, sknet_triton.sk_select, inputs)
            launcher = EXAMPLES[op.replace(" ", "_")].calls(inputs)[0]
            figures = {"call µs": _median_us(call, calls, launches)}
            if op.endswith("fwd"):
                leaves = {"branches": [b.detach().requires_grad_() for b in branches],
                          "logits": logits.detach().requires_grad_()}
                grad_call = op_call(op, sknet_triton.sk_fuse, sknet_triton.sk_select, leaves)
                figures["grad call µs"] = _median_us(grad_call, calls, launches)
                figures["no-grad call µs"] = _median_us(_without_grad(call), calls, launches)
            figures["launcher µs"] = _median_us(launcher, calls, launches)
            if op.endswith("fwd"):
                figures["validation µs"] = _median_us(functools.partial(_validate, checks, op, branches, logits),
                                                      calls, launches)
            call()
            launched = [entry.family for entry in launches]
        rows.append({"op": op, "B×C×H×W": "×".join(map(str, HOST_ONLY_SHAPE)), "dtype": dtype_name,
                     "layout": layout, **figures, "launches per call": len(launched),
                     "kernel": ",".join(launched)})
        if progress is not None:
            progress.update(1)
    return rows


def _validate(checks, op: str, branches: list, logits) -> None:
    """The checks a forward op runs on its inputs (no prologue)."""
    name = "sk_" + op.split()[0]
    _, views = checks.check_branches(name, branches)
    if op == "select fwd":
        checks.check_logits(name, logits, views)
    checks.check_prologue(name, views, None, None, False)


def _without_grad(call: Callable) -> Callable:
    """``call`` under ``torch.no_grad()``: eager inference, which launches without the operator's dispatch."""

    def run():
        with torch.no_grad():
            return call()

    return run


def _median_us(call: Callable, calls: int, launches: list) -> float:
    """Median µs of ``calls`` calls of ``call``, each timed alone; the recorded launches are dropped after each
    call, outside the timing."""
    call()  # the first call fills the plan cache
    launches.clear()
    times = []
    for _ in range(calls):
        start = time.perf_counter_ns()
        call()
        times.append(time.perf_counter_ns() - start)
        launches.clear()
    return statistics.median(times) / 1e3


# --------------------------------------------------------------------------------------------------------
# Command line.


def _parse(argv) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="bf16, channels_last, the largest and smallest shape, fewer repetitions")
    parser.add_argument("--dtypes", help="comma-separated from bf16,fp32 (default: both; --quick: bf16)")
    parser.add_argument("--layouts", help="comma-separated from channels_last,contiguous (default: both; --quick: channels_last)")
    parser.add_argument("--batch", type=int, default=BATCH, help=f"batch size B (default {BATCH})")
    parser.add_argument("--budget-s", type=float,
                        help="start no new configuration after this many seconds (rows left out say so)")
    parser.add_argument("--host-only", action="store_true",
                        help="no GPU needed: host µs per call up to the launch, launches recorded instead of run")
    parser.add_argument("--calls", type=int, default=HOST_ONLY_CALLS,
                        help=f"--host-only: calls each median is taken over (default {HOST_ONLY_CALLS})")
    parser.add_argument("--out", type=Path, help="also write ops.csv and ops.md (host_only.csv with --host-only) here")
    return parser, parser.parse_args(argv)


def host_only_main(args) -> int:
    """--host-only: print the host-path table, and write host_only.csv with --out."""
    device = torch.device("cpu")
    with tqdm(total=len(DTYPES) * len(LAYOUTS) * len(OPS), desc="host-only", unit="row") as progress:
        table = pd.DataFrame(host_only_rows(args.calls, progress))
    environment = report.environment(device)
    print(report.stamp_line(environment))
    print(f"Host µs per call, median of {args.calls} calls each, launches recorded instead of run "
          f"(B×C×H×W = {'×'.join(map(str, HOST_ONLY_SHAPE))}, M = {BRANCHES}):")
    print(report.format_table(table))
    if args.out:
        report.write_tables(args.out, environment, {"host_only": table})
    return 0


def main(argv=None) -> int:
    """The op table on its own: print it, and write it with --out."""
    parser, args = _parse(argv)
    if args.host_only:
        return host_only_main(args)
    selection = replace(QUICK if args.quick else Selection(), batch=args.batch)
    for option, allowed in (("dtypes", DTYPES), ("layouts", LAYOUTS)):
        value = getattr(args, option)
        if value:
            chosen = tuple(value.split(","))
            if not set(chosen) <= set(allowed):
                parser.error(f"--{option}: expected a comma-separated list from {', '.join(allowed)}, got {value!r}")
            selection = replace(selection, **{option: chosen})

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reason = skip_reason(device)
    if reason:
        print(f"Op table skipped: {reason}.")
        return 0
    environment = report.environment(device)
    copy_gbps = copy_bandwidth(device, args.quick)
    print(report.stamp_line(environment), flush=True)
    print(f"Device-to-device copy bandwidth: {copy_gbps:.0f} GB/s (read + write)", flush=True)

    def write(rows):
        if args.out:
            report.write_tables(args.out, environment, {"ops": pd.DataFrame(rows)})

    with tqdm(total=selection.rows, desc="ops", unit="row") as progress:
        table = pd.DataFrame(op_rows(device, selection, copy_gbps, progress, args.budget_s, write))
    print(report.format_table(table))
    if args.out:
        write(table.to_dict("records"))
        config = {"batch": args.batch, "M": BRANCHES, "quick": args.quick, "copy GB/s": round(copy_gbps),
                  "kernel path": _kernel_path(device), "tuned table": _tuned_table_name(device)}
        notes = [__doc__.split("\n\n")[1].replace("\n", " ")]
        report.write_markdown(args.out / "ops.md", environment, config, [("Ops", report.markdown_table(table))], notes)
    return 0


def _kernel_path(device: torch.device) -> str:
    from sknet_triton.ops import kernel_path

    return kernel_path(device)


def _tuned_table_name(device: torch.device) -> str:
    """The tuned table the launches read on ``device``, or "none (defaults)"."""
    from sknet_triton import tuned

    arch = tuned.arch_name(device)
    return f"sknet_triton/tuned/{arch}.json" if tuned.tuned_table(arch) else "none (defaults)"


if __name__ == "__main__":
    sys.exit(main())
