"""The tuned launch tables: one JSON file per GPU architecture, ``sknet_triton/tuned/<arch>.json`` named as
:func:`arch_name` names it (``sm_90.json``, ``gfx942.json``; format: sknet_triton/tuned/README.md), written
by perf/tune.py and read by the launcher's planning.

A :class:`Config` is how one kernel family is launched for one problem; a :class:`TunedEntry` the best
configuration measured for one problem. This module reads and writes the files; which entry a launch
takes is :func:`sknet_triton.planning.choose_config`'s decision.
"""
from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from sknet_triton.dtypes import DTYPE_NAMES

# Per-architecture tables written by perf/tune.py: <arch>.json.
TUNED_DIR = Path(__file__).with_name("tuned")


@dataclass(frozen=True)
class Config:
    """How one kernel family is launched for one problem: what ``perf/tune.py`` sweeps."""

    tile_bytes: int  # bytes of each streamed tensor in one [BLOCK_C, BLOCK_HW] tile
    num_warps: int
    num_stages: int
    programs_per_sm: int  # the H*W axis is split until the grid has about this many programs per SM
    maxnreg: Optional[int] = None  # registers per thread allowed to ptxas, where its own budget would spill

    def options(self) -> dict:
        """The launch options of this configuration, as Triton takes them."""
        options = dict(num_warps=self.num_warps, num_stages=self.num_stages)
        return options if self.maxnreg is None else dict(options, maxnreg=self.maxnreg)


@dataclass(frozen=True)
class TunedEntry:
    """The best configuration perf/tune.py measured for one problem."""

    family: str
    dtype: str  # a value of sknet_triton.dtypes.DTYPE_NAMES
    channels_last: bool
    M: int
    B: int
    C: int
    HW: int
    config: Config


def arch_name(device: torch.device) -> Optional[str]:
    """The architecture of a GPU as its tuned table is named: ``sm_<major><minor>`` for NVIDIA, the LLVM
    processor (``gfx942``) for AMD under PyTorch's ROCm build (where AMD GPUs are "cuda" devices and
    ``torch.version.hip`` is set; its ``gcnArchName`` adds target features, ``gfx942:sramecc+:xnack-``, which
    the table's name leaves out); None for any other device."""
    if device.type != "cuda":
        return None
    if torch.version.hip:
        return torch.cuda.get_device_properties(device).gcnArchName.split(":")[0]
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def read_table(path: Path) -> list[TunedEntry]:
    """The entries of one tuned table (a JSON file written by :func:`write_table`)."""
    data = json.loads(path.read_text())
    return [TunedEntry(**{**e, "config": Config(**e["config"])}) for e in data["entries"]]


def write_table(path: Path, arch: str, stamp: dict, entries: list[TunedEntry]) -> None:
    """Write ``entries`` as the tuned table of ``arch`` to ``path``; ``stamp`` names what measured them
    (gpu, torch, triton, commit, date). A configuration's register budget is written only where it has one."""
    rows = [{**asdict(e), "config": {k: v for k, v in asdict(e.config).items() if v is not None}} for e in entries]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"arch": arch, **stamp, "entries": rows}, indent=1) + "\n")


@functools.lru_cache(maxsize=None)
def tuned_table(arch: Optional[str]) -> tuple[TunedEntry, ...]:
    """The tuned table for ``arch``; empty where none was written."""
    path = TUNED_DIR / f"{arch}.json"
    return tuple(read_table(path)) if arch and path.exists() else ()


def tuned_tables() -> dict[str, tuple[TunedEntry, ...]]:
    """Every tuned table in the package, by architecture."""
    return {path.stem: tuned_table(path.stem) for path in sorted(TUNED_DIR.glob("*.json"))}


def split_measured_faster(
    device: torch.device, dtype: torch.dtype, channels_last: bool, M: int, C: int, HW: int
) -> bool:
    """Whether this device's tuned table has a "split_fwd" entry for exactly this kind and shape (dtype,
    layout, M, C, output positions HW): perf/tune.py writes one only where the split kernel beat the cuDNN
    convolutions + BatchNorm + ReLU + fuse it replaces."""
    name = DTYPE_NAMES.get(dtype)
    return any(
        (e.family, e.dtype, e.channels_last, e.M, e.C, e.HW) == ("split_fwd", name, channels_last, M, C, HW)
        for e in tuned_table(arch_name(device))
    )
