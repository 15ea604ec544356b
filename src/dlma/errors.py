"""Errors that the CLI reports as one clean line instead of a traceback."""

from __future__ import annotations


class DlmaError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""


class DataError(DlmaError):
    """A malformed record: names the file and line so the user can fix it."""

    def __init__(self, path: object, line: int | None, message: str):
        self.path, self.line = str(path), line
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")
