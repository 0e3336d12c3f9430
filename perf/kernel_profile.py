"""Where one step's GPU time goes: a per-kernel breakdown of SKNet-50, sknet_triton's and timm's, by group.

For sknet_triton ``sknet50`` and timm ``skresnext50_32x4d`` (the same network), one inference forward and
one training step (forward, backward, SGD step), eager and under ``torch.compile``, is profiled with
``torch.profiler`` after warm-up, and every GPU kernel's time is put in one group:

- **SK ops**: fuse and select (the branch sum and pool, the softmax over branches and the weighted sum);
- **convolutions** (the branch convolutions and every other convolution's kernels);
- **BatchNorm and activations**;
- **attention MLP** (fc_reduce, its BatchNorm and ReLU, fc_select; timm's attention module also holds the
  softmax, which is counted here for timm);
- **other** (pooling, residual adds, the classifier, the loss, the optimizer).

A kernel is grouped by the module it ran in where that is known: in eager mode every module is wrapped in a
profiler range (forward hooks), and backward kernels take the group of the forward op they differentiate
(autograd's sequence numbers). Compiled kernels cross module boundaries, so they, and any kernel outside
every range, are grouped by their names (Inductor names a fused kernel after the operations it fuses;
cuDNN's after the convolution; sknet_triton's Triton kernels are ``sk_fuse_*``/``sk_select_*``), which
cannot tell the attention's 1x1 convolutions from the others. Beside the GPU time: the host time of one
step (issuing it, unsynchronised) and its wall time (synchronised), measured without the profiler.

    python perf/kernel_profile.py [--out DIR]          # on a GPU
    python perf/kernel_profile.py --dry-run --out DIR  # sknet_tiny on the CPU, CPU activities only
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function
from tqdm import tqdm

from perf import model_bench, report

GROUPS = ("SK ops", "convolutions", "BatchNorm and activations", "attention MLP", "other")
# Modules by class name: the SK units (whose own forward is the fuse and select) and their attention.
SK_UNITS = ("SKConv", "SelectiveKernel")
SK_ATTENTIONS = ("SKAttention", "SelectiveKernelAttn")
RANGE_PREFIX = "group: "
# Kernel (or, on the CPU, operator) names by group, tried in this order.
NAME_PATTERNS = (
    ("SK ops", ("sk_fuse", "sk_select")),
    ("convolutions", ("conv", "fprop", "dgrad", "wgrad", "implicit_gemm", "winograd", "cudnn")),
    ("BatchNorm and activations", ("batch_norm", "batchnorm", "bn_fw", "bn_bw", "relu", "threshold")),
)
# What runs: (package, model) pairs and the step settings on each device.
MODELS = (("sknet_triton", "sknet50"), ("timm", "skresnext50_32x4d"))
DRY_MODELS = (("sknet_triton", "sknet_tiny"),)
# The GPU settings are perf/run.py's, so that both compile the same graphs (and share Inductor's cache).
# The dry run compiles with aot_eager: Inductor would build C++ for the CPU, minutes for a test.
# Steps: untimed after the first call, then timed for host and wall time (medians), then one profiled.
GPU_SETTINGS = dict(dtype="bf16", image_size=224, batch={"inference": 256, "train": 128}, backend="inductor",
                    warmup_steps=3, host_steps=5)
DRY_SETTINGS = dict(dtype="fp32", image_size=32, batch={"inference": 2, "train": 2}, backend="aot_eager",
                    warmup_steps=1, host_steps=2)
TOP_KERNELS = 5


@dataclass(frozen=True)
class Case:
    """One profiled step."""

    package: str
    model: str
    mode: str  # "inference" or "train"
    compiled: bool

    @property
    def label(self) -> str:
        return f"{self.package} {self.model} ({'torch.compile' if self.compiled else 'eager'}), {self.mode}"


def module_group(module: nn.Module, in_attention: bool) -> Optional[str]:
    """The group of the work done directly in ``module``'s forward, or None to leave it to the names."""
    kind = type(module).__name__
    if in_attention or kind in SK_ATTENTIONS:
        return "attention MLP"
    if isinstance(module, nn.Conv2d):
        return "convolutions"
    if isinstance(module, (nn.BatchNorm2d, nn.ReLU)) or "BatchNormAct" in kind:
        return "BatchNorm and activations"
    if kind in SK_UNITS:
        return "SK ops"
    return None


def add_group_ranges(model: nn.Module) -> list:
    """Wrap the forward of every module that has a group in a profiler range named after it; returns the
    hook handles."""
    handles = []

    def visit(module: nn.Module, in_attention: bool):
        group = module_group(module, in_attention)
        if group is not None:
            def enter(mod, args, group=group):
                mod._profile_range = record_function(RANGE_PREFIX + group)
                mod._profile_range.__enter__()

            def leave(mod, args, output):
                mod._profile_range.__exit__(None, None, None)

            handles.extend([module.register_forward_pre_hook(enter), module.register_forward_hook(leave)])
        for child in module.children():
            visit(child, in_attention or type(module).__name__ in SK_ATTENTIONS)

    visit(model, False)
    return handles


def group_by_name(name: str) -> str:
    """A kernel's (or operator's) group by its name alone."""
    lowered = name.lower()
    for group, patterns in NAME_PATTERNS:
        if any(p in lowered for p in patterns):
            return group
    return "other"


def _ancestors(event):
    while event is not None:
        yield event
        event = event.cpu_parent


def device_kernels_us(events) -> float:
    """µs of every GPU kernel in a profile's events, attributed to an operator or not."""
    return sum(e.time_range.end - e.time_range.start for e in events if e.device_type == torch.autograd.DeviceType.CUDA)


def work_items(events, device_type: str) -> list[tuple[str, float, str]]:
    """(name, µs, group) of every kernel (on a GPU) or every leaf operator (on the CPU, self time) of a
    profile's events."""
    forward_groups = {}  # autograd sequence number -> the group of the forward op that has it
    for event in events:
        if getattr(event, "sequence_nr", -1) >= 0 and not event.name.startswith("autograd::"):
            group = next((a.name[len(RANGE_PREFIX):] for a in _ancestors(event) if a.name.startswith(RANGE_PREFIX)), None)
            if group is not None:
                forward_groups.setdefault(event.sequence_nr, group)

    def group_of(event, name):
        for ancestor in _ancestors(event):
            if ancestor.name.startswith(RANGE_PREFIX):
                return ancestor.name[len(RANGE_PREFIX):]
            if ancestor.name.startswith("autograd::engine::evaluate_function") and ancestor.sequence_nr in forward_groups:
                return forward_groups[ancestor.sequence_nr]
        return group_by_name(name)

    items = []
    for event in events:
        if event.name.startswith(RANGE_PREFIX) or event.device_type != torch.autograd.DeviceType.CPU:
            continue
        if device_type == "cuda":
            for kernel in event.kernels:
                items.append((kernel.name, kernel.duration, group_of(event, kernel.name)))
        elif not event.cpu_children and not event.name.startswith("autograd::"):
            items.append((event.name, event.self_cpu_time_total, group_of(event, event.name)))
    return items


def make_step(case: Case, settings: dict, device: torch.device) -> tuple[Callable[[], None], nn.Module]:
    """The case's model on the device and a closure running one step of it."""
    config = model_bench.BenchConfig(device=device, dtype=settings["dtype"], channels_last=True,
                                     image_size=settings["image_size"], batch=settings["batch"], warmup=0, iters=1)
    torch.manual_seed(0)
    model = model_bench.create_model(case.package, case.model)
    model.to(device, memory_format=torch.channels_last)
    images, targets = model_bench.inputs(case.mode, config)
    runner = torch.compile(model, backend=settings["backend"]) if case.compiled else model
    return model_bench.iteration(case.mode, model, runner, images, targets, config), model


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_and_wall_ms(step: Callable[[], None], device: torch.device, steps: int) -> tuple[float, float]:
    """Median ms over ``steps`` steps of issuing one without synchronising, and of one synchronised at both ends."""
    host, wall = [], []
    for _ in range(steps):
        _synchronize(device)
        start = time.perf_counter()
        step()
        issued = time.perf_counter()
        _synchronize(device)
        host.append(issued - start)
        wall.append(time.perf_counter() - start)
    return statistics.median(host) * 1e3, statistics.median(wall) * 1e3


def profile_case(case: Case, settings: dict, device: torch.device) -> tuple[dict, pd.DataFrame]:
    """One case's row (GPU ms per group, host and wall ms) and its kernels table."""
    step, model = make_step(case, settings, device)
    handles = [] if case.compiled else add_group_ranges(model)
    started = time.perf_counter()
    step()  # compiles, for compiled cases
    _synchronize(device)
    first_s = time.perf_counter() - started
    for _ in range(settings["warmup_steps"]):
        step()
    host_ms, wall_ms = host_and_wall_ms(step, device, settings["host_steps"])
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _synchronize(device)
    with profile(activities=activities) as prof:
        step()
        _synchronize(device)
    for handle in handles:
        handle.remove()
    kernels = pd.DataFrame(work_items(prof.events(), device.type), columns=["kernel", "µs", "group"])
    per_group = kernels.groupby("group")["µs"].sum()
    # GPU work no operator launched as far as the profiler links them (none expected): shown, not hidden.
    unattributed_us = max(0.0, device_kernels_us(prof.events()) - kernels["µs"].sum()) if device.type == "cuda" else 0.0
    row = {"case": case.label, "package": case.package, "model": case.model, "mode": case.mode,
           "compiled": case.compiled, "batch": settings["batch"][case.mode],
           **{f"{g} ms": per_group.get(g, 0.0) / 1e3 for g in GROUPS},
           "kernels ms": kernels["µs"].sum() / 1e3, "unattributed ms": unattributed_us / 1e3, "kernels": len(kernels),
           "host ms": host_ms, "wall ms": wall_ms, "first call s": first_s}
    top = (kernels.groupby(["group", "kernel"])["µs"].agg(["sum", "count"]).reset_index()
           .sort_values("sum", ascending=False).groupby("group").head(TOP_KERNELS))
    top = top.rename(columns={"sum": "µs", "count": "calls"}).assign(case=case.label)
    del step, model
    model_bench._release_memory(device)
    return row, top


def main(argv=None) -> int:
    """Profile every case; print the breakdown; write profile.csv, kernels.csv and profile.md with --out."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="sknet_tiny on the CPU, tiny inputs, CPU activities only")
    parser.add_argument("--modes", default="inference,train", help="comma-separated from inference,train")
    parser.add_argument("--variants", default="eager,compiled", help="comma-separated from eager,compiled")
    parser.add_argument("--out", type=Path, help="write profile.csv, kernels.csv and profile.md here")
    args = parser.parse_args(argv)
    modes = [m for m in model_bench.MODES if m in args.modes.split(",")]
    variants = [v == "compiled" for v in ("eager", "compiled") if v in args.variants.split(",")]
    if args.dry_run:
        device, models, settings = torch.device("cpu"), DRY_MODELS, DRY_SETTINGS
    else:
        if not torch.cuda.is_available():
            parser.error("profiling kernels needs a CUDA GPU (--dry-run profiles sknet_tiny on the CPU)")
        device, models, settings = torch.device("cuda"), MODELS, GPU_SETTINGS
        torch.backends.cudnn.benchmark = True
    cases = [Case(package, model, mode, compiled) for (package, model), mode, compiled
             in ((pm, m, c) for pm in models for m in modes for c in variants)]
    env = report.environment(device)
    print(report.stamp_line(env), flush=True)
    rows, tops = [], []
    for case in tqdm(cases, desc="profile", unit="case"):
        missing = model_bench.missing_package(case.package)
        try:
            if missing:
                raise RuntimeError(missing)
            row, top = profile_case(case, settings, device)
            rows.append({**row, "status": "ok", "reason": ""})
            tops.append(top)
        except Exception as error:  # a failing case is reported; the others still run
            rows.append({"case": case.label, "status": "error", "reason": model_bench.describe_error(error)})
            model_bench._release_memory(device)
        tqdm.write(f"  {case.label}: {rows[-1]['status']}"
                   + (f", kernels {rows[-1]['kernels ms']:.1f} ms, host {rows[-1]['host ms']:.1f} ms, "
                      f"wall {rows[-1]['wall ms']:.1f} ms" if rows[-1]["status"] == "ok" else f" ({rows[-1]['reason']})"))
        if args.out:  # written as each case is done, so a run cut short keeps what it measured
            report.write_tables(args.out, env, {"profile": pd.DataFrame(rows)})
    table = pd.DataFrame(rows)
    kernels = pd.concat(tops, ignore_index=True) if tops else pd.DataFrame()
    shown = [c for c in ["case", *[f"{g} ms" for g in GROUPS], "kernels ms", "unattributed ms", "host ms", "wall ms", "status", "reason"]
             if c in table.columns]
    print(report.format_table(table[shown]))
    if args.out:
        report.write_tables(args.out, env, {"profile": table, "kernels": kernels})
        config = {"device": device.type, "dtype": settings["dtype"], "image size": settings["image_size"],
                  "compile backend": settings["backend"],
                  **{f"batch {m}": b for m, b in settings["batch"].items()}, "layout": "channels_last"}
        sections = [("GPU time by group, host and wall time per step", report.markdown_table(table[shown]))]
        if not kernels.empty:
            sections.append((f"Top {TOP_KERNELS} kernels of each group", report.markdown_table(kernels)))
        notes = [" ".join(__doc__.split("\n\n")[2].split()),
                 "The 'ms' of each group is the sum of its kernels' GPU times in one profiled step (on the CPU: "
                 "operators' self times); host ms: issuing one step without synchronising; wall ms: one step "
                 f"synchronised; both medians of {settings['host_steps']} steps without the profiler."]
        report.write_markdown(args.out / "profile.md", env, config, sections, notes)
    return 0 if (table["status"] == "ok").all() else 1


if __name__ == "__main__":
    sys.exit(main())
