"""Where the evaluation data is (``--data-dir``, ``$IPISSA_DATA_DIR``, the repository's shared folder, the cache)
and fetching the default files into the cache on networked machines (atomic, resumable)."""

from __future__ import annotations

import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from ...datafiles import read_data

#: Environment variable naming the evaluation data directory.
DATA_DIR_ENV = "IPISSA_DATA_DIR"


class DataDownloadError(RuntimeError):
    """Downloading an evaluation file failed; the message names the URL."""


# ---------------------------------------------------------------------------------------------------------------
# Locating and fetching the data
# ---------------------------------------------------------------------------------------------------------------

_HOW_TO_GET_DATA = (
    "Evaluation data not found: run `ipissa fetch-data` on a networked machine (downloads into {cache}), or pass\n"
    "--data-dir / set {env} to a folder laid out as\n"
    "  dailydilemmas/dilemma.csv, dailydilemmas/values.csv   (github.com/kellycyy/daily_dilemmas, data/*.csv)\n"
    "  anthropic_mwe/persona/<behaviour>.jsonl              (github.com/anthropics/evals, persona/*.jsonl)\n"
    "Looked in: {looked}"
)


def default_cache_dir() -> Path:
    """The download cache for evaluation data: ``~/.cache/innerpissa/data``."""
    return Path.home() / ".cache" / "innerpissa" / "data"


def _repo_root() -> Path | None:
    for parent in Path(__file__).resolve().parents:
        if (parent / "pyproject.toml").is_file() or (parent / ".git").exists():
            return parent
    return None


def data_dir(explicit: str | Path | None = None) -> Path:
    """Where evaluation data lives.

    Order: ``explicit``; else ``$IPISSA_DATA_DIR``; else the first existing of ``../shared/data`` relative to the
    current directory and relative to the repository root (found by walking up from this file to a folder with
    ``pyproject.toml`` or ``.git``); else the download cache ``~/.cache/innerpissa/data`` if it exists and is not
    empty (fill it with :func:`fetch_dataset`).

    Returns:
        The folder (resolved), laid out as ``dailydilemmas/…`` and ``anthropic_mwe/persona/…``.

    Raises:
        FileNotFoundError: ``explicit`` or ``$IPISSA_DATA_DIR`` names a missing folder, or nothing was found; the
            message says where it looked and how to get the data.
    """
    if explicit is not None:
        p = Path(explicit).expanduser()
        if not p.is_dir():
            raise FileNotFoundError(f"evaluation data folder not found: {p}")
        return p.resolve()
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        p = Path(env).expanduser()
        if not p.is_dir():
            raise FileNotFoundError(f"{DATA_DIR_ENV}={env} but that folder does not exist")
        return p.resolve()
    candidates = [Path.cwd() / ".." / "shared" / "data"]
    root = _repo_root()
    if root is not None:
        candidates.append(root / ".." / "shared" / "data")
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    cache = default_cache_dir()
    if cache.is_dir() and any(cache.iterdir()):
        return cache
    looked = ", ".join(str(c) for c in [*candidates, cache])
    raise FileNotFoundError(_HOW_TO_GET_DATA.format(env=DATA_DIR_ENV, cache=cache, looked=looked))


_SOURCES = {
    "dailydilemmas/": "https://raw.githubusercontent.com/kellycyy/daily_dilemmas/main/data/",
    "anthropic_mwe/": "https://raw.githubusercontent.com/anthropics/evals/main/",
}


def dataset_url(name: str) -> str:
    """The original raw GitHub URL of a data file named by its path under the data folder.

    ``"dailydilemmas/<file>"`` -> kellycyy/daily_dilemmas ``data/<file>``; ``"anthropic_mwe/<path>"`` ->
    anthropics/evals ``<path>`` (e.g. ``anthropic_mwe/persona/openness.jsonl``). Raises ValueError otherwise.
    """
    parts = Path(name).parts
    if not parts or Path(name).is_absolute() or ".." in parts:
        raise ValueError(f"dataset name must be a relative path without '..', got {name!r}")
    for prefix, base in _SOURCES.items():
        if name.startswith(prefix) and len(name) > len(prefix):
            return base + name[len(prefix) :]
    raise ValueError(
        f"unknown dataset {name!r}; names look like 'dailydilemmas/dilemma.csv', 'dailydilemmas/values.csv' or "
        "'anthropic_mwe/persona/<behaviour>.jsonl'"
    )


def default_files() -> list[str]:
    """Paths (under the data folder) of the default suite's evaluation files (``data/eval_files.json``)."""
    return list(read_data("eval_files.json")["files"])


def fetch_default_data(cache: Path | None = None) -> list[Path]:
    """Download every file of :func:`default_files` into ``cache`` (default :func:`default_cache_dir`), skipping
    those already there; each lands atomically (:func:`fetch_dataset`).

    Returns:
        The local paths, in :func:`default_files` order.

    Raises:
        DataDownloadError: a download failed (the message names the URL); files fetched before it are kept.
    """
    cache = Path(cache) if cache is not None else default_cache_dir()
    return [fetch_dataset(name, cache) for name in default_files()]


def fetch_dataset(name: str, cache: Path) -> Path:
    """Download one evaluation file from its original source into ``cache/name`` (if not already there).

    The file is written to a temporary file in the same folder and moved into place with ``os.replace``, so an
    interrupted download never leaves a partial file under the final name. Needs network access; never called by
    the tests.

    Args:
        name: path under the data folder, e.g. ``"dailydilemmas/dilemma.csv"`` or
            ``"anthropic_mwe/persona/openness.jsonl"`` (see :func:`dataset_url`).
        cache: the cache folder (usually :func:`default_cache_dir`).

    Returns:
        Path of the local file.

    Raises:
        ValueError: unknown name.
        DataDownloadError: the download failed; the message names the URL.
    """
    url = dataset_url(name)
    dest = Path(cache) / name
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
            while chunk := resp.read(1 << 16):
                out.write(chunk)
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        raise DataDownloadError(
            f"could not download {url} ({err}); check the network, or fetch it by hand into {dest}"
        ) from err
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest
