"""Exception types. Every error guardmerge raises on bad input is a ``GuardmergeError``.

Messages name the file, expert, tensor or field at fault, so the user can fix it without a
traceback.
"""

from __future__ import annotations


class GuardmergeError(Exception):
    """Base class of every error guardmerge raises deliberately."""


class ConfigError(GuardmergeError):
    """A merge config (YAML or overrides) is invalid: unknown method, parameter, bad value."""


class CheckpointError(GuardmergeError):
    """A checkpoint cannot be found, read, or is of a refused format (pickle, corrupt file)."""


class CompatibilityError(GuardmergeError):
    """Experts do not share architecture, shapes, vocabulary or tensors with the base."""


class StatisticsError(GuardmergeError):
    """Statistics (Gram matrices, Fisher) are missing, malformed, or belong to another expert."""


class OutputExistsError(GuardmergeError):
    """The output folder exists and ``force`` was not given."""


class DataError(GuardmergeError):
    """A data file (JSONL, CSV, TXT) is missing, empty, or lacks the requested field."""


class OutputError(GuardmergeError):
    """The output path is unsafe (it is, holds or lies inside an input) or cannot be written."""
