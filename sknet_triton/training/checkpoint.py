"""Checkpoints: everything a run needs to continue exactly where it stopped, written so that an interrupted
write never costs the previous checkpoint."""
from __future__ import annotations

import contextlib
import os
import random
from typing import Any, Callable, Iterable, Mapping, Optional

import numpy as np
import torch

from sknet_triton.training.errors import CheckpointError

__all__ = ["FILENAME", "atomic_write", "save", "load", "check_same_run", "rng_state", "restore_rng_state"]

FILENAME = "checkpoint.pt"
_FORMAT = "sknet_triton.train/1"


def atomic_write(path: str, write: Callable[[Any], None]) -> None:
    """Call ``write(file)`` on a temporary binary file beside ``path``, then rename it to ``path``.

    The rename is atomic: ``path`` holds either its previous content or the complete new one, whenever the
    process stops.
    """
    directory, name = os.path.split(os.path.abspath(path))
    temporary = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def save(path: str, state: Mapping[str, Any]) -> None:
    """Write ``state`` (tensors, numbers, strings and containers of them) to ``path`` atomically."""
    atomic_write(path, lambda file: torch.save({"format": _FORMAT, **state}, file))


def load(path: str) -> dict:
    """The state saved at ``path``, its tensors on the CPU; CheckpointError if missing or unreadable."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        # weights_only: a checkpoint is data; loading one never runs code from it.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, corrupt or foreign files raise any of several types
        raise CheckpointError(f"{path} is corrupt or not a checkpoint ({_first_sentence(error)})") from None
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint of sknet_triton.train")
    return state


def _first_sentence(error: Exception) -> str:
    """The gist of an error from torch.load, whose messages run to several sentences of advice."""
    text = str(error).strip()
    return text.splitlines()[0].split(". ")[0].rstrip(".") if text else type(error).__name__


def check_same_run(path: str, saved: Mapping[str, Any], current: Mapping[str, Any], keys: Iterable[str]) -> None:
    """CheckpointError unless ``saved`` and ``current`` (the runs' settings) agree on every key of ``keys``."""
    differences = [
        f"{key} {saved.get(key)!r} there, {current[key]!r} here" for key in keys if saved.get(key) != current[key]
    ]
    if differences:
        raise CheckpointError(
            f"{path} belongs to a different run ({'; '.join(differences)}); "
            "resume with the same settings, or start afresh in another --output"
        )


def rng_state() -> dict:
    """This process's random generators: Python's, NumPy's global one (mixup's and cutmix's draws), torch's
    CPU one, and its current CUDA device's."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": random.getstate(),
        # NumPy's state as a tensor and numbers: a checkpoint loads with weights_only, which refuses arrays.
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def restore_rng_state(state: Mapping[str, Optional[Any]]) -> None:
    """Set the generators saved by :func:`rng_state`."""
    random.setstate(state["python"])
    kind, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])

