"""The trainer's user-facing errors."""


class TrainingError(Exception):
    """A problem with the run's input (options, data, checkpoint), reported as one line, exit status 2."""

    def __init__(self, message: str):
        super().__init__(_original_message(message, type(self)))


class DataError(TrainingError):
    """The dataset cannot be built from the given options, or one of its files cannot be read."""


class CheckpointError(TrainingError):
    """A checkpoint is missing, unreadable, or belongs to a different run."""


class Interrupted(Exception):
    """The user stopped the run (Ctrl-C); the message, one line, says what the output directory holds.

    Only the main process reports it: the message of every other process is empty.
    """


def _original_message(message: str, error_type: type) -> str:
    """``message``, or the message of the error a DataLoader worker raised when ``message`` is the worker's.

    A worker's error reaches the main process rebuilt as ``error_type(text)``, where the text is the worker's
    whole traceback, ending in the line ``module.Type: message``: the message is what the user needs.
    """
    lines = message.rstrip().splitlines()
    prefix = f"{error_type.__module__}.{error_type.__qualname__}: "
    if len(lines) > 1 and lines[0].startswith(f"Caught {error_type.__name__} in DataLoader worker"):
        if lines[-1].startswith(prefix):
            return lines[-1][len(prefix):]
    return message
