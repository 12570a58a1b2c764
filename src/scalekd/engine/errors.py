"""How runs and commands end on purpose: a run that cannot start as asked, a run a signal stopped,
and which exceptions are a user's mistake (one line and exit code 2 wherever a command reports them)."""

import signal
from typing import Optional

__all__ = ['RunError', 'RunInterrupted', 'USER_ERRORS', 'stop_signal']


class RunError(ValueError):
    """A run that cannot start as asked (output folder, resume, batch split)."""


class RunInterrupted(RuntimeError):
    """SIGTERM / SIGINT stopped the run after saving a checkpoint (``signum``: None when the signal came
    to another rank)."""

    def __init__(self, message: str, signum: Optional[int] = None):
        super().__init__(message)
        self.signum = signum


def stop_signal(error: BaseException) -> signal.Signals:
    """The signal behind a stop: the one the error carries (``signum``, as :class:`RunInterrupted` does),
    else SIGINT (``KeyboardInterrupt``, or a signal that came to another rank)."""
    return signal.Signals(getattr(error, 'signum', None) or signal.SIGINT)


# a bad option, config, file or data (ConfigError, DataError, WeightsError, RunError, ... are ValueErrors) or
# the non-finite-loss stop; anything else is a defect and keeps its traceback
USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError)
