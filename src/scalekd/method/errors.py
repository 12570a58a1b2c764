"""The base of the errors that are a user's mistake: commands report them in one line with exit code 2,
while any other exception is a defect and keeps its traceback. It lives in the lowest layer so that
every layer can raise it."""

__all__ = ['UserError', 'OptionError']


class UserError(Exception):
    """A mistake in what the user asked for or pointed at (an option, a config, a file, data, a model
    name); the message names the key, file or cause and what to do."""


class OptionError(UserError):
    """A distillation option that is unknown, out of range, or does not fit another option or the models."""
