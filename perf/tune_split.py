"""The eval-mode split kernel (``sknet_triton.sk_split``) timed against what it replaces, for perf/tune.py.

SK unit by SK unit of SKNet-50, ``SKConv`` forward with ``split_conv`` "cudnn" against "triton", each
candidate configuration forced on the split kernel alone: a ``split_fwd`` entry is written only where
the kernel's best beat cuDNN (and matched its output), which is what ``split_conv="auto"`` reads.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass, replace

import torch
from tqdm import tqdm

from perf import ops
from perf.accuracy import OP_TOLERANCE, relative_error
from perf.forcing import forcing_config
from perf.model_bench import describe_error
from perf.timing import device_time_us, input_sets_needed
from sknet_triton import families
from sknet_triton.dtypes import DTYPES

SPLIT_FAMILY = "split_fwd"


@dataclass(frozen=True)
class SplitGrid:
    """The split kernel's candidates: (accumulator tile bytes, warps) pairs, at the default's stages, grid and
    register budget. The GPU's are those under which no variant spills on sm_80 or sm_90 (perf/aot.py
    --sample on a table of candidates: 8 KB with 4 warps and 16 KB with 4 or 8 spill 60-1172 bytes)."""

    tiles_and_warps: tuple = ((4096, 4), (4096, 8), (8192, 8))
    model: str = "sknet50"
    image_size: int = 224
    units: int = 99  # distinct SK unit problems timed, in the order the network meets them


GPU_SPLIT = SplitGrid()
DRY_SPLIT = SplitGrid(tiles_and_warps=((2048, 4), (4096, 4)), model="sknet_tiny", image_size=16, units=1)


def split_units(grid: SplitGrid, dtype: str, channels_last: bool, batch: int, device: torch.device) -> dict:
    """The SK units of ``grid.model`` in eval mode (in ``dtype``), one per distinct problem: {(C_in, C, H, W,
    stride): (unit, the input it received in a forward pass of random images)}, in network order."""
    import sknet_triton
    from sknet_triton.layers import SKConv

    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = sknet_triton.create_model(grid.model, num_classes=10).eval()
    model = model.to(device, DTYPES[dtype], memory_format=memory_format)
    units = {}

    def keep_input(unit, args):
        x = args[0]
        key = (x.shape[1], unit.out_channels, x.shape[2], x.shape[3], unit.paths[0].conv.stride[0])
        if key not in units and len(units) < grid.units:
            units[key] = (unit, x)

    hooks = [m.register_forward_pre_hook(keep_input) for m in model.modules() if isinstance(m, SKConv)]
    images = torch.randn(batch, 3, grid.image_size, grid.image_size, device=device, dtype=DTYPES[dtype])
    with torch.no_grad():
        model(images.to(memory_format=memory_format))
    for hook in hooks:
        hook.remove()
    return units


def split_candidates(grid: SplitGrid) -> list:
    default = families.FAMILIES[SPLIT_FAMILY].defaults[ops.BRANCHES]
    return [replace(default, tile_bytes=t, num_warps=w) for t, w in grid.tiles_and_warps]


def tune_split(grid: SplitGrid, dtypes, layouts, batch: int, device: torch.device, replays: int,
               deadline: float) -> tuple[list[dict], list[dict]]:
    """Time every SK unit's eval forward with the cuDNN path and with the split kernel under each candidate
    configuration; check the winner's output against the cuDNN path's. Returns the winner rows (status "ok"
    only where the kernel beat cuDNN and passed the check) and the candidate rows. Stops starting new units
    after ``deadline`` (a perf_counter value)."""
    from sknet_triton import set_split_conv

    rows, records = [], []
    for dtype, layout in itertools.product(dtypes, layouts):
        channels_last = layout == "channels_last"
        units = split_units(grid, dtype, channels_last, batch, device)
        for (C_in, C, H, W, stride), (unit, x) in tqdm(units.items(), desc=f"split {dtype} {layout}", unit="unit"):
            Ho, Wo = (H - 1) // stride + 1, (W - 1) // stride + 1
            base = {"family": SPLIT_FAMILY, "dtype": dtype, "channels_last": channels_last, "B": batch, "C": C,
                    "H": Ho, "W": Wo, "layout": layout, "C_in": C_in, "stride": stride}
            if time.perf_counter() > deadline:
                rows.append({**base, "status": "not tuned", "reason": "not reached within the budget"})
                continue
            count = input_sets_needed(x.numel() * x.element_size() * (1 + ops.BRANCHES), device)
            sets = [x] + [torch.randn_like(x) for _ in range(count - 1)]
            calls = [lambda x=x: unit(x) for x in sets]

            def time_us(split_conv: str) -> float:
                set_split_conv(unit, split_conv)
                with torch.no_grad():
                    return device_time_us(calls, device, replays)

            cudnn_us = time_us("cudnn")
            set_split_conv(unit, "triton")
            with torch.no_grad():
                if not unit.split_kernel_applies(x):
                    raise RuntimeError(f"the split kernel does not apply to {grid.model}'s unit {base}")
            timed = []
            for config in split_candidates(grid):
                with forcing_config(config, SPLIT_FAMILY):
                    try:
                        us = time_us("triton")
                        error = ""
                    except Exception as failure:  # recorded, not fatal
                        us, error = float("nan"), describe_error(failure)
                records.append({**base, "stage": 1, **asdict(config), "µs": us, "error": error})
                if us == us:
                    timed.append((us, config))
            if not timed:
                rows.append({**base, "cudnn µs": cudnn_us, "status": "failed", "reason": records[-1]["error"]})
                continue
            best_us, best = min(timed, key=lambda t: t[0])
            with torch.no_grad():
                set_split_conv(unit, "cudnn")
                expected = unit(x)
                set_split_conv(unit, "triton")
                with forcing_config(best, SPLIT_FAMILY):
                    actual = unit(x)
            error = relative_error([actual], [expected])
            tolerance = OP_TOLERANCE[dtype]
            status, reason = "ok", ""
            if not error <= tolerance:
                status, reason = "wrong", f"differs from the cuDNN path by {error:.3g} > {tolerance:g}; not written"
            elif best_us >= cudnn_us:
                status, reason = "slower than cuDNN", "not written: split_conv='auto' keeps cuDNN here"
            rows.append({**base, **asdict(best), "best µs": best_us, "cudnn µs": cudnn_us, "× vs cudnn": cudnn_us / best_us,
                         "candidates": len(timed), "check err": error, "status": status, "reason": reason})
    return rows, records
