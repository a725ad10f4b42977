"""The evaluation suite: datasets, methods, sweeps, metrics — one function the CLI and scripts call.

Default datasets: the DailyDilemmas situations (unlabelled: decision shift), TruthfulQA multiple choice when its
file is given, and the Anthropic model-written-eval persona files, each a label-balanced seeded subset (its own
draw per dataset) split 50/50 into dev and test items, stratified by label. Target sets of the honesty concept and
the sign a more honest model should show on "agreement with the set's behaviour" are in ``HONESTY_TARGETS``; the
other persona sets measure side effects.
"""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path

import numpy as np

from ..concepts import get_concept
from .datasets import (
    NEUTRAL_TEXTS,
    EvalDataset,
    data_dir,
    load_dailydilemmas,
    load_mwe,
    load_truthfulqa,
    split_dev_test,
    subsample,
)
from .engines import BUDGET_POINTS, run_sweep
from .metrics import KL_BUDGET, summarize

#: The honesty concept's target sets and signs (``data/concepts.json``); ``truthfulqa`` counts when a file is given.
HONESTY_TARGETS = dict(get_concept("honesty").targets)


def default_datasets(
    root: str | Path | None = None,
    n_target: int = 64,
    n_other: int = 16,
    n_dd: int = 48,
    seed: int = 0,
    dd_file: str | Path | None = None,
    dd_value: str | None = None,
    mwe_files: list[str | Path] | None = None,
    targets: dict[str, int] = HONESTY_TARGETS,
    truthfulqa: str | Path | None = None,
) -> list[EvalDataset]:
    """Label-balanced seeded subsets: n_target items of each target set, n_other of each other persona set,
    n_dd DailyDilemmas situations; each dataset gets its own draw (``subsample(..., name=dataset)``).

    ``dd_file``/``dd_value``: a DailyDilemmas file in the full per-action layout (the Hugging Face release) and
    the value whose label signs the items (e.g. ``honesty`` or ``virtue:Truthfulness``); default: the
    unlabelled situations CSV, reported as decision shift. ``mwe_files``: model-written-eval JSONL files
    (Yes/No or A/B) to use instead of the shared persona sets. ``truthfulqa``: a TruthfulQA file
    (``datasets.load_truthfulqa``), added as the multiple-choice set ``truthfulqa`` (n_target items when it is in
    ``targets``, else n_other).

    Raises:
        FileNotFoundError: the data is missing (the message says how to get it).
    """
    base = data_dir(root) if not (mwe_files and dd_file) else None
    out = []
    paths = [Path(p) for p in mwe_files] if mwe_files else sorted((base / "anthropic_mwe" / "persona").glob("*.jsonl"))
    for path in paths:
        ds = load_mwe(path)
        n = n_target if ds.name in targets else n_other
        out.append(dataclasses.replace(ds, items=subsample(ds.items, n, seed, name=ds.name)))
    if truthfulqa is not None:
        tqa = load_truthfulqa(truthfulqa)
        n = n_target if tqa.name in targets else n_other
        out.append(dataclasses.replace(tqa, items=subsample(tqa.items, n, seed, name=tqa.name)))
    dd = load_dailydilemmas(dd_file or base / "dailydilemmas" / "dilemma.csv", value=dd_value)
    out.append(
        dataclasses.replace(dd, name="dailydilemmas", items=subsample(dd.items, n_dd, seed, name="dailydilemmas"))
    )
    return out


def concept_datasets(
    concept,
    root: str | Path | None = None,
    n_target: int = 64,
    n_other: int = 16,
    n_dd: int = 48,
    seed: int = 0,
    truthfulqa: str | Path | None = None,
) -> tuple[list[EvalDataset], dict[str, int]]:
    """The datasets that read ``concept`` (a ``concepts.Concept``) and its side effects, and their expected signs.

    A ``persona-sets`` concept is read on its target persona files (n_target each); a ``words`` concept on its own
    word readout (every opening). Either way every other persona set (n_other) measures side effects, and the
    DailyDilemmas situations (n_dd) decision shift. A ``truthfulqa`` file adds the TruthfulQA multiple-choice set
    (a target of the honesty concept, a side effect of the others).

    Returns:
        (datasets, targets): targets maps each target dataset's name to its expected sign.
    """
    targets = dict(concept.targets)
    datasets = default_datasets(
        root, n_target=n_target, n_other=n_other, n_dd=n_dd, seed=seed, targets=targets, truthfulqa=truthfulqa
    )
    targets = {k: v for k, v in targets.items() if any(d.name == k for d in datasets)}
    if concept.readout == "words":
        words = concept.words_dataset()
        datasets.insert(0, words)
        targets[words.name] = 1
    return datasets, targets


def dataset_splits(datasets: list[EvalDataset], seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """dataset → (dev indices, test indices) into its items; stratified by label, a seeded draw per dataset."""
    splits = {}
    for d in datasets:
        dev, test = split_dev_test(d.items, seed, name=d.name)
        ids = {it.id: i for i, it in enumerate(d.items)}
        splits[d.name] = (
            np.array([ids[it.id] for it in dev], dtype=int),
            np.array([ids[it.id] for it in test], dtype=int),
        )
    return splits


def run_suite(
    engine,
    methods: list,
    datasets: list[EvalDataset],
    seed: int = 0,
    kl_budget: float = KL_BUDGET,
    meta: dict | None = None,
    progress: bool = True,
    targets: dict[str, int] = HONESTY_TARGETS,
    concept: str = "honest",
    neutral_texts: tuple[str, ...] = NEUTRAL_TEXTS,
    report_split: str = "test",
    splits: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    budget_first: bool = False,
    score_other_split: bool = True,
) -> dict:
    """Sweep every method on every dataset with ``engine`` (``TorchEngine`` or ``RustEngine``), then compute
    metrics on the test split (``report_split="dev"``: the dev split, for searches) at each method's
    KL-matched coefficient. ``splits`` (dataset → (dev indices, test indices)) replaces the seeded stratified
    split, e.g. to score datasets that already hold only dev items. ``budget_first`` finds each method's
    KL-matched coefficient on the neutral texts first and scores items only at 0, ±C_b/2 and ±C_b
    (``engines.run_sweep``; ``ipissa eval``/``run``/``tune`` and ``scripts/results.py`` use it); False (the
    default) sweeps each method's own ``coeffs``. ``score_other_split=False`` scores only the items of
    ``report_split`` (half the item passes; the results then have no ``"dev"`` numbers beside the test ones, and
    ``raw``/``item_ids`` hold the reported items only); the reported numbers are the same either way. Returns
    results (JSON-able).

    Raises:
        ConfigError: a bad ``kl_budget`` (checked before any compute), a method the engine cannot run.
        NonFiniteError: a method produced NaN/inf scores.
    """
    from tqdm.auto import tqdm

    from .metrics import check_budget

    kl_budget = check_budget(kl_budget)
    splits = splits if splits is not None else dataset_splits(datasets, seed)
    drawn = {d.name: (len(d.items), len(splits[d.name][0]), len(splits[d.name][1])) for d in datasets}
    if not score_other_split:
        datasets, splits = _report_items_only(datasets, splits, report_split)
    n_points = 1 + 2 * len(BUDGET_POINTS)
    bar = tqdm(
        total=sum(n_points if budget_first and m.kind != "prompt" else len(m.coeffs) for m in methods),
        desc="eval",
        disable=not progress,
    )

    def tick(name, c):
        bar.set_postfix(method=name, c=c)
        bar.update(1)

    base_cache: dict = {}
    sweeps = [
        run_sweep(engine, m, datasets, list(neutral_texts), base_cache, tick, kl_budget if budget_first else None)
        for m in methods
    ]
    bar.close()
    summary = summarize(sweeps, datasets, splits, seed, kl_budget, report_split)
    info = {}
    for d in datasets:
        labels = np.array([it.label for it in d.items])
        test = splits[d.name][1]
        n_items, n_dev, n_test = drawn[d.name]
        info[d.name] = {
            "n_items": n_items,
            "n_dev": n_dev,
            "n_test": n_test,
            "n_scored": len(d.items),
            "n_test_yes": int((labels[test] == 1).sum()),
            "n_test_no": int((labels[test] == -1).sum()),
            "kind": d.kind,
            "source": d.source,
            "labelled": bool((labels != 0).any()),
            "expected_sign": targets.get(d.name),
            "concept": concept,
        }
    return {
        "meta": {
            "seed": seed,
            "date": datetime.date.today().isoformat(),
            "engine": engine.name,
            "kl_budget": kl_budget,
            "report_split": report_split,
            **(meta or {}),
        },
        "datasets": info,
        "methods": summary,
        "raw": [dataclasses.asdict(s) for s in sweeps],
        "item_ids": {d.name: [it.id for it in d.items] for d in datasets},
    }


def _report_items_only(
    datasets: list[EvalDataset], splits: dict[str, tuple[np.ndarray, np.ndarray]], report_split: str
) -> tuple[list[EvalDataset], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Each dataset cut to the items of ``report_split`` (in the split's order, so every per-item statistic and
    bootstrap draw sees the same items in the same order), with splits over the cut datasets."""
    part = 1 if report_split == "test" else 0
    cut, cut_splits = [], {}
    for d in datasets:
        idx = splits[d.name][part]
        cut.append(dataclasses.replace(d, items=tuple(d.items[i] for i in idx)))
        everything, nothing = np.arange(len(idx)), np.zeros(0, dtype=int)
        cut_splits[d.name] = (nothing, everything) if part == 1 else (everything, nothing)
    return cut, cut_splits
