"""SK's attention between the fuse and the select, and the rules for its width."""
from typing import Callable, Union

from timm.layers import make_divisible
from torch import Tensor, nn

from sknet_triton.checks import check_int, is_integer

AttnWidth = Union[None, int, Callable[[int], int]]


def paper_attn_width(r: int = 16, L: int = 32) -> Callable[[int], int]:
    """The paper's attention width, ``d = max(C // r, L)``."""
    r = check_int("paper_attn_width", "r", r, 1)
    L = check_int("paper_attn_width", "L", L, 1)
    return lambda channels: max(channels // r, L)


def timm_attn_width(rd_ratio: float = 1 / 16, rd_divisor: int = 8) -> Callable[[int], int]:
    """timm's attention width, ``make_divisible(C * rd_ratio, rd_divisor)`` (timm's own ``make_divisible``)."""
    if isinstance(rd_ratio, bool) or not isinstance(rd_ratio, (int, float)):
        raise TypeError(f"timm_attn_width: rd_ratio must be a number, got {type(rd_ratio).__name__} {rd_ratio!r}")
    if not rd_ratio > 0:
        raise ValueError(f"timm_attn_width: rd_ratio must be above 0, got {rd_ratio!r}")
    rd_divisor = check_int("timm_attn_width", "rd_divisor", rd_divisor, 1)
    return lambda channels: make_divisible(channels * rd_ratio, rd_divisor)


def attn_channels(owner: str, attn_width: AttnWidth, r: int, L: int, channels: int) -> int:
    """The attention width ``attn_width`` (None: the paper's rule with ``r`` and ``L``; an int; a callable
    C -> d) gives for ``channels`` channels, checked to be a positive integer."""
    if attn_width is None:
        attn_width = paper_attn_width(r, L)
    elif not callable(attn_width):
        return check_int(owner, "attn_width", attn_width, 1)
    width = attn_width(channels)
    if not is_integer(width) or width < 1:
        raise ValueError(f"{owner}: attn_width({channels}) must give a positive integer, got {width!r}")
    return int(width)


class SKAttention(nn.Module):
    """Fuse's squeeze and Select's logits: s [B, C] -> fc_reduce -> BN -> act -> fc_select -> [B, M, C]."""

    def __init__(
        self,
        channels: int,
        num_paths: int,
        attn_channels: int,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
        act_layer: Callable[..., nn.Module] = nn.ReLU,
    ):
        super().__init__()
        self.num_paths = num_paths
        self.fc_reduce = nn.Conv2d(channels, attn_channels, kernel_size=1, bias=False)
        self.bn = norm_layer(attn_channels)
        self.act = act_layer(inplace=True)
        self.fc_select = nn.Conv2d(attn_channels, channels * num_paths, kernel_size=1, bias=False)

    def forward(self, s: Tensor) -> Tensor:
        """s: [B, C] (float32 from sk_fuse). Returns logits [B, M, C]."""
        x = s.to(self.fc_reduce.weight.dtype)[:, :, None, None]
        x = self.fc_select(self.act(self.bn(self.fc_reduce(x))))
        # Every size named: an empty batch leaves -1 nothing to infer from.
        return x.view(x.shape[0], self.num_paths, x.shape[1] // self.num_paths)
