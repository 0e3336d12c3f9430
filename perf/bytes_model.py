"""The bytes model: the least memory traffic each SK op needs, and what eager timm moves instead.

Counts are in passes over one branch's N = B * C * H * W elements (DESIGN.md §5). The SK ops are
memory-bound, so a pass count times N times the element size is the floor their time is measured against.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from sknet_triton.families import FAMILIES

# SKNet-50 (timm skresnext50_32x4d): SK output channels and blocks per stage.
SKNET50_STAGES = ((128, 3), (256, 4), (512, 6), (1024, 3))
# ResNeSt-50 (timm resnest50d, radix 2): SplitAttn output channels and blocks per stage. Its average-pool
# downsampling follows the split attention, so a stage's first unit runs at the previous stage's resolution.
RESNEST50_STAGES = ((64, 3), (128, 4), (256, 6), (512, 3))
# The networks forward_bytes_table counts.
NETWORKS = ("sknet50", "resnest50d")
# The stem (a stride-2 convolution, then a stride-2 max pool) divides the resolution by 4.
STEM_HALVINGS = 2


def kernel_passes(family: str, M: int) -> int:
    """The least passes of one kernel family's launch: its registry entry's bytes model
    (each family's declaration, beside its op in sknet_triton/ops/, says what it reads and writes)."""
    return FAMILIES[family].passes(M)


def fused_forward_passes(M: int) -> int:
    """An SK unit's forward with the fused ops: fuse, then select; BatchNorm and ReLU in their prologue."""
    return kernel_passes("fuse_fwd", M) + kernel_passes("select_fwd", M)


def eager_forward_passes(M: int) -> int:
    """An SK unit's forward as timm's SelectiveKernel runs it in eager PyTorch, kernel by kernel."""
    batchnorm_and_relu = 4 * M  # each branch: BatchNorm reads and writes, ReLU reads and writes
    stack = 2 * M  # torch.stack copies the branches
    attention_sum = M + 1  # x.sum(1) reads M, writes 1
    mean = 1  # .mean((2, 3)) reads the sum
    multiply = 2 * M  # x * attention reads M, writes M
    select_sum = M + 1  # torch.sum(dim=1) reads M, writes 1
    return batchnorm_and_relu + stack + attention_sum + mean + multiply + select_sum


# Training mode (DESIGN.md §3, §5): every branch needs BatchNorm with the batch's statistics and a ReLU. Counts per
# SK unit after the convolutions (which write the raw branches Y_m either way).


def fused_training_forward_passes(M: int) -> int:
    """Statistics, then fuse and select with BatchNorm + ReLU in their prologue: 3M + 1."""
    return kernel_passes("bn_stats", M) + fused_forward_passes(M)


def fused_training_backward_passes(M: int) -> int:
    """The whole backward with BatchNorm inside the kernels: 3M + 2."""
    return kernel_passes("select_bn_bwd", M) + kernel_passes("fuse_bn_bwd", M)


def unfused_training_forward_passes(M: int) -> int:
    """BatchNorm and ReLU as separate ops before the fused ops (SKConv where the norm is not nn.BatchNorm2d)."""
    batchnorm = 3 * M  # statistics read; normalisation read, write
    relu = 2 * M  # in place: read, write
    return batchnorm + relu + fused_forward_passes(M)


def unfused_training_backward_passes(M: int) -> int:
    """Select's backward, fuse's broadcast gradient added to it, then ReLU's and BatchNorm's backward."""
    accumulate = 2 * M  # select's dU_m + fuse's expanded ds / HW: read, write
    relu = 3 * M  # read grad and output, write
    batchnorm = 5 * M  # read dZ and Y for the two sums, read them again and write dY
    return kernel_passes("select_bwd", M) + accumulate + relu + batchnorm


def eager_training_forward_passes(M: int) -> int:
    """timm's SelectiveKernel in training: the eager forward plus BatchNorm's statistics read."""
    return eager_forward_passes(M) + M


def eager_training_backward_passes(M: int) -> int:
    """timm's SelectiveKernel backward in eager PyTorch, kernel by kernel (an estimate: about 14M)."""
    multiply = 2 * M + 2 * M  # x * attention: dX (read dV per branch, write) and d(attention) (read dV and x)
    accumulate = 2 * M  # the stacked branches' two gradients (multiply, and the fuse sum's expanded one)
    relu = 3 * M
    batchnorm = 5 * M
    return multiply + accumulate + relu + batchnorm


def eager_split_attn_forward_passes(M: int) -> int:
    """A ResNeSt unit's forward as timm's SplitAttn runs it in eager PyTorch (NCHW, eval), after its
    convolution: bn0 and the ReLU over the M radix branches, then the sums and the weighted product."""
    batchnorm_and_relu = 4 * M  # bn0 reads and writes all M*C channels, the ReLU (in place) too
    attention_sum = M + 1  # x.sum(dim=1) reads M, writes 1
    mean = 1
    multiply = 2 * M  # x * attention reads M, writes M
    select_sum = M + 1
    return batchnorm_and_relu + attention_sum + mean + multiply + select_sum


def training_passes_table(M: int = 2) -> pd.DataFrame:
    """Passes over one branch per training-mode SK unit: BatchNorm inside the kernels, BatchNorm and ReLU as
    separate ops before the fused ops, and eager timm; and how many branch-sized tensors backward keeps."""
    rows = [
        ("forward", fused_training_forward_passes(M), unfused_training_forward_passes(M),
         eager_training_forward_passes(M)),
        ("backward", fused_training_backward_passes(M), unfused_training_backward_passes(M),
         eager_training_backward_passes(M)),
        # Y_m; Y_m and P_m; Y_m, P_m and the stacked copy the multiply keeps.
        ("kept for backward", M, 2 * M, 3 * M),
    ]
    return pd.DataFrame(rows, columns=["pass", "BatchNorm in the kernels", "separate BatchNorm + ReLU", "eager timm"])


def op_min_bytes(op: str, M: int, elements: int, element_size: int) -> int:
    """The least bytes ``op`` (a kernel family's name with a space: "fuse fwd") moves for branches of
    ``elements`` elements each."""
    return kernel_passes(op.replace(" ", "_"), M) * elements * element_size


@dataclass(frozen=True)
class SKStage:
    """SK units of one shape in one stage (numbered from 1): their output shape per image and how many there are."""

    stage: int
    channels: int
    height: int
    width: int
    units: int

    @property
    def elements(self) -> int:
        """Elements of one branch of one unit, per image."""
        return self.channels * self.height * self.width


def sknet50_stages(image_size: int = 224) -> list[SKStage]:
    """SKNet-50's SK units for square images of ``image_size``: every stride-2 layer rounds up."""
    size = image_size
    for _ in range(STEM_HALVINGS):
        size = math.ceil(size / 2)
    stages = []
    for index, (channels, units) in enumerate(SKNET50_STAGES):
        if index > 0:
            size = math.ceil(size / 2)
        stages.append(SKStage(index + 1, channels, size, size, units))
    return stages


def resnest50_stages(image_size: int = 224) -> list[SKStage]:
    """ResNeSt-50's SplitAttn units for square images of ``image_size``: each stage after the first has
    one unit at the previous resolution, then the rest at half of it (rounded up)."""
    size = image_size
    for _ in range(STEM_HALVINGS):
        size = math.ceil(size / 2)
    stages = []
    for index, (channels, units) in enumerate(RESNEST50_STAGES):
        if index == 0:
            stages.append(SKStage(1, channels, size, size, units))
            continue
        stages.append(SKStage(index + 1, channels, size, size, 1))
        size = math.ceil(size / 2)
        stages.append(SKStage(index + 1, channels, size, size, units - 1))
    return stages


def sknet50_elements_per_image(image_size: int = 224) -> int:
    """Elements of one branch summed over all 16 SK units of SKNet-50, per image (2.76 M at 224)."""
    return sum(stage.elements * stage.units for stage in sknet50_stages(image_size))


def forward_bytes_table(
    batch: int, element_size: int, image_size: int = 224, M: int = 2, copy_gbps: float | None = None,
    network: str = "sknet50",
) -> pd.DataFrame:
    """Eager and fused forward bytes of a network's SK units (``network``: one of :data:`NETWORKS`, SKNet-50's
    SK units or ResNeSt-50's SplitAttn units): per unit and per stage (ResNeSt's stages in two rows, the unit
    at the previous resolution first), and the total.

    The convolutions that produce the branches are left out: both ways write them once. With
    ``copy_gbps`` (a measured device-to-device copy bandwidth), adds the time each total takes at it.
    """
    if network not in NETWORKS:
        raise ValueError(f"forward_bytes_table: network must be one of {NETWORKS}, got {network!r}")
    stages = sknet50_stages(image_size) if network == "sknet50" else resnest50_stages(image_size)
    eager_passes = eager_forward_passes(M) if network == "sknet50" else eager_split_attn_forward_passes(M)
    rows = []
    for stage in stages:
        unit_bytes = stage.elements * batch * element_size
        rows.append({
            "stage": str(stage.stage),
            "SK output C×H×W": f"{stage.channels}×{stage.height}×{stage.width}",
            "units": stage.units,
            "eager MB/unit": eager_passes * unit_bytes / 1e6,
            "fused MB/unit": fused_forward_passes(M) * unit_bytes / 1e6,
        })
    table = pd.DataFrame(rows)
    table["eager MB"] = table["eager MB/unit"] * table["units"]
    table["fused MB"] = table["fused MB/unit"] * table["units"]
    total = {"stage": "all", "SK output C×H×W": "", "units": table["units"].sum(),
             "eager MB": table["eager MB"].sum(), "fused MB": table["fused MB"].sum()}
    table = pd.concat([table, pd.DataFrame([total])], ignore_index=True)
    table["eager / fused"] = table["eager MB"] / table["fused MB"]
    if copy_gbps:
        # MB / (GB/s) = ms
        table["eager ms at copy BW"] = table["eager MB"] / copy_gbps
        table["fused ms at copy BW"] = table["fused MB"] / copy_gbps
    return table
