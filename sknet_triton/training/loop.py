"""One epoch of training, one pass of evaluation, and the learning-rate schedule."""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from sknet_triton.training.distributed import Context, all_reduce_sum

__all__ = ["EpochMetrics", "train_one_epoch", "evaluate", "warmup_cosine"]

# Reading the running loss waits for the device, so the progress bar shows it only this often (steps).
POSTFIX_EVERY = 25


@dataclass
class EpochMetrics:
    """Totals over all processes: mean loss, top-1 accuracy in percent, images seen, seconds taken."""

    loss: float
    top1: float
    images: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """The learning-rate factor of step ``step``: rising linearly to 1 over ``warmup_steps``, then falling
    to 0 along a half cosine at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def _autocast(device: torch.device, amp_dtype: Optional[torch.dtype]):
    return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()


def _to_device(images, targets, context: Context, memory_format: torch.memory_format):
    images = images.to(context.device, non_blocking=True).contiguous(memory_format=memory_format)
    return images, targets.to(context.device, non_blocking=True)


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    context: Context,
    amp_dtype: Optional[torch.dtype],
    memory_format: torch.memory_format,
    description: str,
) -> EpochMetrics:
    """Train ``model`` (DDP-wrapped and/or compiled) on one pass over ``loader``; the scheduler steps every batch.

    Loss and accuracy accumulate on the device and are summed over processes once, at the end.
    """
    model.train()
    criterion = nn.CrossEntropyLoss()
    totals = torch.zeros(3, dtype=torch.float64, device=context.device)  # loss sum, correct, images
    start = time.perf_counter()
    with tqdm(loader, desc=description, unit="batch", disable=not context.is_main, leave=False, dynamic_ncols=True) as progress:
        for step, (images, targets) in enumerate(progress, 1):
            images, targets = _to_device(images, targets, context, memory_format)
            with _autocast(context.device, amp_dtype):
                logits = model(images)
                loss = criterion(logits, targets)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            with torch.no_grad():
                totals[0] += loss.detach().double() * targets.shape[0]
                totals[1] += (logits.argmax(dim=1) == targets).sum()
                totals[2] += targets.shape[0]
            if context.is_main and step % POSTFIX_EVERY == 0:
                progress.set_postfix(loss=f"{(totals[0] / totals[2]).item():.3f}")
    if context.device.type == "cuda":
        torch.cuda.synchronize(context.device)
    seconds = time.perf_counter() - start
    loss_sum, correct, images = all_reduce_sum(context, totals).tolist()
    return EpochMetrics(loss_sum / images, 100.0 * correct / images, int(images), seconds)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    context: Context,
    amp_dtype: Optional[torch.dtype],
    memory_format: torch.memory_format,
) -> EpochMetrics:
    """Loss and top-1 accuracy of ``model`` (unwrapped: processes may see different numbers of batches)
    over this process's share of ``loader``, summed over processes."""
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    totals = torch.zeros(3, dtype=torch.float64, device=context.device)
    start = time.perf_counter()
    for images, targets in loader:
        images, targets = _to_device(images, targets, context, memory_format)
        with _autocast(context.device, amp_dtype):
            logits = model(images)
        totals[0] += criterion(logits.float(), targets).double()
        totals[1] += (logits.argmax(dim=1) == targets).sum()
        totals[2] += targets.shape[0]
    seconds = time.perf_counter() - start
    loss_sum, correct, images = all_reduce_sum(context, totals).tolist()
    return EpochMetrics(loss_sum / images, 100.0 * correct / images, int(images), seconds)
