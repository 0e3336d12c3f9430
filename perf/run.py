"""How much faster and leaner sknet_triton makes SKNet-50 and ResNeSt-50, measured in one process on one device.

Rows: timm skresnext50_32x4d eager and under torch.compile, sknet_triton sknet50 eager and under
torch.compile, and timm resnext50_32x4d (the same network without SK units) under torch.compile as the
ceiling; timm resnest50d and sknet_triton's accelerated resnest50d, each eager and compiled; in inference
(eval, no_grad) and a training step (forward, backward, SGD step). Every row is
checked against timm's eager output on the same weights and input before it is timed. On a GPU it adds
the op table (perf/ops.py) against the measured copy bandwidth; everywhere, the bytes model.

Results go to --out (default perf/results/<device>-<date>/, or <device>-<date>-2/, -3/, ... for a later
run of the same day): models.csv, ops.csv, bytes_model.csv, report.md, chart.png and meta.json, each
stamped with the device, versions and git commit. An --out that already holds results is refused: no run
overwrites another's.

    python perf/run.py            # the full report
    python perf/run.py --quick    # fewer iterations and op configurations: minutes
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd
import torch
from tqdm import tqdm

from perf import bytes_model, model_bench, ops, report
from perf.accuracy import MODEL_TOLERANCE

# Defaults per device. The CPU ones keep a run to minutes: small images and batches, float32 (few CPUs
# have fast bf16 convolutions), few iterations.
DEFAULTS = {
    "cuda": dict(dtype="bf16", image_size=224, batch_inference=256, batch_train=128, warmup=10, iters=50),
    "cpu": dict(dtype="fp32", image_size=64, batch_inference=4, batch_train=2, warmup=2, iters=10, threads=1),
}
QUICK_ITERATIONS = {"cuda": dict(warmup=3, iters=10), "cpu": dict(warmup=1, iters=3)}
PROGRESS_FORMAT = "{desc}: {n_fmt}/{total_fmt} rows |{bar}| {elapsed} elapsed"
MODEL_COLUMNS = ["row", "mode", "batch", "status", "images/s", "ms min", "ms median", "ms max", "peak GiB",
                 "compile s", "logits err", "grads err"]


def parse_args(argv=None) -> argparse.Namespace:
    """The command line; options left unset take the device's defaults (see DEFAULTS)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Defaults in brackets are GPU / CPU.")
    parser.add_argument("--quick", action="store_true",
                        help="fewer iterations; op table in bf16, channels_last, two shapes; on CPU, compiled rows "
                             "time inference only")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="where to run (default auto: cuda when available)")
    parser.add_argument("--modes", default="inference,train",
                        help="comma-separated from inference,train (default both)")
    parser.add_argument("--variants", default=",".join(model_bench.VARIANT_KEYS),
                        help="comma-separated rows to run, from " + ", ".join(model_bench.VARIANT_KEYS) + " (default all)")
    parser.add_argument("--dtype", choices=tuple(ops.DTYPES),
                        help="bf16 autocast or fp32 [bf16 / fp32]")
    parser.add_argument("--layout", choices=("channels_last", "contiguous"), default="channels_last",
                        help="memory format of the images and weights (default channels_last)")
    parser.add_argument("--image-size", type=int, help="square image side [224 / 64]")
    parser.add_argument("--batch-inference", type=int, help="inference batch [256 / 4]")
    parser.add_argument("--batch-train", type=int, help="training batch [128 / 2]")
    parser.add_argument("--warmup", type=int, help="untimed iterations after the first call [10 / 2; --quick 3 / 1]")
    parser.add_argument("--iters", type=int, help="timed iterations [50 / 10; --quick 10 / 3]")
    parser.add_argument("--threads", type=int,
                        help="PyTorch CPU threads [PyTorch's default / 1: a CPU run shares the machine with its "
                             "other processes, and one thread is disturbed least by them]")
    parser.add_argument("--no-ops", action="store_true", help="leave out the op table")
    parser.add_argument("--no-latency", action="store_true",
                        help="leave out the small-batch latency table (GPU only: B = 1, 8, 32 under CUDA graphs)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and inputs (default 0)")
    parser.add_argument("--out", type=Path,
                        help="results folder, new or without results (default perf/results/<device>-<date>/, "
                             "with -2, -3, ... after the first run of the day)")
    args = parser.parse_args(argv)

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but no CUDA device is available")
    defaults = dict(DEFAULTS[args.device.type], **(QUICK_ITERATIONS[args.device.type] if args.quick else {}))
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.modes = _choices(parser, "--modes", args.modes, model_bench.MODES)
    args.variants = _choices(parser, "--variants", args.variants, model_bench.VARIANT_KEYS)
    for name in ("image_size", "batch_inference", "iters", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.batch_train < 2:
        parser.error("--batch-train must be at least 2: BatchNorm in training needs two values per channel")
    if args.warmup < 0:
        parser.error("--warmup must be at least 0")
    earlier_results = report.results_in(args.out) if args.out is not None else []
    if earlier_results:
        parser.error(f"--out {args.out} already holds results ({', '.join(earlier_results)}); "
                     "choose another --out, or leave it out for a new folder under perf/results")
    return args


def _choices(parser, option: str, value: str, allowed) -> list[str]:
    chosen = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in allowed]
    if unknown or not chosen:
        parser.error(f"{option}: expected a comma-separated list from {', '.join(allowed)}, got {value!r}")
    return [v for v in allowed if v in chosen]


def speedups(models: pd.DataFrame) -> pd.DataFrame:
    """Add "× <peer>" columns: each row's images/s over the peer row's, in the same mode, for the rows of the
    families the peer is compared with (model_bench.PEERS); blank for the others."""
    if "images/s" not in models:
        return models
    for peer, families in model_bench.PEERS.items():
        peer_rate = models[(models["variant"] == peer) & (models["status"] == "ok")].set_index("mode")["images/s"]
        if not peer_rate.empty:
            compared = models["family"].isin(families)
            models[f"× {peer}"] = (models["images/s"] / models["mode"].map(peer_rate)).where(compared)
    return models


def notes_for(args, cpu_quick: bool, ops_skipped: str | None, peak_load: float) -> list[str]:
    """What a reader needs to know to read this run's numbers. ``peak_load``: the highest 1-minute load
    average seen after a model row."""
    timm_missing = model_bench.missing_package("timm")
    if timm_missing:
        check = f"Nothing was checked: {timm_missing}; the sknet_triton rows ran on their own random weights."
    else:
        check = (f"Every row's first call was compared with timm's eager output on the same weights and input before "
                 f"any timing: a row whose logits err (relative L2 error of the logits) exceeds "
                 f"{MODEL_TOLERANCE[args.dtype]:g} is reported wrong and not timed. grads err, the same measure over "
                 "every parameter gradient of the training step, is shown for reading, not gated: the gradients of a "
                 "randomly initialised network are far more sensitive to rounding than its logits; read it beside "
                 "the timm torch.compile row's.")
    notes = [
        check,
        "images/s is the batch over the median of the timed iterations; compile s is the wall time of the first "
        "call (forward, and backward in training), compilation included (helped by whatever torch.compile's "
        "on-disk caches kept from earlier runs), and is not in the timed iterations.",
        "× <peer>: the row's images/s over the peer's, in the same mode and run.",
    ]
    if args.device.type == "cuda":
        notes.append("GPU times from CUDA events around each iteration; cudnn.benchmark on; peak GiB is "
                     "torch.cuda.max_memory_allocated over the warm-up and timed iterations (weights, gradients "
                     "and optimizer state included).")
        if args.dtype == "fp32":
            notes.append(f"fp32: cuDNN TF32 convolutions {'on' if torch.backends.cudnn.allow_tf32 else 'off'} "
                         "(PyTorch's setting).")
    else:
        notes.append("No GPU: the Triton kernels need an NVIDIA GPU, so the sknet_triton rows run its plain-PyTorch "
                     "path; times are wall-clock; peak memory is not measured on the CPU.")
    cores = os.cpu_count() or 1
    if peak_load > cores:
        notes.append(f"The machine was busy: load average up to {peak_load:.1f} on {cores} cores while rows ran; "
                     "other processes competed for the CPU, and times that depend on it are unreliable.")
    if cpu_quick:
        notes.append("--quick on CPU: compiled rows time inference only (inductor compiles slowly on CPU); run "
                     "without --quick to time compiled training too.")
    if ops_skipped:
        notes.append(f"Op table skipped: {ops_skipped}.")
    notes.append("Bytes model: SK unit forward traffic beside the convolutions, in passes over one branch "
                 f"(eager timm: {bytes_model.eager_forward_passes(2)} for SKNet-50's M=2 SelectiveKernel, "
                 f"{bytes_model.eager_split_attn_forward_passes(2)} for ResNeSt-50's radix-2 SplitAttn, with BatchNorm "
                 f"and ReLU; fused: {bytes_model.fused_forward_passes(2)}), at the inference batch, image size and "
                 "dtype of this run.")
    return notes


def main(argv=None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    device = args.device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    env = report.environment(device)
    out_dir = args.out or report.default_out_dir(env)
    config = {
        "device": device.type, "dtype": args.dtype, "layout": args.layout, "image size": args.image_size,
        "batch inference": args.batch_inference, "batch train": args.batch_train,
        "warmup": args.warmup, "iters": args.iters, "quick": args.quick, "seed": args.seed,
        "threads": torch.get_num_threads(),
    }
    bench_config = model_bench.BenchConfig(
        device=device, dtype=args.dtype, channels_last=args.layout == "channels_last", image_size=args.image_size,
        batch={"inference": args.batch_inference, "train": args.batch_train},
        warmup=args.warmup, iters=args.iters, seed=args.seed,
    )
    cpu_quick = args.quick and device.type != "cuda"
    ops_skipped = "left out with --no-ops" if args.no_ops else ops.skip_reason(device)
    op_selection = ops.QUICK if args.quick else ops.Selection()
    variants = [v for v in model_bench.VARIANTS if v.key in args.variants]

    def skip(variant, mode):
        if cpu_quick and variant.compiled and mode == "train":
            return "--quick on CPU compiles inference only"
        return None

    print(report.stamp_line(env), flush=True)
    print(f"Results go to {out_dir}", flush=True)
    total = len(variants) * len(args.modes) + (0 if ops_skipped else op_selection.rows)
    # No time estimate: rows differ in cost by 100x and more (a compiled training row against an op), so
    # rows done say little about the time left; each row's log line gives its own time instead.
    with tqdm(total=total, desc="perf", unit="row", bar_format=PROGRESS_FORMAT) as progress:
        copy_gbps = None
        if device.type == "cuda":
            copy_gbps = ops.copy_bandwidth(device, args.quick)
            progress.write(f"device-to-device copy: {copy_gbps:.0f} GB/s (read + write)")
        rows, peak_load = [], 0.0
        row_started = time.perf_counter()
        for row in model_bench.model_rows(variants, args.modes, bench_config, skip):
            rows.append(row)
            peak_load = max(peak_load, os.getloadavg()[0])
            now = time.perf_counter()
            progress.write(f"  {model_bench.summary(row)} [{now - row_started:.0f} s; {now - started:.0f} s in all]")
            row_started = now
            progress.update(1)
            # Written as each row is done, so a run cut short still leaves what it measured.
            report.write_tables(out_dir, env, {"models": pd.DataFrame(rows)})
        models = speedups(pd.DataFrame(rows).assign(dtype=args.dtype, layout=args.layout, image=args.image_size))
        bytes_table = pd.concat([
            bytes_model.forward_bytes_table(args.batch_inference, ops.DTYPES[args.dtype].itemsize, args.image_size,
                                            copy_gbps=copy_gbps, network=network).assign(network=network)
            for network in bytes_model.NETWORKS
        ], ignore_index=True)
        bytes_table = bytes_table[["network", *[c for c in bytes_table.columns if c != "network"]]]
        notes = notes_for(args, cpu_quick, ops_skipped, peak_load)
        write_all(out_dir, env, config, notes, copy_gbps, models, None, bytes_table, ops_skipped, args)
        op_table = None
        if not ops_skipped:
            op_table = pd.DataFrame(ops.op_rows(device, op_selection, copy_gbps, progress))

    written = write_all(out_dir, env, config, notes, copy_gbps, models, op_table, bytes_table, ops_skipped, args)
    latency = None if args.no_latency or device.type != "cuda" else latency_table(bench_config, out_dir, env)
    if latency is not None:
        written += report.write_tables(out_dir, env, {"latency": latency})
    print()
    print(report.stamp_line(env))
    print("Configuration: " + ", ".join(f"{k} {v}" for k, v in config.items()))
    for title, body in sections(models, op_table, bytes_table, copy_gbps, ops_skipped, args):
        print(f"\n== {title} ==\n{body if isinstance(body, str) else report.format_table(body)}")
    if latency is not None:
        print("\n== Small-batch inference latency, torch.compile(mode=\"reduce-overhead\") (CUDA graphs) ==\n"
              + report.format_table(latency))
    print("\nNotes:\n" + "\n".join(f"- {note}" for note in notes))
    print(f"\nWrote {', '.join(p.name for p in written)} to {out_dir} in {time.perf_counter() - started:.0f} s")
    return 0


def latency_table(bench_config, out_dir, env) -> pd.DataFrame:
    """The small-batch latency rows (model_bench.latency_rows), written to latency.csv as each is done."""
    rows = []
    for row in tqdm(model_bench.latency_rows(bench_config), total=2 * len(model_bench.LATENCY_BATCHES),
                    desc="latency", unit="row"):
        rows.append(row)
        report.write_tables(out_dir, env, {"latency": model_bench.latency_speedups(rows)})
    return model_bench.latency_speedups(rows)


def sections(models, op_table, bytes_table, copy_gbps, ops_skipped, args) -> list[tuple[str, object]]:
    """The report's (title, table or sentence) pairs, in order."""
    setting = f"{args.dtype}, {args.layout}, {args.image_size}×{args.image_size}"
    peers = [c for c in models.columns if c.startswith("× ")]
    model_columns = [c for c in MODEL_COLUMNS if c in models.columns] + peers + ["reason"]
    result = [(f"Models ({setting}; batch {args.batch_inference} inference, {args.batch_train} train)",
               models[model_columns])]
    if op_table is not None:
        hidden = {"B", "M"} | ({"status", "reason"} if (op_table["status"] == "ok").all() else set())
        result.append((f"Ops (B={ops.BATCH}, M={ops.BRANCHES}; device-to-device copy {copy_gbps:.0f} GB/s)",
                       op_table[[c for c in op_table.columns if c not in hidden]]))
    else:
        result.append(("Ops", f"Skipped: {ops_skipped}."))
    result.append((f"Bytes model: SKNet-50's SK units and ResNeSt-50's, forward, batch {args.batch_inference}, "
                   f"{args.dtype}, "
                   f"{args.image_size}×{args.image_size}", bytes_table))
    return result


def write_all(out_dir, env, config, notes, copy_gbps, models, op_table, bytes_table, ops_skipped, args) -> list[Path]:
    """Every results file: models.csv, ops.csv, bytes_model.csv, report.md, chart.png and meta.json."""
    ops_csv = op_table if op_table is not None else pd.DataFrame([{"status": "skipped", "reason": ops_skipped}])
    paths = report.write_tables(out_dir, env, {"models": models, "ops": ops_csv, "bytes_model": bytes_table})
    markdown = [(title, body if isinstance(body, str) else report.markdown_table(body))
                for title, body in sections(models, op_table, bytes_table, copy_gbps, ops_skipped, args)]
    paths.append(report.write_markdown(out_dir / "report.md", env, config, markdown, notes))
    setting = f"{args.dtype}, {args.layout}, {args.image_size}×{args.image_size}"
    paths.append(report.write_chart(out_dir / "chart.png", env, setting, models, op_table))
    paths.append(report.write_meta(out_dir / "meta.json", env, config, notes, copy_gbps))
    return paths


if __name__ == "__main__":
    sys.exit(main())
