"""DailyDilemmas (Chiu, Jiang, Choi 2024): each dilemma's two actions and the values each action expresses, as a
Yes/No question per situation labelled by a value framework."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .items import EvalDataError, EvalDataset, EvalItem
from .tables import parse_list, read_rows

#: DailyDilemmas value frameworks (column names, case-insensitive, in values.csv and the per-action layout).
FRAMEWORKS: tuple[str, ...] = ("wvs", "mft", "virtue", "emotion", "maslow")


# ---------------------------------------------------------------------------------------------------------------
# DailyDilemmas
# ---------------------------------------------------------------------------------------------------------------

_ACTIONS = ("to_do", "not_to_do")
_ID_COLUMNS = ("idx", "dilemma_idx")
_VALUE_COLUMNS = ("values_names", "values_aggregated")


def _norm(s: str | None) -> str | None:
    return None if s is None else " ".join(s.split()).lower()


@dataclass(frozen=True)
class _Action:
    """The value labels of one action row: normalised value names and {framework: labels per value}."""

    lineno: int
    situation: str
    values: tuple[str | None, ...]
    frameworks: dict[str, tuple[str | None, ...]]


def _load_values_table(path: Path) -> dict[str, dict[str, str | None]]:
    """values.csv -> {value (normalised): {framework (lower): label (normalised) or None}}."""
    header, rows = read_rows(path)
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
    header, rows = read_rows(path)
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
                values = parse_list(cell(row, value_col, lineno))
                for fw, col in fw_cols.items():
                    labels = parse_list(cell(row, col, lineno))
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
