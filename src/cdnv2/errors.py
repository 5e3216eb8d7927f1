"""Errors that describe a user's mistake: the CLI prints them as one paragraph, no traceback."""
from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (config, data, checkpoint). Exit code 2."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """A configuration value that cannot work."""


class TrainingInterrupted(Exception):
    """SIGTERM / SIGINT: a checkpoint was written; exit with the conventional code."""

    def __init__(self, signum: int, checkpoint: str | None):
        self.signum = signum
        self.checkpoint = checkpoint
        self.exit_code = 128 + signum
        super().__init__(f"interrupted by signal {signum}; checkpoint: {checkpoint}")


class NonFiniteLossError(UserError):
    """The loss became NaN/inf and nan_policy says stop (or too many bad steps)."""

    exit_code = 3


class CheckpointError(UserError, ValueError):
    """A checkpoint file that is missing, truncated, foreign or does not fit the run."""


class DataError(UserError):
    """A problem with the data the user can fix (missing folder, unreadable image, bad
    data config). The message is one paragraph meant to be printed as is."""


class ScheduleError(UserError, ValueError):
    """The model's masks do not agree with the condensation schedule (e.g. a resumed checkpoint)."""


class ParityError(UserError, ValueError):
    """The compact model does not reproduce the masked model's outputs."""
