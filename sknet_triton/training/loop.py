"""One epoch of training, and one pass of evaluation."""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import torch
from timm.utils import dispatch_clip_grad
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from sknet_triton.training.distributed import Context, all_reduce_sum
from sknet_triton.training.recipe import Recipe

__all__ = ["EpochMetrics", "train_one_epoch", "evaluate", "TOP_K"]

# Reading the running loss waits for the device, so the progress bar shows it only this often (steps).
POSTFIX_EVERY = 25
TOP_K = 5  # the second accuracy reported beside top-1 (top-k with k the classes, if fewer)


@dataclass
class EpochMetrics:
    """Totals over all processes: mean loss, top-1 and top-5 accuracy in percent, images seen, seconds taken,
    and for training the learning rates of the epoch's first and last updates (None in evaluation)."""

    loss: float
    top1: float
    top5: float
    images: int
    seconds: float
    lr_first: Optional[float] = None
    lr_last: Optional[float] = None

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def _autocast(device: torch.device, amp_dtype: Optional[torch.dtype]):
    return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()


def _to_device(images, targets, context: Context, memory_format: torch.memory_format):
    images = images.to(context.device, non_blocking=True).contiguous(memory_format=memory_format)
    return images, targets.to(context.device, non_blocking=True)


def _correct(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[2]: how many of ``targets`` ([B] class indices) are the top-1, and among the top-5, of ``logits`` [B, K]."""
    top = logits.topk(min(TOP_K, logits.shape[1]), dim=1).indices == targets[:, None]
    return torch.stack([top[:, 0].sum(), top.any(dim=1).sum()])


def _summarise(totals: torch.Tensor, context: Context, seconds: float, **lrs) -> EpochMetrics:
    loss_sum, top1, top5, images = all_reduce_sum(context, totals).tolist()
    return EpochMetrics(loss_sum / images, 100.0 * top1 / images, 100.0 * top5 / images, int(images), seconds, **lrs)


def train_one_epoch(
    model: nn.Module,
    base_model: nn.Module,
    loader: DataLoader,
    recipe: Recipe,
    scaler: torch.amp.GradScaler,
    context: Context,
    amp_dtype: Optional[torch.dtype],
    memory_format: torch.memory_format,
    first_update: int,
    description: str,
) -> EpochMetrics:
    """Train ``model`` (``base_model`` DDP-wrapped and/or compiled) on one pass over ``loader``.

    Every ``recipe.accum_steps`` batches (the epoch's last group: what is left) make one update, numbered
    from ``first_update`` across the run; the schedule sets each update's learning rate before it, and the
    EMA follows each update. Loss and accuracy (against the labels before mixup) accumulate on the device
    and are summed over processes once, at the end.
    """
    model.train()
    optimizer = recipe.optimizer
    totals = torch.zeros(4, dtype=torch.float64, device=context.device)  # loss sum, top-1, top-5, images
    batches = len(loader)
    update = first_update
    lrs = []
    start = time.perf_counter()
    with tqdm(loader, desc=description, unit="batch", disable=not context.is_main, leave=False, dynamic_ncols=True) as progress:
        for step, (images, targets) in enumerate(progress):
            group_start = step - step % recipe.accum_steps
            group_size = min(recipe.accum_steps, batches - group_start)
            ends_group = step == group_start + group_size - 1
            if step == group_start:
                recipe.scheduler.step_update(update)
                lrs.append(optimizer.param_groups[0]["lr"])
            images, targets = _to_device(images, targets, context, memory_format)
            inputs, loss_targets = recipe.mixup(images, targets) if recipe.mixup is not None else (images, targets)
            # DDP averages the gradients over processes at the backward of the group's last batch only.
            synchronise = nullcontext() if ends_group or not context.distributed else model.no_sync()
            with synchronise:
                with _autocast(context.device, amp_dtype):
                    logits = model(inputs)
                    loss = recipe.criterion(logits, loss_targets)
                scaler.scale(loss / group_size).backward()
            if ends_group:
                if recipe.clip_grad is not None:
                    scaler.unscale_(optimizer)
                    dispatch_clip_grad(base_model.parameters(), recipe.clip_grad, mode="norm")
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                update += 1
                if recipe.ema is not None:
                    recipe.ema.update(base_model, step=update)
            with torch.no_grad():
                totals[0] += loss.detach().double() * targets.shape[0]
                totals[1:3] += _correct(logits.detach(), targets)
                totals[3] += targets.shape[0]
            if context.is_main and (step + 1) % POSTFIX_EVERY == 0:
                progress.set_postfix(loss=f"{(totals[0] / totals[3]).item():.3f}")
    if context.device.type == "cuda":
        torch.cuda.synchronize(context.device)
    return _summarise(totals, context, time.perf_counter() - start, lr_first=lrs[0], lr_last=lrs[-1])


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    context: Context,
    amp_dtype: Optional[torch.dtype],
    memory_format: torch.memory_format,
) -> EpochMetrics:
    """Cross-entropy loss, top-1 and top-5 accuracy of ``model`` (unwrapped: processes may see different
    numbers of batches) over this process's share of ``loader``, summed over processes."""
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    totals = torch.zeros(4, dtype=torch.float64, device=context.device)
    start = time.perf_counter()
    for images, targets in loader:
        images, targets = _to_device(images, targets, context, memory_format)
        with _autocast(context.device, amp_dtype):
            logits = model(images)
        totals[0] += criterion(logits.float(), targets).double()
        totals[1:3] += _correct(logits, targets)
        totals[3] += targets.shape[0]
    return _summarise(totals, context, time.perf_counter() - start)
