"""Train a registered SKNet: ``python -m sknet_triton.train --model NAME --data PATH|synthetic ...``.

One process, or one per GPU under ``torchrun -m sknet_triton.train``; ``--help`` lists the options.
Bad options, data or checkpoints end the run with a one-line message and exit status 2; Ctrl-C ends it with
one line naming the intact checkpoint, and exit status 130 (the shell's for an interrupt).
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from sknet_triton.training.errors import Interrupted, TrainingError
from sknet_triton.training.options import parse_args
from sknet_triton.training.run import train

__all__ = ["main"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the trainer with command-line arguments ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    args = parse_args(argv)
    try:
        train(args)
    except TrainingError as error:
        print(f"sknet_triton.train: error: {error}", file=sys.stderr)
        return 2
    except Interrupted as interruption:
        if str(interruption):
            print(f"sknet_triton.train: {interruption}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
