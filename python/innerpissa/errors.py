"""One family of errors for everything a user can get wrong: a file, a field, a number, an output path.

Every error the package raises on bad input derives from :class:`InnerPiSSAError`, whose message is one line
that names where the problem is (a file, a line, a field) and what to do. The CLI prints that line and exits 1;
``ipissa --debug …`` shows the traceback instead.
"""

from __future__ import annotations

import math
from pathlib import Path


class InnerPiSSAError(Exception):
    """Base class: a one-line message naming the file / line / field at fault and the fix.

    Attributes:
        path: the file or directory at fault, or None.
        lineno: 1-based line of ``path``, or None.
        field: the config field or argument at fault, or None.
    """

    def __init__(
        self, message: str, *, path: str | Path | None = None, lineno: int | None = None, field: str | None = None
    ) -> None:
        self.path = None if path is None else str(path)
        self.lineno = lineno
        self.field = field
        where = ""
        if self.path is not None:
            where = f"{self.path}:{lineno}: " if lineno is not None else f"{self.path}: "
        super().__init__(where + message)


class ConfigError(InnerPiSSAError, ValueError):
    """A configuration value (adapter, training, evaluation or CLI option) has the wrong type or range."""


class OutputExistsError(InnerPiSSAError, FileExistsError):
    """An output path holds files the package did not write in this call; pass ``overwrite=True``
    (CLI ``--overwrite``) or choose another path."""


class ResumeMismatchError(InnerPiSSAError, ValueError):
    """A run directory's checkpoint was made with another configuration or other data than the rerun asks for."""


class AdapterFileError(InnerPiSSAError, ValueError):
    """An adapter directory is missing, truncated, corrupted (checksum), or of an unknown format version."""


class MissingFileError(AdapterFileError, FileNotFoundError):
    """A file the command needs is not there (the path is named)."""


class NonFiniteError(InnerPiSSAError, ValueError):
    """A NaN or infinity in a coefficient, a parameter, a loss or a score."""


class TrainingDivergedError(InnerPiSSAError, RuntimeError):
    """The training loss or the adapter parameters blew up; the adapter was not saved."""


def finite_coeff(value, name: str = "coefficient") -> float:
    """``float(value)`` when it is a finite real number.

    Raises:
        NonFiniteError: NaN or ±inf (names ``name``).
        ConfigError: not a number.
    """
    try:
        c = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}", field=name) from None
    if not math.isfinite(c):
        raise NonFiniteError(f"{name} must be finite, got {c}", field=name)
    return c
