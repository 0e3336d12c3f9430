"""The trainer's user-facing errors."""


class TrainingError(Exception):
    """A problem with the run's input (options, data, checkpoint), reported as one line, exit status 2."""


class DataError(TrainingError):
    """The dataset cannot be built from the given options."""


class CheckpointError(TrainingError):
    """A checkpoint is missing, unreadable, or belongs to a different run."""
