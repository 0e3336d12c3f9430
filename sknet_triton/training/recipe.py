"""The training recipe's components, all timm's: loss, optimiser, learning-rate schedule, mixup/cutmix, EMA.

Each is built from the run's settings (:func:`sknet_triton.training.options.resolve`) in one place here;
the loop (``loop``) only calls them.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Optional

from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler, StepLRScheduler
from timm.scheduler.scheduler import Scheduler
from timm.utils import ModelEmaV3
from torch import nn
from torch.optim import Optimizer

from sknet_triton.training.options import MOMENTUM, OPTIMIZERS

__all__ = ["Recipe", "build_recipe", "build_optimizer", "build_scheduler", "updates_per_epoch"]


@dataclass
class Recipe:
    """What turns batches into updates: the loss (soft targets under mixup), the optimiser and its
    schedule (stepped every update), mixup/cutmix (None if off), the EMA of the weights (None if off),
    the gradient-norm limit (None: no clipping) and the batches per update."""

    criterion: nn.Module
    optimizer: Optimizer
    scheduler: Scheduler
    mixup: Optional[Mixup]
    ema: Optional[ModelEmaV3]
    clip_grad: Optional[float]
    accum_steps: int


def updates_per_epoch(batches: int, accum_steps: int) -> int:
    """Optimiser updates in an epoch of ``batches`` batches, ``accum_steps`` to an update (the last update
    takes what is left)."""
    return -(-batches // accum_steps)


def build_recipe(settings: argparse.Namespace, model: nn.Module, num_classes: int, batches_per_epoch: int) -> Recipe:
    """The recipe of ``settings`` for ``model`` (unwrapped, on its device), ``num_classes`` classes and
    ``batches_per_epoch`` training batches per epoch."""
    mixup = None
    if settings.mixup > 0 or settings.cutmix > 0:
        # timm's Mixup takes one of the two at random per batch when both are on; its draws come from
        # NumPy's global generator, which the checkpoint keeps.
        mixup = Mixup(
            mixup_alpha=settings.mixup, cutmix_alpha=settings.cutmix, label_smoothing=settings.label_smoothing,
            num_classes=num_classes,
        )
        criterion = SoftTargetCrossEntropy()
    elif settings.label_smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=settings.label_smoothing)
    else:
        criterion = nn.CrossEntropyLoss()
    optimizer = build_optimizer(settings, model)
    scheduler = build_scheduler(settings, optimizer, updates_per_epoch(batches_per_epoch, settings.accum_steps))
    ema = ModelEmaV3(model, decay=settings.model_ema_decay) if settings.model_ema else None
    return Recipe(criterion, optimizer, scheduler, mixup, ema, settings.clip_grad, settings.accum_steps)


def build_optimizer(settings: argparse.Namespace, model: nn.Module) -> Optimizer:
    """timm's optimiser ``settings.opt``; weight decay on weight matrices and kernels only, not on biases and
    normalisation parameters (timm's filter of parameters with one dimension or named ``bias``)."""
    extra = {} if settings.opt_eps is None else {"eps": settings.opt_eps}
    return create_optimizer_v2(
        model, opt=OPTIMIZERS[settings.opt], lr=settings.lr, weight_decay=settings.weight_decay, momentum=MOMENTUM,
        filter_bias_and_bn=True, **extra,
    )


def build_scheduler(settings: argparse.Namespace, optimizer: Optimizer, updates: int) -> Scheduler:
    """timm's schedule counted in updates (``updates`` per epoch): a linear warm-up from ``warmup_lr`` over
    ``warmup_epochs``, then a cosine decay to ``min_lr`` at the last update, or steps of ``decay_rate``
    every ``decay_epochs``. ``scheduler.step_update(u)`` sets the learning rate of update ``u`` (from 0)."""
    warmup = round(settings.warmup_epochs * updates)
    common = dict(warmup_t=warmup, warmup_lr_init=settings.warmup_lr, warmup_prefix=True, t_in_epochs=False)
    if settings.sched == "cosine":
        return CosineLRScheduler(optimizer, t_initial=max(settings.epochs * updates - warmup, 1), lr_min=settings.min_lr,
                                 **common)
    return StepLRScheduler(optimizer, decay_t=settings.decay_epochs * updates, decay_rate=settings.decay_rate, **common)
