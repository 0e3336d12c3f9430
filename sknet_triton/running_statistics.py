"""nn.BatchNorm2d's running-statistics update, for units whose BatchNorm runs inside the kernels."""
import torch
from torch import Tensor, nn


@torch.no_grad()
def update_running_statistics(bn: nn.BatchNorm2d, mean: Tensor, var: Tensor, count: int) -> None:
    """nn.BatchNorm2d's training-time update from a batch's float32 [C] mean and biased variance over ``count``
    values: an exponential average with its momentum, or the cumulative average over num_batches_tracked when
    momentum is None; the running variance is unbiased. An empty batch (``count`` 0) counts as a batch and
    leaves the averages as they are."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            momentum = 1.0 / bn.num_batches_tracked
    if count == 0:
        return
    bn.running_mean.mul_(1 - momentum).add_(momentum * mean)
    bn.running_var.mul_(1 - momentum).add_(momentum * var * (count / (count - 1)))
