"""perf/tune.py and the configuration override it times candidates with (perf/forcing.py)."""
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch

from perf import tune, tune_split
from perf.forcing import forcing_config
from perf.recording import recording
from sknet_triton import families, planning, tuned
from sknet_triton.ops.select import select_forward
from tests.helpers import requires_kernels
from tests.ops_inputs import make_branches, make_logits

REPO = Path(__file__).resolve().parents[1]
FORCED = tuned.Config(tile_bytes=2048, num_warps=2, num_stages=2, programs_per_sm=1)


def select_launch():
    branches = make_branches((2, 24, 9, 11), 2, torch.float32, True, stacked=False)
    with recording() as launches:
        select_forward(branches, make_logits(2, 2, 24, torch.float32), None, None, False)
    return launches[0]


@requires_kernels
def test_forcing_config_steers_every_launch_and_ends_with_the_block():
    before = select_launch()
    select_bwd, split_fwd = families.FAMILIES["select_bwd"], families.FAMILIES["split_fwd"]
    with forcing_config(FORCED):
        assert planning.device_config(select_bwd, torch.device("cpu"), torch.bfloat16, False, 3, 1, 1, 1) == FORCED
        forced = select_launch()
    with forcing_config(FORCED, "split_fwd"):  # one family's: the others keep their own
        assert planning.device_config(split_fwd, torch.device("cpu"), torch.bfloat16, False, 3, 1, 1, 1) == FORCED
        assert select_launch().options == before.options
    assert tuned.tuned_table(None) == ()
    after = select_launch()
    assert forced.options == dict(num_warps=FORCED.num_warps, num_stages=FORCED.num_stages)
    assert forced.constexprs["BLOCK_C"] * forced.constexprs["BLOCK_HW"] == FORCED.tile_bytes // 4
    # The cached plan of the block is gone with it: the same problem launches as before.
    assert after.options == before.options != forced.options
    assert after.constexprs == before.constexprs


def test_dry_run_writes_a_table_launch_reads(tmp_path):
    table = tmp_path / "sm_test.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, str(REPO / "perf" / "tune.py"), "--dry-run", "--dtypes", "fp32",
                             "--layouts", "channels_last", "--table", str(table), "--out", str(tmp_path)],
                            capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(table.read_text())
    assert {"arch", "gpu", "torch", "triton", "commit", "entries"} <= set(data)
    entries = tuned.read_table(table)
    # Every family the registry sweeps, the training-mode BatchNorm kernels among them.
    assert {"bn_stats", "select_bn_bwd", "fuse_bn_bwd"} <= set(tune.SWEPT)
    assert set(tune.SWEPT) == set(families.FAMILIES) - {tune_split.SPLIT_FAMILY}
    assert {(e.family, e.channels_last) for e in entries if e.family != tune_split.SPLIT_FAMILY} == {
        (f, True) for f in tune.SWEPT}
    winners = pd.read_csv(tmp_path / "winners.csv")
    assert (winners["check err"] < 1e-4).all()
    swept = winners[winners["family"] != tune_split.SPLIT_FAMILY]
    assert (swept["status"] == "ok").all()
    # The split kernel against cuDNN, one SK unit: an entry only where it was faster.
    split = winners[winners["family"] == tune_split.SPLIT_FAMILY]
    assert split["channels_last"].tolist() == [True]
    assert ((split["best µs"] < split["cudnn µs"]) == (split["status"] == "ok")).all()
    assert sum(e.family == tune_split.SPLIT_FAMILY for e in entries) == (split["status"] == "ok").sum()
    candidates = pd.read_csv(tmp_path / "tune.csv")
    assert set(candidates["stage"]) == {1, 2, 3} and candidates["µs"].gt(0).all()
    # Each winner is the fastest candidate measured for its problem.
    for winner in winners.to_dict("records"):
        mine = candidates[(candidates["family"] == winner["family"]) & (candidates["channels_last"] == winner["channels_last"])]
        assert winner["best µs"] == mine["µs"].min()


def test_table_keeps_each_configuration_whole(tmp_path):
    """A register budget is written where a configuration has one (the split kernel's), and only there."""
    split, fuse = families.FAMILIES[tune_split.SPLIT_FAMILY].defaults[2], families.FAMILIES["fuse_fwd"].defaults[2]
    assert split.maxnreg is not None and fuse.maxnreg is None
    problem = {"dtype": "bf16", "channels_last": True, "B": 8, "C": 64, "H": 7, "W": 7, "status": "ok"}
    winners = pd.DataFrame([{**problem, "family": tune_split.SPLIT_FAMILY, **asdict(split)},
                            {**problem, "family": "fuse_fwd", **asdict(fuse)},
                            {**problem, "family": "fuse_bwd", **asdict(fuse), "status": "wrong"}])
    stamp = {"gpu": "test", "torch": "0", "triton": "0", "commit": "0", "date": "0"}
    table = tmp_path / "sm_test.json"
    tuned.write_table(table, "sm_test", stamp, tune.tuned_entries(winners))
    assert "maxnreg" not in json.loads(table.read_text())["entries"][1]["config"]
    assert [(e.family, e.config, e.HW) for e in tuned.read_table(table)] == [
        (tune_split.SPLIT_FAMILY, split, 49), ("fuse_fwd", fuse, 49)]
