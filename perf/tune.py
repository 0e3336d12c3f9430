"""Tune the kernels' launch configurations on the GPU at hand, time the split kernel against cuDNN, and
write the GPU's tuned table.

For each kernel family the registry sweeps (sknet_triton/families.py: fuse and select, forward and
backward, and the training-mode BatchNorm kernels), SKNet-50 SK shape, dtype and layout (M = 2, B = 128),
candidate :class:`sknet_triton.tuned.Config` values are forced on the launcher
(perf/forcing.py) and timed by GPU time alone (perf/timing.py's CUDA-graph replay over input
sets that overflow the L2 cache). The family's entry builds the inputs, names the launcher call and
gives the float64 reference that call is checked against (perf/examples.py). The grid is searched one coordinate at a
time, the way these memory-bound kernels respond:

1. tile size x warps (the bytes in flight per program and the threads that issue them);
2. programs per SM (how finely H*W is split: parallelism against atomic partial sums), with 1's winner;
3. software-pipelining stages, with 2's winner.

Kernels are compiled ahead of each timing phase by worker processes that launch every candidate once
(filling Triton's on-disk cache), so the timing process only loads them. Each winner is checked against
its family's float64 reference before it is written to ``sknet_triton/tuned/sm_<cc>.json`` (format:
sknet_triton/tuned/README.md), stamped with the GPU, torch, triton and the commit; every candidate's
time goes to ``--out``/tune.csv.

The eval-mode split kernel is timed against the cuDNN path it replaces instead (perf/tune_split.py),
first, with a share of the budget.

    python perf/tune.py [--budget-s 270] [--jobs N] [--out DIR]
    python perf/tune.py --dry-run      # tiny grid and shapes, on the CPU through Triton's interpreter
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import itertools
import multiprocessing
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# The dry run runs the kernels on the CPU through Triton's interpreter, which must be chosen before sknet_triton
# (imported below) defines them.
if __name__ == "__main__" and "--dry-run" in sys.argv[1:]:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pandas as pd
import torch
from tqdm import tqdm

from perf import bytes_model, examples, ops, report, tune_split
from perf.accuracy import OP_TOLERANCE, relative_error
from perf.forcing import forcing_config
from perf.model_bench import describe_error
from perf.timing import device_time_us, input_sets_needed
from sknet_triton import families, tuned
from sknet_triton.dtypes import DTYPES

# The families the grid sweeps; the split kernel is timed against cuDNN instead (perf/tune_split.py).
SWEPT = tuple(name for name, family in families.FAMILIES.items() if family.swept)


@dataclass(frozen=True)
class Grid:
    """The values each coordinate of the search takes."""

    forward_tiles: tuple = (4096, 8192, 16384)
    small_tiles: tuple = (2048, 4096, 8192)  # of the families that stream 2M + 1 tensors or hold accumulator tiles
    warps: tuple = (4, 8)
    programs_per_sm: tuple = (4, 8, 16, 32)
    stages: tuple = (2, 3, 4)
    replays: int = 10


@dataclass(frozen=True)
class Problem:
    """One tuned-table entry's problem."""

    family: str
    dtype: str
    channels_last: bool
    B: int
    C: int
    H: int
    W: int

    @property
    def layout(self) -> str:
        return "channels_last" if self.channels_last else "contiguous"

    @property
    def family_problem(self) -> examples.Problem:
        """The problem as its family's examples take it."""
        return examples.Problem(self.B, self.C, self.H, self.W, ops.BRANCHES, DTYPES[self.dtype], self.channels_last)


GPU_GRID = Grid()
GPU_SHAPES = ops.SHAPES
DRY_GRID = Grid(forward_tiles=(2048, 4096), small_tiles=(2048,), warps=(4,), programs_per_sm=(4, 16),
                stages=(2, 3), replays=2)
DRY_SHAPES = ((16, 4, 4),)
DRY_BATCH = 2


def problems(shapes, dtypes, layouts, batch: int) -> list[Problem]:
    """Every (family, shape, dtype, layout), shape by shape from the largest."""
    return [Problem(family, dtype, layout == "channels_last", batch, C, H, W)
            for (C, H, W), layout, dtype, family in itertools.product(shapes, layouts, dtypes, SWEPT)]


def _launcher_call(problem: Problem, inputs: dict) -> Callable[[], object]:
    """One launch of the problem's family through its launcher (what the op calls), on ``inputs``: the
    family's tuned call."""
    return examples.EXAMPLES[problem.family].calls(inputs)[0]


def _inputs(problem: Problem, device: torch.device, seed: int) -> dict:
    return examples.problem_inputs(problem.family, problem.family_problem, device, seed)


def _min_bytes(problem: Problem) -> int:
    return bytes_model.op_min_bytes(problem.family, ops.BRANCHES, problem.B * problem.C * problem.H * problem.W,
                                    DTYPES[problem.dtype].itemsize)


def candidates(problem: Problem, grid: Grid, stage: int, best=None) -> list:
    """The configurations of search ``stage`` (1, 2 or 3) for ``problem``; ``best``: the previous stage's winner."""
    default = families.FAMILIES[problem.family].defaults[ops.BRANCHES]
    if stage == 1:
        tiles = grid.small_tiles if families.FAMILIES[problem.family].small_tiles else grid.forward_tiles
        return [tuned.Config(t, w, default.num_stages, default.programs_per_sm, default.maxnreg)
                for t, w in itertools.product(tiles, grid.warps)]
    if stage == 2:
        return [replace(best, programs_per_sm=p) for p in grid.programs_per_sm]
    return [replace(best, num_stages=s) for s in grid.stages]


# --------------------------------------------------------------------------------------------------------
# Compiling ahead: worker processes launch each candidate once, which fills Triton's on-disk cache.


def _compile_in_worker(problem: Problem, configs: list) -> int:
    """Launch ``problem`` once with each of ``configs`` on this process's GPU (run in a worker process)."""
    device = torch.device("cuda")
    call = _launcher_call(problem, _inputs(problem, device, seed=0))
    for config in configs:
        with forcing_config(config):
            call()
    torch.cuda.synchronize()
    return len(configs)


def compile_ahead(pool, work: list[tuple[Problem, list]], desc: str) -> None:
    """Compile every (problem, configs) of ``work`` in ``pool`` (None: nothing, the timing compiles)."""
    if pool is None or not work:
        return
    futures = [pool.submit(_compile_in_worker, problem, configs) for problem, configs in work]
    with tqdm(total=sum(len(c) for _, c in work), desc=desc, unit="kernel", mininterval=2) as bar:
        for future in concurrent.futures.as_completed(futures):
            bar.update(future.result())


# --------------------------------------------------------------------------------------------------------
# Timing and checking.


class Timer:
    """Times candidate configurations of problems, keeping each problem's input sets between stages."""

    def __init__(self, device: torch.device, grid: Grid):
        self.device, self.grid = device, grid
        self.inputs: dict[Problem, list[dict]] = {}

    def sets(self, problem: Problem) -> list[dict]:
        """The problem's input sets (enough to overflow the L2 cache on a GPU; one on the CPU)."""
        if problem not in self.inputs:
            self.inputs.clear()  # one problem at a time in memory
            count = input_sets_needed(_min_bytes(problem), self.device)
            self.inputs[problem] = [_inputs(problem, self.device, seed) for seed in range(count)]
        return self.inputs[problem]

    def time_us(self, problem: Problem, config) -> float:
        """GPU µs of one launch of ``problem`` with ``config`` (wall µs on the CPU)."""
        calls = [_launcher_call(problem, inputs) for inputs in self.sets(problem)]
        with forcing_config(config):
            return device_time_us(calls, self.device, self.grid.replays)


def verify(problem: Problem, config, device: torch.device) -> float:
    """Relative error of ``problem``'s launcher with ``config`` against its family's float64 reference, on
    fresh inputs. On a GPU, a block as large as the outputs is filled with NaN and freed first: the caching
    allocator likely hands it to the outputs, so that an element never written shows as NaN."""
    inputs = _inputs(problem, device, seed=1234)
    expected = examples.EXAMPLES[problem.family].reference(inputs)
    if device.type == "cuda":
        torch.full((4 * sum(e.numel() for e in expected),), float("nan"), device=device)  # freed at once
    with forcing_config(config):
        actual = examples.flatten(_launcher_call(problem, inputs)())
    return relative_error(actual, expected)


def tune(problem_list: list[Problem], grid: Grid, device: torch.device, budget_s: float,
         pool=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Search every problem's configurations (see the module docstring) and check each winner.

    Returns the winners (one row per problem: its best configuration and time beside the default's, and
    the check) and every candidate timed. Problems not reached within ``budget_s`` are left untuned (their
    rows say so)."""
    started = time.perf_counter()
    timer = Timer(device, grid)
    records, best = [], {}

    def over_budget():
        return time.perf_counter() - started > budget_s

    def run_stage(stage: int, todo: list[Problem]):
        if over_budget():
            return  # compiling ahead would outlast the budget too
        work = [(p, candidates(p, grid, stage, best.get(p, (None,))[0])) for p in todo]
        compile_ahead(pool, work, f"compile stage {stage}")
        for problem, configs in tqdm(work, desc=f"time stage {stage}", unit="problem"):
            if over_budget():
                break
            for config in configs:
                if any(r["problem"] == problem and r["config"] == config for r in records):
                    continue  # measured in an earlier stage
                try:
                    us = timer.time_us(problem, config)
                except Exception as error:  # a candidate that fails to compile or launch is recorded, not fatal
                    records.append({"problem": problem, "stage": stage, "config": config, "µs": float("nan"),
                                    "error": describe_error(error)})
                    continue
                records.append({"problem": problem, "stage": stage, "config": config, "µs": us, "error": ""})
            timed = [r for r in records if r["problem"] == problem and r["µs"] == r["µs"]]
            if timed:
                winner = min(timed, key=lambda r: r["µs"])
                best[problem] = (winner["config"], winner["µs"])

    # On a side stream: CUDA-graph capture needs one.
    with torch.cuda.stream(torch.cuda.Stream(device)) if device.type == "cuda" else contextlib.nullcontext():
        for stage in (1, 2, 3):
            run_stage(stage, [p for p in problem_list if stage == 1 or p in best])
        # The untuned time beside every winner: the default is a stage-1 candidate of the GPU grid, so
        # usually measured already.
        defaults = {}
        for problem in tqdm(list(best), desc="defaults and checks", unit="problem"):
            default = families.FAMILIES[problem.family].defaults[ops.BRANCHES]
            measured = [r["µs"] for r in records if r["problem"] == problem and r["config"] == default]
            defaults[problem] = measured[0] if measured else timer.time_us(problem, default)
    rows = []
    for problem in problem_list:
        base = {**asdict(problem), "layout": problem.layout}
        if problem not in best:
            rows.append({**base, "status": "not tuned", "reason": f"not reached within {budget_s:.0f} s"})
            continue
        config, us = best[problem]
        error = verify(problem, config, device)
        tolerance = OP_TOLERANCE[problem.dtype]
        ok = error <= tolerance
        rows.append({**base, **asdict(config), "best µs": us, "default µs": defaults[problem],
                     "× vs default": defaults[problem] / us, "candidates": sum(r["problem"] == problem for r in records),
                     "check err": error, "status": "ok" if ok else "wrong",
                     "reason": "" if ok else f"differs from the reference by {error:.3g} > {tolerance:g}; not written"})
    candidates_table = pd.DataFrame([{**asdict(r["problem"]), "stage": r["stage"], **asdict(r["config"]),
                                      "µs": r["µs"], "error": r["error"]} for r in records])
    return pd.DataFrame(rows), candidates_table


def tuned_entries(winners: pd.DataFrame) -> list[tuned.TunedEntry]:
    """The checked winners as tuned-table entries."""
    config_fields = [f for f in tuned.Config.__dataclass_fields__]
    return [tuned.TunedEntry(r["family"], r["dtype"], bool(r["channels_last"]), ops.BRANCHES, int(r["B"]), int(r["C"]),
                             int(r["H"] * r["W"]),
                             tuned.Config(**{f: int(r[f]) for f in config_fields if pd.notna(r.get(f))}))
            for r in winners[winners["status"] == "ok"].to_dict("records")]


def _pool(jobs: int):
    """Worker processes that compile on the GPU (spawned: CUDA does not survive a fork)."""
    if jobs <= 0:
        return None
    return concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"))


def main(argv=None) -> int:
    """Tune, check, write the table; exit 1 if a winner failed its check or no split candidate ran."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-s", type=float, default=270,
                        help="time no new problem after this many seconds (default 270: under 5 minutes in all)")
    parser.add_argument("--jobs", type=int, default=min(12, os.cpu_count() or 1),
                        help="worker processes compiling ahead (0: compile while timing)")
    parser.add_argument("--dtypes", default="bf16,fp32", help="comma-separated from bf16,fp32")
    parser.add_argument("--layouts", default="channels_last,contiguous", help="comma-separated from channels_last,contiguous")
    parser.add_argument("--table", type=Path, help="where to write the tuned table (default sknet_triton/tuned/sm_<cc>.json)")
    parser.add_argument("--out", type=Path, help="also write tune.csv (every candidate) and winners.csv here")
    parser.add_argument("--split-share", type=float, default=0.3,
                        help="share of the budget for the split kernel against cuDNN, timed first (0: skip it)")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny grid and shapes on the CPU through Triton's interpreter; the table goes to a temporary folder")
    args = parser.parse_args(argv)
    dtypes, layouts = tuple(args.dtypes.split(",")), tuple(args.layouts.split(","))
    if not set(dtypes) <= set(ops.DTYPES) or not set(layouts) <= set(ops.LAYOUTS):
        parser.error("--dtypes from bf16,fp32; --layouts from channels_last,contiguous")
    if args.dry_run:
        device, grid, shapes, batch, jobs, arch = torch.device("cpu"), DRY_GRID, DRY_SHAPES, DRY_BATCH, 0, "dry_run"
        split_grid = tune_split.DRY_SPLIT
        table_path = args.table or Path(tempfile.mkdtemp(prefix="sknet_tune_")) / "sm_dry_run.json"
    else:
        if not torch.cuda.is_available():
            parser.error("tuning needs a CUDA GPU (--dry-run runs a tiny grid on the CPU)")
        device, grid, shapes, batch, jobs = torch.device("cuda"), GPU_GRID, GPU_SHAPES, ops.BATCH, args.jobs
        split_grid = tune_split.GPU_SPLIT
        arch = tuned.arch_name(device)
        table_path = args.table or tuned.TUNED_DIR / f"{arch}.json"
    from sknet_triton import ops as sk_ops

    if sk_ops.kernel_path(device) == "reference":
        parser.error(f"the ops run the reference on {device.type}; nothing to tune")

    env = report.environment(device)
    print(report.stamp_line(env), flush=True)
    split_budget_s = args.budget_s * args.split_share
    split_rows, split_records = [], []
    if split_budget_s > 0:
        with torch.cuda.stream(torch.cuda.Stream(device)) if device.type == "cuda" else contextlib.nullcontext():
            split_rows, split_records = tune_split.tune_split(split_grid, dtypes, layouts, batch, device,
                                                              grid.replays, time.perf_counter() + split_budget_s)
    problem_list = problems(shapes, dtypes, layouts, batch)
    pool = _pool(jobs)
    try:
        winners, every = tune(problem_list, grid, device, args.budget_s - split_budget_s, pool)
    finally:
        if pool is not None:
            pool.shutdown()
    winners = pd.concat([winners, pd.DataFrame(split_rows)], ignore_index=True)
    every = pd.concat([every, pd.DataFrame(split_records)], ignore_index=True)
    stamp = {"gpu": env["device"], **{key: env[key] for key in ("torch", "triton", "commit", "date")}}
    tuned.write_table(table_path, arch, stamp, tuned_entries(winners))
    if args.out:
        report.write_tables(args.out, env, {"tune": every, "winners": winners})
    print(report.format_table(winners))
    print(f"Wrote {int((winners['status'] == 'ok').sum())} entries to {table_path}")
    return 0 if not winners["status"].isin(("wrong", "failed")).any() else 1


if __name__ == "__main__":
    sys.exit(main())
