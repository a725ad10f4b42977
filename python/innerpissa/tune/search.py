"""The resumable trial runner: train each trial of a grid, evaluate it on dev items, append one row per trial.

Shared by ``ipissa tune`` (successive halving over rungs) and ``ipissa ablate``; the grid format is in
``innerpissa.tune``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import TrainingDivergedError
from .grid import PEFT_ONLY, Grid, load_grid, split_params, train_seeds, trial_key
from .tables import write_summary


def score_row(results: dict, method: str, targets: dict[str, int]) -> dict:
    """One row of numbers for ``method`` from a dev-split ``run_suite`` result (see module docstring)."""
    m = results["methods"][method]
    ds = m["datasets"]
    row: dict[str, Any] = {
        "kl_coeff": m["kl_coeff"],
        "budget_reached": m["budget_reached"],
        "kl_at_coeff": m["kl_at_coeff"],
        "abs_dnll": m["abs_dnll_at_budget"],
        "targets": {},
    }
    signed = []
    for name, sign in targets.items():
        r = ds[name]
        signed.append(sign * r["effect"])
        row["targets"][name] = {
            "sign": sign,
            "n_items": r["n_items"],
            "effect": r["effect"],
            "ci": r["ci"],
            "bias": r["bias"],
            "spearman": r.get("spearman"),
            "neg_side": r.get("effect_neg_side"),
            "pos_side": r.get("effect_pos_side"),
        }
    others = [d for d, info in results["datasets"].items() if info["labelled"] and d not in targets]
    row["score"] = float(np.mean(signed))
    row["off_abs_bias"] = float(np.mean([abs(ds[d]["bias"]) for d in others])) if others else None
    row["off_abs_effect"] = float(np.mean([abs(ds[d]["effect"]) for d in others])) if others else None
    return row


@dataclasses.dataclass
class _Context:
    lm: Any
    engine: Any
    split: Any
    datasets: list
    splits: dict
    targets: dict[str, int]
    concept: Any


def _context(grid: Grid, data_dir) -> _Context:
    from ..concepts import get_concept
    from ..eval.datasets import EvalDataset
    from ..eval.engines import TorchEngine
    from ..eval.rust_engine import RustEngine
    from ..eval.suite import concept_datasets, dataset_splits
    from ..models import gguf_for_spec, load_model

    t = grid.tune
    concept = get_concept(t["concept"])
    lm = load_model(t["model"])
    try:
        engine = RustEngine(gguf_for_spec(lm.spec), lm.tokenizer, batch_size=t["batch_size"])
    except (ValueError, FileNotFoundError):
        engine = TorchEngine(lm.model, lm.tokenizer, t["batch_size"])
    datasets, targets = concept_datasets(concept, data_dir, t["n_target"], t["n_other"], 0, t["seed"])
    datasets = [d for d in datasets if any(it.label for it in d.items)]  # labelled sets only (no decision shift)
    dev_only: list[EvalDataset] = []  # the items of the chosen split (dev for searches, test for ablations)
    part = 0 if t.get("split", "dev") == "dev" else 1
    for d in datasets:
        idx = dataset_splits([d], t["seed"])[d.name][part]
        if len(idx) == 0:  # too few items for a dev half (n_other < 4)
            continue
        dev_only.append(dataclasses.replace(d, items=tuple(d.items[i] for i in idx)))
    splits = {d.name: (np.arange(len(d.items)), np.zeros(0, dtype=int)) for d in dev_only}
    split = concept.pairs(lm.tokenizer, seed=t["seed"])
    return _Context(lm, engine, split, dev_only, splits, targets, concept)


def _evaluate(ctx: _Context, methods: list, grid: Grid, engine=None) -> dict:
    from ..eval.suite import run_suite

    t = grid.tune
    return run_suite(
        engine or ctx.engine,
        methods,
        ctx.datasets,
        seed=t["seed"],
        kl_budget=t["kl_budget"],
        targets=ctx.targets,
        concept=t["concept"],
        progress=False,
        report_split="dev",
        splits=ctx.splits,
        budget_first=True,
    )


def _append(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, allow_nan=False) + "\n")
        f.flush()


def _trainable(adapter) -> int:
    return sum(p.numel() for p in adapter.parameters() if p.requires_grad)


def _run_trial(
    ctx: _Context, grid: Grid, params: dict, key: str, rung: int, epochs: float, out: Path, train_seed: int
) -> dict:
    from ..adapter.config import AdapterConfig
    from ..adapter.model import attach
    from ..adapter.targets import expand_modules
    from ..eval.methods import AdapterMethod
    from ..train import TrainConfig, train

    t = grid.tune
    tr, ad = split_params(params, grid.source)
    acfg = AdapterConfig(**ad, seed=train_seed)
    tcfg = TrainConfig(**tr, epochs=float(epochs), seed=train_seed)
    meta = {"base_model": ctx.lm.spec, "concept": t["concept"], "pairs": f"builtin:{t['concept']}"}
    family = params.get("family", "innerpissa")
    run_dir = out / "runs" / key / f"epochs{epochs:g}"  # by length, not rung index: grids with other rungs share it
    state = run_dir / "run_state.json"
    finished = state.is_file() and json.loads(state.read_text()).get("finished")
    engine = None  # the search's engine (Rust where the model is a GGUF it runs) ...
    if family in PEFT_ONLY or not set(expand_modules(acfg.modules)) <= {"o", "down"}:
        from ..eval.engines import TorchEngine

        # ... which runs InnerPiSSA-format adapters on residual writers only
        engine = TorchEngine(ctx.lm.model, ctx.lm.tokenizer, t["batch_size"])
    train_min = None
    t0 = time.perf_counter()
    if family in PEFT_ONLY:
        from ..adapter.families import PeftSteering, load_steering

        if finished:  # trained, but its row was not written
            adapter = load_steering(ctx.lm.model, run_dir / "adapter")
        else:
            adapter = PeftSteering(ctx.lm.model, family, acfg, meta)
    elif finished:
        from ..adapter.model import load_adapter

        adapter = load_adapter(ctx.lm.model, run_dir / "adapter")
    elif family == "lora":
        from ..adapter.lora import LoRASteering

        adapter = LoRASteering(ctx.lm.model, acfg, meta)
    else:
        adapter = attach(ctx.lm.model, acfg, meta=meta, pairs=list(ctx.split.train), tokenizer=ctx.lm.tokenizer)
    n_params = _trainable(adapter)
    row = {
        "kind": "trial",
        "key": key,
        "rung": rung,
        "epochs": epochs,
        "params": params,
        "train_seed": train_seed,
        "trainable_params": n_params,
        "steps": tcfg.total_steps(len(ctx.split.train)),
    }
    try:
        if not finished:
            try:
                train(
                    adapter,
                    ctx.lm.tokenizer,
                    list(ctx.split.train),
                    list(ctx.split.val),
                    tcfg,
                    run_dir=run_dir,
                    progress=False,
                )
            except TrainingDivergedError as e:  # a result of the setting, not a crash: recorded, ranked last
                return row | {"score": None, "diverged": str(e), "train_minutes": (time.perf_counter() - t0) / 60}
            finally:
                if family == "lora":  # the trained LoRA in InnerPiSSA form (exact), which the Rust engine runs
                    trained, _ = adapter.to_adapter(), adapter.remove()
            if family == "lora":
                adapter = trained
            train_min = (time.perf_counter() - t0) / 60
        t1 = time.perf_counter()
        res = _evaluate(ctx, [AdapterMethod(adapter, coeffs=tuple(t["coeffs"]), name=family)], grid, engine)
    finally:
        if family in PEFT_ONLY:
            adapter.remove()  # the model is the base model again for the next trial
    return (
        score_row(res, family, ctx.targets)
        | row
        | {
            "train_minutes": train_min,
            "eval_minutes": (time.perf_counter() - t1) / 60,
        }
    )


def run_search(grid_path: str | Path, out: str | Path, data_dir=None, log=print) -> list[dict]:
    """Run (or resume) the search of ``grid_path`` into ``out``; returns every row. See the module docstring.

    Raises:
        ConfigError / FileNotFoundError: a bad grid file (before any compute).
        ResumeMismatchError: a trial's training directory holds a run with other settings (changed by hand).

    A trial whose training diverges (``TrainingDivergedError``) is not an error of the search: its row has
    ``score`` None and ``diverged`` (the message), it ranks last, and the search goes on.
    """
    grid = load_grid(grid_path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "rows.jsonl"
    rows = [json.loads(x) for x in rows_path.read_text().splitlines() if x.strip()] if rows_path.is_file() else []
    done = {(r["key"], r.get("rung"), r.get("epochs")): r for r in rows}
    ctx = _context(grid, data_dir)
    t = grid.tune
    for name in t["baselines"]:
        key = f"baseline:{name}:{trial_key({}, t)}"
        if (key, None, None) in done:
            continue
        from ..eval.methods import build_methods

        methods = build_methods(
            ctx.lm.model,
            ctx.lm.tokenizer,
            None,
            list(ctx.split.train),
            t["seed"],
            (name,),
            engine=ctx.engine if hasattr(ctx.engine, "add_control_vector") else None,
            instruction=ctx.concept.instruction,
            layers=None if name == "prompting" else _vector_layers(ctx, grid),
        )
        t1 = time.perf_counter()
        row = score_row(_evaluate(ctx, methods, grid), name, ctx.targets)
        row.update(
            kind="baseline", key=key, rung=None, params={"method": name}, eval_minutes=(time.perf_counter() - t1) / 60
        )
        _append(rows_path, row)
        rows.append(row)
        done[(key, None, None)] = row
        log(f"baseline {name}: score {row['score']:+.3f}")
    seeds = train_seeds(t)
    survivors = grid.trials()
    for rung, epochs in enumerate(t["rungs"]):
        for i, params in enumerate(survivors):
            for seed in seeds:
                key = trial_key(params, t, seed)
                if (key, rung, epochs) in done:
                    continue
                log(f"rung {rung} ({epochs:g} epochs) trial {i + 1}/{len(survivors)} seed {seed} {key}: {params}")
                row = _run_trial(ctx, grid, params, key, rung, epochs, out, seed)
                _append(rows_path, row)
                rows.append(row)
                done[(key, rung, epochs)] = row
                if row["score"] is None:
                    log(f"  {row['diverged']}")
                else:
                    log(
                        f"  score {row['score']:+.3f} (C_b {row['kl_coeff']:.3g}, "
                        f"{(row['train_minutes'] or 0):.1f} + {row['eval_minutes']:.1f} min)"
                    )
                write_summary(rows, out / "summary.md", grid)

        def mean_score(params, rung=rung, epochs=epochs):  # a seed that diverged ranks the setting last
            scores = [done[(trial_key(params, t, s), rung, epochs)]["score"] for s in seeds]
            return -math.inf if None in scores else float(np.mean(scores))

        ranked = sorted(survivors, key=mean_score, reverse=True)
        survivors = ranked[: max(1, math.ceil(t["keep"] * len(ranked)))]
    write_summary(rows, out / "summary.md", grid)
    return rows


def _vector_layers(ctx: _Context, grid: Grid) -> list[int]:
    from ..adapter.config import AdapterConfig
    from ..adapter.targets import decoder_blocks, select_layers

    _, ad = split_params(grid.fixed, grid.source)
    return select_layers(len(decoder_blocks(ctx.lm.model)), AdapterConfig(**ad))
