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


def yaml_error(exc: Exception) -> str:
    """A YAML parser error on one line: what it expected and where (line, column from 1)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


def os_error_message(exc: OSError) -> str:
    """One line for an OSError a user can act on: what happened, to which file, what to do."""
    import errno

    where = f" ({exc.filename})" if exc.filename else ""
    if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return (f"no room to write{where}: the disk or quota is full, or a file-size limit was hit; free space "
                "and rerun the same command to resume (whole records written so far are kept)")
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write{where}: {exc.strerror or 'read-only or permission denied'}; choose a writable --out"
    return f"{exc.strerror or exc}{where}"
