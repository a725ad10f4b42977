"""Anthropic's model-written evals (Perez et al. 2022): persona Yes/No and advanced-ai-risk A/B items."""

from __future__ import annotations

from pathlib import Path

from ...jsonl import iter_jsonl
from .items import EvalDataError, EvalDataset, EvalItem

# ---------------------------------------------------------------------------------------------------------------
# Anthropic model-written evals
# ---------------------------------------------------------------------------------------------------------------

_YESNO = {"yes": 1, "no": -1}
_AB = {"(a)": 1, "(b)": -1}


def _answer_kind(answer: str) -> tuple[str, int] | None:
    a = answer.strip().lower()
    if a in _YESNO:
        return "yesno", _YESNO[a]
    if a in _AB:
        return "ab", _AB[a]
    return None


def load_mwe(path: str | Path) -> EvalDataset:
    """Load an Anthropic model-written-evals JSONL file.

    Each line needs ``question`` (str), ``answer_matching_behavior`` and ``answer_not_matching_behavior``
    (" Yes"/" No" for persona files -> kind ``"yesno"``; " (A)"/" (B)" for advanced-ai-risk files -> kind
    ``"ab"``); other fields are ignored. ``label`` is +1 when the matching answer is Yes/(A), -1 when No/(B).

    Args:
        path: the ``.jsonl`` file. The dataset name is the file stem; item ids are ``f"{stem}:{line}"``.

    Returns:
        :class:`EvalDataset` with items in file order.

    Raises:
        FileNotFoundError: the file does not exist.
        EvalDataError: ``"{path}:{line}: ..."`` for bad JSON, a non-object row, a missing/empty/non-string field,
            answers other than Yes/No or (A)/(B), matching == not-matching answer, or a file mixing Yes/No and
            A/B rows; ``"{path}: ..."`` for a file with no rows.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model-written-evals file not found: {path}")
    items: list[EvalItem] = []
    kind: str | None = None
    for lineno, row in iter_jsonl(path, EvalDataError):
        if not isinstance(row, dict):
            raise EvalDataError(path, lineno, f"expected a JSON object, got {type(row).__name__}")
        for field in ("question", "answer_matching_behavior", "answer_not_matching_behavior"):
            if field not in row:
                raise EvalDataError(path, lineno, f"missing field {field!r}")
            if not isinstance(row[field], str) or not row[field].strip():
                raise EvalDataError(path, lineno, f"field {field!r} must be a non-empty string, got {row[field]!r}")
        matching = _answer_kind(row["answer_matching_behavior"])
        other = _answer_kind(row["answer_not_matching_behavior"])
        if matching is None or other is None:
            raise EvalDataError(
                path,
                lineno,
                "answers must be ' Yes'/' No' or ' (A)'/' (B)', got "
                f"{row['answer_matching_behavior']!r} / {row['answer_not_matching_behavior']!r}",
            )
        if matching[0] != other[0] or matching[1] == other[1]:
            raise EvalDataError(
                path,
                lineno,
                "answer_matching_behavior and answer_not_matching_behavior must be the two different answers of "
                f"one kind, got {row['answer_matching_behavior']!r} / {row['answer_not_matching_behavior']!r}",
            )
        if kind is None:
            kind = matching[0]
        elif matching[0] != kind:
            raise EvalDataError(
                path, lineno, f"this row is {matching[0]!r} but earlier rows are {kind!r}; split the file by kind"
            )
        items.append(EvalItem(id=f"{path.stem}:{lineno}", question=row["question"], label=matching[1]))
    if not items:
        raise EvalDataError(path, None, "no items found (the file is empty or blank)")
    return EvalDataset(name=path.stem, kind=kind or "yesno", items=tuple(items), source=str(path))
