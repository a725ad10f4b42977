"""The evaluation item and set types, their errors, the seeded label-balanced draws and the dev/test split, and
the neutral texts of the coherence measurement."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ...datafiles import read_data
from ...errors import InnerPiSSAError


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
