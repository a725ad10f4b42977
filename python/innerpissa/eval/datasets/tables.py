"""Reading the CSV tables of the evaluation sources: rows with their line numbers, and list-valued cells."""

from __future__ import annotations

import ast
import csv
import math
from pathlib import Path
from typing import Any

from ...jsonl import iter_jsonl
from .items import EvalDataError


def parse_list(text: Any) -> list[str | None]:
    """Parse a python-literal / JSON list cell such as ``"['a', nan, 'b']"``; nan/None/NaN -> None.

    A real list (from a JSONL row) is accepted as is. Raises ValueError on anything else.
    """
    if isinstance(text, list):
        return [None if (v is None or (isinstance(v, float) and math.isnan(v))) else str(v) for v in text]
    if not isinstance(text, str):
        raise ValueError(f"expected a list, got {type(text).__name__}")
    s = text.strip()
    if not s:
        return []
    node = ast.parse(s, mode="eval").body
    if not isinstance(node, (ast.List, ast.Tuple)):
        raise ValueError(f"expected a list like \"['honesty', 'care']\", got {s[:60]!r}")
    out: list[str | None] = []
    for el in node.elts:
        if isinstance(el, ast.Constant) and isinstance(el.value, str):
            out.append(el.value)
        elif (
            isinstance(el, ast.Constant)
            and (el.value is None or (isinstance(el.value, float) and math.isnan(el.value)))
        ) or (isinstance(el, ast.Name) and el.id.lower() in ("nan", "none", "null")):
            out.append(None)
        else:
            raise ValueError(f"unexpected list element {ast.unparse(el)!r}")
    return out


def read_rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    """Rows of a CSV (header + (start line, row)) or JSONL (keys of the first row, (line, row))."""
    if path.suffix.lower() in (".jsonl", ".json"):
        rows = []
        for lineno, row in iter_jsonl(path, EvalDataError):
            if not isinstance(row, dict):
                raise EvalDataError(path, lineno, f"expected a JSON object, got {type(row).__name__}")
            rows.append((lineno, row))
        header = list(rows[0][1]) if rows else []
        return header, rows
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = list(reader.fieldnames or [])
        rows = []
        start = reader.line_num + 1
        try:
            for row in reader:
                rows.append((start, row))
                start = reader.line_num + 1
        except csv.Error as err:
            raise EvalDataError(path, start, f"malformed CSV ({err})") from None
    return header, rows
