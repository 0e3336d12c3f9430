"""What the main process reports after each epoch: a console line, and the run's history as a CSV file."""
from __future__ import annotations

import csv
import io
from typing import Optional, Sequence

from sknet_triton.training.checkpoint import atomic_write
from sknet_triton.training.loop import EpochMetrics

__all__ = ["CSV_FILENAME", "COLUMNS", "epoch_row", "describe", "describe_evaluation", "write_csv"]

CSV_FILENAME = "log.csv"
COLUMNS = (
    "epoch", "lr_first", "lr_last", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5",
    "ema_val_loss", "ema_val_top1", "ema_val_top5", "images_per_s", "epoch_s",
)


def epoch_row(epoch: int, train: EpochMetrics, val: EpochMetrics, ema_val: Optional[EpochMetrics] = None) -> dict:
    """One epoch's record (numbers only, so it can travel in a checkpoint); ``epoch`` counts from 1.

    lr_first and lr_last are the learning rates of the epoch's first and last updates; accuracies are in
    percent (training's top-1 against the labels before mixup); the ema_val columns are the EMA of the
    weights' validation (absent without --model-ema); images_per_s is the training throughput of all
    processes together, epoch_s the seconds of training and validation.
    """
    row = {
        "epoch": epoch,
        "lr_first": train.lr_first,
        "lr_last": train.lr_last,
        "train_loss": train.loss,
        "train_top1": train.top1,
        "val_loss": val.loss,
        "val_top1": val.top1,
        "val_top5": val.top5,
        "images_per_s": train.images_per_second,
        "epoch_s": train.seconds + val.seconds + (ema_val.seconds if ema_val else 0.0),
    }
    if ema_val is not None:
        row.update(ema_val_loss=ema_val.loss, ema_val_top1=ema_val.top1, ema_val_top5=ema_val.top5)
    return row


def describe(row: dict, epochs: int) -> str:
    """``row`` as one console line; the learning rate as the range the epoch went through."""
    lr = f"{row['lr_first']:.4g}" if row["lr_first"] == row["lr_last"] else f"{row['lr_first']:.4g} to {row['lr_last']:.4g}"
    ema = (f"  EMA val top-1 {row['ema_val_top1']:.2f}% top-5 {row['ema_val_top5']:.2f}%"
           if "ema_val_top1" in row else "")
    return (
        f"epoch {row['epoch']}/{epochs}  lr {lr}  train loss {row['train_loss']:.4f}  "
        f"train top-1 {row['train_top1']:.2f}%  val loss {row['val_loss']:.4f}  val top-1 {row['val_top1']:.2f}% "
        f"top-5 {row['val_top5']:.2f}%{ema}  {row['images_per_s']:.0f} img/s  {row['epoch_s']:.1f} s"
    )


def describe_evaluation(val: EpochMetrics) -> str:
    """An evaluation's result as one console line."""
    return (f"val loss {val.loss:.4f}  val top-1 {val.top1:.2f}%  top-5 {val.top5:.2f}%  "
            f"({val.images} images, {val.seconds:.1f} s)")


def write_csv(path: str, history: Sequence[dict]) -> None:
    """Write every epoch of ``history`` to ``path`` (atomically, so that it always matches a checkpoint)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write(path, lambda file: file.write(text.getvalue().encode()))
