"""Errors meant for the user: one line, no traceback, a non-zero exit code in the CLI."""


class IBNormError(Exception):
    """A problem with the user's input (path, file, option, architecture)."""

    exit_code = 2


class SourceError(IBNormError):
    """The source model cannot be found, read or understood."""


class OutputExistsError(IBNormError):
    """The output path exists and ``force`` was not given."""


class OptionError(IBNormError):
    """A command-line option is out of range, not finite, or does not apply to this source."""


class CorruptFileError(SourceError):
    """A file (safetensors header, shard index, manifest) is malformed or inconsistent."""


class StateMismatchError(SourceError):
    """The weights do not match the architecture (missing, unexpected or misshapen tensors)."""


class NonFiniteError(IBNormError):
    """A weight or a metric the tool would write or report is NaN or infinite."""


class OutputError(IBNormError):
    """The output cannot be written (no space, read-only, overlaps the source)."""
