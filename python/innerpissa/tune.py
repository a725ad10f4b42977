"""Dev-split search over training recipes: a grid of training and adapter settings, screened by successive
halving, scored by the evaluator on **dev items only** (test items are never read).

Grid file (TOML)::

    [tune]
    model = "embedded:smollm2"
    concept = "sentiment"
    seed = 0
    rungs = [0.5, 2.0]      # epochs per rung; every trial of a rung trains from scratch with that budget
    keep = 0.34             # fraction of a rung's trials promoted to the next one (at least one)
    kl_budget = 0.05        # nats/token, as in the evaluator
    n_target = 64           # items drawn per target set (its dev half is scored)
    n_other = 16            # items drawn per off-target persona set (dev half; sets with no dev item are dropped)

With ``seed``, ``n_target`` and ``n_other`` equal to the evaluation's (``ipissa eval``/``scripts/results.py``:
64 and 16, seed 0) the dev items here are exactly the evaluation's dev items, so no reported test item is ever
seen by the search; other values draw other subsets, and the tables' test items may then overlap them.
    coeffs = [-2, -1, -0.5, -0.25, 0, 0.25, 0.5, 1, 2]
    baselines = ["prompting", "pca", "mean-diff"]   # scored once on the same dev items, for reference

    [fixed]                 # settings every trial shares
    "train.batch_pairs" = 8

    [grid]                  # every combination is a trial
    "train.objective" = ["reprpo-svd", "anchored"]
    "adapter.depth_range" = [[0.1, 0.5], [0.3]]     # [start] runs to the default end (L − 3)
    "train.loss_layer,train.lr" = [[0.5, 3e-3], [0.7, 1e-2]]   # a joint axis: these keys change together

Keys are ``train.<TrainConfig field>``, ``adapter.<AdapterConfig field>``, or ``family`` (``"innerpissa"``, the
default, or ``"lora"``: PEFT LoRA with the same objective, ``adapter/lora.py``; it needs ``train.basis = "pca"``).

**Score** of a trial: the mean over the concept's target sets of (expected sign × balanced effect at the KL
budget), nats, on dev items. Each row also holds every target set's effect with its CI, the bias, ρ, both sides'
effects, the mean |bias| and |effect| over the off-target sets, whether the budget was reached, the KL-matched
coefficient and train/eval minutes.

Outputs in ``out``: ``rows.jsonl`` (one row per trial × rung and per baseline, appended as each finishes, so an
interrupted search loses at most the trial in progress; a rerun skips finished rows and resumes an unfinished
training run), ``runs/<key>/rung<k>/`` (training run directories) and ``summary.md`` (tables, best first).
One process at a time: run nothing else CPU-heavy beside it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as the tomli package
    import tomli as tomllib

from .errors import ConfigError

TUNE_DEFAULTS: dict[str, Any] = {
    "model": None,
    "concept": "honesty",
    "seed": 0,
    "rungs": [0.5, 2.0],
    "keep": 0.34,
    "kl_budget": 0.05,
    "n_target": 64,
    "n_other": 16,
    "coeffs": [-2.0, -1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0, 2.0],
    "baselines": ["prompting", "pca", "mean-diff"],
    "batch_size": 32,
    "split": "dev",
    "train_seeds": None,
}

#: adapter families a trial can train: InnerPiSSA, LoRA (``adapter/lora.py``) and the PEFT families of
#: ``adapter/families.py`` (evaluated with the torch engine: the Rust engine runs InnerPiSSA-format adapters only)
PEFT_ONLY = ("dora", "delora", "oft", "boft", "psoft", "road", "ia3")
FAMILY_CHOICES = ("innerpissa", "lora", *PEFT_ONLY)


@dataclasses.dataclass
class Grid:
    """A parsed grid file: search settings, settings shared by every trial, and the axes of the grid."""

    tune: dict[str, Any]
    fixed: dict[str, Any]
    axes: dict[str, list]
    source: str = ""

    def trials(self) -> list[dict[str, Any]]:
        """Every combination of the axes, each merged over ``fixed`` (axis values win). A joint axis
        (``"a,b" = [[a1, b1], [a2, b2]]``) sets its keys together."""
        out = []
        for combo in itertools.product(*self.axes.values()):
            params = dict(self.fixed)
            for name, value in zip(self.axes, combo):
                keys = name.split(",")
                params.update(zip(keys, value) if len(keys) > 1 else [(name, value)])
            out.append(params)
        return out

    def columns(self) -> list[str]:
        """The settings the axes vary, one per key (a joint axis gives several)."""
        return [k for name in self.axes for k in name.split(",")]


def _split_params(params: dict[str, Any], source: str) -> tuple[dict, dict]:
    from .adapter.config import AdapterConfig
    from .train import TrainConfig

    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    adapter_fields = {f.name for f in dataclasses.fields(AdapterConfig)}
    tr, ad = {}, {}
    for key, value in params.items():
        if key == "family":
            if value not in FAMILY_CHOICES:
                raise ConfigError(
                    f"family must be one of {', '.join(FAMILY_CHOICES)}, got {value!r}", path=source, field=key
                )
            continue
        group, _, name = key.partition(".")
        if group == "train" and name in train_fields and name not in ("seed", "epochs", "steps"):
            tr[name] = value
        elif group == "adapter" and name in adapter_fields and name != "seed":
            ad[name] = None if name == "depth_range" and value is None else value
        else:
            raise ConfigError(
                f"unknown setting {key!r}; use train.<field> ({', '.join(sorted(train_fields))}) or "
                f"adapter.<field> ({', '.join(sorted(adapter_fields))}); seed and epochs come from "
                "[tune]",
                path=source,
                field=key,
            )
    if "depth_range" in ad and isinstance(ad["depth_range"], list):  # TOML has no null: [start] = to L − 3
        dr = ad["depth_range"]
        ad["depth_range"] = (dr[0], dr[1] if len(dr) > 1 else None)
    for name in ("modules",):
        if isinstance(ad.get(name), list):
            ad[name] = tuple(ad[name])
    return tr, ad


def load_grid(path: str | Path) -> Grid:
    """Read and check a grid file (every trial's configuration is validated before any compute).

    Raises:
        FileNotFoundError: no such file.
        ConfigError: bad TOML, an unknown section or key, an empty axis, a bad value (names file and key).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"grid file not found: {path}")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"not valid TOML ({e})", path=path) from None
    unknown = set(raw) - {"tune", "fixed", "grid"}
    if unknown:
        raise ConfigError(f"unknown section(s) {sorted(unknown)}; use [tune], [fixed], [grid]", path=path)
    tune = dict(TUNE_DEFAULTS)
    for k, v in raw.get("tune", {}).items():
        if k not in TUNE_DEFAULTS:
            raise ConfigError(f"unknown [tune] key {k!r}; known: {', '.join(TUNE_DEFAULTS)}", path=path, field=k)
        tune[k] = v
    rungs = tune["rungs"]
    if not isinstance(rungs, list) or not rungs or not all(isinstance(r, (int, float)) and r > 0 for r in rungs):
        raise ConfigError(f"[tune] rungs must be a list of epochs > 0, got {rungs!r}", path=path, field="rungs")
    if not (isinstance(tune["keep"], (int, float)) and 0 < tune["keep"] <= 1):
        raise ConfigError(f"[tune] keep must be in (0, 1], got {tune['keep']!r}", path=path, field="keep")
    if tune["split"] not in ("dev", "test"):
        raise ConfigError(f"[tune] split must be 'dev' or 'test', got {tune['split']!r}", path=path, field="split")
    seeds = tune["train_seeds"]
    if seeds is not None and not (
        isinstance(seeds, list) and seeds and all(isinstance(x, int) and not isinstance(x, bool) for x in seeds)
    ):
        raise ConfigError(
            f"[tune] train_seeds must be a non-empty list of integers, got {seeds!r}", path=path, field="train_seeds"
        )
    axes = {}
    for k, v in raw.get("grid", {}).items():
        if not isinstance(v, list) or not v:
            raise ConfigError(f"[grid] {k} must be a non-empty list of values, got {v!r}", path=path, field=k)
        n_keys = len(k.split(","))
        if n_keys > 1 and not all(isinstance(x, list) and len(x) == n_keys for x in v):
            raise ConfigError(
                f"[grid] joint axis {k} needs a list of {n_keys}-element lists (one value per key), got {v!r}",
                path=path,
                field=k,
            )
        axes[k] = v
    grid = Grid(tune, dict(raw.get("fixed", {})), axes, str(path))
    from .adapter.config import AdapterConfig
    from .concepts import get_concept
    from .train import TrainConfig

    get_concept(tune["concept"])
    for trial in grid.trials():
        tr, ad = _split_params(trial, str(path))
        try:
            tcfg = TrainConfig(**tr)
            AdapterConfig(**ad)
        except TypeError as e:
            raise ConfigError(f"bad setting in trial {trial}: {e}", path=path) from None
        family = trial.get("family", "innerpissa")
        if family != "innerpissa" and tcfg.basis != "pca":
            raise ConfigError(
                f'trial {trial}: family {family} needs train.basis = "pca" (there are no singular '
                "vectors to read the loss in)",
                path=path,
                field="train.basis",
            )
    return grid


#: [tune] settings that change a score: part of every row's key, so a rerun with other values recomputes.
SCORING_KEYS = ("model", "concept", "seed", "kl_budget", "coeffs", "n_target", "n_other")


def trial_key(params: dict[str, Any], tune: dict[str, Any], train_seed: int | None = None) -> str:
    """12 hex digits identifying a trial: its settings, the [tune] settings that change its score, and the
    training seed when it differs from ``seed`` (so the keys of single-seed dev searches stay as they were); the
    test split adds itself."""
    ident = {"params": params, **{k: tune[k] for k in SCORING_KEYS}}
    if train_seed is not None and train_seed != tune["seed"]:
        ident["train_seed"] = train_seed
    if tune.get("split", "dev") != "dev":
        ident["split"] = tune["split"]
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]


def train_seeds(tune: dict[str, Any]) -> list[int]:
    """The training seeds of every trial: ``train_seeds``, or the one data ``seed``."""
    return list(tune["train_seeds"]) if tune.get("train_seeds") else [tune["seed"]]


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
    from .concepts import get_concept
    from .eval.datasets import EvalDataset
    from .eval.engines import TorchEngine
    from .eval.rust_engine import RustEngine
    from .eval.suite import concept_datasets, dataset_splits
    from .models import gguf_for_spec, load_model

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
    from .eval.suite import run_suite

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
    from .adapter.config import AdapterConfig
    from .adapter.model import attach, expand_modules
    from .eval.methods import AdapterMethod
    from .train import TrainConfig, train

    t = grid.tune
    tr, ad = _split_params(params, grid.source)
    acfg = AdapterConfig(**ad, seed=train_seed)
    tcfg = TrainConfig(**tr, epochs=float(epochs), seed=train_seed)
    meta = {"base_model": ctx.lm.spec, "concept": t["concept"], "pairs": f"builtin:{t['concept']}"}
    family = params.get("family", "innerpissa")
    run_dir = out / "runs" / key / f"rung{rung}"
    state = run_dir / "run_state.json"
    finished = state.is_file() and json.loads(state.read_text()).get("finished")
    engine = None  # the search's engine (Rust where the model is a GGUF it runs) ...
    if family in PEFT_ONLY or not set(expand_modules(acfg.modules)) <= {"o", "down"}:
        from .eval.engines import TorchEngine

        # ... which runs InnerPiSSA-format adapters on residual writers only
        engine = TorchEngine(ctx.lm.model, ctx.lm.tokenizer, t["batch_size"])
    train_min = None
    t0 = time.perf_counter()
    if family in PEFT_ONLY:
        from .adapter.families import PeftSteering, load_steering

        if finished:  # trained, but its row was not written
            adapter = load_steering(ctx.lm.model, run_dir / "adapter")
        else:
            adapter = PeftSteering(ctx.lm.model, family, acfg, meta)
    elif finished:
        from .adapter.model import load_adapter

        adapter = load_adapter(ctx.lm.model, run_dir / "adapter")
    elif family == "lora":
        from .adapter.lora import LoRASteering

        adapter = LoRASteering(ctx.lm.model, acfg, meta)
    else:
        adapter = attach(ctx.lm.model, acfg, meta=meta, pairs=list(ctx.split.train), tokenizer=ctx.lm.tokenizer)
    n_params = _trainable(adapter)
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
    row = score_row(res, family, ctx.targets)
    row.update(
        kind="trial",
        key=key,
        rung=rung,
        epochs=epochs,
        params=params,
        train_seed=train_seed,
        trainable_params=n_params,
        train_minutes=train_min,
        eval_minutes=(time.perf_counter() - t1) / 60,
        steps=tcfg.total_steps(len(ctx.split.train)),
    )
    return row


def run_search(grid_path: str | Path, out: str | Path, data_dir=None, log=print) -> list[dict]:
    """Run (or resume) the search of ``grid_path`` into ``out``; returns every row. See the module docstring.

    Raises:
        ConfigError / FileNotFoundError: a bad grid file (before any compute).
        ResumeMismatchError: a trial's training directory holds a run with other settings (changed by hand).
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
        from .eval.methods import build_methods

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
                log(
                    f"  score {row['score']:+.3f} (C_b {row['kl_coeff']:.3g}, {(row['train_minutes'] or 0):.1f} + "
                    f"{row['eval_minutes']:.1f} min)"
                )
                write_summary(rows, out / "summary.md", grid)

        def mean_score(params, rung=rung, epochs=epochs):
            return float(np.mean([done[(trial_key(params, t, s), rung, epochs)]["score"] for s in seeds]))

        ranked = sorted(survivors, key=mean_score, reverse=True)
        survivors = ranked[: max(1, math.ceil(t["keep"] * len(ranked)))]
    write_summary(rows, out / "summary.md", grid)
    return rows


def _vector_layers(ctx: _Context, grid: Grid) -> list[int]:
    from .adapter.config import AdapterConfig
    from .adapter.model import decoder_blocks, select_layers

    _, ad = _split_params(grid.fixed, grid.source)
    return select_layers(len(decoder_blocks(ctx.lm.model)), AdapterConfig(**ad))


def write_summary(rows: list[dict], path: Path, grid: Grid) -> None:
    """summary.md: the baselines, then one table per rung, best score first (numbers on dev items)."""
    from .adapter.model import atomic_write

    t = grid.tune
    axes = grid.columns()
    lines = [
        f"# Search: {t['concept']} on {t['model'] or 'embedded:smollm2'} ({t.get('split', 'dev')} items only)",
        "",
        f"Grid `{grid.source}`; seed {t['seed']}; KL budget {t['kl_budget']} nats/token; score = mean over "
        "target sets of expected sign × balanced effect at the budget (nats).",
        "",
    ]
    targets = sorted({n for r in rows for n in r.get("targets", {})})
    head = (
        "| "
        + " | ".join(
            [
                "trial",
                *axes,
                "seed",
                "score",
                *[f"{n} effect [CI]" for n in targets],
                "bias",
                "ρ",
                "off |bias|",
                "C_b",
                "params",
                "min",
            ]
        )
        + " |"
    )
    sep = "|" + "---|" * (len(axes) + len(targets) + 9)

    def cells(r: dict) -> str:
        tg = r.get("targets", {})
        eff = [
            f"{tg[n]['effect']:+.3f} [{tg[n]['ci'][0]:+.3f}, {tg[n]['ci'][1]:+.3f}]" if n in tg else "–"
            for n in targets
        ]
        bias = "; ".join(f"{tg[n]['bias']:+.3f}" for n in targets if n in tg)
        rho = "; ".join(f"{tg[n]['spearman']:.2f}" for n in targets if n in tg and tg[n]["spearman"] is not None)
        off = "–" if r.get("off_abs_bias") is None else f"{r['off_abs_bias']:.3f}"
        minutes = (r.get("train_minutes") or 0) + (r.get("eval_minutes") or 0)
        name = r["key"]
        vals = [str(r["params"].get(a, "")) for a in axes] if r["kind"] == "trial" else [""] * len(axes)
        flag = "" if r["budget_reached"] else " (budget not reached)"
        return (
            "| "
            + " | ".join(
                [
                    name,
                    *vals,
                    str(r.get("train_seed", "")),
                    f"{r['score']:+.3f}",
                    *eff,
                    bias,
                    rho,
                    off,
                    f"{r['kl_coeff']:.3g}{flag}",
                    str(r.get("trainable_params", "")),
                    f"{minutes:.1f}",
                ]
            )
            + " |"
        )

    base = [r for r in rows if r["kind"] == "baseline"]
    if base:
        lines += ["## Baselines", "", head, sep, *[cells(r) for r in sorted(base, key=lambda r: -r["score"])], ""]
    for rung, epochs in enumerate(t["rungs"]):
        rs = [r for r in rows if r["kind"] == "trial" and r["rung"] == rung]
        if rs:
            lines += [
                f"## Rung {rung}: {epochs:g} epochs ({len(rs)} trials)",
                "",
                head,
                sep,
                *[cells(r) for r in sorted(rs, key=lambda r: -r["score"])],
                "",
            ]
    lines += seed_table(rows, grid)
    text = "\n".join(lines) + "\n"
    atomic_write(path, lambda p: Path(p).write_text(text, encoding="utf-8"))


def seed_summary(rows: list[dict], grid: Grid) -> list[dict]:
    """Per trial setting and rung, the score over training seeds: mean, sample standard deviation, a 95 %
    t-interval of the mean (scipy; none for one seed), each seed's score, and the trainable parameter count."""
    from scipy import stats

    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r["kind"] == "trial":
            groups.setdefault(json.dumps([r["params"], r["rung"]], sort_keys=True), []).append(r)
    out = []
    for rs in groups.values():
        scores = np.array([r["score"] for r in rs])
        n = len(scores)
        sd = float(scores.std(ddof=1)) if n > 1 else None
        ci = None
        if n > 1:
            half = float(stats.t.ppf(0.975, n - 1)) * sd / np.sqrt(n)
            ci = (float(scores.mean()) - half, float(scores.mean()) + half)
        out.append(
            {
                "params": rs[0]["params"],
                "rung": rs[0]["rung"],
                "n_seeds": n,
                "mean": float(scores.mean()),
                "sd": sd,
                "ci": ci,
                "scores": {r.get("train_seed"): r["score"] for r in rs},
                "trainable_params": rs[0].get("trainable_params"),
            }
        )
    return sorted(out, key=lambda g: (g["rung"], -g["mean"]))


def seed_table(rows: list[dict], grid: Grid) -> list[str]:
    """Markdown lines of ``seed_summary`` (nothing when every trial has one seed)."""
    groups = seed_summary(rows, grid)
    if all(g["n_seeds"] < 2 for g in groups):
        return []
    axes = grid.columns()
    lines = [
        "## Over training seeds",
        "",
        "| " + " | ".join(["rung", *axes, "seeds", "mean score [95 % t-CI]", "sd", "per seed", "params"]) + " |",
        "|" + "---|" * (len(axes) + 6),
    ]
    for g in groups:
        ci = "" if g["ci"] is None else f" [{g['ci'][0]:+.3f}, {g['ci'][1]:+.3f}]"
        per = ", ".join(f"{v:+.3f}" for v in g["scores"].values())
        sd = "–" if g["sd"] is None else f"{g['sd']:.3f}"
        vals = [str(g["params"].get(a, "")) for a in axes]
        lines.append(
            f"| {g['rung']} | "
            + " | ".join([*vals, str(g["n_seeds"]), f"{g['mean']:+.3f}{ci}", sd, per, str(g["trainable_params"])])
            + " |"
        )
    return [*lines, ""]
