"""Op-level benchmark: the fused SK ops against the memory-bandwidth floor, beside the plain-PyTorch reference.

For each op, shape, dtype and layout it times sknet_triton's Triton kernels, the eager reference
(sknet_triton.reference) and torch.compile of that reference with ``triton.testing.do_bench``, and
reports each as effective bandwidth (the op's minimum bytes, perf/bytes_model.py, over its time) and
as a share of the same GPU's device-to-device copy bandwidth.

    python perf/ops.py [--quick] [--dtypes bf16,fp32] [--layouts channels_last,contiguous] [--out DIR]
"""
from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd
import torch
from tqdm import tqdm

from perf import bytes_model, report
from perf.accuracy import OP_TOLERANCE, relative_error
from perf.model_bench import describe_error

# SKNet-50's SK units at 224x224: (C, H, W) of each stage.
SHAPES = ((128, 56, 56), (256, 28, 28), (512, 14, 14), (1024, 7, 7))
BATCH = 128
BRANCHES = 2
OPS = tuple(bytes_model.OP_PASSES)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
LAYOUTS = ("channels_last", "contiguous")
# The eager reference runs first: the others are checked against it.
IMPLEMENTATIONS = ("eager", "sknet_triton", "compiled")
TIMED_COLUMNS = ("sknet_triton µs", "sknet_triton GB/s", "sknet_triton % copy BW", "eager µs", "eager % copy BW",
                 "compiled µs", "compiled % copy BW", "× vs eager", "× vs compiled")
# do_bench budgets in ms (warm-up, repetitions); --quick trades precision for time.
BENCH_MS = {False: (25, 100), True: (10, 40)}
# The copy that measures the GPU's bandwidth: large enough that launch overhead and caches do not count.
COPY_BYTES = 2**30
NEEDS_GPU = "the Triton kernels need an NVIDIA GPU"


@dataclass(frozen=True)
class Selection:
    """The configurations the op table measures."""

    dtypes: tuple = tuple(DTYPES)
    layouts: tuple = LAYOUTS
    shapes: tuple = SHAPES
    batch: int = BATCH
    quick: bool = False  # shorter do_bench budgets

    @property
    def rows(self) -> int:
        return len(self.dtypes) * len(self.layouts) * len(self.shapes) * len(OPS)


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


def _functions(implementation: str) -> tuple[Callable, Callable]:
    """(fuse, select) of one implementation; compiled ones are fresh, so each shape compiles statically."""
    import sknet_triton
    from sknet_triton import reference

    if implementation == "sknet_triton":
        return sknet_triton.sk_fuse, sknet_triton.sk_select
    if implementation == "eager":
        return reference.sk_fuse, reference.sk_select
    torch._dynamo.reset()
    return torch.compile(reference.sk_fuse), torch.compile(reference.sk_select)


def _op_call(op: str, fuse: Callable, select: Callable, inputs: dict) -> Callable[[], object]:
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


def _inputs(batch: int, C: int, H: int, W: int, dtype: torch.dtype, layout: str, device: torch.device) -> dict:
    """Seeded branches, logits, prologue constants and upstream gradients of one configuration."""
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    generator = torch.Generator(device=device).manual_seed(0)

    def normal(*shape, dtype=dtype):
        return torch.randn(*shape, device=device, dtype=dtype, generator=generator)

    return {
        "branches": [normal(batch, C, H, W).contiguous(memory_format=memory_format) for _ in range(BRANCHES)],
        "logits": normal(batch, BRANCHES, C),
        "scale": normal(BRANCHES, C, dtype=torch.float32).abs() + 0.5,
        "bias": normal(BRANCHES, C, dtype=torch.float32) * 0.1,
        "grad_s": normal(batch, C, dtype=torch.float32),
        "grad_out": normal(batch, C, H, W).contiguous(memory_format=memory_format),
    }


def _outputs(result) -> list:
    return list(result) if isinstance(result, (tuple, list)) else [result]


def op_rows(device: torch.device, selection: Selection, copy_gbps: float, progress=None) -> list[dict]:
    """One row per (op, shape, dtype, layout): each implementation's time and share of copy bandwidth,
    checked against the eager reference first. ``progress`` (a tqdm bar) advances by one per row."""
    from triton.testing import do_bench

    warmup, rep = BENCH_MS[selection.quick]
    batch = selection.batch
    rows = []
    for dtype_name, layout, (C, H, W) in itertools.product(selection.dtypes, selection.layouts, selection.shapes):
        inputs = _inputs(batch, C, H, W, DTYPES[dtype_name], layout, device)
        element_size = inputs["branches"][0].element_size()
        for op in OPS:
            min_bytes = bytes_model.op_min_bytes(op, BRANCHES, batch * C * H * W, element_size)
            row = {"op": op, "C×H×W": f"{C}×{H}×{W}", "B": batch, "M": BRANCHES, "dtype": dtype_name,
                   "layout": layout, "prologue": "BN+ReLU" if op == "fuse bwd" else "none",
                   "min MB": min_bytes / 1e6}
            timed, wrong, failed = {}, [], []
            expected = None
            for implementation in IMPLEMENTATIONS:
                try:
                    call = _op_call(op, *_functions(implementation), inputs)
                    result = _outputs(call())
                    expected = result if expected is None else expected
                    error = relative_error(result, expected)
                    if not error <= OP_TOLERANCE[dtype_name]:
                        wrong.append(f"{implementation} differs from eager by {error:.3g}")
                        continue
                    ms = do_bench(call, warmup=warmup, rep=rep, return_mode="median")
                except Exception as exception:  # reported in the row; the other implementations still run
                    failed.append(f"{implementation}: {describe_error(exception)}")
                    continue
                timed[f"{implementation} µs"] = ms * 1e3
                timed[f"{implementation} % copy BW"] = 100 * min_bytes / ms / 1e6 / copy_gbps
            if "sknet_triton µs" in timed:
                timed["sknet_triton GB/s"] = min_bytes / (timed["sknet_triton µs"] * 1e3)
                for baseline in ("eager", "compiled"):
                    if f"{baseline} µs" in timed:
                        timed[f"× vs {baseline}"] = timed[f"{baseline} µs"] / timed["sknet_triton µs"]
            rows.append({**row, **{c: timed.get(c, float("nan")) for c in TIMED_COLUMNS},
                         "status": "error" if failed else "wrong" if wrong else "ok", "reason": "; ".join(failed + wrong)})
            if progress is not None:
                progress.update(1)
        del inputs
        torch.cuda.empty_cache()
    torch._dynamo.reset()
    return rows


def main(argv=None) -> int:
    """The op table on its own: print it, and write it with --out."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="bf16, channels_last, the largest and smallest shape, shorter do_bench budgets")
    parser.add_argument("--dtypes", help="comma-separated from bf16,fp32 (default: both; --quick: bf16)")
    parser.add_argument("--layouts", help="comma-separated from channels_last,contiguous (default: both; --quick: channels_last)")
    parser.add_argument("--batch", type=int, default=BATCH, help=f"batch size B (default {BATCH})")
    parser.add_argument("--out", type=Path, help="also write ops.csv and ops.md to this folder")
    args = parser.parse_args(argv)
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
    copy_gbps = copy_bandwidth(device, args.quick)
    with tqdm(total=selection.rows, desc="ops", unit="row") as progress:
        table = pd.DataFrame(op_rows(device, selection, copy_gbps, progress))
    environment = report.environment(device)
    print(report.stamp_line(environment))
    print(f"Device-to-device copy bandwidth: {copy_gbps:.0f} GB/s (read + write)")
    print(report.format_table(table))
    if args.out:
        report.write_tables(args.out, environment, {"ops": table})
        config = {"batch": args.batch, "M": BRANCHES, "quick": args.quick, "copy GB/s": round(copy_gbps)}
        report.write_markdown(args.out / "ops.md", environment, config, [("Ops", report.markdown_table(table))], [])
    return 0


if __name__ == "__main__":
    sys.exit(main())
