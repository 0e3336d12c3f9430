"""Force one launch configuration on the kernels for the duration of a block (perf/tune.py and
perf/tune_split.py time their candidates this way), by replacing the tuned tables the planning reads: the
runtime holds no override of its own."""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

from sknet_triton import planning, tuned
from sknet_triton.dtypes import DTYPE_NAMES
from sknet_triton.families import FAMILIES
from sknet_triton.ops.launch import BRANCH_COUNTS
from sknet_triton.tuned import Config, TunedEntry


@contextlib.contextmanager
def forcing_config(config: Config, family: Optional[str] = None) -> Iterator[None]:
    """Launch ``family``'s kernels (every family's, by default) with ``config`` inside the block, whatever
    the tables say: the table of the GPU at hand and of every architecture (the CPU's interpreter included)
    records ``config`` alone for every problem of those families, and keeps the other families' entries.

    Plans are cached, so the cache is emptied on entry and on exit: plans made inside the block never leak
    out of it. Compiled graphs (``torch.compile``) keep the plans they were traced with.
    """
    names = {family} if family else set(FAMILIES)
    forced = tuple(TunedEntry(name, dtype, channels_last, M, 1, 1, 1, config) for name in sorted(names)
                   for dtype in DTYPE_NAMES.values() for channels_last in (False, True) for M in BRANCH_COUNTS)
    saved = dict(tuned.TABLES)
    archs = set(saved) | {None}
    if torch.cuda.is_available():
        archs.add(tuned.arch_name(torch.device("cuda")))
    for arch in archs:
        tuned.TABLES[arch] = tuple(e for e in saved.get(arch, ()) if e.family not in names) + forced
    planning.clear_plans()
    try:
        yield
    finally:
        tuned.TABLES.clear()
        tuned.TABLES.update(saved)
        planning.clear_plans()
