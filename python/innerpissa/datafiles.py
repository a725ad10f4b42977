"""The package's own data files (``innerpissa/data/``): concepts, suffixes, neutral texts, guard questions.

They ship inside the wheel, so nothing here touches the network or the user's data folder (evaluation sets are
read by :mod:`innerpissa.eval.datasets` from a path instead).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any


def data_path(name: str) -> Path:
    """Path of ``innerpissa/data/<name>`` (the installed package's copy)."""
    return Path(str(resources.files("innerpissa") / "data" / name))


def read_data(name: str) -> Any:
    """Parsed JSON of ``innerpissa/data/<name>``.

    Raises:
        FileNotFoundError: the file is not in the installed package (a broken install: reinstall innerpissa).
    """
    return json.loads(data_path(name).read_text(encoding="utf-8"))
