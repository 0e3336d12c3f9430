"""Every kernel specialization the ops can launch compiles ahead of time for sm_80 and sm_90, unspilled.

Triton's own compiler runs without a GPU; the kernels must be the real @triton.jit functions, so the
compilation runs in a subprocess without TRITON_INTERPRET.
"""
import os
import subprocess
import sys


def test_every_specialization_compiles_without_spills(capsys):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "sknet_triton.aot", "--arch", "80", "90"],
        env=env, capture_output=True, text=True, timeout=1800,
    )
    with capsys.disabled():  # registers and shared memory per kernel belong in the CI log
        print("\n" + result.stdout)
    assert result.returncode == 0, f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    assert " 0 with spills" in result.stdout
