"""Compare two ahead-of-time tables (perf/aot.py's CSV), before and after a kernel change.

    python perf/aot_compare.py BEFORE.csv AFTER.csv [--out COMPARISON.csv] [--growth PERCENT]

Rows are matched by target and specialization (the kernel's name holds its dtype, constexprs and launch
options). For each matched pair it sets registers, bytes spilled, shared memory and instructions side by
side with their change; it prints a summary per target and every specialization whose registers or
instructions grew by more than ``--growth`` percent (5 by default), and exits with status 1 if any
specialization spills where it did not, or spills more.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

KEY = ["arch", "kernel"]
MEASURES = ["registers", "spilled", "shared_bytes", "instructions"]


def load(path: Path) -> pd.DataFrame:
    """One table, with ``spilled``: bytes (NVIDIA: stored and loaded) or VGPRs and scratch bytes (AMD) that
    reach memory, and ``instructions`` (0 where the table did not count them)."""
    table = pd.read_csv(path)
    if "instructions" not in table:
        table["instructions"] = 0
    table["spilled"] = table[["spill_stores", "spill_loads", "vgpr_spills", "scratch_bytes"]].sum(axis=1)
    return table[KEY + MEASURES]


def compare(before: pd.DataFrame, after: pd.DataFrame) -> pd.DataFrame:
    """Matched rows with each measure before and after and its change in percent (of a nonzero before)."""
    joined = before.merge(after, on=KEY, suffixes=(" before", " after"))
    for measure in MEASURES:
        was, now = joined[f"{measure} before"], joined[f"{measure} after"]
        joined[f"{measure} %"] = ((now - was) / was.where(was != 0) * 100).round(1)
    return joined


def summary(before: pd.DataFrame, after: pd.DataFrame, joined: pd.DataFrame, growth: float) -> pd.DataFrame:
    """Per target: rows matched and unmatched, the largest and total counts before and after, and how many
    specializations grew past ``growth`` percent or gained a spill."""
    rows = []
    for arch, group in joined.groupby("arch"):
        rows.append({
            "arch": arch, "matched": len(group),
            "only before": int((before["arch"] == arch).sum() - len(group)),
            "only after": int((after["arch"] == arch).sum() - len(group)),
            "max registers": f"{group['registers before'].max()} -> {group['registers after'].max()}",
            "max instructions": f"{group['instructions before'].max()} -> {group['instructions after'].max()}",
            "instructions, all": f"{group['instructions before'].sum()} -> {group['instructions after'].sum()}",
            "spilling": f"{(group['spilled before'] > 0).sum()} -> {(group['spilled after'] > 0).sum()}",
            f"registers > +{growth:g} %": int((group["registers %"] > growth).sum()),
            f"instructions > +{growth:g} %": int((group["instructions %"] > growth).sum()),
            "spill gained": int((group["spilled after"] > group["spilled before"]).sum()),
        })
    return pd.DataFrame(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--out", type=Path, help="write the matched rows side by side here (CSV)")
    parser.add_argument("--growth", type=float, default=5.0, help="list growth beyond this percent (default 5)")
    args = parser.parse_args(argv)

    before, after = load(args.before), load(args.after)
    joined = compare(before, after)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        joined.to_csv(args.out, index=False)
    with pd.option_context("display.width", 250, "display.max_columns", 20, "display.max_colwidth", 110):
        print(summary(before, after, joined, args.growth).to_string(index=False))
        grown = joined[(joined["registers %"] > args.growth) | (joined["instructions %"] > args.growth)]
        columns = KEY + [f"{m} {when}" for m in ("registers", "instructions") for when in ("before", "after")]
        print(f"\n{len(grown)} specializations grew by more than {args.growth:g} % in registers or instructions"
              + (":" if len(grown) else "."))
        if len(grown):
            print(grown[columns + ["registers %", "instructions %"]].to_string(index=False))
        gained = joined[joined["spilled after"] > joined["spilled before"]]
        if len(gained):
            print(f"\n{len(gained)} specializations spill where they did not, or more:")
            print(gained[KEY + ["spilled before", "spilled after"]].to_string(index=False))
    return 1 if len(gained) else 0


if __name__ == "__main__":
    sys.exit(main())
