"""A training run from start (or checkpoint) to end: model, optimiser, data, epochs, checkpoints, reports."""
from __future__ import annotations

import argparse
import os
import random

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from sknet_triton import create_model
from sknet_triton.training import checkpoint, distributed
from sknet_triton.training.data import build_datasets, build_loaders, set_epoch
from sknet_triton.training.errors import CheckpointError, TrainingError
from sknet_triton.training.loop import evaluate, train_one_epoch, warmup_cosine
from sknet_triton.training.options import MOMENTUM, resolve
from sknet_triton.training.report import CSV_FILENAME, describe, epoch_row, write_csv

__all__ = ["train", "SAME_RUN_KEYS"]

# Settings a resumed run must share with its checkpoint: the model's shape, and everything that decides
# the trajectory of the weights (schedule, global batch, data, precision, seed).
SAME_RUN_KEYS = (
    "model", "num_classes", "img_size", "synthetic_size", "epochs", "warmup_epochs", "batch_size", "world_size",
    "lr", "weight_decay", "amp", "sync_bn", "seed",
)
AMP_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


def train(args: argparse.Namespace) -> None:
    """Run the training that ``args`` (from :func:`sknet_triton.training.options.parse_args`) describes.

    Raises TrainingError for bad data, options or checkpoints.
    """
    context = distributed.init()
    try:
        _train(args, context)
    finally:
        distributed.shutdown(context)


def _train(args: argparse.Namespace, context: distributed.Context) -> None:
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    settings = resolve(args, context.world_size, local_world_size, cuda=context.device.type == "cuda")
    if settings.sync_bn and context.distributed and context.device.type != "cuda":
        raise TrainingError("--sync-bn needs GPUs: SyncBatchNorm does not run on the CPU")
    if context.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest convolution algorithms
        torch.set_float32_matmul_precision("high")  # TF32, as cuDNN's convolutions already use

    data = build_datasets(settings.data, settings.img_size, settings.seed, settings.synthetic_size)
    run_settings = {**vars(settings), "num_classes": data.num_classes, "world_size": context.world_size}
    checkpoint_path = os.path.join(settings.output, checkpoint.FILENAME)
    state = distributed.run_on_main(context, lambda: _checkpoint_to_resume(settings, run_settings, checkpoint_path))

    memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
    model = _build_model(settings, context, data.num_classes, memory_format)
    train_loader, val_loader = build_loaders(
        data, settings.batch_size, settings.workers, settings.seed, context.rank, context.world_size,
        pin_memory=context.device.type == "cuda",
    )
    steps_per_epoch = len(train_loader)
    optimizer = torch.optim.SGD(_parameter_groups(model, settings.weight_decay), lr=settings.lr, momentum=MOMENTUM)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(round(settings.warmup_epochs * steps_per_epoch), settings.epochs * steps_per_epoch)
    )
    scaler = torch.amp.GradScaler(context.device.type, enabled=settings.amp == "fp16")
    if state is None:
        start_epoch, history = 0, []
        # Different draws per process from here on (dropout); data order and augmentation do not use them.
        random.seed(settings.seed + context.rank)
        torch.manual_seed(settings.seed + context.rank)
    else:
        start_epoch, history = state["epoch"], state["history"]
        _restore(state, settings.resume, model, optimizer, scheduler, scaler, context)

    train_model = model
    if context.distributed:
        train_model = DistributedDataParallel(model, device_ids=[context.device.index] if context.device.type == "cuda" else None)
    if settings.compile:
        train_model = torch.compile(train_model)

    stop_epoch = settings.stop_after_epoch or settings.epochs
    amp_dtype = AMP_TORCH_DTYPES[settings.amp]
    if context.is_main:
        _announce(settings, context, data, model, start_epoch, stop_epoch)
    for epoch in range(start_epoch, stop_epoch):
        set_epoch(train_loader, epoch)
        lr = optimizer.param_groups[0]["lr"]
        train_metrics = train_one_epoch(
            train_model, train_loader, optimizer, scheduler, scaler, context, amp_dtype, memory_format,
            description=f"epoch {epoch + 1}/{settings.epochs}",
        )
        distributed.broadcast_buffers(context, model)
        if not distributed.replicas_identical(context, model):
            raise RuntimeError(f"after epoch {epoch + 1}, the processes hold different weights")
        val_metrics = evaluate(model, val_loader, context, amp_dtype, memory_format)
        history.append(epoch_row(epoch + 1, lr, train_metrics, val_metrics))
        rng_states = distributed.all_gather_objects(context, checkpoint.rng_state())
        if context.is_main:
            checkpoint.save(checkpoint_path, {
                "epoch": epoch + 1,
                "settings": run_settings,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": rng_states,
                "history": history,
            })
            write_csv(os.path.join(settings.output, CSV_FILENAME), history)
            tqdm.write(describe(history[-1], settings.epochs))
    if context.is_main and context.distributed and stop_epoch > start_epoch:
        tqdm.write(f"weights identical on all {context.world_size} processes after every epoch")


def _build_model(
    settings: argparse.Namespace, context: distributed.Context, num_classes: int, memory_format: torch.memory_format
) -> nn.Module:
    # The same initial weights on every process (DDP would broadcast rank 0's anyway).
    random.seed(settings.seed)
    torch.manual_seed(settings.seed)
    # The models run their SK units through the Triton kernels on CUDA, and through plain PyTorch on the
    # CPU (unless TRITON_INTERPRET=1 asks for the kernels' interpreter, a debugging aid).
    model = create_model(settings.model, num_classes=num_classes)
    if settings.sync_bn and context.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.to(context.device, memory_format=memory_format)


def _restore(state: dict, path: str, model, optimizer, scheduler, scaler, context: distributed.Context) -> None:
    """Put the model, optimiser, schedule, scaler and this process's generators back as ``state`` has them."""
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as error:
        raise CheckpointError(f"{path} does not fit this model: {str(error).splitlines()[0]}") from None
    scheduler.load_state_dict(state["scheduler"])
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


def _parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay for weight matrices and kernels; none for biases and normalisation parameters (1-D)."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim > 1 else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _announce(settings, context, data, model, start_epoch: int, stop_epoch: int) -> None:
    parameters = sum(p.numel() for p in model.parameters())
    tqdm.write(
        f"{settings.model}: {parameters / 1e6:.2f} M parameters, {data.num_classes} classes; "
        f"{len(data.train)} training and {len(data.val)} validation images of {settings.img_size}x{settings.img_size}; "
        f"{context.world_size} process(es) x {settings.batch_size} images per step on {context.device.type}; "
        f"lr {settings.lr:g}, amp {settings.amp}; output {settings.output}"
    )
    if start_epoch >= stop_epoch:
        tqdm.write(f"nothing to do: the checkpoint is at epoch {start_epoch}")
    elif start_epoch:
        tqdm.write(f"resuming after epoch {start_epoch}")
