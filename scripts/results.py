"""Regenerate docs/results.md: the default adapter vs prompting, PCA, mean-difference and random vectors, per
model and concept, every method at the common KL budget, balanced effect and bias side by side.

    python scripts/results.py --models embedded:smollm2 embedded:gemma3-270m --concepts honesty sentiment

For each model × concept: train the default adapter on the concept's built-in pairs (``OUT/<model>/<concept>/``;
an unfinished run resumes, a finished one is reused), build the baselines on the same pairs, and sweep everything
with the Rust engine (both embedded models are GGUF files) on label-balanced seeded items (seed 0), dev/test split
stratified by label; tables report **test** items. Each evaluation writes ``report.md``, ``results.json`` and
figures into its run directory and ``summary.json`` there; the doc is rebuilt from every finished summary, so an
interrupted command loses at most the evaluation in progress. The hand-written reading between the
``<!-- reading -->`` markers of the existing doc is kept.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", spec)


def run_one(spec: str, concept_name: str, args) -> dict:
    """Train (or reuse) and evaluate one model × concept; returns the summary written to summary.json."""
    import torch

    from innerpissa import AdapterConfig, attach, load_adapter
    from innerpissa.concepts import get_concept
    from innerpissa.eval import build_methods, run_suite, write_report
    from innerpissa.eval.engines import RustEngine, gguf_for_spec
    from innerpissa.eval.suite import concept_datasets
    from innerpissa.models import load_model
    from innerpissa.train import TrainConfig, train

    torch.set_num_threads(args.threads)
    run = args.out / slug(spec) / concept_name
    concept = get_concept(concept_name)
    lm = load_model(spec)
    split = concept.pairs(lm.tokenizer, seed=args.seed)
    t0 = time.perf_counter()
    if (run / "adapter" / "adapter_config.json").is_file() and not (run / "checkpoint").exists():
        adapter = load_adapter(lm.model, run / "adapter")
        train_minutes = json.loads((run / "summary.json").read_text())["train_minutes"] \
            if (run / "summary.json").is_file() else None
    else:
        adapter = attach(lm.model, AdapterConfig(seed=args.seed),
                         meta={"base_model": lm.spec, "concept": concept_name, "pairs": f"builtin:{concept_name}"},
                         pairs=list(split.train), tokenizer=lm.tokenizer)
        train(adapter, lm.tokenizer, list(split.train), list(split.val),
              TrainConfig(steps=args.steps, seed=args.seed), run_dir=run)
        train_minutes = (time.perf_counter() - t0) / 60
    eng = RustEngine(gguf_for_spec(lm.spec), lm.tokenizer, batch_size=args.batch_size)
    datasets, targets = concept_datasets(concept, args.data_dir, args.n_target, args.n_other, args.n_dd, args.seed,
                                         truthfulqa=args.truthfulqa)
    methods = build_methods(lm.model, lm.tokenizer, adapter, list(split.train), args.seed, engine=eng,
                            instruction=concept.instruction)
    t1 = time.perf_counter()
    cmd = "python scripts/results.py " + " ".join(sys.argv[1:])
    results = run_suite(eng, methods, datasets, seed=args.seed, kl_budget=args.kl_budget, targets=targets,
                        concept=concept_name, meta={"model": spec, "concept": concept_name, "command": cmd})
    eval_minutes = (time.perf_counter() - t1) / 60
    write_report(results, run / "eval")
    summary = {"model": spec, "concept": concept_name, "train_minutes": train_minutes,
               "loss": adapter.meta.get("loss"), "steps": args.steps, "seed": args.seed,
               "eval_minutes": eval_minutes, "date": datetime.date.today().isoformat(),
               "methods": {m: {k: v for k, v in r.items() if k != "datasets"} | {"datasets": {
                   d: {k: x for k, x in dr.items() if k not in ("curve", "item_effects", "item_labels")}
                   for d, dr in r["datasets"].items()}} for m, r in results["methods"].items()},
               "datasets": results["datasets"]}
    tmp = run / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1, allow_nan=False))
    tmp.replace(run / "summary.json")
    return summary


def _f(x, nd=2):
    return "–" if x is None else f"{x:+.{nd}f}"


def tables(s: dict) -> list[str]:
    """Markdown for one model × concept summary."""
    ms, ds = s["methods"], s["datasets"]
    targets = [d for d, info in ds.items() if info.get("expected_sign")]
    others = [d for d, info in ds.items() if info["labelled"] and not info.get("expected_sign")]
    unl = [d for d, info in ds.items() if not info["labelled"]]
    tm = f"{s['train_minutes']:.1f} min" if s.get("train_minutes") else "reused"
    loss = s.get("loss") or {}
    out = [f"### {s['model']} — {s['concept']}", "",
           f"Adapter: objective {loss.get('name', '?')} v{loss.get('version', '?')}, {s.get('steps', '?')} steps, "
           f"seed {s.get('seed', '?')}. Training {tm}; evaluation {s['eval_minutes']:.1f} min (Rust engine, "
           "2 threads).", "",
           "| method | C_b | KL at ±C_b | "
           + " | ".join(f"{d} ({'+' if ds[d]['expected_sign'] > 0 else '−'}): effect [CI] / bias" for d in targets)
           + " | off-target mean \\|bias\\| | off-target mean \\|effect\\| | DailyDilemmas net shift |",
           "|---|---|---|" + "---|" * len(targets) + "---|---|---|"]
    for name, m in ms.items():
        cells = []
        for d in targets:
            r = m["datasets"][d]
            cells.append(f"{_f(r.get('effect'))} [{_f(r['ci'][0])}, {_f(r['ci'][1])}] / {_f(r['bias'])}")
        ob = sum(abs(m["datasets"][d]["bias"]) for d in others) / max(len(others), 1)
        oe = sum(abs(m["datasets"][d].get("effect") or 0) for d in others) / max(len(others), 1)
        dd = "; ".join(f"{m['datasets'][d]['decision_shift_net']:.2f}" for d in unl) or "–"
        out.append(f"| {name} | {m['kl_coeff']:.3g} | {m['kl_at_coeff']:.3f} | " + " | ".join(cells)
                   + f" | {ob:.2f} | {oe:.2f} | {dd} |")
    out += ["", "| method | target set | flip score | ρ | − side / + side | invalid c=0 → ±C_b |", "|---|---|---|---|---|---|"]
    for name, m in ms.items():
        for d in targets:
            r = m["datasets"][d]
            out.append(f"| {name} | {d} | {_f(r.get('flip_score'))} | {_f(r.get('spearman'))} | "
                       f"{_f(r.get('effect_neg_side'))} / {_f(r.get('effect_pos_side'))} | "
                       f"{r['invalid_rate_c0']:.2f} → {r['invalid_rate_cb']:.2f} |")
    return out + [""]


def readme_table(summaries: list[dict]) -> list[str]:
    """The README's compact table: per model × concept, each method's balanced effect on the target sets at the
    KL budget (signed so that + is the concept's direction), test items."""
    methods = list(dict.fromkeys(m for s in summaries for m in s["methods"]))
    out = ["| model | concept | target set | " + " | ".join(methods) + " |", "|---|---|---|" + "---|" * len(methods)]
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
            out.append(f"| {s['model']} | {s['concept']} | {d} | " + " | ".join(cells) + " |")
    return out


def write_readme_table(summaries: list[dict], readme: Path = Path("README.md")) -> None:
    """Replace the README's table between ``<!-- results-table -->`` markers (if present) with ``readme_table``."""
    if not readme.is_file():
        return
    text = readme.read_text()
    m = re.search(r"<!-- results-table -->.*?<!-- /results-table -->", text, re.S)
    if not m:
        return
    body = "\n".join(["<!-- results-table -->", *readme_table(summaries), "<!-- /results-table -->"])
    readme.write_text(text[:m.start()] + body + text[m.end():])


def write_doc(args, summaries: list[dict], minutes: float) -> None:
    old = args.doc.read_text() if args.doc.is_file() else ""
    m = re.search(r"<!-- reading -->.*?<!-- /reading -->", old, re.S)
    reading = m.group(0) if m else "<!-- reading -->\n(no reading yet)\n<!-- /reading -->"
    cpu = platform.processor() or platform.machine()
    try:
        flags = open("/proc/cpuinfo").read()
        cpu += ", AVX-512" if "avx512f" in flags else ", AVX2"
    except OSError:
        pass
    lines = ["# Results", "",
             f"Command: `python scripts/results.py {' '.join(sys.argv[1:])}` (doc written {datetime.date.today()}; "
             f"the runs below took {sum((s.get('train_minutes') or 0) + s['eval_minutes'] for s in summaries):.0f} "
             f"min in all, {minutes:.0f} of them in this call; {cpu}; 2 threads; seed {args.seed}).", "",
             "Protocol (the `innerpissa.eval.metrics` module docstring): label-balanced items, a separate seeded draw per "
             "dataset, dev/test split stratified by label, **test items only** below. Every method is read at its "
             f"own KL-matched coefficient C_b, where the mean per-token KL(p₀ ‖ p_c) on neutral text (worse of ±c) "
             f"reaches **{args.kl_budget} nats/token** (prompting: its one dose, c = ±1, KL shown). Balanced effect "
             "= label-aligned (a(+C_b) − a(−C_b))/2 with equal weight per label class (a uniform Yes/No shift gives "
             "0); bias = the same for the raw first-option log-odds; both in nats with 95 % bootstrap CIs over items. "
             "Expected signs in the headers: + means a more positive-persona model should agree more.", "",
             reading, "", "## Tables", ""]
    for s in summaries:
        lines += tables(s)
    args.doc.write_text("\n".join(lines) + "\n")
    write_readme_table(summaries)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["embedded:smollm2", "embedded:gemma3-270m"])
    ap.add_argument("--concepts", nargs="+", default=["honesty", "sentiment"])
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kl-budget", type=float, default=0.05)
    ap.add_argument("--n-target", type=int, default=64)
    ap.add_argument("--n-other", type=int, default=16)
    ap.add_argument("--n-dd", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--truthfulqa", type=Path, default=None,
                    help="TruthfulQA.csv to add as a multiple-choice set (a target of the honesty concept)")
    ap.add_argument("--out", type=Path, default=Path("runs/results"))
    ap.add_argument("--doc", type=Path, default=Path("docs/results.md"))
    args = ap.parse_args()
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))
    t0 = time.perf_counter()

    def finished() -> list[dict]:
        out = []
        for spec in args.models:
            for c in args.concepts:
                if (p := args.out / slug(spec) / c / "summary.json").is_file():
                    s = json.loads(p.read_text())
                    cfg = args.out / slug(spec) / c / "adapter" / "adapter_config.json"
                    if "loss" not in s and cfg.is_file():  # summaries written before the field existed
                        saved = json.loads(cfg.read_text())
                        s.update(loss=saved.get("loss"), steps=saved.get("train_config", {}).get("steps"),
                                 seed=saved.get("train_config", {}).get("seed"))
                    out.append(s)
        return out

    for spec in args.models:
        for concept in args.concepts:
            if not (args.out / slug(spec) / concept / "summary.json").is_file():
                run_one(spec, concept, args)
                write_doc(args, finished(), (time.perf_counter() - t0) / 60)  # the doc grows run by run
    write_doc(args, finished(), (time.perf_counter() - t0) / 60)
    print(args.doc.read_text())


if __name__ == "__main__":
    main()
