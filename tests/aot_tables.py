"""The ahead-of-time check's tables: each test of tests/test_aot.py records where it wrote its own, and the
end of the run joins them into one table beside them and prints its summary line."""
import os
from pathlib import Path

PROPERTY = "aot_table"  # the user property (it reaches the main process from test workers) naming a table


def tables_of(report) -> list[str]:
    """The tables a test report names (its call's report: its teardown's repeats the test's properties)."""
    return [value for name, value in report.user_properties if name == PROPERTY] if report.when == "call" else []


def join(tables: list[str]) -> str:
    """Write the tables as one, in the folder that holds them all, and return its summary line."""
    from perf import aot

    results = [row for table in sorted(tables) for row in aot.read_table(table)]
    joined = Path(os.path.commonpath([Path(table).parent for table in tables])) / "aot.csv"
    aot.write_table(results, joined)
    return f"ahead-of-time check: {aot.summary(results)}; table in {joined}"
