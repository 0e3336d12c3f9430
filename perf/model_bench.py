"""Whole-network benchmark: SKNet-50 and ResNeSt-50 as timm and sknet_triton run them, eager and under
torch.compile.

Every variant starts from the same weights and input; its first call (which compiles, for compiled
variants) is checked against timm's eager output before any iteration is timed.
"""
from __future__ import annotations

import gc
import importlib
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from perf.accuracy import MODEL_TOLERANCE, relative_error

MODES = ("inference", "train")
# Batch of random images that sets BatchNorm statistics before the benchmark (see calibrated_weights).
CALIBRATION_BATCH = 8
# timm's names (and so sknet_triton's) of the BatchNorm that ends each bottleneck's residual branch.
RESIDUAL_END_BATCHNORMS = ("bn3", "conv3.bn")


@dataclass(frozen=True)
class Variant:
    """One row of the benchmark: a network from a package, eager or compiled."""

    key: str  # the name --variants takes
    package: str  # "timm" or "sknet_triton"
    model: str  # the model's name in that package
    compiled: bool
    family: str  # variants of one family share weights and a timm reference: "sk" or "plain"

    def label(self, device: torch.device) -> str:
        """The row's name in the tables: for sknet_triton, with the path its SK units really run."""
        how = "torch.compile" if self.compiled else "eager"
        if self.package == "sknet_triton":
            how += ", " + PATH_WORDS[sknet_path(device)]
        return f"{self.package} {self.model} ({how})"


# What sknet_path returns, in the tables' words.
PATH_WORDS = {"triton": "Triton kernels", "triton-interpreter": "Triton interpreter",
              "reference": "plain-PyTorch reference", "torch": "plain-PyTorch path"}


def sknet_path(device: torch.device) -> str:
    """The path sknet_triton's SK units run in this benchmark on ``device``: "torch" where the benchmark
    sets ``set_backend(model, "torch")`` (every device but CUDA), else the ops' own dispatch decision
    (``sknet_triton.ops.kernel_path``: "triton", "triton-interpreter" or "reference")."""
    if device.type != "cuda":
        return "torch"
    return importlib.import_module("sknet_triton.ops").kernel_path(device)


VARIANTS = (
    Variant("timm-sk", "timm", "skresnext50_32x4d", compiled=False, family="sk"),
    Variant("timm-sk-compiled", "timm", "skresnext50_32x4d", compiled=True, family="sk"),
    Variant("sknet", "sknet_triton", "sknet50", compiled=False, family="sk"),
    Variant("sknet-compiled", "sknet_triton", "sknet50", compiled=True, family="sk"),
    Variant("timm-plain-compiled", "timm", "resnext50_32x4d", compiled=True, family="plain"),
    Variant("timm-resnest", "timm", "resnest50d", compiled=False, family="resnest"),
    Variant("timm-resnest-compiled", "timm", "resnest50d", compiled=True, family="resnest"),
    Variant("resnest", "sknet_triton", "resnest50d", compiled=False, family="resnest"),
    Variant("resnest-compiled", "sknet_triton", "resnest50d", compiled=True, family="resnest"),
)
VARIANT_KEYS = tuple(v.key for v in VARIANTS)
# The timm model each family is checked against, run eagerly.
FAMILY_REFERENCE = {"sk": "skresnext50_32x4d", "plain": "resnext50_32x4d", "resnest": "resnest50d"}
# The rows other rows' speed is compared with, and the families of the rows compared with each: SKNet-50's
# with timm's SK and plain ResNeXt rows, ResNeSt-50's with timm's ResNeSt rows.
PEERS = {
    "timm-sk": ("sk", "plain"),
    "timm-sk-compiled": ("sk", "plain"),
    "timm-plain-compiled": ("sk", "plain"),
    "timm-resnest": ("resnest",),
    "timm-resnest-compiled": ("resnest",),
}


@dataclass(frozen=True)
class BenchConfig:
    """What one benchmark run measures."""

    device: torch.device
    dtype: str  # "bf16" (autocast) or "fp32"
    channels_last: bool
    image_size: int
    batch: dict  # mode -> batch size
    warmup: int
    iters: int
    seed: int = 0


def missing_package(package: str) -> Optional[str]:
    """Why ``package`` cannot be benchmarked, or None when it can."""
    try:
        module = importlib.import_module(package)
    except ImportError as error:
        return f"{package} is not installed" if getattr(error, "name", None) == package else describe_error(error)
    if not hasattr(module, "create_model"):
        return f"this {package} has no create_model"
    return None


def create_model(package: str, name: str) -> nn.Module:
    """A freshly initialised model ``name`` from ``package``."""
    return importlib.import_module(package).create_model(name, num_classes=1000)


def calibrated_weights(package: str, name: str, config: BenchConfig) -> dict[str, Tensor]:
    """A state dict of ``package``'s ``name`` in which every path matters and rounding stays small.

    Weights are seeded; BatchNorm scales and shifts are drawn at random, the scale that ends each residual
    branch small (timm zero-initialises it in some networks, which would leave the branches, the SK
    units among them, without effect; trained networks keep it small, which keeps rounding differences
    from growing through the depth, so the check can tell them from errors); and BatchNorm statistics are
    measured on random images, so activations stay in range.
    """
    torch.manual_seed(config.seed)
    model = create_model(package, name)
    for module_name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            ends_branch = module_name.endswith(RESIDUAL_END_BATCHNORMS)
            nn.init.uniform_(module.weight, *((0.1, 0.3) if ends_branch else (0.5, 1.5)))
            nn.init.uniform_(module.bias, -0.1, 0.1)
            module.momentum = None  # a plain average over the calibration batch
    model.to(config.device).train()
    if package == "sknet_triton" and sknet_path(config.device) == "torch":
        importlib.import_module("sknet_triton").set_backend(model, "torch")
    images = torch.randn(CALIBRATION_BATCH, 3, config.image_size, config.image_size, device=config.device)
    with torch.no_grad():
        model(images)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = 0.1
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def inputs(mode: str, config: BenchConfig) -> tuple[Tensor, Tensor]:
    """Seeded images in the configured layout, and class targets."""
    generator = torch.Generator().manual_seed(config.seed + 1)
    batch = config.batch[mode]
    images = torch.randn(batch, 3, config.image_size, config.image_size, generator=generator)
    targets = torch.randint(0, 1000, (batch,), generator=generator)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    return images.to(config.device, memory_format=memory_format), targets.to(config.device)


def prepared_model(package: str, name: str, weights: dict, config: BenchConfig) -> nn.Module:
    """The model with ``weights``, on the device, in the configured layout and backend."""
    model = create_model(package, name)
    model.load_state_dict(weights)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model.to(config.device, memory_format=memory_format)
    if package == "sknet_triton" and sknet_path(config.device) == "torch":
        # The Triton kernels need a GPU; elsewhere the plain-PyTorch path (never Triton's interpreter).
        importlib.import_module("sknet_triton").set_backend(model, "torch")
    return model


def _autocast(config: BenchConfig):
    return torch.autocast(config.device.type, dtype=torch.bfloat16, enabled=config.dtype == "bf16")


def checked_call(mode: str, model: nn.Module, runner: Callable, images: Tensor, targets: Tensor, config: BenchConfig):
    """One forward (and, in training, backward, without an optimizer step): the logits, and in training
    every parameter's gradient in name order."""
    if mode == "inference":
        model.eval()
        with torch.no_grad(), _autocast(config):
            return runner(images).float(), []
    model.train()
    with _autocast(config):
        logits = runner(images)
    F.cross_entropy(logits.float(), targets).backward()
    grads = [p.grad.detach().clone() for _, p in sorted(model.named_parameters())]
    model.zero_grad(set_to_none=True)
    return logits.detach().float(), grads


def iteration(mode: str, model: nn.Module, runner: Callable, images: Tensor, targets: Tensor, config: BenchConfig):
    """The timed unit of work: an inference forward, or a training step (forward, backward, SGD step)."""
    if mode == "inference":
        model.eval()

        def step():
            with torch.no_grad(), _autocast(config):
                runner(images)
        return step

    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        with _autocast(config):
            logits = runner(images)
        F.cross_entropy(logits.float(), targets).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def timed_iterations(step: Callable, warmup: int, iters: int, device: torch.device) -> list[float]:
    """Milliseconds of each of ``iters`` calls of ``step``, after ``warmup`` untimed ones.

    CUDA events time the GPU's work between iterations; on the CPU, the wall clock."""
    for _ in range(warmup):
        step()
    if device.type != "cuda":
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            step()
            times.append((time.perf_counter() - start) * 1e3)
        return times
    torch.cuda.synchronize(device)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for start, end in zip(starts, ends):
        start.record()
        step()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in zip(starts, ends)]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release_memory(device: torch.device) -> None:
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reference_outputs(mode: str, family: str, weights: dict, config: BenchConfig) -> tuple[Tensor, list[Tensor]]:
    """timm's eager outputs for ``family`` on the benchmark input: what every variant is checked against.
    Kept in host memory, out of the way of the rows' peak GPU memory."""
    model = prepared_model("timm", FAMILY_REFERENCE[family], weights, config)
    images, targets = inputs(mode, config)
    logits, grads = checked_call(mode, model, model, images, targets, config)
    del model, images
    _release_memory(config.device)
    return logits.cpu(), [g.cpu() for g in grads]


def bench_variant(
    variant: Variant, mode: str, weights: dict, reference: Optional[tuple], config: BenchConfig
) -> dict:
    """Check one variant against the reference, then time it. Returns its row of the results table."""
    row = {"status": "ok", "reason": ""}
    model = prepared_model(variant.package, variant.model, weights, config)
    runner = torch.compile(model) if variant.compiled else model
    images, targets = inputs(mode, config)

    start = time.perf_counter()
    logits, grads = checked_call(mode, model, runner, images, targets, config)
    _synchronize(config.device)
    if variant.compiled:
        row["compile s"] = time.perf_counter() - start
    if reference is None:
        row["reason"] = "not checked: timm is not installed"
    else:
        reference_logits, reference_grads = reference
        error = relative_error([logits], [reference_logits])
        row["logits err"] = error
        if grads:
            row["grads err"] = relative_error(grads, reference_grads)
        tolerance = MODEL_TOLERANCE[config.dtype]
        if not error <= tolerance:
            row.update(status="wrong", reason=f"logits differ from timm's by {error:.3g} > {tolerance:g}; not timed")
            return row
    del logits, grads

    step = iteration(mode, model, runner, images, targets, config)
    if config.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(config.device)
    times = torch.tensor(timed_iterations(step, config.warmup, config.iters, config.device))
    median = times.median().item()
    row.update({
        "images/s": config.batch[mode] / median * 1e3,
        "ms min": times.min().item(),
        "ms median": median,
        "ms max": times.max().item(),
    })
    if config.device.type == "cuda":
        row["peak GiB"] = torch.cuda.max_memory_allocated(config.device) / 2**30
    return row


def model_rows(
    variants: list[Variant], modes: list[str], config: BenchConfig, skip: Callable[[Variant, str], Optional[str]]
) -> Iterator[dict]:
    """The row of every (mode, variant), as each is done: timed, wrong, skipped or failed, with the reason.

    ``skip(variant, mode)`` says why a row is left out by choice, or returns None.
    """
    weights: dict[str, dict] = {}
    for mode in modes:
        references: dict[str, Optional[tuple]] = {}
        for variant in variants:
            row = {"variant": variant.key, "family": variant.family, "row": variant.label(config.device), "mode": mode,
                   "batch": config.batch[mode], "compiled": variant.compiled,
                   "path": sknet_path(config.device) if variant.package == "sknet_triton" else ""}
            reason = missing_package(variant.package) or skip(variant, mode)
            if reason is not None:
                yield {**row, "status": "skipped", "reason": reason}
                continue
            try:
                family_weights, reference = _family_state(variant, mode, config, weights, references)
                row.update(bench_variant(variant, mode, family_weights, reference, config))
            except Exception as error:  # a failing variant is reported, and the others still run
                row.update(status="error", reason=describe_error(error))
            _release_memory(config.device)
            yield row


def _family_state(variant: Variant, mode: str, config: BenchConfig, weights: dict, references: dict):
    """The family's shared weights and its timm reference for ``mode`` (None without timm), made on first
    use. Without timm, the weights are sknet_triton's own, and nothing is checked."""
    family = variant.family
    timm_installed = missing_package("timm") is None
    if family not in weights:
        source = ("timm", FAMILY_REFERENCE[family]) if timm_installed else (variant.package, variant.model)
        weights[family] = calibrated_weights(*source, config)
    if family not in references:
        references[family] = reference_outputs(mode, family, weights[family], config) if timm_installed else None
    return weights[family], references[family]


def describe_error(error: Exception) -> str:
    """The error's type and the first line of its message."""
    message = str(error).strip()
    return f"{type(error).__name__}: {message.splitlines()[0]}" if message else type(error).__name__


def summary(row: dict) -> str:
    """A row as one line of log."""
    parts = []
    if "images/s" in row:
        parts.append(f"{row['images/s']:.1f} images/s")
    if "compile s" in row:
        parts.append(f"compiled in {row['compile s']:.1f} s")
    if row.get("reason"):
        parts.append(row["reason"])
    return f"{row['row']}, {row['mode']}: {row['status']}" + (" (" + "; ".join(parts) + ")" if parts else "")


# --------------------------------------------------------------------------------------------------------
# Small-batch latency under CUDA graphs.

LATENCY_BATCHES = (1, 8, 32)
LATENCY_MODELS = (("timm", "skresnext50_32x4d"), ("sknet_triton", "sknet50"))


def latency_rows(config: BenchConfig, batches=LATENCY_BATCHES) -> Iterator[dict]:
    """Inference latency at small batches under ``torch.compile(mode="reduce-overhead")`` (CUDA graphs),
    timm's SK network and sknet_triton's, as each is done: ms per call (wall clock, synchronised after every
    call; median, min and max of ``config.iters`` calls after ``config.warmup``), with the path sknet_triton
    ran. Weights are freshly initialised: latency does not depend on them. CUDA only."""
    for package, name in LATENCY_MODELS:
        for batch in batches:
            row = {"row": f"{package} {name} (torch.compile reduce-overhead)", "batch": batch,
                   "path": sknet_path(config.device) if package == "sknet_triton" else ""}
            reason = missing_package(package) or (None if config.device.type == "cuda" else "CUDA graphs need a GPU")
            if reason:
                yield {**row, "status": "skipped", "reason": reason}
                continue
            try:
                row.update(_latency(package, name, batch, config))
            except Exception as error:  # a failing row is reported, and the others still run
                row.update(status="error", reason=describe_error(error))
            _release_memory(config.device)
            yield row


def _latency(package: str, name: str, batch: int, config: BenchConfig) -> dict:
    torch.manual_seed(config.seed)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model = create_model(package, name).to(config.device, memory_format=memory_format).eval()
    compiled = torch.compile(model, mode="reduce-overhead", dynamic=False)
    images = torch.randn(batch, 3, config.image_size, config.image_size, device=config.device)
    images = images.contiguous(memory_format=memory_format)

    def call():
        with torch.no_grad(), _autocast(config):
            compiled(images)
        torch.cuda.synchronize(config.device)

    start = time.perf_counter()
    call()
    compile_s = time.perf_counter() - start
    for _ in range(max(config.warmup, 2)):  # cudagraph trees record on the second call
        call()
    times = []
    for _ in range(config.iters):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    times = torch.tensor(times)
    return {"status": "ok", "reason": "", "ms median": times.median().item(), "ms min": times.min().item(),
            "ms max": times.max().item(), "compile s": compile_s}


def latency_speedups(rows: list[dict]) -> "pd.DataFrame":
    """The latency rows as a table, with "× timm": timm's median ms over the row's, at the same batch."""
    import pandas as pd

    table = pd.DataFrame(rows)
    if "ms median" in table:
        timm = table[table["row"].str.startswith("timm ") & (table["status"] == "ok")].set_index("batch")["ms median"]
        table["× timm"] = table["batch"].map(timm) / table["ms median"]
    return table
