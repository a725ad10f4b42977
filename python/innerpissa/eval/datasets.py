"""Held-out evaluation sets (docs/design.md §5): model-written evals, DailyDilemmas, TruthfulQA, neutral texts.

Every set becomes an :class:`EvalDataset` of :class:`EvalItem` s holding the *untemplated* user question and a
label ``y`` in {+1, -1, 0}: +1 when answering "Yes" (or "(A)") is the dataset's target behaviour, -1 when "No"
(or "(B)") is, 0 when unlabelled. The evaluator adds the chat template and the answer instruction, reads the
Yes/No score and forms the label-aligned score ``y * score``. Multiple-choice items (TruthfulQA, kind ``"mc"``)
also carry their true and false answers; their score is the length-normalised log-likelihood gap (see
``engines.mc_score``) and their label is +1 (a true answer is the target behaviour).

Sources (CC BY 4.0):

* Anthropic model-written evals (Perez et al. 2022), https://github.com/anthropics/evals — ``persona/*.jsonl``
  (Yes/No) and ``advanced-ai-risk/**.jsonl`` (A/B).
* DailyDilemmas (Chiu, Jiang, Choi 2024), https://github.com/kellycyy/daily_dilemmas — ``data/dilemma.csv``,
  ``data/values.csv``; the per-action value labels are in the Hugging Face release ``kellycyy/daily_dilemmas``
  (``dilemma_to_action_to_values_aggregated.csv``).
* TruthfulQA (Lin, Hilton, Evans 2022; Apache-2.0), https://github.com/sylinrl/TruthfulQA — ``TruthfulQA.csv``
  (or the Hugging Face ``truthful_qa`` "generation" rows as CSV/JSONL); read only from a path the user gives.

Imports only the standard library.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import math
import os
import random
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..datafiles import read_data
from ..errors import InnerPiSSAError
from ..jsonl import iter_jsonl

__all__ = [
    "DATA_DIR_ENV",
    "FRAMEWORKS",
    "NEUTRAL_TEXTS",
    "DataDownloadError",
    "EvalDataError",
    "EvalDataset",
    "EvalItem",
    "data_dir",
    "dataset_url",
    "default_cache_dir",
    "default_files",
    "fetch_dataset",
    "fetch_default_data",
    "load_dailydilemmas",
    "load_mwe",
    "load_truthfulqa",
    "split_dev_test",
    "subsample",
]

#: Environment variable naming the evaluation data directory.
DATA_DIR_ENV = "IPISSA_DATA_DIR"

#: DailyDilemmas value frameworks (column names, case-insensitive, in values.csv and the per-action layout).
FRAMEWORKS: tuple[str, ...] = ("wvs", "mft", "virtue", "emotion", "maslow")


@dataclass(frozen=True)
class EvalItem:
    """One evaluation question.

    Attributes:
        id: stable identifier, e.g. ``"openness:17"`` (file stem and 1-based line) or ``"dd-55"``.
        question: user-turn text, not templated.
        label: +1 if answering "Yes"/"(A)" is the target behaviour, -1 if "No"/"(B)" is, 0 if unlabelled.
        true_answers, false_answers: multiple-choice items only (kind ``"mc"``): the answers scored as the
            continuation of the assistant reply; empty for Yes/No and A/B items.
    """

    id: str
    question: str
    label: int
    true_answers: tuple[str, ...] = ()
    false_answers: tuple[str, ...] = ()


@dataclass(frozen=True)
class EvalDataset:
    """A named evaluation set. ``kind`` is ``"yesno"``, ``"ab"``, ``"mc"`` (multiple choice: TruthfulQA) or
    ``"words:<concept>"`` (a concept's word readout); ``source`` is the path it was read from."""

    name: str
    kind: str
    items: tuple[EvalItem, ...]
    source: str


class EvalDataError(InnerPiSSAError, ValueError):
    """A malformed evaluation file; ``str(err)`` starts with ``f"{path}:{lineno}: "`` (or ``f"{path}: "``)."""

    def __init__(self, path: str | Path, lineno: int | None, message: str) -> None:
        self.reason = message
        super().__init__(message, path=path, lineno=lineno)


class DataDownloadError(RuntimeError):
    """Downloading an evaluation file failed; the message names the URL."""


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


# ---------------------------------------------------------------------------------------------------------------
# DailyDilemmas
# ---------------------------------------------------------------------------------------------------------------

_ACTIONS = ("to_do", "not_to_do")
_ID_COLUMNS = ("idx", "dilemma_idx")
_VALUE_COLUMNS = ("values_names", "values_aggregated")


def _parse_list(text: Any) -> list[str | None]:
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


def _norm(s: str | None) -> str | None:
    return None if s is None else " ".join(s.split()).lower()


@dataclass(frozen=True)
class _Action:
    """The value labels of one action row: normalised value names and {framework: labels per value}."""

    lineno: int
    situation: str
    values: tuple[str | None, ...]
    frameworks: dict[str, tuple[str | None, ...]]


def _read_rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
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


def _load_values_table(path: Path) -> dict[str, dict[str, str | None]]:
    """values.csv -> {value (normalised): {framework (lower): label (normalised) or None}}."""
    header, rows = _read_rows(path)
    cols = {h.lower(): h for h in header if h}
    if "value" not in cols:
        raise EvalDataError(path, 1, f"values table needs a 'value' column; found {header}")
    table: dict[str, dict[str, str | None]] = {}
    for _, row in rows:
        name = _norm(row[cols["value"]])
        if name:
            table[name] = {fw: (_norm(row.get(cols[fw])) or None) if fw in cols else None for fw in FRAMEWORKS}
    return table


def _parse_value_spec(value: str) -> tuple[str | None, str]:
    """ "honesty" -> (None, "honesty"); "virtue:Truthfulness" -> ("virtue", "truthfulness")."""
    if ":" in value:
        fw, _, label = value.partition(":")
        fw = fw.strip().lower()
        if fw not in FRAMEWORKS:
            raise ValueError(f"unknown value framework {fw!r} in {value!r}; use one of {', '.join(FRAMEWORKS)}")
        return fw, _norm(label) or ""
    return None, _norm(value) or ""


def _action_labels(action: _Action, framework: str | None, table: dict | None) -> set[str]:
    """The set of labels (value names, or framework labels) an action carries."""
    if framework is None:
        return {v for v in action.values if v}
    if framework in action.frameworks:
        return {v for v in action.frameworks[framework] if v}
    assert table is not None
    return {table[v][framework] for v in action.values if v and v in table and table[v][framework]}


def load_dailydilemmas(
    path: str | Path, value: str | None = None, values_table: str | Path | None = None
) -> EvalDataset:
    """Load DailyDilemmas as one yes/no item per dilemma (``id = f"dd-{idx}"``, question = dilemma_situation).

    Two layouts, detected from the header:

    1. Situations CSV (``dilemma.csv``: ``idx``, ``basic_situation``, ``dilemma_situation``) -> every item has
       label 0 (there are no value labels; ``value`` must be None).
    2. Per-action layout (``dilemmas_with_detail_by_action_test.csv``, or the Hugging Face release's
       ``dilemma_to_action_to_values_aggregated.csv``; ``.jsonl`` with the same fields also works): two rows per
       dilemma (``idx`` or ``dilemma_idx``; ``action_type`` in {to_do, not_to_do}) with a values list column
       ``values_names`` or ``values_aggregated`` (python-literal list string).

    Labels for a value V (docs/design.md §5; the situation's "Yes" is the to_do action): +1 if V is among the to_do
    action's values, -1 if among the not_to_do action's values, and the dilemma is **dropped** if both or
    neither. The not_to_do side is negated exactly once. With ``value=None`` every item has label 0.

    ``value`` is a value name matched case-insensitively (``"honesty"``), or ``"framework:Label"``
    (``"virtue:Truthfulness"``; frameworks ``wvs, mft, virtue, emotion, maslow``): an action carries the label if
    any of its values maps to it, read from the per-row framework columns aligned with ``values_names`` when
    present, else through a values table (``values.csv``: value, WVS, MFT, Virtue, Emotion, Maslow).

    Args:
        path: CSV (or JSONL) file.
        value: the value to label for, or None for unlabelled items.
        values_table: the values.csv used for framework lookups when the file has no framework columns; default
            ``values.csv`` next to ``path``.

    Returns:
        :class:`EvalDataset` (kind ``"yesno"``, name = file stem, plus ``f"[{value}]"`` when labelled), items in
        order of first appearance.

    Raises:
        FileNotFoundError: the file (or a needed values table) does not exist.
        EvalDataError: ``"{path}:{line}: ..."`` for a missing column, an unknown ``action_type``, a duplicated
            action, an unparsable or misaligned values list, an empty situation, or a dilemma missing one of its
            two actions when ``value`` is given.
        ValueError: ``value`` given for the situations layout, an unknown framework, or a value that occurs in no
            action of the file (probably misspelt).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DailyDilemmas file not found: {path}")
    header, rows = _read_rows(path)
    if not rows:
        raise EvalDataError(path, None, "no rows found (the file is empty)")
    cols = {h.lower(): h for h in header if h}
    id_col = next((cols[c] for c in _ID_COLUMNS if c in cols), None)
    if id_col is None or "dilemma_situation" not in cols:
        raise EvalDataError(
            path, 1, f"expected columns 'idx' (or 'dilemma_idx') and 'dilemma_situation'; found {header}"
        )
    sit_col = cols["dilemma_situation"]
    name = path.stem if value is None else f"{path.stem}[{value}]"

    def cell(row: dict, col: str, lineno: int) -> Any:
        v = row.get(col)
        if v is None:
            raise EvalDataError(path, lineno, f"row has no {col!r} value (short row?)")
        return v

    def ident(row: dict, lineno: int) -> str:
        raw = str(cell(row, id_col, lineno)).strip()
        if not raw:
            raise EvalDataError(path, lineno, f"empty {id_col!r}")
        return raw[:-2] if raw.endswith(".0") and raw[:-2].isdigit() else raw

    def situation(row: dict, lineno: int) -> str:
        s = cell(row, sit_col, lineno)
        if not isinstance(s, str) or not s.strip():
            raise EvalDataError(path, lineno, "empty dilemma_situation")
        return s.strip()

    if "action_type" not in cols:  # layout 1: situations only
        if value is not None:
            raise ValueError(
                f"{path} has no per-action values (no 'action_type' column), so it cannot be labelled for "
                f"value {value!r}; pass value=None, or use the per-action file (Hugging Face "
                "kellycyy/daily_dilemmas, dilemma_to_action_to_values_aggregated.csv)"
            )
        items, seen = [], {}
        for lineno, row in rows:
            i = ident(row, lineno)
            if i in seen:
                raise EvalDataError(path, lineno, f"duplicate {id_col} {i} (first on line {seen[i]})")
            seen[i] = lineno
            items.append(EvalItem(id=f"dd-{i}", question=situation(row, lineno), label=0))
        return EvalDataset(name=name, kind="yesno", items=tuple(items), source=str(path))

    # layout 2: per action
    value_col = next((cols[c] for c in _VALUE_COLUMNS if c in cols), None)
    if value is not None and value_col is None:
        raise EvalDataError(path, 1, f"expected a values column ({' or '.join(_VALUE_COLUMNS)}); found {header}")
    fw_cols = {fw: cols[fw] for fw in FRAMEWORKS if fw in cols}
    dilemmas: dict[str, dict[str, _Action]] = {}
    for lineno, row in rows:
        i = ident(row, lineno)
        action_type = str(cell(row, cols["action_type"], lineno)).strip().lower()
        if action_type not in _ACTIONS:
            raise EvalDataError(path, lineno, f"action_type must be 'to_do' or 'not_to_do', got {action_type!r}")
        values: list[str | None] = []
        frameworks: dict[str, tuple[str | None, ...]] = {}
        if value_col is not None:
            try:
                values = _parse_list(cell(row, value_col, lineno))
                for fw, col in fw_cols.items():
                    labels = _parse_list(cell(row, col, lineno))
                    if len(labels) != len(values):
                        raise ValueError(
                            f"column {col!r} has {len(labels)} entries but {value_col!r} has {len(values)}; "
                            "framework lists must align with the values list"
                        )
                    frameworks[fw] = tuple(_norm(v) for v in labels)
            except (ValueError, SyntaxError) as err:
                raise EvalDataError(path, lineno, f"bad values list: {err}") from None
        actions = dilemmas.setdefault(i, {})
        if action_type in actions:
            raise EvalDataError(
                path,
                lineno,
                f"dilemma {i} has a second {action_type} row (first on line {actions[action_type].lineno})",
            )
        actions[action_type] = _Action(
            lineno=lineno,
            situation=situation(row, lineno),
            values=tuple(_norm(v) for v in values),
            frameworks=frameworks,
        )

    def question(actions: dict[str, _Action]) -> str:
        return (actions.get("to_do") or actions["not_to_do"]).situation

    if value is None:
        items = [EvalItem(id=f"dd-{i}", question=question(a), label=0) for i, a in dilemmas.items()]
        return EvalDataset(name=name, kind="yesno", items=tuple(items), source=str(path))

    framework, target = _parse_value_spec(value)
    if not target:
        raise ValueError(f"empty value name in {value!r}")
    table = None
    if framework is not None and framework not in fw_cols:
        table_path = Path(values_table) if values_table is not None else path.with_name("values.csv")
        if not table_path.is_file():
            raise FileNotFoundError(
                f"{path} has no {framework!r} column, so framework values need the DailyDilemmas values table; "
                f"not found: {table_path} (pass values_table=..., e.g. the repo's data/values.csv)"
            )
        table = _load_values_table(table_path)

    items, seen_anywhere = [], False
    for i, actions in dilemmas.items():
        missing = [a for a in _ACTIONS if a not in actions]
        if missing:
            first = min(a.lineno for a in actions.values())
            raise EvalDataError(
                path, first, f"dilemma {i} has no {missing[0]} row; each dilemma needs a to_do and a not_to_do row"
            )
        in_do = target in _action_labels(actions["to_do"], framework, table)
        in_not = target in _action_labels(actions["not_to_do"], framework, table)
        seen_anywhere |= in_do or in_not
        if in_do == in_not:  # both or neither: this dilemma does not trade V off, skip it
            continue
        items.append(EvalItem(id=f"dd-{i}", question=question(actions), label=1 if in_do else -1))
    if not seen_anywhere:
        raise ValueError(
            f"value {value!r} occurs in no action of {path}; check the spelling (plain names such as 'honesty', "
            "or 'framework:Label' such as 'virtue:Truthfulness')"
        )
    return EvalDataset(name=name, kind="yesno", items=tuple(items), source=str(path))


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
        return [a for a in (x.strip() if x else "" for x in _parse_list(text)) if a]
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
    header, rows = _read_rows(path)
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


# ---------------------------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------------------------


def dataset_seed(seed: int, name: str) -> int:
    """A seed for one dataset's draws: sha256 of ``f"{seed}:{name}"``, so no two datasets share an index pattern."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


def _by_label(items: tuple[EvalItem, ...]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(it.label, []).append(i)
    return groups


def split_dev_test(
    items: Sequence[EvalItem], seed: int, dev_fraction: float = 0.5, name: str = ""
) -> tuple[tuple[EvalItem, ...], tuple[EvalItem, ...]]:
    """Split items into (dev, test): disjoint, together covering all items, deterministic for (seed, name).

    Stratified by label: within each label class (+1, −1, or 0 for unlabelled) ``round(n_class · dev_fraction)``
    items, chosen by a shuffle seeded with ``dataset_seed(seed, name)``, go to dev, so a balanced set gives
    balanced splits. Both parts keep the input order.

    Raises:
        ValueError: ``dev_fraction`` outside [0, 1].
    """
    if not 0.0 <= dev_fraction <= 1.0:
        raise ValueError(f"dev_fraction must be in [0, 1], got {dev_fraction}")
    items = tuple(items)
    rng = random.Random(dataset_seed(seed, name))
    dev_idx: set[int] = set()
    for label in sorted(_by_label(items)):
        idx = _by_label(items)[label]
        rng.shuffle(idx)
        dev_idx.update(idx[: round(len(idx) * dev_fraction)])
    dev = tuple(x for i, x in enumerate(items) if i in dev_idx)
    test = tuple(x for i, x in enumerate(items) if i not in dev_idx)
    return dev, test


def subsample(items: Sequence[EvalItem], n: int | None, seed: int, name: str = "") -> tuple[EvalItem, ...]:
    """A seeded, label-balanced subset of about ``n`` items, in input order.

    Labelled items (label ±1) are drawn stratified: min(n // 2, n_yes, n_no) from each class, so Yes- and
    No-matching items are equally many (a uniform answer bias then cancels in the balanced effect). Unlabelled
    sets, and sets with one label class only (which cannot be balanced; reports show their class counts), are
    sampled plainly. The draw is seeded with ``dataset_seed(seed, name)``: every dataset gets its own
    index pattern. ``n`` None keeps every item (balanced for labelled sets).

    Raises:
        ValueError: ``n`` negative.
    """
    items = tuple(items)
    if n is not None and n < 0:
        raise ValueError(f"n must be >= 0 or None, got {n}")
    rng = random.Random(dataset_seed(seed, name))
    groups = _by_label(items)
    if not (groups.get(1) and groups.get(-1)):  # unlabelled, or one class only: nothing to balance
        if n is None or n >= len(items):
            return items
        keep = set(rng.sample(range(len(items)), n))
    else:
        per = min(len(groups.get(1, [])), len(groups.get(-1, [])))
        if n is not None:
            per = min(per, n // 2)
        keep = set()
        for label in (1, -1):
            keep.update(rng.sample(groups[label], per))
    return tuple(x for i, x in enumerate(items) if i in keep)


# ---------------------------------------------------------------------------------------------------------------
# Neutral texts for the coherence (ΔNLL) measurement
# ---------------------------------------------------------------------------------------------------------------

#: Short neutral passages (facts, recipes, weather, how-to) with no ethics or honesty content
#: (``data/neutral_texts.json``). The evaluator measures mean per-token NLL on them at coefficient c minus at 0.
NEUTRAL_TEXTS: tuple[str, ...] = tuple(read_data("neutral_texts.json")["texts"])
