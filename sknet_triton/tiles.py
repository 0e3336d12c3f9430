"""The tile shapes the kernels can be launched with: what a configuration's tile_bytes becomes for each
layout and kernel, and every shape a launch can reach (which the ahead-of-time check compiles)."""
from __future__ import annotations

from sknet_triton.tuned import Config

# channels_last tiles are BLOCK_C wide along the contiguous channels (the narrowest that covers C);
# NCHW tiles are BLOCK_HW long along the contiguous positions, the longest that pads H*W by at most 1/16
# (else the least padding).
CHANNELS_LAST_BLOCK_C = (32, 64, 128)
NCHW_BLOCK_HW = (256, 64, 16)
# The split kernel's channel blocks: the FMA loop's by layout (channels_last: wide along the contiguous
# channels; NCHW: narrow, the positions being contiguous), the tl.dot path's within one group (the
# narrowest that covers group_out), and its reduction step over a group's input channels.
SPLIT_FMA_BLOCK_C = {True: 32, False: 16}
SPLIT_FMA_BLOCK_K = 16  # unused by the FMA loop; one value, so that it adds no specialization
SPLIT_DOT_BLOCK_C = (16, 32, 64)
SPLIT_DOT_BLOCK_K = (16, 32)
# tl.dot needs a product of at least 16 along each of its dimensions.
DOT_MIN = 16


def tile_shape(channels_last: bool, C: int, HW: int, tile: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_HW) for a tile of ``tile`` elements over [C, HW] branches."""
    if channels_last:
        block_c = next((b for b in CHANNELS_LAST_BLOCK_C if b >= C), CHANNELS_LAST_BLOCK_C[-1])
        return block_c, tile // block_c

    def padding(block_hw):
        return -HW % block_hw

    block_hw = next((b for b in NCHW_BLOCK_HW if 16 * padding(b) <= HW), None)
    if block_hw is None:
        block_hw = min(NCHW_BLOCK_HW, key=lambda b: (padding(b), -b))
    return tile // block_hw, block_hw


def reachable_tile_shapes(tile: int) -> list[tuple[bool, int, int]]:
    """Every (CHANNELS_LAST, BLOCK_C, BLOCK_HW) that :func:`tile_shape` can return for this tile."""
    return [(True, b, tile // b) for b in CHANNELS_LAST_BLOCK_C] + [(False, tile // b, b) for b in NCHW_BLOCK_HW]


def split_blocks(channels_last: bool, group_in: int, group_out: int) -> tuple[bool, int, int]:
    """(USE_DOT, BLOCK_C, BLOCK_K) of the split kernel for groups of ``group_in`` input and ``group_out``
    output channels: tl.dot where both of its dimensions reach DOT_MIN, else the FMA loop."""
    if group_out >= DOT_MIN and 9 * group_in >= DOT_MIN:
        block_c = next((b for b in SPLIT_DOT_BLOCK_C if b >= group_out), SPLIT_DOT_BLOCK_C[-1])
        block_k = next((b for b in SPLIT_DOT_BLOCK_K if b >= group_in), SPLIT_DOT_BLOCK_K[-1])
        return True, block_c, block_k
    return False, SPLIT_FMA_BLOCK_C[channels_last], SPLIT_FMA_BLOCK_K


def split_block_p(config: Config, block_c: int) -> int:
    """BLOCK_P of the split kernel: the positions of a float32 [BLOCK_P, BLOCK_C] tile of config.tile_bytes."""
    return max(DOT_MIN, config.tile_bytes // 4 // block_c)
