"""SKConv's constructor: every bad argument is a one-line TypeError or ValueError naming it, before any
module is built; good arguments of other integer types are accepted."""
import re

import numpy as np
import pytest
import torch

from sknet_triton import SKConv, set_backend
from sknet_triton.attention import paper_attn_width, timm_attn_width

BAD_ARGUMENTS = {
    "groups 0": (dict(groups=0), ValueError, "groups must be a positive integer, got 0"),
    "negative groups": (dict(groups=-4), ValueError, "groups must be a positive integer, got -4"),
    "attn_width 0": (dict(attn_width=0), ValueError, "attn_width must be a positive integer, got 0"),
    "attn_width rule giving 0": (
        dict(attn_width=lambda channels: 0), ValueError, "attn_width(64) must give a positive integer, got 0"
    ),
    "attn_width rule giving a float": (
        dict(attn_width=lambda channels: channels / 4), ValueError, "attn_width(64) must give a positive integer, got 16.0"
    ),
    "attn_width float": (dict(attn_width=8.0), TypeError, "attn_width must be an integer, got float"),
    "out_channels 0": (dict(out_channels=0), ValueError, "out_channels must be a positive integer, got 0"),
    "negative stride": (dict(stride=-1), ValueError, "stride must be a positive integer, got -1"),
    "stride bool": (dict(stride=True), TypeError, "stride must be an integer, got bool"),
    "dilation 0": (dict(dilation=0), ValueError, "dilation must be a positive integer, got 0"),
    "r 0": (dict(r=0), ValueError, "r must be a positive integer, got 0"),
    "L float": (dict(L=32.0), TypeError, "L must be an integer, got float"),
    "M float": (dict(M=2.0), TypeError, "M must be an integer, got float"),
    "M 1": (dict(M=1), ValueError, "M must be 2 to 4, got 1"),
    "M bool": (dict(M=True), TypeError, "M must be an integer, got bool"),
    "kernel_sizes int": (dict(kernel_sizes=5), TypeError, "kernel_sizes must be a sequence of odd integers, got 5"),
    "kernel_sizes even": (dict(kernel_sizes=[3, 4]), ValueError, "kernel sizes must be odd integers >= 3, got [3, 4]"),
    "split_input int": (dict(split_input=1), TypeError, "split_input must be True or False, got int"),
    "keep_3x3 text": (dict(keep_3x3="no"), TypeError, "keep_3x3 must be True or False, got str"),
}


@pytest.mark.parametrize("kwargs, error, message", BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_bad_argument_is_a_one_line_error_naming_it(kwargs, error, message):
    with pytest.raises(error, match=re.escape(f"SKConv: {message}")) as raised:
        SKConv(64, **kwargs)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    "in_channels, error", [(0, ValueError), (-64, ValueError), (64.0, TypeError), (None, TypeError)]
)
def test_bad_in_channels(in_channels, error):
    with pytest.raises(error, match="SKConv: in_channels must be"):
        SKConv(in_channels)


def test_attention_width_rules_check_their_arguments():
    with pytest.raises(ValueError, match="paper_attn_width: r must be a positive integer, got 0"):
        paper_attn_width(r=0)
    with pytest.raises(ValueError, match="timm_attn_width: rd_divisor must be a positive integer, got 0"):
        timm_attn_width(rd_divisor=0)
    with pytest.raises(ValueError, match="timm_attn_width: rd_ratio must be above 0, got -0.5"):
        timm_attn_width(rd_ratio=-0.5)


def test_integers_of_other_types_are_accepted_as_ints():
    unit = SKConv(np.int64(32), torch.tensor(16).item(), stride=np.int32(2), groups=np.int64(4), attn_width=np.int64(8),
                  kernel_sizes=(np.int64(3), 5)).eval()
    assert (unit.in_channels, unit.out_channels, unit.attn.fc_reduce.out_channels) == (32, 16, 8)
    assert type(unit.in_channels) is int and unit.paths[0].conv.groups == 4
    with torch.no_grad():
        assert set_backend(unit, "torch")(torch.randn(2, 32, 8, 8)).shape == (2, 16, 4, 4)
