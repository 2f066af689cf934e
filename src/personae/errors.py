"""Exception types shared by every personae module."""

from __future__ import annotations

from os import PathLike
from pathlib import Path

__all__ = ["PersonaeError", "DataError", "CardError"]


class PersonaeError(Exception):
    """Base class of every error personae raises on purpose."""


class DataError(PersonaeError, ValueError):
    """Bad input data: the message names the file and, when known, the 1-based line.

    ``str(err)`` reads ``pairs.jsonl:17: missing field 'caption'``. The bare ``message`` is kept
    on ``err.message`` and the location on ``err.path`` / ``err.line``. The constructor accepts a
    single positional message so that the error survives pickling and DataLoader workers.
    """

    def __init__(
        self,
        message: str,
        path: str | PathLike[str] | None = None,
        line: int | None = None,
    ) -> None:
        self.message = message
        self.path = Path(path) if path is not None else None
        self.line = line
        super().__init__(message)

    def __str__(self) -> str:
        if self.path is None:
            return self.message if self.line is None else f"line {self.line}: {self.message}"
        where = str(self.path) if self.line is None else f"{self.path}:{self.line}"
        return f"{where}: {self.message}"

    def __reduce__(self) -> tuple[type, tuple[str, Path | None, int | None]]:
        return (type(self), (self.message, self.path, self.line))


class CardError(DataError):
    """A character card that cannot be read or written; the message names the file."""
