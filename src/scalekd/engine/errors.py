"""How runs and commands end on purpose: a user's mistake (:class:`UserError`: one line and exit code 2
wherever a command reports it), a run that cannot start as asked, a loss that is not finite, a run a
signal stopped; and the one line that reports an error."""

import os
import signal
from typing import Optional

from ..method.errors import UserError

__all__ = ['UserError', 'ConfigError', 'RunError', 'LossNotFinite', 'RunInterrupted', 'stop_signal', 'error_line',
           'TRACEBACK_ENV', 'traceback_wanted']

TRACEBACK_ENV = 'SCALEKD_TRACEBACK'  # set to 1: a user error prints its traceback too


class ConfigError(UserError):
    """A config that cannot be read, or a value outside its range, with the key and file at fault."""


class RunError(UserError):
    """A run that cannot start as asked (output folder, resume, batch split)."""


class LossNotFinite(UserError):
    """The run stopped on a non-finite loss after saving the state from before it."""


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


def error_line(error: BaseException) -> str:
    """The error's message on one line; for one re-raised from a DataLoader worker (whose message
    carries the worker's traceback), the original message alone."""
    message = str(error).strip()
    if 'Original Traceback' in message:
        message = message.splitlines()[-1].split(': ', 1)[-1]
    return ' '.join(line.strip() for line in message.splitlines() if line.strip())


def traceback_wanted() -> bool:
    """Whether ``SCALEKD_TRACEBACK`` asks for the traceback of every error, user errors included."""
    return os.environ.get(TRACEBACK_ENV, '').strip().lower() not in ('', '0', 'false', 'no')
