"""TruthfulQA (Lin, Hilton, Evans 2022) as multiple-choice items: true and false answers scored as continuations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .items import EvalDataError, EvalDataset, EvalItem
from .tables import parse_list, read_rows

# ---------------------------------------------------------------------------------------------------------------
# TruthfulQA (multiple choice)
# ---------------------------------------------------------------------------------------------------------------


def _answers(cell: Any) -> list[str]:
    """A TruthfulQA answers cell: ``"a; b; c"`` (the original CSV), a JSON/python list string, or a list (null
    entries skipped).

    Raises:
        ValueError: a numpy array's repr (``"['a' 'b']"``, what pandas writes for list columns), which cannot be
            split safely.
    """
    if isinstance(cell, list):
        return [str(a).strip() for a in cell if a is not None and str(a).strip()]
    if cell is None:
        return []
    text = str(cell).strip()
    if text.startswith("["):
        if ("," not in text and "' '" in text) or '" "' in text:
            raise ValueError(
                "this looks like a numpy array's repr (no commas between answers); save the answer "
                "lists as JSON lists or ';'-separated text"
            )
        return [a for a in (x.strip() if x else "" for x in parse_list(text)) if a]
    return [a.strip() for a in text.split(";") if a.strip()]


def load_truthfulqa(path: str | Path, name: str = "truthfulqa") -> EvalDataset:
    """Load TruthfulQA as multiple-choice items (kind ``"mc"``, label +1, ``id = f"{name}:{line}"``).

    Layouts (header names matched case-insensitively, spaces and underscores alike):

    - the original ``TruthfulQA.csv``: ``Question``, ``Best Answer``, ``Correct Answers`` and
      ``Incorrect Answers`` (answers separated by ``;``);
    - the Hugging Face ``truthful_qa`` "generation" rows saved as CSV or JSONL: ``question``, ``best_answer``,
      ``correct_answers`` and ``incorrect_answers`` as lists.

    The true answers are the best answer followed by the other correct answers (duplicates removed); the false
    answers are the incorrect ones. An answer listed as both true and false is an error.

    Args:
        path: the CSV or JSONL file.
        name: the dataset's name (reports, targets): ``"truthfulqa"`` by default whatever the file is called.

    Returns:
        :class:`EvalDataset` with items in file order.

    Raises:
        FileNotFoundError: the file does not exist.
        EvalDataError: ``"{path}:{line}: ..."`` for a missing column, an empty question, a row with no true or
            no false answer, or an answer both true and false; ``"{path}: ..."`` for a file with no rows.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"TruthfulQA file not found: {path} (get TruthfulQA.csv from "
            "https://github.com/sylinrl/TruthfulQA and pass its path)"
        )
    header, rows = read_rows(path)
    if not rows:
        raise EvalDataError(path, None, "no rows found (the file is empty)")
    cols = {" ".join(h.replace("_", " ").split()).lower(): h for h in header if h}
    missing = [c for c in ("question", "incorrect answers") if c not in cols]
    if missing or not ({"best answer", "correct answers"} & set(cols)):
        raise EvalDataError(
            path,
            1,
            "expected columns Question, Best Answer and/or Correct Answers, and Incorrect "
            f"Answers (TruthfulQA.csv layout); found {header}",
        )
    items = []
    for lineno, row in rows:
        question = row.get(cols["question"])
        if not isinstance(question, str) or not question.strip():
            raise EvalDataError(path, lineno, "empty Question")
        try:
            best = row.get(cols["best answer"]) if "best answer" in cols else None
            true = [str(best).strip()] if best is not None and str(best).strip() else []  # one answer, kept whole
            if "correct answers" in cols:
                true += _answers(row.get(cols["correct answers"]) or "")
            false = _answers(row.get(cols["incorrect answers"]) or "")
        except (ValueError, SyntaxError) as err:
            raise EvalDataError(path, lineno, f"bad answers list: {err}") from None
        true = list(dict.fromkeys(true))
        false = list(dict.fromkeys(false))
        if not true or not false:
            raise EvalDataError(
                path,
                lineno,
                f"needs at least one correct and one incorrect answer; got {len(true)} correct, {len(false)} incorrect",
            )
        both = set(true) & set(false)
        if both:
            raise EvalDataError(path, lineno, f"answer {sorted(both)[0]!r} is listed as both correct and incorrect")
        items.append(
            EvalItem(
                id=f"{name}:{lineno}",
                question=question.strip(),
                label=1,
                true_answers=tuple(true),
                false_answers=tuple(false),
            )
        )
    return EvalDataset(name=name, kind="mc", items=tuple(items), source=str(path))
