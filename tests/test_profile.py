"""perf/kernel_profile.py: grouping by name, and a tiny CPU run (sknet_tiny, eager training step)."""
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from perf import kernel_profile

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name, group", [
    ("sk_select_bwd_kernel", "SK ops"),
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32", "convolutions"),
    ("triton_poi_fused__native_batch_norm_legit_no_training_relu_12", "BatchNorm and activations"),
    ("aten::mkldnn_convolution", "convolutions"),
    ("triton_red_fused_mean_sum_3", "other"),
])
def test_group_by_name(name, group):
    assert kernel_profile.group_by_name(name) == group


def test_dry_run_groups_forward_and_backward_by_module(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "perf" / "kernel_profile.py"), "--dry-run", "--modes", "train",
                             "--variants", "eager", "--out", str(tmp_path)],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    [row] = pd.read_csv(tmp_path / "profile.csv").to_dict("records")
    assert row["status"] == "ok" and row["mode"] == "train"
    groups = [f"{g} ms" for g in kernel_profile.GROUPS]
    assert row["kernels ms"] == pytest.approx(sum(row[g] for g in groups))
    # Every group has work in a training step of an SK network; backward kernels carry their forward's group
    # (the CPU path's SK ops are plain operators, found only through the module ranges).
    assert all(row[g] > 0 for g in groups), row
    assert row["wall ms"] >= row["host ms"] > 0
    kernels = pd.read_csv(tmp_path / "kernels.csv")
    # Grouped by module, not by name: the CPU path's SK operators have no SK names.
    assert any(kernel_profile.group_by_name(k) != "SK ops" for k in kernels[kernels["group"] == "SK ops"]["kernel"])
    assert (tmp_path / "profile.md").read_text().count("## ") >= 2
