"""perf/ops.py without a GPU: the --host-only measurement and the words of the limit column."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

from perf import ops

REPO = Path(__file__).resolve().parents[1]


def test_limit_names_the_time_that_sets_the_call():
    assert ops.limit(call_us=105, gpu_us=100, host_us=20, percent_copy=90) == "GPU, at bandwidth"
    assert ops.limit(call_us=105, gpu_us=100, host_us=20, percent_copy=40) == "GPU, kernels under bandwidth"
    assert ops.limit(call_us=50, gpu_us=10, host_us=45, percent_copy=90) == "host"
    assert ops.limit(call_us=50, gpu_us=10, host_us=20, percent_copy=90) == "launch/other"
    assert ops.limit(call_us=math.nan, gpu_us=10, host_us=20, percent_copy=90) == ""


def test_host_only_records_one_launch_per_op(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, str(REPO / "perf" / "ops.py"), "--host-only", "--calls", "20",
                             "--out", str(tmp_path)], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    table = pd.read_csv(tmp_path / "host_only.csv")
    assert len(table) == len(ops.OPS) * len(ops.DTYPES) * len(ops.LAYOUTS)
    assert (table["launches per call"] == 1).all()
    assert (table["kernel"] == table["op"].str.replace(" ", "_")).all()
    # Host times are measured, not asserted against each other: on a loaded machine the launcher alone can
    # time slower than a whole call, so only their presence is checked.
    assert (table["call µs"] > 0).all() and (table["launcher µs"] > 0).all()
    forward = table[table["op"].str.endswith("fwd")]
    assert forward["validation µs"].gt(0).all() and table[~table.index.isin(forward.index)]["validation µs"].isna().all()
