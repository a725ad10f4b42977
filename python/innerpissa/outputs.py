"""Output paths written safely: check before compute, publish by atomic rename (files and directories).

Every writer in the package (adapters, exports, run directories, reports) goes through these, so an interrupted run
never leaves a torn file and nothing the user did not ask to replace is replaced.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .errors import OutputExistsError


def check_output(
    path: str | Path, overwrite: bool = False, *, kind: str = "dir", protect: tuple[str | Path, ...] = ()
) -> Path:
    """Check an output path before any compute: nothing the caller did not ask to replace gets replaced.

    Args:
        path: output directory (``kind="dir"``) or file (``kind="file"``).
        overwrite: allow a non-empty directory (only the files the export writes are replaced; others are
            kept) or an existing file.
        protect: directories the output must not be or contain (e.g. the adapter being exported).
    Raises:
        OutputExistsError: the path exists (non-empty) without ``overwrite``, has the wrong kind, or is a
            protected input directory.
    """
    p = Path(path).expanduser()
    for q in protect:
        q = Path(q).expanduser().resolve()
        if p.resolve() == q:
            raise OutputExistsError(
                f"output is the input directory {q} (or holds it); choose another output path", path=p
            )
    if kind == "dir":
        if p.exists() and not p.is_dir():
            raise OutputExistsError("exists and is not a directory; choose another output path", path=p)
        if p.is_dir() and any(p.iterdir()) and not overwrite:
            raise OutputExistsError(
                "exists and is not empty; pass --overwrite (overwrite=True) to replace the "
                "files this command writes (other files are kept), or choose another path",
                path=p,
            )
    else:
        if p.is_dir():
            raise OutputExistsError("is a directory; the output of this format is a file", path=p)
        if p.exists() and not overwrite:
            raise OutputExistsError(
                "exists; pass --overwrite (overwrite=True) to replace it, or choose another path", path=p
            )
    return p


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp)`` on a temporary sibling of ``path``, then rename it to ``path`` (removed on error)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_dir(out: Path, fill, overwrite: bool = False) -> Path:
    """Fill a temporary sibling directory, then publish it as ``out``.

    A new or empty ``out`` receives the whole directory by rename. A non-empty ``out`` is refused unless
    ``overwrite``; then each written file replaces its namesake by an atomic rename and every other file in
    ``out`` is kept. Nothing is ever deleted that ``fill`` did not write.

    Raises:
        OutputExistsError: ``out`` is non-empty without ``overwrite``, or a written file would replace a
            directory (or a directory a file).
    """
    out = check_output(out, overwrite).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        fill(tmp)
        if not out.exists():
            os.replace(tmp, out)
            return out
        for src in sorted(tmp.rglob("*")):
            dst = out / src.relative_to(tmp)
            if src.is_dir():
                if dst.exists() and not dst.is_dir():
                    raise OutputExistsError("is a file where the export writes a directory", path=dst)
                dst.mkdir(exist_ok=True)
            else:
                if dst.is_dir():
                    raise OutputExistsError("is a directory where the export writes a file", path=dst)
                os.replace(src, dst)
        shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
