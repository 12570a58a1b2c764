"""How runs and commands end on purpose: a run that cannot start as asked, a run a signal stopped,
and which exceptions are a user's mistake (one line and exit code 2 wherever a command reports them)."""

from typing import Optional

__all__ = ['RunError', 'RunInterrupted', 'USER_ERRORS']


class RunError(ValueError):
    """A run that cannot start as asked (output folder, resume, batch split)."""


class RunInterrupted(RuntimeError):
    """SIGTERM / SIGINT stopped the run after saving a checkpoint (``signum``: None when the signal came
    to another rank)."""

    def __init__(self, message: str, signum: Optional[int] = None):
        super().__init__(message)
        self.signum = signum


# a bad option, config, file or data (ConfigError, DataError, WeightsError, RunError, ... are ValueErrors) or
# the non-finite-loss stop; anything else is a defect and keeps its traceback
USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError)
