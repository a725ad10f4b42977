"""Regenerate docs/results.md: the trained adapter (≥ 3 training seeds) and LoRA trained with the same objective vs
prompting, PCA, mean-difference and random vectors, per model and concept, every method at the common KL budget,
balanced effect and bias side by side.

    python scripts/results.py --models embedded:smollm2 embedded:gemma3-270m --concepts honesty sentiment

The recipe is ``TrainConfig`` / ``AdapterConfig``'s defaults (``--steps``/``--epochs``/``--objective`` and
``--set FIELD=VALUE`` override them). Pairs, evaluation items and the dev/test split are fixed by ``--seed``; each
of ``--seeds`` trains its own InnerPiSSA adapter and its own LoRA (adapter init, batch order). For each model ×
concept, under ``OUT/<model>/<concept>/<recipe>/`` (``<recipe>`` names the objective, its version and a hash of the
whole configuration, so results of another recipe are never reused):

- ``<family>-seed<k>/``: the training run (an unfinished one resumes, a finished one is reused) and its
  evaluation ``summary.json``;
- ``../baselines-<hash>/summary.json``: prompting, PCA, mean-difference and random vectors from the same training
  pairs (deterministic given the pairs; random uses ``--seed``), shared by every recipe with the same adapter
  configuration (the layers the vectors steer).

Everything is swept with the Rust engine (both embedded models are GGUF files) on label-balanced seeded items,
dev/test split stratified by label; tables report **test** items. A trained method's numbers are pooled over seeds
(``metrics.pool_seeds``: each item's effect averaged over seeds, each seed at its own KL-matched coefficient, then
the bootstrap over items), with every seed's effect listed. Every unit writes its ``summary.json`` when it
finishes, and the doc is rebuilt from every finished summary, so an interrupted command loses at most the unit in
progress. The hand-written reading between the ``<!-- reading -->`` markers of the existing doc is kept.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TRAINED = ("innerpissa", "lora")
BASELINES = ("prompting", "pca", "mean-diff", "random")


#: TrainConfig / AdapterConfig fields added after results were first computed, with the value that reproduces
#: the older recipe: left out of the recipe hash at that value, so finished runs keep their directory.
ADDED_LATER = {
    "direction": "mean-diff",
    "fisher_damping": 1e-5,
    "rotate_side": "v",
    "bias_weight": 0.0,
    "bias_batch": 8,
    "even_weight": 0.0,
}
_UNSET = object()


def slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", spec)


def recipe(args):
    """(TrainConfig kwargs, AdapterConfig, tag) of this command's recipe (seed excluded from the tag)."""
    from innerpissa import AdapterConfig
    from innerpissa.train import TrainConfig
    from innerpissa.train.objectives import OBJECTIVES

    kw = {
        k: v
        for k, v in (("steps", args.steps), ("epochs", args.epochs), ("objective", args.objective))
        if v is not None
    }
    kw |= parse_sets(getattr(args, "set", None) or [])
    if "steps" in kw and "epochs" not in kw:  # --steps means steps, whatever the default recipe says
        kw["epochs"] = 0.0
    tcfg = TrainConfig(**kw)
    acfg = AdapterConfig()
    ident = {"train": _identity(tcfg, ("seed", "share_prefix")), "adapter": _identity(acfg, ("seed",))}
    return kw, acfg, f"{tcfg.objective}-v{OBJECTIVES[tcfg.objective]}-{_digest(ident)}"


def lora_sets(args) -> dict:
    """``--lora-set FIELD=VALUE`` items: TrainConfig overrides applied to the LoRA units only, on top of the recipe
    (a learning rate at which LoRA's different parametrisation stays stable, say). Not part of the recipe tag, so
    InnerPiSSA's units and the baselines are shared; they name LoRA's unit directories instead (``_unit_path``)."""
    return parse_sets(getattr(args, "lora_set", None) or [])


def _unit_suffix(unit: str, lora_kw: dict) -> str:
    """The part of a trained unit's directory name after its family: the LoRA overrides, e.g. ``-lr0.001``."""
    return "".join(f"-{k}{v}" for k, v in sorted(lora_kw.items())) if unit == "lora" else ""


def _identity(cfg, skip: tuple[str, ...]) -> dict:
    """A config's fields that name a recipe: all but ``skip`` and the ``ADDED_LATER`` fields at their old value."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in skip and ADDED_LATER.get(k, _UNSET) != v}


def _digest(ident: dict) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=list).encode()).hexdigest()[:8]


def parse_sets(items: list[str]) -> dict:
    """``--set FIELD=VALUE`` items as TrainConfig keyword arguments (``innerpissa.train.config.parse_overrides``).

    Raises:
        SystemExit: with the one-line message of the ConfigError naming the bad item.
    """
    from innerpissa.errors import ConfigError
    from innerpissa.train.config import parse_overrides

    try:
        return parse_overrides(items)
    except ConfigError as e:
        raise SystemExit(str(e)) from None


def _strip(method_result: dict) -> dict:
    """A method's results without the curves (item effects are kept: they are what seeds pool over)."""
    return {k: v for k, v in method_result.items() if k != "datasets"} | {
        "datasets": {d: {k: x for k, x in dr.items() if k != "curve"} for d, dr in method_result["datasets"].items()}
    }


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, allow_nan=False))
    tmp.replace(path)


def run_unit(
    lm, split, concept, spec: str, unit: str, seed: int, run: Path, args, recipe_kw, acfg, eng, datasets, targets
) -> dict:
    """Train (or reuse) one trained method at one seed, or build the baselines (``unit="baselines"``), evaluate on
    the shared items, and write ``run/summary.json``; returns it."""
    import torch

    from innerpissa import attach, load_adapter
    from innerpissa.adapter.targets import select_layers
    from innerpissa.eval import build_methods, run_suite, write_report
    from innerpissa.eval.methods import AdapterMethod
    from innerpissa.train import TrainConfig, train

    torch.set_num_threads(args.threads)
    meta = {"base_model": spec, "concept": concept.name, "pairs": f"builtin:{concept.name}"}
    train_minutes = None
    t0 = time.perf_counter()
    if unit == "baselines":
        layers = select_layers(eng.config["n_layer"], acfg)
        methods = build_methods(
            lm.model,
            lm.tokenizer,
            None,
            list(split.train),
            args.seed,
            tuple(m for m in args.methods if m in BASELINES),
            layers=layers,
            engine=eng,
            instruction=concept.instruction,
        )
        loss = None
    else:
        cfg = dataclasses.replace(acfg, seed=seed)
        if (run / "adapter" / "adapter_config.json").is_file() and not (run / "checkpoint").exists():
            adapter = load_adapter(lm.model, run / "adapter")
        else:
            if unit == "lora":
                from innerpissa.adapter.lora import LoRASteering

                steer = LoRASteering(lm.model, cfg, meta)
            else:
                steer = attach(lm.model, cfg, meta=meta, pairs=list(split.train), tokenizer=lm.tokenizer)
            tcfg = TrainConfig(**(recipe_kw | (lora_sets(args) if unit == "lora" else {})), seed=seed)
            if unit == "lora" and tcfg.basis != "pca":  # LoRA has no singular vectors to read the loss in
                tcfg = dataclasses.replace(tcfg, basis="pca")
            try:
                train(steer, lm.tokenizer, list(split.train), list(split.val), tcfg, run_dir=run)
            finally:
                if unit == "lora":
                    trained, _ = steer.to_adapter(), steer.remove()
            adapter = trained if unit == "lora" else steer
            train_minutes = (time.perf_counter() - t0) / 60
        loss = adapter.meta.get("loss")
        methods = [AdapterMethod(adapter, name=unit)]
    t1 = time.perf_counter()
    cmd = "python scripts/results.py " + " ".join(sys.argv[1:])
    results = run_suite(
        eng,
        methods,
        datasets,
        seed=args.seed,
        kl_budget=args.kl_budget,
        targets=targets,
        budget_first=True,
        concept=concept.name,
        meta={"model": spec, "concept": concept.name, "command": cmd},
    )
    write_report(results, run / "eval")
    summary = {
        "model": spec,
        "concept": concept.name,
        "unit": unit,
        "seed": seed,
        "data_seed": args.seed,
        "train_minutes": train_minutes,
        "eval_minutes": (time.perf_counter() - t1) / 60,
        "loss": loss,
        "date": datetime.date.today().isoformat(),
        "methods": {m: _strip(r) for m, r in results["methods"].items()},
        "datasets": results["datasets"],
    }
    _write_json(run / "summary.json", summary)
    return summary


def run_one(spec: str, concept_name: str, args) -> None:
    """Every unfinished unit of one model × concept (training seeds of each trained method, then the baselines)."""
    import torch

    from innerpissa.concepts import get_concept
    from innerpissa.eval.rust_engine import RustEngine
    from innerpissa.eval.suite import concept_datasets
    from innerpissa.models import gguf_for_spec, load_model

    torch.set_num_threads(args.threads)
    kw, acfg, tag = recipe(args)
    base = args.out / slug(spec) / concept_name / tag
    units = [(u, s) for u in TRAINED if u in args.methods for s in args.seeds]
    units += [("baselines", args.seed)] if set(args.methods) & set(BASELINES) else []
    todo = [(u, s) for u, s in units if not (_unit_path(base, u, s, acfg, lora_sets(args)) / "summary.json").is_file()]
    if not todo:
        return
    concept = get_concept(concept_name)
    lm = load_model(spec)
    split = concept.pairs(lm.tokenizer, seed=args.seed)
    eng = RustEngine(gguf_for_spec(lm.spec), lm.tokenizer, batch_size=args.batch_size)
    datasets, targets = concept_datasets(
        concept, args.data_dir, args.n_target, args.n_other, args.n_dd, args.seed, truthfulqa=args.truthfulqa
    )
    base.mkdir(parents=True, exist_ok=True)
    _write_json(base / "recipe.json", {"train": kw, "adapter": dataclasses.asdict(acfg), "tag": tag})
    for unit, seed in todo:
        print(f"== {spec} / {concept_name} / {tag}: {unit} seed {seed}", flush=True)
        run = _unit_path(base, unit, seed, acfg, lora_sets(args))
        run.mkdir(parents=True, exist_ok=True)
        run_unit(lm, split, concept, spec, unit, seed, run, args, kw, acfg, eng, datasets, targets)
        write_doc(args, finished(args), (time.perf_counter() - args.t0) / 60)  # the doc grows unit by unit


def _unit_path(base: Path, unit: str, seed: int, acfg, lora_kw: dict | None = None) -> Path:
    """A unit's directory: ``base/<family>[-<LoRA overrides>]-seed<k>`` for a trained method; the baselines do not
    depend on the training recipe, so they live beside the recipes in ``baselines-<hash of the adapter config>``
    (the layers they steer) and every recipe of a model × concept reuses them."""
    if unit != "baselines":
        return base / f"{unit}{_unit_suffix(unit, lora_kw or {})}-seed{seed}"
    return base.parent / f"baselines-{_digest(_identity(acfg, ('seed',)))}"


def finished(args) -> list[dict]:
    """One pooled summary per model × concept with any finished unit: methods → pooled numbers per dataset."""
    from innerpissa.eval.metrics import pool_seeds

    _, acfg, tag = recipe(args)
    out = []
    for spec in args.models:
        for c in args.concepts:
            base = args.out / slug(spec) / c / tag
            # trained units of this command's LoRA overrides only (``lora-seed0`` and ``lora-lr0.001-seed0`` are
            # two LoRA recipes, not two seeds)
            lkw = lora_sets(args)
            own = re.compile("|".join(re.escape(t + _unit_suffix(t, lkw)) + r"-seed\d+" for t in TRAINED))
            paths = [p for p in sorted(base.glob("*/summary.json")) if own.fullmatch(p.parent.name)]
            paths.append(_unit_path(base, "baselines", 0, acfg) / "summary.json")
            units = [json.loads(p.read_text()) for p in paths if p.is_file()]
            if not units:
                continue
            methods, minutes, loss = {}, 0.0, None
            for name in args.methods:
                per = (
                    [u for u in units if name in u["methods"] and u["unit"] != "baselines"]
                    if name in TRAINED
                    else [u for u in units if u["unit"] == "baselines" and name in u["methods"]]
                )
                if not per:
                    continue
                ms = [u["methods"][name] for u in per]
                pooled = {d: pool_seeds([m["datasets"][d] for m in ms]) for d in ms[0]["datasets"]}
                methods[name] = {
                    "kl_coeff": [m["kl_coeff"] for m in ms],
                    "kl_at_coeff": [m["kl_at_coeff"] for m in ms],
                    "budget_reached": all(m["budget_reached"] for m in ms),
                    "seeds": [u["seed"] for u in per] if name in TRAINED else [],
                    "datasets": pooled,
                }
            for u in units:
                minutes += (u.get("train_minutes") or 0) + u["eval_minutes"]
                loss = loss or u.get("loss")
            out.append(
                {
                    "model": spec,
                    "concept": c,
                    "recipe": tag,
                    "loss": loss,
                    "minutes": minutes,
                    "datasets": units[0]["datasets"],
                    "methods": methods,
                    "lora_kw": lkw if "lora" in methods else {},
                    "recipe_kw": json.loads((base / "recipe.json").read_text())["train"]
                    if (base / "recipe.json").is_file()
                    else {},
                }
            )
    return out


def _f(x, nd=2):
    return "–" if x is None else f"{x:+.{nd}f}"


def _seeds(xs) -> str:
    return " / ".join(f"{x:+.2f}" for x in xs)


def tables(s: dict) -> list[str]:
    """Markdown for one model × concept pooled summary."""
    ms, ds = s["methods"], s["datasets"]
    targets = [d for d, info in ds.items() if info.get("expected_sign")]
    others = [d for d, info in ds.items() if info["labelled"] and not info.get("expected_sign")]
    unl = [d for d, info in ds.items() if not info["labelled"]]
    loss = s.get("loss") or {}
    rkw = s.get("recipe_kw", {})
    if "steps" in rkw and rkw.get("epochs") == 0.0:  # --steps implies training by steps (``recipe``)
        rkw = {k: v for k, v in rkw.items() if k != "epochs"}
    kw = ", ".join(f"{k} {v}" for k, v in rkw.items()) or "defaults"
    flags = " ".join(
        f"--{k} {v}" if k in ("steps", "epochs", "objective") else f"--set {k}={v}" for k, v in rkw.items()
    )
    seeds = next((m["seeds"] for m in ms.values() if m["seeds"]), [])
    extra = "" if list(ms) == list(TRAINED + BASELINES) else f" --methods {','.join(ms)}"
    extra += "" if seeds in ([], [0, 1, 2]) else f" --seeds {' '.join(map(str, seeds))}"
    lkw = s.get("lora_kw") or {}
    lflags = "".join(f" --lora-set {k}={v}" for k, v in lkw.items())
    out = [
        f"### {s['model']} — {s['concept']}" + (f" ({flags})" if flags else ""),
        "",
        f"Command: `python scripts/results.py --models {s['model']} --concepts {s['concept']}{extra}"
        + (f" {flags}" if flags else "")
        + lflags
        + "`.",
        "",
        f"Recipe `{s['recipe']}`: objective {loss.get('name', '?')} v{loss.get('version', '?')} ({kw}; the rest "
        f"TrainConfig/AdapterConfig defaults"
        + (f"; LoRA with {', '.join(f'{k} {v}' for k, v in lkw.items())}" if lkw else "")
        + "). Trained methods pooled over seeds ("
        + "; ".join(f"{n} {', '.join(map(str, m['seeds']))}" for n, m in ms.items() if m["seeds"])
        + f"); {s['minutes']:.0f} min of training and evaluation in all (Rust engine, 2 threads).",
        "",
        "| method | C_b (per seed) | KL at ±C_b | "
        + " | ".join(f"{d} ({'+' if ds[d]['expected_sign'] > 0 else '−'}): effect [CI] / bias" for d in targets)
        + " | off-target mean \\|bias\\| | off-target mean \\|effect\\| | DailyDilemmas net shift |",
        "|---|---|---|" + "---|" * len(targets) + "---|---|---|",
    ]
    for name, m in ms.items():
        cells = []
        for d in targets:
            r = m["datasets"][d]
            cells.append(f"{_f(r.get('effect'))} [{_f(r['ci'][0])}, {_f(r['ci'][1])}] / {_f(r['bias'])}")
        ob = sum(abs(m["datasets"][d]["bias"]) for d in others) / max(len(others), 1)
        oe = sum(abs(m["datasets"][d].get("effect") or 0) for d in others) / max(len(others), 1)
        dd = "; ".join(f"{m['datasets'][d]['decision_shift_net']:.2f}" for d in unl) or "–"
        cb = " / ".join(f"{c:.3g}" for c in m["kl_coeff"]) + ("" if m["budget_reached"] else " (not reached)")
        out.append(
            f"| {name} | {cb} | {max(m['kl_at_coeff']):.3f} | " + " | ".join(cells) + f" | {ob:.2f} | {oe:.2f} | {dd} |"
        )
    out += [
        "",
        "| method | target set | effect per seed | bias per seed | flip score | ρ per seed | "
        "− side / + side | invalid c=0 → ±C_b |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in ms.items():
        for d in targets:
            r = m["datasets"][d]
            out.append(
                f"| {name} | {d} | {_seeds(r.get('effect_seeds', []))} | {_seeds(r['bias_seeds'])} | "
                f"{_f(r.get('flip_score'))} | {' / '.join(_f(x) for x in r.get('spearman_seeds', []))} | "
                f"{_f(r.get('effect_neg_side'))} / {_f(r.get('effect_pos_side'))} | "
                f"{r['invalid_rate_c0']:.2f} → {r['invalid_rate_cb']:.2f} |"
            )
    return out + [""]


def readme_table(summaries: list[dict], old: str = "") -> list[str]:
    """The README's compact table: per model × concept × recipe, each method's balanced effect on the target sets
    at the KL budget (signed so that + is the concept's direction; trained methods pooled over seeds), test items.
    Rows of ``old`` (a previous table's markdown) whose model, concept and recipe are not in ``summaries`` are
    kept, so units finished on another machine stay listed."""
    methods = list(TRAINED + BASELINES)
    head = ["| model | concept | recipe | target set | " + " | ".join(methods) + " |"]
    head.append("|---|---|---|---|" + "---|" * len(methods))
    rows: dict[tuple, str] = {}
    for line in old.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 + len(methods) and cells[0] != "model" and not cells[0].startswith("---"):
            rows[tuple(cells[:4])] = line
    fresh = {(s["model"], s["concept"], s["recipe"]) for s in summaries}
    rows = {k: v for k, v in rows.items() if k[:3] not in fresh}
    for s in summaries:
        for d, info in s["datasets"].items():
            if not info.get("expected_sign"):
                continue
            cells = []
            for m in methods:
                r = s["methods"].get(m, {}).get("datasets", {}).get(d)
                if r is None or r.get("effect") is None:
                    cells.append("–")
                    continue
                sign = info["expected_sign"]
                lo, hi = sorted((sign * r["ci"][0], sign * r["ci"][1]))
                cells.append(f"{sign * r['effect']:+.2f} [{lo:+.2f}, {hi:+.2f}]")
            key = (s["model"], s["concept"], s["recipe"], d)
            rows[key] = f"| {' | '.join(key)} | " + " | ".join(cells) + " |"
    return head + [rows[k] for k in sorted(rows)]


def write_readme_table(summaries: list[dict], readme: Path = Path("README.md")) -> None:
    """Replace the README's table between ``<!-- results-table -->`` markers (if present) with ``readme_table``,
    keeping the rows of other model × concept × recipe units."""
    if not readme.is_file():
        return
    text = readme.read_text()
    m = re.search(r"<!-- results-table -->.*?<!-- /results-table -->", text, re.S)
    if not m:
        return
    body = "\n".join(["<!-- results-table -->", *readme_table(summaries, m.group(0)), "<!-- /results-table -->"])
    readme.write_text(text[: m.start()] + body + text[m.end() :])


def merge_tables(old_doc: str, summaries: list[dict]) -> list[str]:
    """The doc's "## Tables" part: ``tables`` of each summary, plus each section of ``old_doc``'s tables whose
    model, concept and recipe (its header and its "Recipe `tag`" line) no summary regenerates, in the old order
    with new sections after them."""
    fresh = {(s["model"], s["concept"], s["recipe"]): tables(s) for s in summaries}
    part = old_doc.split("\n## Tables\n", 1)[1] if "\n## Tables\n" in old_doc else ""
    out = []
    for sec in re.split(r"\n(?=### )", part):
        head = re.match(r"### (.+?) — (\S+)", sec)
        tag = re.search(r"Recipe `([^`]+)`", sec)
        if not head or not tag:
            continue
        key = (head.group(1), head.group(2), tag.group(1))
        out += fresh.pop(key) if key in fresh else [sec.rstrip("\n"), ""]
    for lines in fresh.values():
        out += lines
    return out


def write_doc(args, summaries: list[dict], minutes: float) -> None:
    old = args.doc.read_text() if args.doc.is_file() else ""
    m = re.search(r"<!-- reading -->.*?<!-- /reading -->", old, re.S)
    reading = m.group(0) if m else "<!-- reading -->\n(no reading yet)\n<!-- /reading -->"
    cpu = platform.processor() or platform.machine()
    try:
        flags = Path("/proc/cpuinfo").read_text()
        cpu += ", AVX-512" if "avx512f" in flags else ", AVX2"
    except OSError:
        pass
    command = " ".join(a for a in sys.argv[1:] if a != "--doc-only")
    lines = [
        "# Results",
        "",
        "Each table below names the `scripts/results.py` command that produced it (it reuses every finished "
        f"unit). This doc was last written on {datetime.date.today()} by `python scripts/results.py {command}` "
        f"({minutes:.0f} min in that call; {cpu}; {args.threads} threads; data seed {args.seed}).",
        "",
        "Protocol (the `innerpissa.eval.metrics` module docstring): label-balanced items, a separate seeded draw per "
        "dataset, dev/test split stratified by label, **test items only** below. Every method is read at its "
        f"own KL-matched coefficient C_b, where the mean per-token KL(p₀ ‖ p_c) on neutral text (worse of ±c) "
        f"reaches **{args.kl_budget} nats/token** (prompting: its one dose, c = ±1, KL shown). Balanced effect "
        "= label-aligned (a(+C_b) − a(−C_b))/2 with equal weight per label class (a uniform Yes/No shift gives "
        "0); bias = the same for the raw first-option log-odds; both in nats with 95 % bootstrap CIs over items. "
        "The trained methods (InnerPiSSA, and LoRA trained with the same objective) are pooled over training "
        "seeds: each item's effect is averaged over seeds (each seed at its own C_b), then bootstrapped over "
        "items; each seed's effect is listed. Expected signs in the headers: + means a more positive-persona "
        "model should agree more.",
        "",
        reading,
        "",
        "## Tables",
        "",
    ]
    lines += merge_tables(old, summaries)
    args.doc.write_text("\n".join(lines) + "\n")
    write_readme_table(summaries)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["embedded:smollm2", "embedded:gemma3-270m"])
    ap.add_argument("--concepts", nargs="+", default=["honesty", "sentiment"])
    ap.add_argument(
        "--methods",
        default=",".join(TRAINED + BASELINES),
        help="comma-separated: innerpissa, lora, prompting, pca, mean-diff, random",
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds of the trained methods")
    ap.add_argument("--steps", type=int, default=None, help="override TrainConfig.steps (and train by steps)")
    ap.add_argument("--epochs", type=float, default=None, help="override TrainConfig.epochs")
    ap.add_argument("--objective", default=None, help="override TrainConfig.objective")
    ap.add_argument(
        "--set",
        action="append",
        metavar="FIELD=VALUE",
        help="override any TrainConfig field (repeatable), e.g. --set even_weight=10; part of the recipe tag",
    )
    ap.add_argument(
        "--lora-set",
        action="append",
        metavar="FIELD=VALUE",
        help="override a TrainConfig field for the LoRA units only (repeatable), e.g. --lora-set lr=0.001; names "
        "their directories, not the recipe tag, so InnerPiSSA's units and the baselines are shared",
    )
    ap.add_argument("--seed", type=int, default=0, help="pairs, evaluation items, dev/test split, random vector")
    ap.add_argument("--kl-budget", type=float, default=0.05)
    ap.add_argument("--n-target", type=int, default=64)
    ap.add_argument("--n-other", type=int, default=16)
    ap.add_argument("--n-dd", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument(
        "--truthfulqa",
        type=Path,
        default=None,
        help="TruthfulQA.csv to add as a multiple-choice set (a target of the honesty concept)",
    )
    ap.add_argument("--out", type=Path, default=Path("runs/results"))
    ap.add_argument("--doc", type=Path, default=Path("docs/results.md"))
    ap.add_argument(
        "--doc-only",
        action="store_true",
        help="train and evaluate nothing: rebuild the doc and the README table from the finished units of "
        "--models x --concepts x --methods (the doc lists only those, so name every unit it should show)",
    )
    args = ap.parse_args()
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(args.methods) - set(TRAINED + BASELINES)
    if unknown:
        ap.error(f"--methods: unknown {sorted(unknown)}; known: {', '.join(TRAINED + BASELINES)}")
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))
    args.t0 = time.perf_counter()
    recipe(args)  # a bad override fails before any model loads
    lora_sets(args)
    if not args.doc_only:
        for spec in args.models:
            for concept in args.concepts:
                run_one(spec, concept, args)
    write_doc(args, finished(args), (time.perf_counter() - args.t0) / 60)
    print(args.doc.read_text())


if __name__ == "__main__":
    main()
