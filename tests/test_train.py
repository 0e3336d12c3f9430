"""The trainer: its data, checkpoints and collectives in this process; whole runs as the user starts them.

Whole runs go to subprocesses: torchrun needs them, and exit statuses and stderr are part of the
interface. Their environment drops TRITON_INTERPRET (tests/conftest.py sets it for this process, where
it runs the kernels one program at a time, far too slowly to train with), so the models take their
plain-PyTorch CPU path; the kernels have tests of their own.
"""
from __future__ import annotations

import csv
import os
import re
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing

from torch._utils import ExceptionWrapper

from sknet_triton import train
from sknet_triton.training import checkpoint, distributed
from sknet_triton.training.data import SYNTHETIC_CLASSES, EpochSeeded, ShardSampler, SyntheticScales, load_rgb_image
from sknet_triton.training.errors import CheckpointError, DataError
from sknet_triton.training.options import build_parser
from sknet_triton.training.report import CSV_FILENAME

TINY = ("--model", "sknet_tiny", "--data", "synthetic", "--img-size", "32")
TIMING_COLUMNS = ("images_per_s", "epoch_s")


def trainer_environment() -> dict:
    """The environment of a trainer subprocess: the CPU's plain-PyTorch path."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path: deterministic, and gloo for any number of processes
    # One compute thread per process: OpenMP threads that wait on each other crawl when the cores are
    # shared (with a loader worker, another rank, other jobs).
    env["OMP_NUM_THREADS"] = "1"
    return env


def run_trainer(*args: str, processes: int | None = None) -> subprocess.CompletedProcess:
    """``python -m sknet_triton.train ARGS``, or under torchrun with ``processes`` processes; on the CPU."""
    env = trainer_environment()
    if processes is None:
        command = [sys.executable, "-m", "sknet_triton.train"]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   "-m", "sknet_triton.train"]
    return subprocess.run(command + list(args), env=env, capture_output=True, text=True, timeout=600)


def read_log(output) -> list[dict]:
    with open(os.path.join(output, CSV_FILENAME), newline="") as file:
        return list(csv.DictReader(file))


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sknet_triton.train: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


# --------------------------------------------------------------------------------------------------------
# Whole runs.


def test_learns_the_synthetic_scales(tmp_path):
    # 3 epochs of 1024 images: 95.7, 91.4 and 86.7 % for seeds 0, 1 and 2 (chance: 12.5 %); a loader worker
    # makes the images on another core while one trains.
    output = tmp_path / "run"
    result = run_trainer(
        *TINY, "--synthetic-size", "1024", "--epochs", "3", "--batch-size", "32", "--lr", "0.1",
        "--warmup-epochs", "1", "--workers", "1", "--output", str(output),
    )
    assert result.returncode == 0, result.stderr
    log = read_log(output)
    curve = [round(float(row["val_top1"]), 1) for row in log]
    print("val top-1 per epoch:", curve)
    assert [int(row["epoch"]) for row in log] == [1, 2, 3]
    assert curve[-1] > 80.0
    assert "epoch 3/3" in result.stdout and "val top-1" in result.stdout


def test_trains_a_resnest(tmp_path):
    # ResNeSt through the same trainer: timm's resnest14d with its data configuration, one short epoch.
    output = tmp_path / "run"
    result = run_trainer(
        "--model", "resnest14d", "--data", "synthetic", "--img-size", "32", "--synthetic-size", "64",
        "--epochs", "1", "--batch-size", "16", "--output", str(output),
    )
    assert result.returncode == 0, result.stderr
    [row] = read_log(output)
    assert float(row["train_loss"]) > 0 and 0 <= float(row["val_top1"]) <= 100
    assert "epoch 1/1" in result.stdout


def test_two_processes_hold_identical_weights(tmp_path):
    # 32 images, 2 processes, batch 8: two steps each, accumulated into one update (DDP's no_sync on the
    # first), with cutmix drawing per process and an EMA.
    output = tmp_path / "run"
    result = run_trainer(
        *TINY, "--synthetic-size", "32", "--epochs", "1", "--batch-size", "8", "--workers", "0", "--output", str(output),
        "--opt", "lamb", "--accum-steps", "2", "--cutmix", "1.0", "--model-ema",
        processes=2,
    )
    assert result.returncode == 0, result.stderr
    # The trainer compares every parameter and buffer across processes after each epoch (see
    # test_replicas_identical_tells_processes_apart) and fails the run if any differs.
    assert "weights identical on all 2 processes" in result.stdout
    assert result.stdout.count("epoch 1/1  lr") == 1  # only rank 0 reports
    state = checkpoint.load(str(output / checkpoint.FILENAME))
    assert state["epoch"] == 1 and state["settings"]["world_size"] == 2 and len(state["rng"]) == 2
    # cutmix's draws differ between the processes: their NumPy generators were seeded apart.
    assert not torch.equal(state["rng"][0]["numpy"][1], state["rng"][1]["numpy"][1])


# Every option that draws random numbers or keeps state across epochs: the schedule (warm-up, steps), the
# optimiser's moments, accumulation, clipping, mixup/cutmix and random erasing (NumPy's, Python's and
# torch's generators), the EMA.
RESUME_RUN = (
    *TINY, "--synthetic-size", "256", "--epochs", "3", "--batch-size", "32", "--lr", "0.01", "--warmup-epochs", "1",
    "--opt", "adamw", "--sched", "step", "--decay-epochs", "1", "--accum-steps", "3", "--clip-grad", "1.0",
    "--label-smoothing", "0.1", "--mixup", "0.2", "--cutmix", "1.0", "--reprob", "0.25", "--model-ema",
    "--model-ema-decay", "0.9",
)


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("uninterrupted")
    result = run_trainer(*RESUME_RUN, "--workers", "0", "--output", str(output))
    assert result.returncode == 0, result.stderr
    return output


def test_stop_and_resume_equals_an_uninterrupted_run(uninterrupted_run, tmp_path):
    output = tmp_path / "run"
    # A loader worker this time: data order and augmentation depend on (seed, epoch) only.
    first = run_trainer(*RESUME_RUN, "--workers", "1", "--output", str(output), "--stop-after-epoch", "1")
    assert first.returncode == 0, first.stderr
    assert checkpoint.load(str(output / checkpoint.FILENAME))["epoch"] == 1
    assert first.stdout.strip().splitlines()[-1] == (
        f"stopped after epoch 1/3 as asked; {output / checkpoint.FILENAME} holds it: run the same command with "
        "--resume (and a later --stop-after-epoch, or none) to continue"
    )
    second = run_trainer(*RESUME_RUN, "--workers", "1", "--output", str(output), "--resume")
    assert second.returncode == 0, second.stderr
    assert "resuming after epoch 1" in second.stdout

    expected = checkpoint.load(str(uninterrupted_run / checkpoint.FILENAME))
    resumed = checkpoint.load(str(output / checkpoint.FILENAME))
    assert resumed["epoch"] == expected["epoch"] == 3
    for weights in ("model", "model_ema"):
        for name, tensor in expected[weights].items():
            assert torch.equal(resumed[weights][name], tensor), (weights, name)
    for index, moments in expected["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(resumed["optimizer"]["state"][index][name], moments[name])
    assert resumed["scheduler"] == expected["scheduler"]
    assert not torch.equal(expected["model"]["fc.weight"], expected["model_ema"]["fc.weight"])

    def metrics(log):
        return [{key: value for key, value in row.items() if key not in TIMING_COLUMNS} for row in log]

    assert metrics(read_log(output)) == metrics(read_log(uninterrupted_run))



def test_stop_and_resume_under_the_default_recipe(tmp_path):
    # SGD with momentum and the warm-up + cosine schedule, which the run above leaves out.
    run = (*TINY, "--synthetic-size", "64", "--epochs", "2", "--batch-size", "16", "--warmup-epochs", "0.5",
           "--workers", "0")
    whole = run_trainer(*run, "--output", str(tmp_path / "whole"))
    first = run_trainer(*run, "--output", str(tmp_path / "parts"), "--stop-after-epoch", "1")
    second = run_trainer(*run, "--output", str(tmp_path / "parts"), "--resume")
    for result in (whole, first, second):
        assert result.returncode == 0, result.stderr
    expected = checkpoint.load(str(tmp_path / "whole" / checkpoint.FILENAME))
    resumed = checkpoint.load(str(tmp_path / "parts" / checkpoint.FILENAME))
    assert resumed["epoch"] == expected["epoch"] == 2
    for name, tensor in expected["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name
    for index, state in expected["optimizer"]["state"].items():
        assert torch.equal(resumed["optimizer"]["state"][index]["momentum_buffer"], state["momentum_buffer"])
    assert resumed["scheduler"] == expected["scheduler"]

def test_eval_only_reports_a_checkpoint_and_its_ema(uninterrupted_run):
    row = read_log(uninterrupted_run)[-1]
    before = {path: os.path.getmtime(uninterrupted_run / path) for path in os.listdir(uninterrupted_run)}
    result = run_trainer(*RESUME_RUN, "--workers", "0", "--output", str(uninterrupted_run), "--eval-only", "--resume")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[1].startswith("EMA: "), result.stdout
    for line, prefix in zip(lines, ("val", "ema_val")):
        numbers = re.fullmatch(r"(?:EMA: )?val loss (\S+)  val top-1 (\S+)%  top-5 (\S+)%  \(64 images, .* s\)", line)
        assert numbers, line
        expected = [f"{float(row[f'{prefix}_{name}']):{spec}}" for name, spec in
                    (("loss", ".4f"), ("top1", ".2f"), ("top5", ".2f"))]
        assert list(numbers.groups()) == expected
    # nothing written
    assert {path: os.path.getmtime(uninterrupted_run / path) for path in os.listdir(uninterrupted_run)} == before


def test_a_checkpoint_of_another_model_is_refused(uninterrupted_run):
    result = run_trainer(*RESUME_RUN, "--model", "skresnet18", "--output", str(uninterrupted_run), "--resume")
    assert_one_line_error(result, "different run", "model 'sknet_tiny' there, 'skresnet18' here")


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_corrupt_or_missing_checkpoint_is_one_line_error(uninterrupted_run, tmp_path, damage):
    path = tmp_path / checkpoint.FILENAME
    if damage == "truncated":
        path.write_bytes((uninterrupted_run / checkpoint.FILENAME).read_bytes()[:5000])
    result = run_trainer(*RESUME_RUN, "--output", str(tmp_path), "--resume")
    assert_one_line_error(result, str(path), "corrupt" if damage == "truncated" else "no checkpoint")


def test_an_existing_checkpoint_is_not_overwritten_without_resume(uninterrupted_run):
    result = run_trainer(*RESUME_RUN, "--output", str(uninterrupted_run))
    assert_one_line_error(result, "exists", "--resume")


@pytest.mark.parametrize("below_the_file", ["", "sub"])
def test_an_output_that_is_a_file_is_one_line_error(tmp_path, capsys, below_the_file):
    # In this process: the run stops before building a model.
    blocking = tmp_path / "notes.txt"
    blocking.write_text(str(torch.rand(3)))
    output = os.path.join(blocking, below_the_file) if below_the_file else str(blocking)
    status = train.main([*TINY, "--synthetic-size", "16", "--epochs", "1", "--batch-size", "8", "--workers", "0",
                         "--output", output])
    assert status == 2
    assert capsys.readouterr().err == (
        f"sknet_triton.train: error: --output {output}: cannot create that directory ({blocking} is a file)\n"
    )


def write_image_folders(root, images_per_class: int = 2, classes: int = 2, size: tuple[int, int] = (40, 40)) -> None:
    """root/{train,val}/{a,b,...}/i.png: random RGB images of ``size`` (height, width)."""
    from PIL import Image

    for split in ("train", "val"):
        for name in "abcdefghijklmnopqrstuvwxyz"[:classes]:
            (root / split / name).mkdir(parents=True)
            for index in range(images_per_class):
                pixels = (torch.rand(*size, 3) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / name / f"{index}.png")


def test_an_unreadable_image_stops_the_run_with_one_line_naming_it(tmp_path):
    write_image_folders(tmp_path)
    broken = tmp_path / "train" / "b" / "1.png"
    broken.write_bytes(broken.read_bytes()[:100])  # a truncated download
    # 4 training images, batch 2: every image is loaded in the first epoch, by a loader worker, whose error
    # reaches this process rebuilt around the worker's traceback.
    result = run_trainer("--model", "sknet_tiny", "--data", str(tmp_path), "--img-size", "32", "--epochs", "1",
                         "--batch-size", "2", "--workers", "1", "--output", str(tmp_path / "run"))
    assert result.returncode == 2, result.stderr
    # stderr also holds the progress bar, drawn with carriage returns; the error is the only other line.
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert errors == [f"sknet_triton.train: error: cannot read the image {broken} (image file is truncated); "
                      "repair or remove it"], result.stderr


def test_image_loader_names_the_file_it_cannot_read(tmp_path):
    write_image_folders(tmp_path, images_per_class=1)
    good = tmp_path / "train" / "a" / "0.png"
    image = load_rgb_image(str(good))
    assert image.mode == "RGB" and image.size == (40, 40)
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_bytes(torch.randint(0, 256, (300,), dtype=torch.uint8).numpy().tobytes())
    expected = f"cannot read the image {not_an_image} (not in a format PIL can decode)"
    with pytest.raises(DataError, match=re.escape(expected)):
        load_rgb_image(str(not_an_image))
    with pytest.raises(DataError, match=re.escape(f"cannot read the image {tmp_path / 'missing.png'} (")):
        load_rgb_image(str(tmp_path / "missing.png"))


def test_an_error_from_a_loader_worker_keeps_its_own_message():
    message = "cannot read the image x.png (image file is truncated); repair or remove it"
    try:
        raise DataError(message)
    except DataError:
        rebuilt = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(DataError) as error:
        rebuilt.reraise()
    assert str(error.value) == message
    assert str(DataError("Caught nothing\nin two lines")) == "Caught nothing\nin two lines"


# --------------------------------------------------------------------------------------------------------
# Checkpoint files.


def test_checkpoint_load_refuses_what_is_not_a_checkpoint(tmp_path):
    path = str(tmp_path / checkpoint.FILENAME)
    checkpoint.save(path, {"epoch": 1, "weights": torch.ones(1000)})
    assert checkpoint.load(path)["epoch"] == 1
    whole = open(path, "rb").read()
    for content in (whole[: len(whole) // 2], b"not a checkpoint", b""):
        with open(path, "wb") as file:
            file.write(content)
        with pytest.raises(CheckpointError, match="corrupt or not a checkpoint"):
            checkpoint.load(path)
    torch.save({"fc.weight": torch.ones(2)}, path)  # a bare state dict
    with pytest.raises(CheckpointError, match="not a checkpoint of sknet_triton.train"):
        checkpoint.load(path)


def test_an_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    path = str(tmp_path / checkpoint.FILENAME)
    checkpoint.save(path, {"epoch": 1})

    def dies_halfway(state, file):
        file.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(path, {"epoch": 2})
    monkeypatch.undo()
    assert checkpoint.load(path)["epoch"] == 1
    assert os.listdir(tmp_path) == [checkpoint.FILENAME]  # no temporary file left behind


def test_check_same_run_names_every_difference():
    saved = {"model": "sknet_tiny", "num_classes": 8, "lr": 0.1}
    checkpoint.check_same_run("ckpt", saved, dict(saved), ["model", "num_classes", "lr"])
    with pytest.raises(CheckpointError, match="num_classes 8 there, 10 here; lr 0.1 there, 0.2 here"):
        checkpoint.check_same_run("ckpt", saved, {**saved, "num_classes": 10, "lr": 0.2}, ["model", "num_classes", "lr"])


# --------------------------------------------------------------------------------------------------------
# Data.


def test_synthetic_images_are_a_function_of_seed_and_index():
    a, b = SyntheticScales(32, 32, seed=3, train=True), SyntheticScales(32, 32, seed=3, train=True)
    image, label = a[5]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == 5 % SYNTHETIC_CLASSES
    assert torch.equal(image, b[5][0])
    assert not torch.equal(image, SyntheticScales(32, 32, seed=4, train=True)[5][0])
    assert not torch.equal(image, a[5 + SYNTHETIC_CLASSES][0])  # another image of the same class
    batch = torch.stack([a[i][0] for i in range(32)])
    assert abs(batch.mean()) < 0.3 and 0.5 < batch.std() < 2


def test_synthetic_views_change_with_the_epoch_in_training_only():
    train = SyntheticScales(8, 32, seed=0, train=True)
    val = SyntheticScales(8, 32, seed=0, train=False)
    views = {}
    for epoch in range(4):
        train.set_epoch(epoch)
        val.set_epoch(epoch)
        views[epoch] = train[1][0]
        assert torch.equal(val[1][0], SyntheticScales(8, 32, seed=0, train=False)[1][0])
    assert len({tuple(view.flatten()[:8].tolist()) for view in views.values()}) > 1
    train.set_epoch(2)
    assert torch.equal(train[1][0], views[2])


def test_synthetic_classes_differ_in_scale():
    """The power spectrum's mean frequency falls from each class to the next (longer wavelengths)."""
    dataset = SyntheticScales(SYNTHETIC_CLASSES * 8, 32, seed=0, train=False)
    images, labels = zip(*(dataset[index] for index in range(len(dataset))))
    gray = torch.stack(images).mean(dim=1)  # [N, 32, 32]
    power = torch.fft.rfft2(gray - gray.mean(dim=(1, 2), keepdim=True)).abs() ** 2
    radius = torch.sqrt(torch.fft.fftfreq(32)[:, None] ** 2 + torch.fft.rfftfreq(32)[None, :] ** 2)
    image_frequency = (power * radius).sum(dim=(1, 2)) / power.sum(dim=(1, 2))  # [N], cycles per pixel
    mean_frequency = torch.zeros(SYNTHETIC_CLASSES).index_add_(0, torch.tensor(labels), image_frequency) / 8
    assert (mean_frequency[1:] < mean_frequency[:-1]).all(), mean_frequency


def test_epoch_seeded_augmentation_is_reproducible():
    random_view = EpochSeeded(_RandomItems(), seed=0)
    first = random_view[2]
    assert torch.equal(random_view[2], first)
    random_view.set_epoch(1)
    assert not torch.equal(random_view[2], first)


class _RandomItems:
    """Each item a draw from torch's global generator, as torchvision's random transforms make."""

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return torch.rand(3)


def test_shard_sampler_covers_every_index_once():
    shards = [list(ShardSampler(10, rank, 3)) for rank in range(3)]
    assert sorted(sum(shards, [])) == list(range(10))
    assert [len(ShardSampler(10, rank, 3)) for rank in range(3)] == [4, 3, 3]


# --------------------------------------------------------------------------------------------------------
# Options, collectives.


def test_help_documents_every_option():
    text = build_parser().format_help()
    for action in build_parser()._actions:
        for option in action.option_strings:
            assert option in text and action.help, option


def _compare_replicas(rank: int, port: int, world_size: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        context = distributed.Context(rank=rank, local_rank=rank, world_size=world_size, device=torch.device("cpu"))
        model = torch.nn.BatchNorm2d(3)
        assert distributed.replicas_identical(context, model)
        if rank == 1:
            with torch.no_grad():
                model.weight[2] += 1e-7  # one value, in the last bits
        assert not distributed.replicas_identical(context, model)
        model.running_mean.fill_(float(rank))
        distributed.broadcast_buffers(context, model)
        assert torch.equal(model.running_mean, torch.zeros(3))
    finally:
        dist.destroy_process_group()


def test_replicas_identical_tells_processes_apart():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.multiprocessing.start_processes(_compare_replicas, args=(port, 2), nprocs=2, start_method="fork")
