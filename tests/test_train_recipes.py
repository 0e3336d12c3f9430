"""The trainer's recipe options (timm's components), its interruption and stop messages, its evaluation.

Whole runs go to subprocesses on the CPU's plain-PyTorch path, as in tests/test_train.py, which also holds
the stop/resume test under every option.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from sknet_triton.training import checkpoint, run
from sknet_triton.training.data import Augmentation, EpochSeeded, build_datasets, image_transforms
from sknet_triton.training.errors import DataError, TrainingError
from sknet_triton.training.loop import _correct
from sknet_triton.training.options import OPTIMIZERS, build_parser, parse_args, resolve
from sknet_triton.training.presets import PRESETS
from sknet_triton.training.recipe import build_optimizer, build_scheduler, updates_per_epoch
from sknet_triton.training.report import describe
from tests.test_train import TINY, read_log, run_trainer, trainer_environment, write_image_folders


def test_every_option_still_learns(tmp_path):
    # 3 epochs of 1024 images under AdamW with every regulariser on: 80.9, 77.3 and 81.3 % for seeds 0, 1
    # and 2, their EMAs 78.9, 73.1 and 62.5 % (chance: 12.5 %); mixup and cutmix slow learning, so the bar
    # is lower than plain training's.
    output = tmp_path / "run"
    result = run_trainer(
        *TINY, "--synthetic-size", "1024", "--epochs", "3", "--batch-size", "32", "--warmup-epochs", "1",
        "--workers", "1", "--output", str(output),
        "--opt", "adamw", "--lr", "0.004", "--weight-decay", "0.05", "--sched", "step", "--decay-epochs", "1",
        "--decay-rate", "0.3", "--accum-steps", "2", "--clip-grad", "5", "--label-smoothing", "0.1",
        "--mixup", "0.2", "--cutmix", "1.0", "--reprob", "0.25", "--model-ema", "--model-ema-decay", "0.95",
    )
    assert result.returncode == 0, result.stderr
    log = read_log(output)
    print("val top-1 per epoch:", [row["val_top1"] for row in log], "EMA:", [row["ema_val_top1"] for row in log])
    last = log[-1]
    assert float(last["val_top1"]) > 50.0 and float(last["ema_val_top1"]) > 50.0
    assert all(float(row["val_top5"]) >= float(row["val_top1"]) for row in log)
    # 32 batches of 32 per epoch, 2 to an update: 16 updates, the first of the run at --warmup-lr, then
    # the step decay after the one-epoch warm-up.
    assert float(log[0]["lr_first"]) == pytest.approx(1e-5) and float(log[1]["lr_first"]) == pytest.approx(0.004)
    assert float(log[2]["lr_first"]) == pytest.approx(0.004 * 0.3)


def _default_interrupt() -> None:
    """In the child before it runs the trainer: SIGINT's default disposition, whatever the parent's."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_ends_with_one_line_naming_the_intact_checkpoint(tmp_path):
    output = tmp_path / "run"
    # 20 epochs of 32 steps: the interrupt comes long before the end, whatever the machine's speed.
    command = [sys.executable, "-m", "sknet_triton.train", *TINY, "--synthetic-size", "256", "--epochs", "20",
               "--batch-size", "8", "--workers", "1", "--output", str(output)]
    # A session of its own: the interrupt reaches the trainer and its loader worker, as a terminal's Ctrl-C
    # does. A child inherits an ignored SIGINT (a suite started in the background, `cmd &`, runs so), and
    # Python then installs no KeyboardInterrupt handler: the trainer starts with the default disposition, as
    # from a terminal. This test ignores SIGINT itself meanwhile, so that it fails if the trainer does not.
    ignored = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        process = subprocess.Popen(command, env=trainer_environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, start_new_session=True, preexec_fn=_default_interrupt)
    finally:
        signal.signal(signal.SIGINT, ignored)
    try:
        deadline = time.monotonic() + 300
        while not (output / checkpoint.FILENAME).exists():
            assert process.poll() is None and time.monotonic() < deadline, "no checkpoint after the first epoch"
            time.sleep(0.1)
        time.sleep(0.5)  # into the second epoch, most likely
        os.killpg(process.pid, signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    # stderr also holds the progress bar, drawn and cleared with carriage returns.
    pieces = [piece.strip() for piece in re.split(r"[\r\n]", stderr) if piece.strip()]
    saved = checkpoint.load(str(output / checkpoint.FILENAME))["epoch"]
    where = f"in epoch {saved + 1}/20" if f"in epoch {saved + 1}/20" in pieces[-1] else f"after epoch {saved}/20"
    assert pieces[-1] == (
        f"sknet_triton.train: interrupted {where}; {output / checkpoint.FILENAME} (epoch {saved}) is intact: "
        "run the same command with --resume to continue"
    ), stderr
    assert f"epoch {saved}/20  lr" in stdout and f"epoch {saved + 1}/20  lr" not in stdout


def test_interruption_before_the_first_checkpoint_says_nothing_was_saved():
    saved = run._SavedCheckpoint()
    assert saved.interruption_message() == "interrupted before training; no checkpoint was written yet: start the run again"
    saved.epochs, saved.current = 5, 1
    assert saved.interruption_message().startswith("interrupted in epoch 1/5; no checkpoint")
    saved.path, saved.epoch = "run/checkpoint.pt", 1
    assert saved.interruption_message() == (
        "interrupted after epoch 1/5; run/checkpoint.pt (epoch 1) is intact: run the same command with --resume to continue"
    )
    saved.current = 2
    assert saved.interruption_message().startswith("interrupted in epoch 2/5; run/checkpoint.pt (epoch 1) is intact")


# timm's download replaced by weights a seed gives, with the classifier leaning towards the folder's
# classes so that top-1 and top-5 depend on each image; the same function in both processes.
OFFLINE_TIMM = textwrap.dedent(
    """
    import timm
    import torch

    _create_model = timm.create_model


    def offline_create_model(name, pretrained=False, **kwargs):
        torch.manual_seed(1234)
        model = _create_model(name, pretrained=False, **kwargs)
        with torch.no_grad():
            model.get_classifier().bias[:FOLDER_CLASSES] += 3.0
        return model
    """
)
FOLDER_CLASSES = 3


def test_eval_only_of_pretrained_weights_reproduces_timms_validation(tmp_path):
    import timm
    import timm.data
    import timm.utils

    write_image_folders(tmp_path, images_per_class=4, classes=FOLDER_CLASSES, size=(80, 96))
    program = (f"FOLDER_CLASSES = {FOLDER_CLASSES}\n" + OFFLINE_TIMM +
               "timm.create_model = offline_create_model\n"
               "import sys\nfrom sknet_triton import train\nsys.exit(train.main(sys.argv[1:]))\n")
    result = subprocess.run(
        [sys.executable, "-c", program, "--model", "skresnet18", "--data", str(tmp_path), "--img-size", "64",
         "--batch-size", "5", "--workers", "0", "--eval-only", "--pretrained"],
        env=trainer_environment(), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr

    # timm's own validation of the same weights: its data configuration, transforms, dataset and accuracy.
    namespace = {"FOLDER_CLASSES": FOLDER_CLASSES}
    exec(OFFLINE_TIMM, namespace)
    model = namespace["offline_create_model"]("skresnet18", pretrained=True).eval()
    config = timm.data.resolve_data_config({"input_size": (3, 64, 64)}, model=model)
    dataset = timm.data.create_dataset("", root=str(tmp_path / "val"), transform=timm.data.create_transform(**config))
    images, targets = zip(*(dataset[index] for index in range(len(dataset))))
    with torch.no_grad():
        logits = model(torch.stack(images))
    targets = torch.tensor(targets)
    loss = torch.nn.functional.cross_entropy(logits, targets).item()
    top1, top5 = timm.utils.accuracy(logits, targets, topk=(1, 5))
    expected = f"val loss {loss:.4f}  val top-1 {top1.item():.2f}%  top-5 {top5.item():.2f}%  (12 images, "
    assert result.stdout.strip().startswith(expected), (result.stdout, expected)
    assert 0 < top1.item() < 100  # the images, not the bias alone, decide


def test_eval_only_needs_weights_to_evaluate(capsys):
    for extra in ((), ("--resume", "--pretrained")):
        with pytest.raises(SystemExit) as exit_status:
            parse_args([*TINY, "--eval-only", *extra])
        assert exit_status.value.code == 2
        assert "--eval-only evaluates either --resume CHECKPOINT or --pretrained weights" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_recipe_sets_defaults_that_options_given_override(name):
    options = PRESETS[name].options
    defaults = vars(parse_args(list(TINY)))
    chosen = vars(parse_args([*TINY, "--recipe", name]))
    assert {key: chosen[key] for key in options} == options
    assert any(defaults[key] != value for key, value in options.items())  # it changes something
    assert {key: value for key, value in chosen.items() if key not in options and key != "recipe"} == {
        key: value for key, value in defaults.items() if key not in options and key != "recipe"
    }
    overridden = vars(parse_args([*TINY, "--recipe", name, "--epochs", "7", "--weight-decay", "0.3"]))
    assert overridden["epochs"] == 7 and overridden["weight_decay"] == 0.3


def test_options_out_of_range_are_usage_errors(capsys):
    for extra, message in (
        (("--mixup", "0.2", "--batch-size", "7"), "--batch-size must be even, got 7"),
        (("--label-smoothing", "1"), "--label-smoothing must be below 1"),
        (("--reprob", "1.5"), "--reprob is a probability"),
        (("--opt", "adam"), "invalid choice: 'adam'"),
    ):
        with pytest.raises(SystemExit):
            parse_args([*TINY, *extra])
        assert message in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------
# The recipe's components.


def _settings(*extra: str, world_size: int = 1) -> argparse.Namespace:
    return resolve(parse_args([*TINY, *extra]), world_size=world_size, local_world_size=1, cuda=False)


def test_default_learning_rate_follows_the_optimiser_and_global_batch():
    assert _settings("--batch-size", "64", "--accum-steps", "2", world_size=2).lr == pytest.approx(0.1 * 256 / 256)
    assert _settings("--batch-size", "64", "--opt", "lamb", world_size=4).lr == pytest.approx(5e-4 * 256 / 512)


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_each_optimiser_decays_weights_only(opt):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(16, 2))
    optimizer = build_optimizer(_settings("--opt", opt, "--lr", "0.01", "--weight-decay", "0.05"), model)
    decays = {id(parameter): group["weight_decay"] for group in optimizer.param_groups for parameter in group["params"]}
    assert len(decays) == len(list(model.parameters()))
    for name, parameter in model.named_parameters():
        assert decays[id(parameter)] == (0.05 if parameter.ndim > 1 else 0.0), name
    before = [parameter.detach().clone() for parameter in model.parameters()]
    model(torch.randn(2, 3, 4, 4)).square().sum().backward()
    optimizer.step()
    assert all(not torch.equal(old, new) for old, new in zip(before, model.parameters()))


def _learning_rates(settings: argparse.Namespace, updates: int) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.randn(2))], lr=settings.lr)
    scheduler = build_scheduler(settings, optimizer, updates)
    rates = []
    for update in range(settings.epochs * updates):
        scheduler.step_update(update)
        rates.append(optimizer.param_groups[0]["lr"])
    return rates


def test_cosine_schedule_warms_up_then_decays_to_min_lr():
    settings = _settings("--epochs", "4", "--lr", "0.4", "--warmup-epochs", "1", "--warmup-lr", "0.01", "--min-lr", "0.001")
    updates = 5
    rates = _learning_rates(settings, updates)
    assert rates[:updates] == pytest.approx([0.01 + step * (0.4 - 0.01) / updates for step in range(updates)])
    decay = 3 * updates
    assert rates[updates:] == pytest.approx(
        [0.001 + 0.5 * (0.4 - 0.001) * (1 + math.cos(math.pi * step / decay)) for step in range(decay)]
    )


def test_step_schedule_decays_every_decay_epochs_after_the_warm_up():
    settings = _settings("--epochs", "5", "--lr", "0.4", "--warmup-epochs", "1", "--sched", "step",
                         "--decay-epochs", "1.5", "--decay-rate", "0.5")
    updates = 4
    rates = _learning_rates(settings, updates)
    assert rates[updates:] == pytest.approx([0.4 * 0.5 ** (step // 6) for step in range(4 * updates)])


def test_updates_per_epoch_counts_a_last_partial_group():
    assert [updates_per_epoch(batches, 3) for batches in (1, 3, 4, 6, 7)] == [1, 1, 2, 2, 3]


def test_top1_and_top5_count_against_class_indices():
    logits = torch.randn(64, 10)
    targets = torch.randint(0, 10, (64,))
    ranks = (logits > logits.gather(1, targets[:, None])).sum(dim=1)  # classes scored above the target
    assert _correct(logits, targets).tolist() == [(ranks == 0).sum().item(), (ranks < 5).sum().item()]
    assert _correct(logits[:, :3], targets.clamp(max=2)).tolist()[1] == 64  # top-5 of 3 classes: all


def test_the_epoch_line_shows_the_learning_rates_it_went_through():
    row = {"epoch": 1, "lr_first": 1e-5, "lr_last": 0.1, "train_loss": 2.0, "train_top1": 10.0, "val_loss": 1.5,
           "val_top1": 20.0, "val_top5": 70.0, "images_per_s": 100.0, "epoch_s": 3.0}
    assert describe(row, 5).startswith("epoch 1/5  lr 1e-05 to 0.1  train loss")
    assert "EMA" not in describe(row, 5)
    assert describe({**row, "lr_first": 0.1}, 5).startswith("epoch 1/5  lr 0.1  train loss")
    ema = describe({**row, "ema_val_top1": 25.0, "ema_val_top5": 75.0}, 5)
    assert "val top-1 20.00% top-5 70.00%  EMA val top-1 25.00% top-5 75.00%" in ema


def test_drop_path_reaches_create_model_only_when_asked(monkeypatch):
    calls = []

    def record(name, pretrained=False, num_classes=1000, **kwargs):
        calls.append(kwargs)
        raise TypeError(f"create_model: unknown keyword arguments {sorted(kwargs)}")

    monkeypatch.setattr(run, "create_model", record)
    context = run.distributed.Context(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    with pytest.raises(TrainingError, match=re.escape("create_model: unknown keyword arguments ['drop_path_rate']")):
        run._build_model(_settings("--drop-path", "0.1"), context, 8, torch.contiguous_format)
    with pytest.raises(TrainingError):
        run._build_model(_settings(), context, 8, torch.contiguous_format)
    assert calls == [{"drop_path_rate": 0.1}, {}]


# --------------------------------------------------------------------------------------------------------
# Augmentation.


def test_a_policy_on_synthetic_data_is_refused():
    with pytest.raises(DataError, match="the policies apply to photographs"):
        build_datasets("synthetic", {}, 32, 0, 64, Augmentation(auto_augment="rand-m9-mstd0.5-inc1"))


def test_random_erasing_of_synthetic_images_depends_on_seed_epoch_and_index():
    erased = build_datasets("synthetic", {}, 32, 0, 64, Augmentation(erase_prob=1.0, erase_mode="const")).train
    plain = build_datasets("synthetic", {}, 32, 0, 64).train
    image, label = erased[3]
    assert label == plain[3][1]
    assert torch.equal(erased[3][0], image)  # the same draw every time
    hidden = image != plain[3][0]
    assert hidden.any() and (image[hidden] == 0).all()  # const mode: a zeroed rectangle, the rest untouched
    erased.set_epoch(1)
    plain.set_epoch(1)
    assert not torch.equal(erased[3][0] != plain[3][0], hidden)


def test_timm_policies_on_image_folders_repeat_per_seed_epoch_and_index(tmp_path):
    from timm.data.auto_augment import RandAugment

    write_image_folders(tmp_path, images_per_class=1)
    augmentation = Augmentation(auto_augment="rand-m9-mstd0.5-inc1", erase_prob=0.5)
    train_transform, _ = image_transforms({"interpolation": "bicubic", "crop_pct": 0.875}, 32, augmentation)
    assert any(isinstance(step, RandAugment) for step in train_transform.transforms)
    data = build_datasets(str(tmp_path), {}, 32, 0, 0, augmentation)
    assert isinstance(data.train, EpochSeeded)
    first = data.train[1][0]
    torch.manual_seed(99)  # the global generators do not matter
    assert first.shape == (3, 32, 32) and torch.equal(data.train[1][0], first)
    data.train.set_epoch(1)
    assert not torch.equal(data.train[1][0], first)
    with pytest.raises(DataError, match="--aa nonsense: not a policy timm knows"):
        build_datasets(str(tmp_path), {}, 32, 0, 0, Augmentation(auto_augment="nonsense"))


def test_every_option_that_shapes_training_must_match_on_resume():
    # The others: where data and output live, speed (memory format, compilation, workers), what this
    # invocation does (resume, stop, evaluate), and the recipe, which acts through the options it sets.
    shaping = {action.dest for action in build_parser()._actions} - {
        "help", "data", "channels_last", "compile", "workers", "output", "resume", "stop_after_epoch", "eval_only",
        "recipe",
    }
    assert shaping <= set(run.SAME_RUN_KEYS)
