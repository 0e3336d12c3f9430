"""Every kernel specialization the launcher can choose compiles ahead of time for sm_80 and sm_90, unspilled,
the streaming kernels in 16-byte loads.

Triton's own compiler runs without a GPU; the kernels must be the real @triton.jit functions, so the
compilation runs in a subprocess without TRITON_INTERPRET. The per-kernel table goes to a file; the
summary line goes to the test log.
"""
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def test_every_specialization_compiles_without_spills(tmp_path, capsys):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    table = tmp_path / "aot.csv"
    result = subprocess.run(
        [sys.executable, str(ROOT / "perf" / "aot.py"), "--arch", "80", "90", "--out", str(table)],
        env=env, capture_output=True, text=True, timeout=1800,
    )
    with capsys.disabled():
        print("\n" + result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-2000:])
    assert result.returncode == 0, f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    rows = pd.read_csv(table)
    assert len(rows) > 0 and (rows.spill_stores == 0).all() and (rows.spill_loads == 0).all()
    assert (rows[rows.streaming].widest_load_bytes >= 16).all() and rows.streaming.any()
    assert set(rows.arch) == {80, 90}
