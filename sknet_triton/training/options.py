"""The trainer's command line, and the defaults that depend on where it runs."""
from __future__ import annotations

import argparse
import math
import os
from typing import Optional, Sequence

from sknet_triton import list_models
from sknet_triton.training.checkpoint import FILENAME as CHECKPOINT_FILENAME
from sknet_triton.training.data import SYNTHETIC_CLASSES
from sknet_triton.training.presets import PRESETS

__all__ = ["AMP_DTYPES", "OPTIMIZERS", "SCHEDULES", "build_parser", "parse_args", "resolve"]

AMP_DTYPES = ("bf16", "fp16", "none")
MOMENTUM = 0.9
# --opt's names, and timm's optimizer factory's names for them (timm's "sgd" is Nesterov's).
OPTIMIZERS = {"sgd": "momentum", "nesterov": "nesterov", "adamw": "adamw", "lamb": "lamb", "rmsproptf": "rmsproptf"}
SCHEDULES = ("cosine", "step")
_LATEST = ""  # --resume without a path: the output directory's checkpoint


def _number(kind, minimum, inclusive: bool = True):
    """An argparse type: ``kind`` at least ``minimum`` (or above it, if not ``inclusive``)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if value < minimum or (not inclusive and value == minimum):
            raise argparse.ArgumentTypeError(f"must be {'at least' if inclusive else 'above'} {minimum}, got {text}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m sknet_triton.train``."""
    parser = argparse.ArgumentParser(
        prog="python -m sknet_triton.train",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Train an SKNet on one process, or on many under torchrun (one per GPU; gloo on CPUs).\n"
            "Loss, optimiser, schedule, augmentation, mixup and the weights' EMA are timm's components;\n"
            "--recipe sets the paper's or timm's options, and any option given overrides it."
        ),
        epilog=(
            "examples:\n"
            "  python -m sknet_triton.train --model sknet_tiny --data synthetic --img-size 32 --epochs 5\n"
            "  torchrun --nproc_per_node=8 -m sknet_triton.train --model sknet50 --data /data/imagenet"
        ),
    )
    parser.add_argument("--recipe", choices=tuple(PRESETS), default=None,
                        help="start from a published recipe's options (any option given overrides them): "
                             + "; ".join(f"{name}: {preset.description}" for name, preset in PRESETS.items()))
    parser.add_argument("--model", required=True, choices=list_models(), metavar="NAME",
                        help=f"network to train: {', '.join(list_models())}")
    parser.add_argument("--data", default="synthetic", metavar="PATH|synthetic",
                        help="an ImageFolder tree with train/ and val/ folders of one folder per class (needs "
                             f"torchvision), or 'synthetic': {SYNTHETIC_CLASSES} classes of textures that differ "
                             "only in scale, generated from --seed (default: synthetic)")
    parser.add_argument("--img-size", type=_number(int, 8), default=224, metavar="PIXELS",
                        help="side of the square training and validation images (default: 224)")
    parser.add_argument("--epochs", type=_number(int, 1), default=100, help="epochs of the schedule (default: 100)")
    parser.add_argument("--batch-size", type=_number(int, 2), default=64, metavar="N",
                        help="images per step in each process; BatchNorm needs at least 2 (default: 64)")
    parser.add_argument("--lr", type=_number(float, 0, inclusive=False), default=None,
                        help="peak learning rate, reached after the warm-up (default: 0.1 x global batch / 256 for "
                             "sgd and nesterov, 5e-4 x global batch / 512 for the others; the global batch counts "
                             "--accum-steps)")
    parser.add_argument("--opt", choices=tuple(OPTIMIZERS), default="sgd",
                        help=f"optimiser from timm's factory: sgd (momentum {MOMENTUM}), nesterov (SGD with "
                             "Nesterov momentum), adamw, lamb, rmsproptf (RMSProp as TensorFlow 1 has it) "
                             "(default: sgd)")
    parser.add_argument("--opt-eps", type=_number(float, 0, inclusive=False), default=None, metavar="EPS",
                        help="the adaptive optimisers' epsilon (default: timm's for each)")
    parser.add_argument("--weight-decay", type=_number(float, 0), default=1e-4, metavar="WD",
                        help="L2 penalty on weights; not on biases or normalisation parameters (default: 1e-4)")
    parser.add_argument("--sched", choices=SCHEDULES, default="cosine",
                        help="after the warm-up: cosine decay to --min-lr at the end, or step decay by "
                             "--decay-rate every --decay-epochs; stepped every update (default: cosine)")
    parser.add_argument("--warmup-epochs", type=_number(float, 0), default=None, metavar="EPOCHS",
                        help="epochs of linear warm-up from --warmup-lr to --lr; fractions allowed "
                             "(default: 5, at most a tenth of --epochs)")
    parser.add_argument("--warmup-lr", type=_number(float, 0), default=1e-5, metavar="LR",
                        help="learning rate of the first update of the warm-up (default: 1e-5)")
    parser.add_argument("--min-lr", type=_number(float, 0), default=0.0, metavar="LR",
                        help="where the cosine decay ends (default: 0)")
    parser.add_argument("--decay-epochs", type=_number(float, 0, inclusive=False), default=30.0, metavar="EPOCHS",
                        help="step schedule: epochs between decays, counted after the warm-up (default: 30)")
    parser.add_argument("--decay-rate", type=_number(float, 0, inclusive=False), default=0.1, metavar="FACTOR",
                        help="step schedule: factor of each decay (default: 0.1)")
    parser.add_argument("--clip-grad", type=_number(float, 0, inclusive=False), default=None, metavar="NORM",
                        help="clip the gradients' global L2 norm to NORM before each update (default: no clipping)")
    parser.add_argument("--accum-steps", type=_number(int, 1), default=1, metavar="K",
                        help="batches whose gradients are summed into each update; the last update of an epoch "
                             "takes what is left (default: 1)")
    parser.add_argument("--label-smoothing", type=_number(float, 0), default=0.0, metavar="EPSILON",
                        help="label smoothing of the loss, or of the mixed targets under mixup/cutmix (default: 0)")
    parser.add_argument("--mixup", type=_number(float, 0), default=0.0, metavar="ALPHA",
                        help="mixup's Beta(ALPHA, ALPHA); 0 turns it off (default: 0); needs an even --batch-size")
    parser.add_argument("--cutmix", type=_number(float, 0), default=0.0, metavar="ALPHA",
                        help="cutmix's Beta(ALPHA, ALPHA); 0 turns it off (default: 0). With both, each batch "
                             "takes one of the two at random")
    parser.add_argument("--aa", default=None, metavar="POLICY",
                        help="RandAugment or AutoAugment in timm's notation, e.g. rand-m9-mstd0.5-inc1 or "
                             "original; ImageFolder data only (default: none)")
    parser.add_argument("--reprob", type=_number(float, 0), default=0.0, metavar="P",
                        help="random erasing: probability per training image (default: 0)")
    parser.add_argument("--remode", choices=("const", "rand", "pixel"), default="pixel",
                        help="random erasing's fill: zeros, one random colour, or random pixels (default: pixel)")
    parser.add_argument("--drop-path", type=_number(float, 0), default=None, metavar="RATE",
                        help="stochastic depth: the models' drop_path_rate (default: the model's own)")
    parser.add_argument("--model-ema", action="store_true",
                        help="keep an exponential moving average of the weights (timm's ModelEmaV3), validated "
                             "after each epoch and checkpointed beside the model")
    parser.add_argument("--model-ema-decay", type=_number(float, 0), default=0.9998, metavar="DECAY",
                        help="the EMA's decay per update (default: 0.9998)")
    parser.add_argument("--amp", choices=AMP_DTYPES, default=None,
                        help="mixed precision: bf16, fp16 (with loss scaling) or none (default: bf16 on GPUs, none on CPUs)")
    parser.add_argument("--channels-last", action="store_true", help="run the model in channels_last memory format")
    parser.add_argument("--compile", action="store_true", help="compile the training step with torch.compile")
    parser.add_argument("--sync-bn", action="store_true",
                        help="BatchNorm statistics over the global batch rather than each process's (GPUs, several processes)")
    parser.add_argument("--workers", type=_number(int, 0), default=None, metavar="N",
                        help="data-loading worker processes per training process (default: this machine's CPUs "
                             "shared among its training processes, at most 8)")
    parser.add_argument("--output", default=None, metavar="DIR",
                        help=f"where {CHECKPOINT_FILENAME} (written after every epoch) and log.csv go "
                             "(default: runs/MODEL)")
    parser.add_argument("--resume", nargs="?", const=_LATEST, default=None, metavar="CHECKPOINT",
                        help=f"continue the run saved in CHECKPOINT (default: DIR/{CHECKPOINT_FILENAME}) exactly "
                             "where it stopped; the settings that shape training must be the same")
    parser.add_argument("--stop-after-epoch", type=_number(int, 1), default=None, metavar="EPOCH",
                        help="end this run after epoch EPOCH, keeping the schedule of --epochs; continue later "
                             "with --resume (for time-limited jobs)")
    parser.add_argument("--pretrained", action="store_true",
                        help="start from timm's ImageNet weights of the model (create_model(pretrained=True); "
                             "timm downloads them)")
    parser.add_argument("--eval-only", action="store_true",
                        help="only report the validation folder's loss, top-1 and top-5: of the weights of "
                             "--resume CHECKPOINT (and of their EMA, if saved), or of --pretrained with timm's "
                             "1000 classes (the folder's class folders sorted as ImageNet's synsets); no train/ "
                             "needed, nothing written")
    parser.add_argument("--seed", type=_number(int, 0), default=0,
                        help="seed of the initial weights, data order, augmentation and synthetic images (default: 0)")
    parser.add_argument("--synthetic-size", type=_number(int, 1), default=10_000, metavar="N",
                        help="images in the synthetic training set; validation has a quarter as many (default: 10000)")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line, checked; exits with a usage message (status 2) on bad input.

    ``--recipe NAME`` replaces the defaults by the recipe's options before the command line is read.
    """
    parser = build_parser()
    recipe = argparse.ArgumentParser(add_help=False)
    recipe.add_argument("--recipe", choices=tuple(PRESETS), default=None)
    chosen, _ = recipe.parse_known_args(argv)
    if chosen.recipe is not None:
        parser.set_defaults(**PRESETS[chosen.recipe].options)
    args = parser.parse_args(argv)
    if args.warmup_epochs is not None and args.warmup_epochs >= args.epochs:
        parser.error(f"--warmup-epochs ({args.warmup_epochs:g}) must be less than --epochs ({args.epochs})")
    if args.stop_after_epoch is not None and args.stop_after_epoch > args.epochs:
        parser.error(f"--stop-after-epoch ({args.stop_after_epoch}) is past --epochs ({args.epochs})")
    for option, value in (("--label-smoothing", args.label_smoothing), ("--drop-path", args.drop_path),
                          ("--model-ema-decay", args.model_ema_decay)):
        if value is not None and value >= 1:
            parser.error(f"{option} must be below 1, got {value:g}")
    if args.reprob > 1:
        parser.error(f"--reprob is a probability, got {args.reprob:g}")
    if args.eval_only and (args.resume is None) == (not args.pretrained):
        parser.error("--eval-only evaluates either --resume CHECKPOINT or --pretrained weights: give one of them")
    if (args.mixup or args.cutmix) and args.batch_size % 2:
        parser.error(f"--mixup and --cutmix pair each image with another: --batch-size must be even, got {args.batch_size}")
    return args


def resolve(args: argparse.Namespace, world_size: int, local_world_size: int, cuda: bool) -> argparse.Namespace:
    """``args`` with every environment-dependent default made concrete: the settings a checkpoint records."""
    settings = argparse.Namespace(**vars(args))
    if settings.lr is None:
        global_batch = settings.batch_size * settings.accum_steps * world_size
        settings.lr = 0.1 * global_batch / 256 if settings.opt in ("sgd", "nesterov") else 5e-4 * global_batch / 512
    if settings.warmup_epochs is None:
        settings.warmup_epochs = min(5.0, settings.epochs / 10)
    if settings.amp is None:
        settings.amp = "bf16" if cuda else "none"
    if settings.workers is None:
        settings.workers = min(8, (os.cpu_count() or 1) // local_world_size)
    if settings.output is None:
        settings.output = os.path.join("runs", settings.model)
    if settings.resume == _LATEST:
        settings.resume = os.path.join(settings.output, CHECKPOINT_FILENAME)
    return settings
