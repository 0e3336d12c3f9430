"""A training run from start (or checkpoint) to end: model, recipe, data, epochs, checkpoints, reports; and
the evaluation of a checkpoint or of pretrained weights alone."""
from __future__ import annotations

import argparse
import os
import random
from typing import Optional

import numpy as np
import torch
from timm.models import get_pretrained_cfg, is_model_pretrained
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from sknet_triton import create_model, list_models
from sknet_triton.training import checkpoint, distributed
from sknet_triton.training.data import Augmentation, build_datasets, build_loaders, set_epoch
from sknet_triton.training.errors import CheckpointError, Interrupted, TrainingError
from sknet_triton.training.loop import evaluate, train_one_epoch
from sknet_triton.training.options import resolve
from sknet_triton.training.recipe import Recipe, build_recipe, updates_per_epoch
from sknet_triton.training.report import CSV_FILENAME, describe, describe_evaluation, epoch_row, write_csv

__all__ = ["train", "SAME_RUN_KEYS"]

# Settings a resumed run must share with its checkpoint: the model's shape, and everything that decides
# the trajectory of the weights (recipe, schedule, global batch, data, augmentation, precision, seed).
SAME_RUN_KEYS = (
    "model", "num_classes", "pretrained", "drop_path", "img_size", "synthetic_size", "epochs", "batch_size",
    "accum_steps", "world_size", "opt", "opt_eps", "lr", "weight_decay", "sched", "warmup_epochs", "warmup_lr",
    "min_lr", "decay_epochs", "decay_rate", "clip_grad", "label_smoothing", "mixup", "cutmix", "aa", "reprob",
    "remode", "model_ema", "model_ema_decay", "amp", "sync_bn", "seed",
)
AMP_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


def train(args: argparse.Namespace) -> None:
    """Run the training (or, with ``--eval-only``, the evaluation) that ``args`` describes (from
    :func:`sknet_triton.training.options.parse_args`).

    Raises TrainingError for bad data, options or checkpoints, and Interrupted on Ctrl-C.
    """
    context = distributed.init()
    saved = _SavedCheckpoint()
    try:
        (_evaluate_only if args.eval_only else _train)(args, context, saved)
    except KeyboardInterrupt:
        raise Interrupted(saved.interruption_message() if context.is_main else "") from None
    finally:
        distributed.shutdown(context)


class _SavedCheckpoint:
    """Which checkpoint of the run is complete on disk, and the epoch in progress: what an interruption leaves."""

    def __init__(self):
        self.path: Optional[str] = None
        self.epoch = 0  # epochs the checkpoint at ``path`` holds
        self.epochs = 0  # of the schedule
        self.current = 0  # the epoch being trained, from 1; 0 before the first

    def interruption_message(self) -> str:
        if not self.current:
            where = "interrupted before training"
        elif self.epoch >= self.current:  # between the checkpoint's writing and the next epoch
            where = f"interrupted after epoch {self.epoch}/{self.epochs}"
        else:
            where = f"interrupted in epoch {self.current}/{self.epochs}"
        if self.path is None:
            return f"{where}; no checkpoint was written yet: start the run again"
        return f"{where}; {self.path} (epoch {self.epoch}) is intact: run the same command with --resume to continue"


def _train(args: argparse.Namespace, context: distributed.Context, saved: _SavedCheckpoint) -> None:
    settings = _settings(args, context)
    data = build_datasets(
        settings.data, _data_config(settings), settings.img_size, settings.seed, settings.synthetic_size,
        Augmentation(settings.aa, settings.reprob, settings.remode),
    )
    run_settings = {**vars(settings), "num_classes": data.num_classes, "world_size": context.world_size}
    checkpoint_path = os.path.join(settings.output, checkpoint.FILENAME)
    state = distributed.run_on_main(context, lambda: _checkpoint_to_resume(settings, run_settings, checkpoint_path))

    memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
    model = _build_model(settings, context, data.num_classes, memory_format)
    train_loader, val_loader = build_loaders(
        data, settings.batch_size, settings.workers, settings.seed, context.rank, context.world_size,
        pin_memory=context.device.type == "cuda",
    )
    recipe = build_recipe(settings, model, data.num_classes, len(train_loader))
    updates = updates_per_epoch(len(train_loader), settings.accum_steps)
    scaler = torch.amp.GradScaler(context.device.type, enabled=settings.amp == "fp16")
    if state is None:
        start_epoch, history = 0, []
        # Different draws per process from here on (dropout, stochastic depth, mixup); data order and
        # augmentation do not use them.
        random.seed(settings.seed + context.rank)
        np.random.seed(settings.seed + context.rank)
        torch.manual_seed(settings.seed + context.rank)
    else:
        start_epoch, history = state["epoch"], state["history"]
        _restore(state, settings.resume, model, recipe, scaler, context)
        saved.path, saved.epoch = settings.resume, start_epoch

    train_model = model
    if context.distributed:
        train_model = DistributedDataParallel(model, device_ids=[context.device.index] if context.device.type == "cuda" else None)
    if settings.compile:
        train_model = torch.compile(train_model)

    stop_epoch = settings.stop_after_epoch or settings.epochs
    amp_dtype = AMP_TORCH_DTYPES[settings.amp]
    saved.epochs = settings.epochs
    if context.is_main:
        _announce(settings, context, data, model, start_epoch, stop_epoch)
    for epoch in range(start_epoch, stop_epoch):
        saved.current = epoch + 1
        set_epoch(train_loader, epoch)
        train_metrics = train_one_epoch(
            train_model, model, train_loader, recipe, scaler, context, amp_dtype, memory_format,
            first_update=epoch * updates, description=f"epoch {epoch + 1}/{settings.epochs}",
        )
        distributed.broadcast_buffers(context, model)
        if not distributed.replicas_identical(context, model):
            raise RuntimeError(f"after epoch {epoch + 1}, the processes hold different weights")
        val_metrics = evaluate(model, val_loader, context, amp_dtype, memory_format)
        ema_metrics = None
        if recipe.ema is not None:
            # Every process updates its EMA from the same weights after every update: they agree too.
            ema_metrics = evaluate(recipe.ema.module, val_loader, context, amp_dtype, memory_format)
        history.append(epoch_row(epoch + 1, train_metrics, val_metrics, ema_metrics))
        rng_states = distributed.all_gather_objects(context, checkpoint.rng_state())
        if context.is_main:
            checkpoint.save(checkpoint_path, {
                "epoch": epoch + 1,
                "settings": run_settings,
                "model": model.state_dict(),
                "model_ema": recipe.ema.module.state_dict() if recipe.ema is not None else None,
                "optimizer": recipe.optimizer.state_dict(),
                "scheduler": recipe.scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": rng_states,
                "history": history,
            })
            saved.path, saved.epoch = checkpoint_path, epoch + 1
            write_csv(os.path.join(settings.output, CSV_FILENAME), history)
            tqdm.write(describe(history[-1], settings.epochs))
    if context.is_main and context.distributed and stop_epoch > start_epoch:
        tqdm.write(f"weights identical on all {context.world_size} processes after every epoch")
    if context.is_main and stop_epoch < settings.epochs:
        tqdm.write(f"stopped after epoch {stop_epoch}/{settings.epochs} as asked; {checkpoint_path} holds it: run the "
                   "same command with --resume (and a later --stop-after-epoch, or none) to continue")


def _evaluate_only(args: argparse.Namespace, context: distributed.Context, saved: _SavedCheckpoint) -> None:
    """Report the validation folder's loss, top-1 and top-5 of the checkpoint's weights (and their EMA), or
    of timm's pretrained weights; writes nothing."""
    settings = _settings(args, context)
    state = None
    if settings.resume is not None:
        state = distributed.run_on_main(context, lambda: checkpoint.load(settings.resume))
        checkpoint.check_same_run(settings.resume, state["settings"], {"model": settings.model}, ("model",))
    data = build_datasets(settings.data, _data_config(settings), settings.img_size, settings.seed,
                          settings.synthetic_size, train=False)
    # Pretrained weights keep their 1000 ImageNet classes; a checkpoint, the classes it was trained on.
    num_classes = state["settings"]["num_classes"] if state is not None else 1000
    memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
    model = _build_model(settings, context, num_classes, memory_format)
    _, val_loader = build_loaders(data, settings.batch_size, settings.workers, settings.seed, context.rank,
                                  context.world_size, pin_memory=context.device.type == "cuda")
    amp_dtype = AMP_TORCH_DTYPES[settings.amp]
    weights = {"": None} if state is None else {"": state["model"]}
    if state is not None and state.get("model_ema") is not None:
        weights["EMA: "] = state["model_ema"]
    for label, state_dict in weights.items():
        if state_dict is not None:
            _load_weights(model, state_dict, settings.resume)
        metrics = evaluate(model, val_loader, context, amp_dtype, memory_format)
        if context.is_main:
            tqdm.write(label + describe_evaluation(metrics))


def _settings(args: argparse.Namespace, context: distributed.Context) -> argparse.Namespace:
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    settings = resolve(args, context.world_size, local_world_size, cuda=context.device.type == "cuda")
    if settings.sync_bn and context.distributed and context.device.type != "cuda":
        raise TrainingError("--sync-bn needs GPUs: SyncBatchNorm does not run on the CPU")
    if settings.pretrained and not is_model_pretrained(settings.model):
        with_weights = [name for name in list_models() if is_model_pretrained(name)]
        raise TrainingError(f"--pretrained: no pretrained weights exist for {settings.model}; they exist for "
                            f"{', '.join(with_weights)}")
    if context.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest convolution algorithms
        torch.set_float32_matmul_precision("high")  # TF32, as cuDNN's convolutions already use
    return settings


def _data_config(settings: argparse.Namespace) -> dict:
    """timm's data configuration of the model (its registered default: the pretrained weights' own where it
    has weights), which the weights the run starts from were trained with."""
    return get_pretrained_cfg(settings.model).to_dict()


def _build_model(
    settings: argparse.Namespace, context: distributed.Context, num_classes: int, memory_format: torch.memory_format
) -> nn.Module:
    # The same initial weights on every process (DDP would broadcast rank 0's anyway).
    random.seed(settings.seed)
    torch.manual_seed(settings.seed)
    # drop_path_rate only when asked for: create_model names the models that do not take it.
    extra = {} if settings.drop_path is None else {"drop_path_rate": settings.drop_path}
    # The models run their SK units through the Triton kernels on CUDA, and through plain PyTorch on the
    # CPU (unless TRITON_INTERPRET=1 asks for the kernels' interpreter, a debugging aid).
    try:
        model = create_model(settings.model, pretrained=settings.pretrained, num_classes=num_classes, **extra)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TrainingError(str(error).splitlines()[0]) from None
    if settings.sync_bn and context.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.to(context.device, memory_format=memory_format)


def _load_weights(model: nn.Module, state_dict: dict, path: str) -> None:
    try:
        model.load_state_dict(state_dict)
    except (RuntimeError, ValueError, KeyError) as error:
        raise CheckpointError(f"{path} does not fit this model: {str(error).splitlines()[0]}") from None


def _restore(state: dict, path: str, model: nn.Module, recipe: Recipe, scaler, context: distributed.Context) -> None:
    """Put the model, its EMA, the optimiser, schedule, scaler and this process's generators back as ``state``
    has them."""
    _load_weights(model, state["model"], path)
    if recipe.ema is not None:
        _load_weights(recipe.ema.module, state["model_ema"], path)
    try:
        recipe.optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as error:
        raise CheckpointError(f"{path} does not fit this optimiser: {str(error).splitlines()[0]}") from None
    recipe.scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    checkpoint.restore_rng_state(state["rng"][context.rank])


def _checkpoint_to_resume(settings: argparse.Namespace, run_settings: dict, checkpoint_path: str):
    """The checkpoint state that ``--resume`` names, checked against this run, or None for a fresh run."""
    if settings.resume is None:
        if os.path.exists(checkpoint_path):
            raise CheckpointError(
                f"{checkpoint_path} exists: continue that run with --resume, or choose another --output"
            )
        _make_output_directory(settings.output)
        return None
    state = checkpoint.load(settings.resume)
    checkpoint.check_same_run(settings.resume, state.get("settings", {}), run_settings, SAME_RUN_KEYS)
    _make_output_directory(settings.output)
    return state


def _make_output_directory(path: str) -> None:
    """Create ``path`` and its parents, or raise TrainingError naming --output and what is in the way."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        existing = path
        while existing and not os.path.exists(existing):
            existing = os.path.dirname(existing)
        reason = f"{existing} is a file" if existing and not os.path.isdir(existing) else error.strerror
        raise TrainingError(f"--output {path}: cannot create that directory ({reason})") from None


def _announce(settings, context, data, model, start_epoch: int, stop_epoch: int) -> None:
    parameters = sum(p.numel() for p in model.parameters())
    tqdm.write(
        f"{settings.model}: {parameters / 1e6:.2f} M parameters, {data.num_classes} classes; "
        f"{len(data.train)} training and {len(data.val)} validation images of {settings.img_size}x{settings.img_size}; "
        f"{context.world_size} process(es) x {settings.batch_size} images per step on {context.device.type}; "
        f"{settings.opt}, lr {settings.lr:g}, {settings.sched} schedule, amp {settings.amp}; output {settings.output}"
    )
    if start_epoch >= stop_epoch:
        tqdm.write(f"nothing to do: the checkpoint is at epoch {start_epoch}")
    elif start_epoch:
        tqdm.write(f"resuming after epoch {start_epoch}")
