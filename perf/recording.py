"""Capture kernel launches instead of running them: the ahead-of-time check's specializations, the launch
tests, the host-time measurement. It replaces :func:`sknet_triton.ops.launch.start`, through which every
launch goes, for the duration of a block; the runtime holds no hook of its own."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

from sknet_triton.ops import launch


@dataclass(frozen=True)
class Launch:
    """One kernel launch as :func:`recording` captures it: the family's name, the arguments, constexprs and
    launch options."""

    family: str
    args: tuple
    constexprs: dict
    options: dict = field(default_factory=dict)


@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """Inside the block, every launch is appended to the list it yields instead of run."""
    launches: list[Launch] = []
    start = launch.start

    def record(family, grid, args, constexprs, options) -> None:
        launches.append(Launch(family.name, args, constexprs, options))

    launch.start = record
    try:
        yield launches
    finally:
        launch.start = start
