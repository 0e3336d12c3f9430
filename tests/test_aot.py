"""The kernel specializations the launcher can choose compile ahead of time for sm_80 and sm_90, unspilled,
loading in vectors as wide as their tiles allow (the kernels that stream dense tiles): here the sample of
``perf/aot.py --sample`` (M = 2 in bfloat16, every family, configuration, tile shape and flag); CI runs
``python perf/aot.py``, every specialization, after the tests.

Triton's own compiler runs without a GPU; the kernels must be the real @triton.jit functions, so the
compilation runs in a subprocess without TRITON_INTERPRET. One test per kernel family, so that test workers
share them out; each writes its table to a file, and conftest.py joins the tables into one
and prints its summary line at the end of the run.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from perf import aot
from sknet_triton.families import FAMILIES
from tests import aot_tables

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_specialization_compiles_without_spills(family, tmp_path, record_property):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    table = tmp_path / "aot.csv"
    archs = [str(arch) for arch in aot.DEFAULT_ARCHS]
    result = subprocess.run(
        [sys.executable, str(ROOT / "perf" / "aot.py"), "--arch", *archs, "--family", family, "--sample", "--jobs", "1",
         "--out", str(table)],
        env=env, capture_output=True, text=True, timeout=900,
    )
    if table.is_file():
        record_property(aot_tables.PROPERTY, str(table))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    rows = aot.read_table(table)
    expected = [(spec.name, arch) for spec in aot.specializations() if spec.family == family and aot.in_sample(spec)
                for arch in aot.DEFAULT_ARCHS]
    assert sorted((r.kernel, r.arch) for r in rows) == sorted(expected)
    assert not any(r.spills for r in rows)
    assert all(r.widest_load_bytes >= r.vector_bytes for r in rows)
    # The load-width rule holds a streaming family to something.
    assert any(r.vector_bytes >= 8 for r in rows) == FAMILIES[family].streaming
