"""Errors meant for the user: one line, no traceback, a non-zero exit code in the CLI."""


class IBNormError(Exception):
    """A problem with the user's input (path, file, option, architecture)."""

    exit_code = 2


class SourceError(IBNormError):
    """The source model cannot be found, read or understood."""


class OutputExistsError(IBNormError):
    """The output path exists and ``force`` was not given."""
