"""What the main process reports after each epoch: a console line, and the run's history as a CSV file."""
from __future__ import annotations

import csv
import io
from typing import Sequence

from sknet_triton.training.checkpoint import atomic_write
from sknet_triton.training.loop import EpochMetrics

__all__ = ["CSV_FILENAME", "COLUMNS", "epoch_row", "describe", "write_csv"]

CSV_FILENAME = "log.csv"
COLUMNS = ("epoch", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "images_per_s", "epoch_s")


def epoch_row(epoch: int, lr: float, train: EpochMetrics, val: EpochMetrics) -> dict:
    """One epoch's record (numbers only, so it can travel in a checkpoint); ``epoch`` counts from 1 and
    ``lr`` is the learning rate the epoch started with. Accuracies are top-1 in percent, images_per_s the
    training throughput of all processes together, epoch_s the seconds of training and validation."""
    return {
        "epoch": epoch,
        "lr": lr,
        "train_loss": train.loss,
        "train_top1": train.top1,
        "val_loss": val.loss,
        "val_top1": val.top1,
        "images_per_s": train.images_per_second,
        "epoch_s": train.seconds + val.seconds,
    }


def describe(row: dict, epochs: int) -> str:
    """``row`` as one console line."""
    return (
        f"epoch {row['epoch']}/{epochs}  lr {row['lr']:.4g}  train loss {row['train_loss']:.4f}  "
        f"train top-1 {row['train_top1']:.2f}%  val loss {row['val_loss']:.4f}  val top-1 {row['val_top1']:.2f}%  "
        f"{row['images_per_s']:.0f} img/s  {row['epoch_s']:.1f} s"
    )


def write_csv(path: str, history: Sequence[dict]) -> None:
    """Write every epoch of ``history`` to ``path`` (atomically, so that it always matches a checkpoint)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write(path, lambda file: file.write(text.getvalue().encode()))
