"""The benchmark harness: the bytes model's arithmetic, the CLI, a tiny CPU run of perf/run.py and the
README section made from its results."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import timm
import torch

from perf import bytes_model, model_bench, readme, report, run
from perf.accuracy import relative_error

REPO = Path(__file__).resolve().parents[1]
RESULT_FILES = report.RESULT_FILES


# --------------------------------------------------------------------------------------------------------
# Bytes model.


def test_pass_counts_match_the_floor_of_each_op():
    assert [bytes_model.kernel_passes(f, 2) for f in ("fuse_fwd", "select_fwd", "fuse_bwd", "select_bwd")] == [2, 3, 4, 5]
    assert bytes_model.kernel_passes("select_bwd", 3) == 7  # dV + 3 branches read, 3 gradients written
    assert bytes_model.fused_forward_passes(2) == 5
    # BN + ReLU 8, stack 4, sum 3, mean 1, multiply 4, sum 3
    assert bytes_model.eager_forward_passes(2) == 23
    assert bytes_model.op_min_bytes("select fwd", 2, 1000, 2) == 3 * 1000 * 2
    # Training mode, BatchNorm in the kernels: statistics + fuse + select; pass A + pass B.
    assert bytes_model.fused_training_forward_passes(2) == 7 and bytes_model.fused_training_backward_passes(2) == 8
    table = bytes_model.training_passes_table(3).set_index("pass")
    assert table.loc["backward", "BatchNorm in the kernels"] == 3 * 3 + 2
    assert (table["BatchNorm in the kernels"] < table["separate BatchNorm + ReLU"]).all()


def test_sknet50_units_at_224():
    stages = bytes_model.sknet50_stages(224)
    assert [(s.channels, s.height, s.width, s.units) for s in stages] == [
        (128, 56, 56, 3), (256, 28, 28, 4), (512, 14, 14, 6), (1024, 7, 7, 3)]
    assert bytes_model.sknet50_elements_per_image(224) == 2_759_680


def test_sknet50_units_match_the_network():
    shapes = []
    model = timm.create_model("skresnext50_32x4d").eval()
    for module in model.modules():
        if type(module).__name__ == "SelectiveKernel":
            module.register_forward_hook(lambda m, i, out: shapes.append(tuple(out.shape[1:])))
    with torch.no_grad():
        model(torch.randn(1, 3, 36, 36))  # odd sizes along the way: 9, 5, 3, 2
    expected = [(s.channels, s.height, s.width) for s in bytes_model.sknet50_stages(36) for _ in range(s.units)]
    assert shapes == expected


def test_forward_bytes_table_totals():
    table = bytes_model.forward_bytes_table(batch=256, element_size=2, image_size=224, copy_gbps=2000.0)
    total = table.iloc[-1]
    pass_bytes = 2_759_680 * 256 * 2  # one pass over every SK unit's branch: 1.41 GB
    assert total["stage"] == "all" and total["units"] == 16
    assert total["eager MB"] == pytest.approx(23 * pass_bytes / 1e6)
    assert total["fused MB"] == pytest.approx(5 * pass_bytes / 1e6)
    assert total["fused ms at copy BW"] == pytest.approx(5 * pass_bytes / 2000e9 * 1e3)
    first = table.iloc[0]
    assert first["fused MB/unit"] == pytest.approx(5 * 128 * 56 * 56 * 256 * 2 / 1e6)
    assert first["eager MB"] == pytest.approx(3 * first["eager MB/unit"])
    assert "eager ms at copy BW" not in bytes_model.forward_bytes_table(8, 4, 64).columns


def test_resnest50_units_match_the_network():
    # ResNeSt-D's average-pool downsampling follows the split attention: each stage's first unit runs at the
    # previous stage's resolution.
    shapes = []
    with torch.device("meta"):
        model = timm.create_model("resnest50d").eval()
        for module in model.modules():
            if type(module).__name__ == "SplitAttn":
                module.register_forward_hook(lambda m, i, out: shapes.append((m.radix, *out.shape[1:])))
        model(torch.empty(1, 3, 36, 36))  # odd sizes along the way: 9, 5, 3, 2
    expected = [(2, s.channels, s.height, s.width) for s in bytes_model.resnest50_stages(36) for _ in range(s.units)]
    assert shapes == expected


def test_resnest50_forward_bytes():
    # bn0 and ReLU 8, sum 3, mean 1, multiply 4, sum 3: the SK count without torch.stack's copy.
    assert bytes_model.eager_split_attn_forward_passes(2) == 19
    table = bytes_model.forward_bytes_table(batch=8, element_size=2, image_size=224, network="resnest50d")
    total = table.iloc[-1]
    elements = sum(s.elements * s.units for s in bytes_model.resnest50_stages(224))
    assert total["units"] == 16 and list(table["stage"]) == ["1", "2", "2", "3", "3", "4", "4", "all"]
    assert total["fused MB"] == pytest.approx(5 * elements * 8 * 2 / 1e6)
    assert total["eager / fused"] == pytest.approx(19 / 5)
    with pytest.raises(ValueError, match="network must be one of"):
        bytes_model.forward_bytes_table(8, 2, network="resnet50")


def test_relative_error():
    x = torch.randn(1000, dtype=torch.float64)
    assert relative_error([x], [x]) == 0
    assert relative_error([2 * x], [x]) == pytest.approx(1)
    assert relative_error([torch.full_like(x, float("nan"))], [x]) == float("inf")


# --------------------------------------------------------------------------------------------------------
# Command line and rows.


def test_cli_defaults_follow_the_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = run.parse_args([])
    assert (args.device.type, args.dtype, args.image_size, args.batch_inference, args.batch_train, args.threads) == (
        "cpu", "fp32", 64, 4, 2, 1)
    assert args.variants == list(model_bench.VARIANT_KEYS) and args.modes == ["inference", "train"]
    quick = run.parse_args(["--quick", "--dtype", "bf16", "--iters", "7"])
    assert (quick.dtype, quick.warmup, quick.iters) == ("bf16", run.QUICK_ITERATIONS["cpu"]["warmup"], 7)
    with pytest.raises(SystemExit):
        run.parse_args(["--variants", "timm-sk,nonsense"])


def test_out_that_holds_results_is_refused(tmp_path, capsys):
    assert run.parse_args(["--out", str(tmp_path)]).out == tmp_path  # an empty folder is fine
    (tmp_path / "meta.json").write_text("{}")
    (tmp_path / "chart.png").write_bytes(b"")
    with pytest.raises(SystemExit) as exit_status:
        run.parse_args(["--out", str(tmp_path)])
    assert exit_status.value.code == 2
    assert f"--out {tmp_path} already holds results (chart.png, meta.json)" in capsys.readouterr().err


def test_default_out_dir_never_names_an_earlier_run(tmp_path):
    env = {"device": "NVIDIA H100 80GB HBM3", "device_type": "cuda", "date": "2030-01-02"}
    first = report.default_out_dir(env, tmp_path)
    assert first == tmp_path / "nvidia-h100-80gb-hbm3-2030-01-02"
    first.mkdir()
    second = report.default_out_dir(env, tmp_path)
    assert second == tmp_path / "nvidia-h100-80gb-hbm3-2030-01-02-2"
    second.mkdir()
    assert report.default_out_dir(env, tmp_path).name.endswith("-2030-01-02-3")
    cpu = {"device": "CPU: Some CPU, 1 thread", "device_type": "cpu", "date": "2030-01-02"}
    assert report.default_out_dir(cpu, tmp_path).name == "cpu-2030-01-02"


def test_chart_has_a_legend_and_keeps_value_labels_inside_the_frame():
    device = torch.device("cpu")
    rows = []
    for mode, scale in (("inference", 1.0), ("train", 0.01)):
        for index, variant in enumerate(model_bench.VARIANTS):
            rows.append({"variant": variant.key, "row": variant.label(device), "mode": mode, "batch": 4, "status": "ok",
                         "images/s": scale * float(torch.empty(()).uniform_(10, 10_000)), "peak GiB": 1.0 + index})
    figure = report.chart_figure({"device": "Some GPU", "torch": "x", "triton": "x", "cuda": "x", "timm": "x",
                                  "commit": "abc", "date": "2030-01-02"}, "bf16", pd.DataFrame(rows), None)
    figure.draw_without_rendering()
    renderer = figure._get_renderer()
    (legend,) = figure.legends
    assert [text.get_text() for text in legend.get_texts()] == [label for _, label in report.ROW_KINDS.values()]
    legend_box = legend.get_window_extent(renderer)
    assert len(figure.axes) == 4  # images/s and peak GiB, per mode
    for axis in figure.axes:
        frame = axis.get_window_extent(renderer)
        assert len(axis.texts) == len(model_bench.VARIANTS)
        for text in axis.texts:
            box = text.get_window_extent(renderer)
            assert frame.x0 <= box.x0 and box.x1 <= frame.x1, (axis.get_title(), text.get_text())
        assert not legend_box.overlaps(axis.get_tightbbox(renderer)), axis.get_title()


def test_missing_package_is_skipped_with_its_reason():
    absent = model_bench.Variant("absent", "no_such_package_here", "net", compiled=False, family="sk")
    config = model_bench.BenchConfig(torch.device("cpu"), "fp32", True, 32, {"inference": 1}, 0, 1)

    rows = list(model_bench.model_rows([absent], ["inference"], config, lambda variant, mode: None))
    assert rows[0]["status"] == "skipped" and rows[0]["reason"] == "no_such_package_here is not installed"


# --------------------------------------------------------------------------------------------------------
# A tiny end-to-end run on the CPU.


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("perf")
    command = [sys.executable, str(REPO / "perf" / "run.py"), "--device", "cpu", "--image-size", "32",
               "--batch-inference", "2", "--batch-train", "2", "--warmup", "0", "--iters", "2",
               "--variants", "timm-sk,sknet", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout


def test_tiny_run_writes_every_file(tiny_run):
    out, stdout = tiny_run
    for name in RESULT_FILES:
        assert (out / name).stat().st_size > 0, name
    assert "Op table skipped: the Triton kernels need an NVIDIA GPU" in stdout
    assert "images/s" in stdout
    assert f"Results go to {out}" in stdout
    # each row's own time, since the rows' costs differ too much for a time estimate from the count
    assert len(re.findall(r"\[\d+ s; \d+ s in all\]", stdout)) == 4


def test_tiny_run_models_table(tiny_run):
    out, _ = tiny_run
    models = pd.read_csv(out / "models.csv")
    assert list(models["variant"]) == ["timm-sk", "sknet", "timm-sk", "sknet"]
    assert list(models["mode"]) == ["inference", "inference", "train", "train"]
    assert (models["status"] == "ok").all(), models[["row", "status", "reason"]]
    for column in ("images/s", "ms min", "ms median", "ms max", "logits err", "× timm-sk"):
        assert models[column].notna().all(), column
    assert (models["ms min"] <= models["ms median"]).all() and (models["ms median"] <= models["ms max"]).all()
    assert models["images/s"].tolist() == pytest.approx((2 / models["ms median"] * 1e3).tolist())
    assert models["logits err"].max() < 1e-3  # float32 on the CPU: rounding only
    assert models["grads err"].notna().tolist() == [False, False, True, True]
    assert (models[models["variant"] == "timm-sk"]["× timm-sk"] == 1).all()
    assert "plain-PyTorch path" in models["row"].iloc[1]


def test_tiny_run_stamps(tiny_run):
    out, _ = tiny_run
    meta = json.loads((out / "meta.json").read_text())
    env = meta["environment"]
    assert env["device"].startswith("CPU") and env["torch"] == torch.__version__
    assert env["commit"] == report.git_commit()
    for name in ("models.csv", "ops.csv", "bytes_model.csv"):
        table = pd.read_csv(out / name)
        for column in report.STAMP_COLUMNS:
            assert (table[column].astype(str) == str(env[column])).all(), (name, column)
    assert pd.read_csv(out / "ops.csv")["reason"].iloc[0].startswith("the Triton kernels need an NVIDIA GPU")
    markdown = (out / "report.md").read_text()
    assert report.stamp_line(env) in markdown and "## Bytes model" in markdown
    assert meta["config"]["batch inference"] == 2 and meta["copy_gbps"] is None


def test_readme_section_without_gpu_results(tiny_run):
    out, _ = tiny_run
    section = readme.section(out)
    assert section.startswith(readme.BEGIN) and section.endswith(readme.END)
    assert "No GPU figures exist yet" in section and f"({out.as_posix()}/report.md)" in section
    text = "# Title\n\n## Performance\n\n" + readme.BEGIN + "\nold\n" + readme.END + "\n\n## Training\n"
    updated = readme.updated_readme(text, section)
    assert updated == "# Title\n\n## Performance\n\n" + section + "\n\n## Training\n"
    assert readme.updated_readme(updated, section) == updated
    only_begin = "## Performance\n\n" + readme.BEGIN + "\n\n## Training\n"
    assert readme.updated_readme(only_begin, section) == "## Performance\n\n" + section + "\n\n## Training\n"


def test_readme_section_with_gpu_results(tiny_run, tmp_path):
    out, _ = tiny_run
    gpu = tmp_path / "gpu"
    shutil.copytree(out, gpu)
    meta = json.loads((gpu / "meta.json").read_text())
    meta["environment"].update(device="Some GPU", device_type="cuda")
    meta["copy_gbps"] = 1000.0
    (gpu / "meta.json").write_text(json.dumps(meta))
    # An op table as perf/ops.py writes one (these numbers only exercise the formatting).
    ops_table = pd.DataFrame([{"op": "select fwd", "C×H×W": "128×56×56", "B": 128, "M": 2, "dtype": "bf16",
                               "layout": "channels_last", "sknet_triton µs": 321.0, "sknet_triton GB/s": 2345.0,
                               "sknet_triton % copy BW": 78.9, "eager % copy BW": 12.3, "compiled % copy BW": 45.6,
                               "× vs eager": 6.4, "× vs compiled": 1.73, "status": "ok", "reason": ""}])
    ops_table.to_csv(gpu / "ops.csv", index=False)
    section = readme.section(gpu)
    models = pd.read_csv(gpu / "models.csv")
    assert "No GPU figures" not in section and "**Some GPU**" in section
    assert f"| {models['row'].iloc[0]} | inference | 2 | {report.format_number(models['images/s'].iloc[0])} |" in section
    assert "| select fwd | 128×56×56 | 321 | 2,345 | 78.9 | 12.3 | 45.6 | 6.40 | 1.73 |" in section
    assert "device-to-device copy at 1000 GB/s" in section and "| all |  | 16 |" in section
    assert f"({gpu.as_posix()}/chart.png)" in section


def test_readme_section_from_the_h200_record():
    """The committed H200 record (no bytes model, a training table timed apart) renders, caveat first."""
    folder = REPO / "perf" / "results" / "h200-2026-11-28"
    meta = json.loads((folder / "meta.json").read_text())
    section = readme.section(folder)
    body = section.split("\n", 3)[3]  # past the markers' lines
    assert body.startswith(f"**{meta['caveats'][0]}**") and "9ae7331" in meta["caveats"][0]
    assert "on **NVIDIA H200**" in section and "commit `9ae7331`, 2026-11-28" in section
    assert f"`{meta['command']}`" in section and meta["provenance"] in section
    for name in ("models.csv", "training.csv"):
        for _, row in pd.read_csv(folder / name).iterrows():
            assert f"| {row['row']} | " in section and f" | {report.format_number(row['images/s'])} | " in section
    first_op = pd.read_csv(folder / "ops.csv").iloc[0]
    assert f"| {first_op['op']} | {first_op['C×H×W']} | {report.format_number(first_op['sknet_triton µs'])} |" in section
    assert not (folder / "bytes_model.csv").exists() and "Bytes model" not in section
    assert f"![Performance chart]({folder.relative_to(REPO).as_posix()}/chart.png)" in section


def test_readme_performance_section_is_generated_from_the_newest_results():
    text = readme.README.read_text()
    assert readme.updated_readme(text, readme.section(readme.newest_results())) == text, \
        "run python perf/readme.py"


def test_readme_prefers_gpu_results(tmp_path):
    for name, device_type, date in (("cpu-new", "cpu", "2030-01-02"), ("gpu-old", "cuda", "2030-01-01")):
        (tmp_path / name).mkdir()
        meta = {"environment": {"device_type": device_type, "date": date}}
        (tmp_path / name / "meta.json").write_text(json.dumps(meta))
    assert readme.newest_results(tmp_path).name == "gpu-old"
    (tmp_path / "gpu-old" / "meta.json").unlink()
    assert readme.newest_results(tmp_path).name == "cpu-new"


def test_readme_takes_the_last_run_of_the_newest_day(tmp_path):
    for name in ("gpu-2030-01-02", "gpu-2030-01-02-2", "gpu-2030-01-02-9", "gpu-2030-01-02-10", "gpu-2030-01-01-11"):
        (tmp_path / name).mkdir()
        meta = {"environment": {"device_type": "cuda", "date": name[4:14]}}
        (tmp_path / name / "meta.json").write_text(json.dumps(meta))
    assert readme.newest_results(tmp_path).name == "gpu-2030-01-02-10"
