"""Writing results: the environment stamp, CSV and Markdown tables, the chart, and meta.json.

Every file carries the stamp: the device (GPU name, or CPU), torch, triton, CUDA and timm versions, and
the git commit the numbers were measured at (marked ``-dirty`` when the tree had uncommitted changes).
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Optional

import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "perf" / "results"
RESULT_FILES = ("models.csv", "ops.csv", "bytes_model.csv", "report.md", "chart.png", "meta.json")
STAMP_COLUMNS = ("device", "torch", "triton", "cuda", "commit", "date")
COLORS = {"sknet_triton": "tab:orange", "eager": "tab:gray", "compiled": "tab:blue"}  # the op panel's bars
# The model rows' bar colours and legend entries, by what a row runs.
ROW_KINDS = {
    "sknet_triton": ("tab:orange", "sknet_triton sknet50"),
    "timm": ("tab:blue", "timm skresnext50_32x4d"),
    "plain": ("tab:gray", "timm resnext50_32x4d, no SK units (the ceiling)"),
}


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    """The short commit hash of the repository, with ``-dirty`` if tracked files have changed; in a copy of
    the tree without git's data, the environment's ``SKNET_TRITON_COMMIT`` (set by whoever made the copy)."""
    def git(*args):
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout.strip()
    try:
        commit = git("rev-parse", "--short", "HEAD")
        return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("SKNET_TRITON_COMMIT", "unknown")


def environment(device: torch.device) -> dict:
    """The stamp of this run: what it ran on, with which versions, at which commit and when."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        threads = torch.get_num_threads()
        name = f"CPU: {_cpu_name()}, {threads} thread{'s' if threads > 1 else ''}"
    return {
        "device": name,
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda or "none",
        "timm": _version("timm"),
        "python": platform.python_version(),
        "commit": git_commit(),
        "date": datetime.date.today().isoformat(),
    }


def stamp_line(env: dict) -> str:
    """The stamp as one line of text."""
    return (f"{env['device']} | torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
            f"timm {env['timm']} | commit {env['commit']} | {env['date']}")


def default_out_dir(env: dict, results: Path = RESULTS) -> Path:
    """A new folder under ``results`` for this run: <device>-<date> (the GPU's name, or "cpu"), or
    <device>-<date>-2, -3, ... when earlier runs of the day have taken the name: never an existing one."""
    name = env["device"] if env["device_type"] == "cuda" else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    folder = results / f"{slug}-{env['date']}"
    number = 1
    while folder.exists():
        number += 1
        folder = results / f"{slug}-{env['date']}-{number}"
    return folder


def results_in(folder: Path) -> list[str]:
    """The names of the results files (RESULT_FILES) that ``folder`` already holds."""
    return [name for name in RESULT_FILES if (folder / name).exists()]


def format_number(value) -> str:
    """A table cell for reading: floats to about three significant digits, NaN as blank."""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        magnitude = abs(value)
        if magnitude >= 100:
            return f"{value:,.0f}"
        if magnitude >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}" if magnitude < 0.01 and value else f"{value:.2f}"
    return str(value)


def _formatted(table: pd.DataFrame) -> pd.DataFrame:
    return table.astype(object).apply(lambda column: column.map(format_number))


def format_table(table: pd.DataFrame) -> str:
    """The table as aligned plain text, numbers rounded for reading."""
    return _formatted(table).to_string(index=False)


def markdown_table(table: pd.DataFrame) -> str:
    """The table as GitHub Markdown, numbers rounded for reading."""
    cells = _formatted(table)
    lines = ["| " + " | ".join(str(c) for c in table.columns) + " |",
             "|" + "|".join("---:" if pd.api.types.is_numeric_dtype(table[c]) else "---" for c in table.columns) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in cells.itertuples(index=False)]
    return "\n".join(lines)


def write_tables(out_dir: Path, env: dict, tables: dict[str, pd.DataFrame]) -> list[Path]:
    """Write each table as <name>.csv with the stamp columns appended to every row. Returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, table in tables.items():
        stamped = table.assign(**{column: env[column] for column in STAMP_COLUMNS})
        path = out_dir / f"{name}.csv"
        stamped.to_csv(path, index=False)
        paths.append(path)
    return paths


def write_markdown(path: Path, env: dict, config: dict, sections: list[tuple[str, str]], notes: list[str]) -> Path:
    """report.md: the stamp, the configuration, each (title, body) section, and the notes."""
    lines = ["# sknet_triton performance report", "", f"**{stamp_line(env)}**", "",
             "Configuration: " + ", ".join(f"{k} {v}" for k, v in config.items()), ""]
    for title, body in sections:
        lines += [f"## {title}", "", body, ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]
    path.write_text("\n".join(lines))
    return path


def write_meta(path: Path, env: dict, config: dict, notes: list[str], copy_gbps: Optional[float]) -> Path:
    """meta.json: the stamp, the configuration and the notes, for perf/readme.py."""
    meta = {"environment": env, "config": config, "notes": notes, "copy_gbps": copy_gbps}
    path.write_text(json.dumps(meta, indent=2) + "\n")
    return path


def write_chart(path: Path, env: dict, setting: str, models: pd.DataFrame, ops: Optional[pd.DataFrame]) -> Path:
    """chart.png: :func:`chart_figure` as a PNG image."""
    chart_figure(env, setting, models, ops).savefig(path, dpi=110)
    return path


def chart_figure(env: dict, setting: str, models: pd.DataFrame, ops: Optional[pd.DataFrame]):
    """The chart, a matplotlib Figure: images/s of every timed row by mode, peak GPU memory when measured,
    and the Triton ops' share of copy bandwidth beside the reference's when the op table ran; a legend of
    what each colour runs. ``setting`` (dtype, layout, image size) heads it with the stamp."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    timed = models[models["status"] == "ok"] if "images/s" in models else models.iloc[0:0]
    panels = [("images/s", mode) for mode in timed["mode"].unique()]
    if "peak GiB" in timed and timed["peak GiB"].notna().any():
        panels += [("peak GiB", mode) for mode in timed["mode"].unique()]
    if ops is not None and not ops.empty:
        panels.append(("ops", None))
    panels = panels or [("empty", None)]
    figure = Figure(figsize=(10, 2.2 + 1.9 * len(panels)))
    axes = figure.subplots(len(panels), 1, squeeze=False)
    shown_kinds = set()
    for axis, (quantity, mode) in zip(axes[:, 0], panels):
        if quantity == "ops":
            _ops_panel(axis, ops)
        elif quantity == "empty":
            axis.text(0.5, 0.5, "no timed rows", ha="center", va="center")
            axis.set_axis_off()
        else:
            rows = timed[timed["mode"] == mode]
            kinds = [_row_kind(row) for row in rows["row"]]
            shown_kinds.update(kinds)
            axis.barh(rows["row"], rows[quantity], color=[ROW_KINDS[kind][0] for kind in kinds])
            axis.invert_yaxis()
            # Room beyond the longest bar for its value label, so that every label stays inside the frame.
            axis.set_xlim(0, 1.2 * rows[quantity].max())
            axis.set_xlabel(quantity)
            axis.set_title(f"{mode}, batch {int(rows['batch'].iloc[0])}: {'higher' if quantity == 'images/s' else 'lower'} is better", fontsize=10)
            for y, value in enumerate(rows[quantity]):
                axis.text(value, y, f" {format_number(float(value))}", va="center", fontsize=8)
    figure.suptitle(f"{setting}\n{stamp_line(env)}", fontsize=8)
    legend_height = 0.0
    if shown_kinds:
        handles = [Patch(color=color, label=label) for kind, (color, label) in ROW_KINDS.items() if kind in shown_kinds]
        legend_height = 0.35 / figure.get_figheight()  # inches of one legend row, as a fraction of the figure
        figure.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, legend_height, 1, 1))
    return figure


def _row_kind(row: str) -> str:
    """A model row's key in ROW_KINDS, from its name in the tables (see perf.model_bench.Variant.label)."""
    if row.startswith("sknet_triton "):
        return "sknet_triton"
    return "timm" if "skresnext" in row else "plain"


def _ops_panel(axis, ops: pd.DataFrame) -> None:
    """Grouped bars: % of copy bandwidth per (op, shape) for each implementation, first dtype and layout."""
    first = ops[(ops["dtype"] == ops["dtype"].iloc[0]) & (ops["layout"] == ops["layout"].iloc[0])]
    labels = [f"{op}\n{shape}" for op, shape in zip(first["op"], first["C×H×W"])]
    implementations = [c.removesuffix(" % copy BW") for c in first.columns if c.endswith(" % copy BW")]
    width = 0.8 / max(len(implementations), 1)
    for index, implementation in enumerate(implementations):
        positions = [i + index * width for i in range(len(first))]
        axis.bar(positions, first[f"{implementation} % copy BW"], width, label=implementation,
                 color=COLORS[implementation])
    axis.set_xticks([i + width * (len(implementations) - 1) / 2 for i in range(len(first))], labels, fontsize=6)
    axis.set_ylabel("% of copy bandwidth")
    axis.set_title(f"ops, B={int(first['B'].iloc[0])}, {first['dtype'].iloc[0]}, {first['layout'].iloc[0]}: "
                   "minimum bytes / time, % of copy bandwidth", fontsize=10)
    axis.legend(fontsize=8)
