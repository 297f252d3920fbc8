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


class InvalidTextError(GuardmergeError):
    """A text that cannot be classified (not encodable as UTF-8, e.g. a lone surrogate)."""

    def __init__(self, index: int, position: int, char: str) -> None:
        super().__init__(
            f"text {index} is not valid Unicode text: it has the lone surrogate U+{ord(char):04X} "
            f"at character {position} (send UTF-8 text)"
        )
        self.index, self.position = index, position


class NonFiniteOutputError(GuardmergeError):
    """A model produced NaN or infinite scores: no verdict can be given (a guard fails closed)."""


class NonFiniteWeightsError(GuardmergeError):
    """A model's weights hold NaN or infinity: it must not answer at all."""

    def __init__(self, names: list[str]) -> None:
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        super().__init__(
            f"the model's weights hold NaN or infinity in {len(names)} tensor(s) ({shown}): it does not answer"
        )
        self.names = list(names)


class HubError(GuardmergeError):
    """A Hugging Face Hub repository cannot be written: a bad repository id or branch, a refused
    token, a missing repository, an unreachable Hub."""
