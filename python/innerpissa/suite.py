"""The main job's evaluation suite: datasets, methods, sweeps, metrics — one function the CLI and scripts call.

Default datasets: the DailyDilemmas situations (unlabelled: decision shift) and the Anthropic model-written-eval
persona files, each a seeded subset split 50/50 into dev (usable-range choice) and test (reported) items.
Target sets of the honesty concept and the sign a more honest model should show on "agreement with the set's
behaviour" are in ``HONESTY_TARGETS``; the other persona sets measure side effects.
"""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path

import numpy as np
import torch

from .adapter import Adapter
from .baselines import AdapterMethod, PromptMethod, VectorMethod, pca_control_vector, random_control_vector
from .evaldata import (NEUTRAL_TEXTS, EvalDataset, data_dir, load_dailydilemmas, load_mwe, split_dev_test,
                       subsample)
from .evaluate import run_sweep
from .metrics import summarize
from .pairs import ContrastivePair

HONESTY_TARGETS = {
    "okay-with-deceiving-a-user-to-help-them": -1,
    "desire-to-persuade-people-to-be-more-honest-to-others": +1,
}


def default_datasets(root: str | Path | None = None, n_target: int = 64, n_other: int = 16, n_dd: int = 48,
                     seed: int = 0, dd_file: str | Path | None = None, dd_value: str | None = None,
                     mwe_files: list[str | Path] | None = None) -> list[EvalDataset]:
    """Seeded subsets: n_target items of each honesty target set, n_other of each other persona set,
    n_dd DailyDilemmas situations. Raises FileNotFoundError (with instructions) when the data is missing.

    ``dd_file``/``dd_value``: a DailyDilemmas file in the full per-action layout (the Hugging Face release) and
    the value whose label signs the items (e.g. ``honesty`` or ``virtue:Truthfulness``); default: the
    unlabelled situations CSV, reported as decision shift. ``mwe_files``: model-written-eval JSONL files
    (Yes/No or A/B) to use instead of the shared persona sets."""
    base = data_dir(root)
    out = []
    paths = [Path(p) for p in mwe_files] if mwe_files else sorted((base / "anthropic_mwe" / "persona").glob("*.jsonl"))
    for path in paths:
        ds = load_mwe(path)
        n = n_target if ds.name in HONESTY_TARGETS else n_other
        out.append(dataclasses.replace(ds, items=subsample(ds.items, n, seed)))
    dd = load_dailydilemmas(dd_file or base / "dailydilemmas" / "dilemma.csv", value=dd_value)
    out.append(dataclasses.replace(dd, name="dailydilemmas", items=subsample(dd.items, n_dd, seed)))
    return out


KNOWN_METHODS = ("innerpissa", "prompting", "pca", "random")


def check_methods(names) -> tuple[str, ...]:
    """Validate method names before any compute (a typo must not give an empty report).

    Raises:
        ConfigError: an unknown or empty name, or no names at all.
    """
    from .errors import ConfigError

    names = tuple(n.strip() for n in names)
    unknown = [n for n in names if n not in KNOWN_METHODS]
    if unknown or not names:
        raise ConfigError(f"--methods: unknown method(s) {unknown or names}; choose from {', '.join(KNOWN_METHODS)}",
                          field="methods")
    return names


def build_methods(model, tokenizer, adapter: Adapter | None, pairs: list[ContrastivePair], seed: int,
                  include: tuple[str, ...] = ("innerpissa", "prompting", "pca", "random"),
                  adapter_coeffs=None, vector_coeffs=None, engine=None) -> list:
    """The steering methods to compare; PCA and random vectors use the adapter's layers (or 30 %..L−3).

    With ``engine`` (an ``engine.RustEngine``) the PCA vector is computed from the Rust engine's hidden states
    (repeng's recipe, ``engine.pca_control_vector``) instead of running repeng on the torch model."""
    include = check_methods(include)
    methods = []
    if adapter is not None and "innerpissa" in include:
        methods.append(AdapterMethod(adapter) if adapter_coeffs is None else AdapterMethod(adapter, tuple(adapter_coeffs)))
    if "prompting" in include:
        methods.append(PromptMethod())
    if "pca" in include or "random" in include:
        from .adapter.config import AdapterConfig
        from .adapter.model import decoder_blocks, select_layers

        cfg = adapter.config if adapter is not None else AdapterConfig()
        layers = select_layers(len(decoder_blocks(model)), cfg)
        if engine is not None:
            from .engine import pca_control_vector as rust_pca

            pca = rust_pca(engine, pairs, layers)
        else:
            pca = pca_control_vector(model, tokenizer, pairs, layers)
        kw = {} if vector_coeffs is None else {"coeffs": tuple(vector_coeffs)}
        if "pca" in include:
            methods.append(VectorMethod(model, pca, name="pca", **kw))
        if "random" in include:
            methods.append(VectorMethod(model, random_control_vector(pca, seed), name="random", **kw))
    return methods


def run_suite(model, tokenizer, methods: list, datasets: list[EvalDataset], seed: int = 0, batch_size: int = 32,
              meta: dict | None = None, progress: bool = True, engine=None) -> dict:
    """Sweep every method on every dataset, then compute metrics on the test split. Returns results (JSON-able).

    ``engine``: ``None`` for the PyTorch evaluator, or an ``engine.RustEngine`` (every coefficient of a method
    in one packed pass; same prompts, tokens and answer sets)."""
    from tqdm.auto import tqdm

    splits = {}
    for d in datasets:
        dev, test = split_dev_test(d.items, seed)
        ids = {it.id: i for i, it in enumerate(d.items)}
        splits[d.name] = (np.array([ids[it.id] for it in dev], dtype=int),
                          np.array([ids[it.id] for it in test], dtype=int))
    total = sum(len(m.coeffs) for m in methods)
    bar = tqdm(total=total, desc="eval", disable=not progress)

    def tick(name, c):
        bar.set_postfix(method=name, c=c)
        bar.update(1)

    base_cache: dict = {}
    sweeps = []
    with torch.inference_mode():
        for m in methods:
            if engine is not None:
                from .engine import run_sweep as rust_sweep

                sweeps.append(rust_sweep(engine, m, datasets, list(NEUTRAL_TEXTS), base_cache, tick))
            else:
                sweeps.append(run_sweep(model, tokenizer, m, datasets, list(NEUTRAL_TEXTS), batch_size, base_cache,
                                        tick))
    bar.close()
    summary = summarize(sweeps, datasets, splits, seed)
    return {
        "meta": {"seed": seed, "date": datetime.date.today().isoformat(),
                 "engine": "torch" if engine is None else f"rust ({engine.weights})", **(meta or {})},
        "datasets": {
            d.name: {"n_items": len(d.items), "n_dev": int(len(splits[d.name][0])),
                     "n_test": int(len(splits[d.name][1])), "kind": d.kind, "source": d.source,
                     "labelled": any(it.label != 0 for it in d.items),
                     "expected_sign": HONESTY_TARGETS.get(d.name)}
            for d in datasets
        },
        "methods": summary,
        "raw": [dataclasses.asdict(s) for s in sweeps],
        "item_ids": {d.name: [it.id for it in d.items] for d in datasets},
    }
