"""Planning one launch: which configuration (the tuned table of the device's architecture, else the
family's default), its launch options as the device's chip takes them (:mod:`sknet_triton.targets`), and how
the work is cut into programs. A family is the :class:`sknet_triton.ops.launch.Family` declared beside its op."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from sknet_triton import targets, tuned
from sknet_triton.dtypes import DTYPE_NAMES
from sknet_triton.tiles import split_block_p, split_blocks, tile_shape
from sknet_triton.tuned import Config, TunedEntry

# The interpreter runs programs one by one: on the CPU only a few (still more than one chunk, so that
# tests cover the chunked reductions).
CPU_MIN_PROGRAMS = 4


def clear_plans() -> None:
    """Forget every cached plan (after a change to what they depend on: the tables, the device's program
    count)."""
    plan.cache_clear()
    split_plan.cache_clear()


def choose_config(
    table: Sequence[TunedEntry], family, dtype: torch.dtype, channels_last: bool, M: int, B: int, C: int, HW: int
) -> Config:
    """The configuration measured for the nearest problem of the same kind (``family``, dtype, layout, M), by
    distance in log B, log C, log H*W; the family's default where the table has none of that kind."""
    name = DTYPE_NAMES[dtype]
    kind = [e for e in table if (e.family, e.dtype, e.channels_last, e.M) == (family.name, name, channels_last, M)]
    if not kind:
        return family.defaults[M]

    def distance(e: TunedEntry) -> float:
        return sum(abs(math.log(a / b)) for a, b in ((e.B, max(B, 1)), (e.C, C), (e.HW, HW)))

    return min(kind, key=distance).config


def device_config(family, device: torch.device, dtype: torch.dtype, channels_last: bool, M: int, B: int, C: int,
                  HW: int) -> Config:
    """:func:`choose_config` from the tuned table of ``device``'s architecture."""
    return choose_config(tuned.tuned_table(tuned.arch_name(device)), family, dtype, channels_last, M, B, C, HW)


def launch_options(config: Config, device: torch.device) -> dict:
    """Triton's launch options of ``config`` on ``device``: as its chip takes them (warps within a block's
    threads at its warp or wavefront size; a register budget only for NVIDIA's ptxas); as the configuration
    says for the interpreter."""
    arch = tuned.arch_name(device)
    return config.options() if arch is None else targets.target(arch).launch_options(config.options())


def reachable_configs(family, M: int) -> set[Config]:
    """The configurations :func:`plan` can choose for ``family`` and M: the default and every tuned one."""
    tuned_configs = {e.config for table in tuned.tuned_tables().values() for e in table
                     if (e.family, e.M) == (family.name, M)}
    return {family.defaults[M]} | tuned_configs


@dataclass(frozen=True)
class Plan:
    """One launch: a (B, num_c_blocks, num_splits) grid of programs and the kernel's launch options."""

    block_c: int
    block_hw: int
    num_c_blocks: int
    num_splits: int
    chunk: int  # positions per split, a multiple of block_hw
    options: dict  # Triton's launch options (num_warps, num_stages, ...)


def min_programs(device: torch.device, config: Config) -> int:
    """How many programs a launch should have at least, when the shape allows."""
    if device.type == "cuda":
        return config.programs_per_sm * torch.cuda.get_device_properties(device).multi_processor_count
    return CPU_MIN_PROGRAMS


@functools.lru_cache(maxsize=4096)
def plan(
    family, B: int, C: int, HW: int, M: int, dtype: torch.dtype, channels_last: bool,
    device: torch.device, deterministic: bool = False,
) -> Plan:
    """Cut [B, C, HW] into tiles and the H*W axis into as few chunks as fill the device.

    ``deterministic`` (``torch.use_deterministic_algorithms``) keeps one chunk per image and channel
    block, so that no two programs add into the same output element and results repeat bitwise.
    """
    config = device_config(family, device, dtype, channels_last, M, B, C, HW)
    block_c, block_hw = tile_shape(channels_last, C, HW, config.tile_bytes // dtype.itemsize)
    num_c_blocks = math.ceil(C / block_c)
    num_splits, chunk = chunking(B * num_c_blocks, HW, block_hw, device, config, deterministic)
    return Plan(block_c, block_hw, num_c_blocks, num_splits, chunk, launch_options(config, device))


def chunking(
    programs: int, length: int, block: int, device: torch.device, config: Config, deterministic: bool
) -> tuple[int, int]:
    """(number of chunks, chunk length, a multiple of ``block``) of an axis of ``length`` positions, cut into
    as few chunks as give ``programs`` programs per chunk enough to fill the device; one chunk when
    ``deterministic``."""
    blocks = math.ceil(length / block)
    wanted = 1 if deterministic else math.ceil(min_programs(device, config) / max(1, programs))
    chunk = math.ceil(blocks / max(1, min(wanted, blocks))) * block
    return math.ceil(length / chunk), chunk


@dataclass(frozen=True)
class SplitPlan(Plan):
    """A launch of the split kernel: its tiles are [block_hw = BLOCK_P output positions, block_c channels],
    with tl.dot (``use_dot``, a reduction step of block_k input channels) or the FMA loop."""

    use_dot: bool = False
    block_k: int = 0


@functools.lru_cache(maxsize=1024)
def split_plan(
    family, B: int, C: int, HW: int, M: int, group_in: int, group_out: int, dtype: torch.dtype, channels_last: bool,
    device: torch.device, deterministic: bool = False,
) -> SplitPlan:
    """Cut the split kernel's [B, C, HW] output (HW output positions, groups of ``group_in`` input and
    ``group_out`` output channels) into tiles and chunks, as :func:`plan` does for the other kernels. A
    tl.dot channel block never straddles a group."""
    config = device_config(family, device, dtype, channels_last, M, B, C, HW)
    use_dot, block_c, block_k = split_blocks(channels_last, group_in, group_out)
    num_c_blocks = (C // group_out) * math.ceil(group_out / block_c) if use_dot else math.ceil(C / block_c)
    block_p = split_block_p(config, block_c)
    num_splits, chunk = chunking(B * num_c_blocks, HW, block_p, device, config, deterministic)
    options = launch_options(config, device)
    return SplitPlan(block_c, block_p, num_c_blocks, num_splits, chunk, options, use_dot, block_k)
