"""Line-numbered JSONL reading shared by the pair and evaluation-data loaders."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def iter_jsonl(path: Path, error: Callable[[Path, int, str], Exception]) -> Iterator[tuple[int, Any]]:
    """Yield (1-based line number, parsed JSON) for the non-blank lines of ``path``.

    Raises ``error(path, lineno, message)`` on a line that is not valid UTF-8 or not valid JSON.
    """
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise error(path, lineno, f"not valid UTF-8 ({err.reason} at byte {err.start})") from None
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as err:
                raise error(
                    path, lineno, f"invalid JSON ({err.msg} at column {err.colno}); write one JSON object per line"
                ) from None
