"""Every kernel specialization the launcher can choose compiles ahead of time for sm_80 and sm_90, unspilled,
loading in vectors as wide as their tiles allow (the kernels that stream dense tiles).

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
    with capsys.disabled():  # the compiler's progress bar (stderr) and summary line belong in the CI log
        print()
        result = subprocess.run(
            [sys.executable, str(ROOT / "perf" / "aot.py"), "--arch", "80", "90", "--out", str(table)],
            env=env, stdout=subprocess.PIPE, text=True, timeout=1800,
        )
        print(result.stdout.strip())
    assert result.returncode == 0, result.stdout[-4000:]
    rows = pd.read_csv(table)
    assert len(rows) > 0 and (rows.spill_stores == 0).all() and (rows.spill_loads == 0).all()
    assert (rows.widest_load_bytes >= rows.vector_bytes).all() and (rows.vector_bytes >= 8).any()
    assert set(rows.arch) == {80, 90}
