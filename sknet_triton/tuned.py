"""The tuned launch tables: one JSON file per GPU architecture, ``sknet_triton/tuned/<arch>.json`` named as
:func:`arch_name` names it (``sm_90.json``, ``gfx942.json``; format: sknet_triton/tuned/README.md), written
by perf/tune.py and read by the launcher's planning.

A :class:`Config` is how one kernel family is launched for one problem; a :class:`TunedEntry` the best
configuration measured for one problem. This module reads and writes the files; which entry a launch
takes is :func:`sknet_triton.planning.choose_config`'s decision.
"""
from __future__ import annotations

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


# torch.compile calls this at trace time and keeps the answer as a constant: SKConv's split decision asks it
# inside a traced forward, where the device query itself would break the graph.
@torch.compiler.assume_constant_result
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


# Every table in TUNED_DIR, by architecture, and the output positions where each records the split kernel
# faster, keyed (dtype name, channels_last, M, C). Read once, at import: the tables are fixed for the process,
# and torch.compile traces SKConv's split decision as plain dict lookups, with no file opened in a traced forward.
TABLES: dict[Optional[str], tuple[TunedEntry, ...]] = {}
SPLIT_FASTER: dict[str, dict[tuple[str, bool, int, int], tuple[int, ...]]] = {}


def load_tables(directory: Optional[Path] = None) -> None:
    """(Re)read every tuned table in ``directory`` (default :data:`TUNED_DIR`) into :data:`TABLES` and
    :data:`SPLIT_FASTER`, replacing what they held: at import, and by tests that write a table of their own.
    Plans cached before (:func:`sknet_triton.planning.clear_plans`) are the caller's to forget."""
    TABLES.clear()
    SPLIT_FASTER.clear()
    for path in sorted((directory or TUNED_DIR).glob("*.json")):
        entries = TABLES[path.stem] = tuple(read_table(path))
        split = SPLIT_FASTER[path.stem] = {}
        for e in entries:
            if e.family == "split_fwd":
                key = (e.dtype, e.channels_last, e.M, e.C)
                split[key] = split.get(key, ()) + (e.HW,)


def tuned_table(arch: Optional[str]) -> tuple[TunedEntry, ...]:
    """The tuned table for ``arch`` (None: the CPU's interpreter, which has none unless a tool sets one);
    empty where none was written."""
    return TABLES.get(arch, ())


def tuned_tables() -> dict[str, tuple[TunedEntry, ...]]:
    """Every tuned table in the package, by architecture."""
    return dict(TABLES)


def split_measured_faster(
    device: torch.device, dtype: torch.dtype, channels_last: bool, M: int, C: int, HW: int
) -> bool:
    """Whether this device's tuned table has a "split_fwd" entry for exactly this kind and shape (dtype,
    layout, M, C, output positions HW): perf/tune.py writes one only where the split kernel beat the cuDNN
    convolutions + BatchNorm + ReLU + fuse it replaces. Traced by torch.compile: dict lookups on constants,
    then HW compared with each recorded one (a guard on HW where H and W are dynamic)."""
    arch = arch_name(device)
    positions = SPLIT_FASTER.get(arch, {}).get((DTYPE_NAMES.get(dtype), channels_last, M, C), ()) if arch else ()
    return any(HW == recorded for recorded in positions)


load_tables()
