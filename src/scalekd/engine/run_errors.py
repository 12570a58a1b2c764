"""The two ways a run ends early on purpose: it cannot start as asked, or a signal stopped it."""

__all__ = ['RunError', 'RunInterrupted']


class RunError(ValueError):
    """A run that cannot start as asked (output folder, resume, batch split)."""


class RunInterrupted(RuntimeError):
    """SIGTERM / SIGINT stopped the run after saving a checkpoint."""
