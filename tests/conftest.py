"""Test setup: without a CUDA device, the Triton kernels run on the CPU through Triton's interpreter.

TRITON_INTERPRET must be set before the kernels are defined, so this runs before sknet_triton is imported.
"""
import os

import pytest
import torch

from tests import aot_tables

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The cores shared among the test workers (pytest-xdist), for this process's PyTorch and for the programs the
# tests start: OpenMP threads that outnumber the cores wait on each other and crawl.
_threads = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
os.environ.setdefault("OMP_NUM_THREADS", str(_threads))
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

AOT_TABLES = []  # in the main process: the tables tests/test_aot.py wrote


def pytest_runtest_logreport(report):
    AOT_TABLES.extend(aot_tables.tables_of(report))


def pytest_terminal_summary(terminalreporter, config):
    if AOT_TABLES and not hasattr(config, "workerinput"):  # once, in the main process, not in test workers
        terminalreporter.write_line(aot_tables.join(AOT_TABLES))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def min_programs():
    """Plans as on a large GPU, on the CPU: ``min_programs(n)`` makes launches cut the H*W axis until they
    have n programs. Plans made meanwhile are dropped afterwards."""
    from sknet_triton import planning

    with pytest.MonkeyPatch.context() as patch:

        def set_count(count: int) -> None:
            patch.setattr(planning, "CPU_MIN_PROGRAMS", count)
            planning.clear_plans()

        yield set_count
    planning.clear_plans()
