"""Which exceptions are a user's mistake: one line and exit code 2 wherever a command reports them."""

__all__ = ['USER_ERRORS']

# a bad option, config, file or data (ConfigError, DataError, WeightsError, ... are ValueErrors) or the
# non-finite-loss stop; anything else is a defect and keeps its traceback
USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError)
