"""The kernel specializations the launcher can choose compile ahead of time for every target of
sknet_triton/targets.py, unspilled, within the chip's shared memory, loading in vectors as wide as their tiles
allow (the kernels that stream dense tiles): here the sample of ``perf/aot.py --sample`` (M = 2 in bfloat16,
every family, configuration, tile shape and flag) for sm_80 and sm_90, and each family's representative
(``--representatives``) for every other target; CI runs ``.ci/run``'s whole sweep after the tests.

Triton's own compiler runs without a GPU; the kernels must be the real @triton.jit functions, so the
compilation runs in a subprocess without TRITON_INTERPRET. One test per kernel family, so that test workers
share them out; each writes its table to a file, and conftest.py joins the tables into one
and prints its summary line at the end of the run.
"""
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from perf import aot
from sknet_triton.families import FAMILIES
from sknet_triton.targets import TARGETS
from tests import aot_tables

ROOT = Path(__file__).resolve().parents[1]
OTHER_TARGETS = [name for name in TARGETS if name not in aot.DEFAULT_ARCHS]


def compile_check(tmp_path, record_property, *options) -> list:
    """Run perf/aot.py with ``options`` (without the interpreter), record its table and return its rows."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    table = tmp_path / "aot.csv"
    result = subprocess.run(
        [sys.executable, str(ROOT / "perf" / "aot.py"), *options, "--jobs", "1", "--out", str(table)],
        env=env, capture_output=True, text=True, timeout=900,
    )
    if table.is_file():
        record_property(aot_tables.PROPERTY, str(table))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    rows = aot.read_table(table)
    assert not any(r.spills or r.over_shared for r in rows)
    assert all(r.widest_load_bytes >= r.vector_bytes for r in rows)
    assert all(0 < r.shared_limit == TARGETS[r.arch].shared_bytes for r in rows)
    assert all(r.instructions > 100 for r in rows), "every kernel's machine instructions are counted"
    return rows


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_specialization_compiles_without_spills(family, tmp_path, record_property):
    rows = compile_check(tmp_path, record_property, "--arch", *aot.DEFAULT_ARCHS, "--family", family, "--sample")
    expected = [(spec.name, arch) for spec in aot.specializations() if spec.family == family and aot.in_sample(spec)
                for arch in aot.DEFAULT_ARCHS]
    assert sorted((r.kernel, r.arch) for r in rows) == sorted(expected)
    # The load-width rule holds a streaming family to something.
    assert any(r.vector_bytes >= 8 for r in rows) == FAMILIES[family].streaming


@pytest.mark.parametrize("arch", OTHER_TARGETS)
def test_every_family_compiles_for_every_target(arch, tmp_path, record_property):
    """Each family's representative compiles for the chip, as the launcher starts it there (on AMD Instinct,
    half as many 64-thread wavefronts as a configuration's 32-thread warps)."""
    rows = compile_check(tmp_path, record_property, "--arch", arch.removeprefix("sm_"), "--representatives")
    chip = TARGETS[arch]
    representatives = [aot.launched(aot.all_specializations()[index], chip)
                       for index in aot.selected(representatives=True)]
    assert [r.kernel for r in rows] == [spec.name for spec in representatives]
    assert {spec.family for spec in representatives} == set(FAMILIES) and {r.arch for r in rows} == {arch}
    for r, spec in zip(rows, representatives):
        assert r.vector_bytes == aot.vector_bytes(spec, chip.warp_size)
    if TARGETS[arch].backend == "hip":
        assert all(r.scalar_registers > 0 for r in rows)  # read from the code object's metadata


def test_problems_name_each_limit_crossed():
    """The check fails on what crosses a chip's limit, and says which limit."""
    fits = aot.Resources("k", "gfx942", 64, 30, 0, 0, 0, 0, 0, 1024, 65536, 16, 16)
    assert aot.problems([fits]) == []
    # SGPRs spilled into VGPR lanes cost no memory traffic: listed in the table, not failed.
    assert aot.problems([dataclasses.replace(fits, sgpr_spills=4)]) == []
    crossed = {
        "2 VGPRs": dict(vgpr_spills=2), "16 B scratch": dict(scratch_bytes=16),
        "shared memory": dict(shared_bytes=65540), "widest global load": dict(widest_load_bytes=8),
    }
    for words, change in crossed.items():
        [line] = aot.problems([dataclasses.replace(fits, **change)])
        assert words in line and "gfx942" in line
    [line] = aot.problems([dataclasses.replace(fits, arch="sm_90", spill_loads=4)])
    assert "4 B loaded" in line


def test_the_comparison_matches_specializations_and_fails_on_a_spill_gained(tmp_path):
    """perf/aot_compare.py sets two tables side by side by target and specialization, lists growth beyond
    5 %, and fails exactly when a specialization spills where it did not."""
    fits = aot.Resources("k[bf16,M=2]", "sm_90", 64, 0, 0, 0, 0, 0, 0, 1024, 232448, 16, 16, instructions=1000)
    other = dataclasses.replace(fits, kernel="k[bf16,M=3]")
    before, after = tmp_path / "before.csv", tmp_path / "after.csv"
    aot.write_table([fits, other, dataclasses.replace(fits, arch="sm_80")], before)

    def run(*rows):
        aot.write_table(list(rows), after)
        return subprocess.run([sys.executable, str(ROOT / "perf" / "aot_compare.py"), str(before), str(after),
                               "--out", str(tmp_path / "side_by_side.csv")], capture_output=True, text=True, cwd=ROOT)

    grown = run(dataclasses.replace(fits, registers=72, instructions=1040), other)
    assert grown.returncode == 0, grown.stdout + grown.stderr
    assert "1 specializations grew by more than 5 %" in grown.stdout and "k[bf16,M=2]" in grown.stdout
    table = pd.read_csv(tmp_path / "side_by_side.csv")
    assert len(table) == 2 and set(table["registers %"].round(1)) == {12.5, 0.0}
    spilled = run(fits, dataclasses.replace(other, spill_stores=8, spill_loads=8))
    assert spilled.returncode == 1 and "spill where they did not" in spilled.stdout
