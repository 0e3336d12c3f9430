"""One process or many: process-group setup from torchrun's environment, and the collectives the trainer uses."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from sknet_triton.training.errors import TrainingError

T = TypeVar("T")

__all__ = ["Context", "init", "shutdown", "all_reduce_sum", "broadcast_buffers", "all_gather_objects", "run_on_main",
           "replicas_identical"]


@dataclass(frozen=True)
class Context:
    """Where this process stands: its rank among ``world_size`` processes and its device."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Whether this process logs and writes checkpoints (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether a process group is running (launched by torchrun)."""
        return dist.is_available() and dist.is_initialized()


def init() -> Context:
    """Join torchrun's process group if launched by it (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
    in the environment), else run alone. Each process takes the GPU of its LOCAL_RANK, and the group
    communicates over NCCL; without CUDA, processes run on the CPU and communicate over gloo."""
    use_cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return Context(rank=0, local_rank=0, world_size=1, device=torch.device("cuda" if use_cuda else "cpu"))
    try:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError) as error:
        raise TrainingError(f"RANK is set but the distributed environment is incomplete or invalid ({error}); launch with torchrun") from None
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise TrainingError(f"LOCAL_RANK {local_rank}, but this machine has {torch.cuda.device_count()} GPUs")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world_size)
    return Context(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def shutdown(context: Context) -> None:
    """Leave the process group, if any."""
    if context.distributed:
        dist.destroy_process_group()


def all_reduce_sum(context: Context, values: torch.Tensor) -> torch.Tensor:
    """``values`` summed over all processes (in place; returned for convenience)."""
    if context.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast_buffers(context: Context, model: nn.Module) -> None:
    """Give every process rank 0's buffers (BatchNorm running statistics).

    DistributedDataParallel averages gradients, so parameters agree, but each process updates its running
    statistics from its own batches; rank 0's become everyone's, as DDP does at each forward.
    """
    if context.distributed:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def all_gather_objects(context: Context, value) -> list:
    """``value`` of every process, by rank (a picklable object)."""
    if not context.distributed:
        return [value]
    values = [None] * context.world_size
    dist.all_gather_object(values, value)
    return values


def run_on_main(context: Context, function: Callable[[], T]) -> T:
    """``function()`` computed by rank 0 alone and handed to every process (picklable); a TrainingError it
    raises is raised by every process, so that all stop together with the same message."""
    outcome = None
    if context.is_main:
        try:
            outcome = function()
        except TrainingError as error:
            outcome = error
    if context.distributed:
        box = [outcome]
        dist.broadcast_object_list(box, src=0)
        outcome = box[0]
    if isinstance(outcome, TrainingError):
        raise outcome
    return outcome


def replicas_identical(context: Context, model: nn.Module) -> bool:
    """Whether every process holds exactly the same parameters and buffers as every other.

    Compares the elementwise maximum and minimum over processes: they agree only where all values are equal.
    """
    if not context.distributed:
        return True
    identical = True
    for tensor in model.state_dict().values():
        largest = tensor.detach().to(torch.float64, copy=True)  # exact for every float dtype and the integer counters
        smallest = largest.clone()
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
        dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
        identical = torch.equal(largest, smallest) and identical  # every process runs every collective
    return identical
