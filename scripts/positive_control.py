"""Choose the positive-control concept by measurement: how far does *prompting* move each candidate concept's
held-out readout, on the dev items of each model? (Issue: "a concept that the embedded models visibly represent,
so that 'the method is broken' can be told apart from 'the model cannot show it'.")

    python scripts/positive_control.py --models embedded:smollm2 embedded:gemma3-270m --out runs/positive_control

For each model and each concept of ``innerpissa/data/concepts.json`` (honesty, sentiment, openness) the prompting
baseline — the concept's persona sentence at the start of the user turn at c = ±1, the default system prompt kept
— is evaluated by the standard evaluator (label-balanced items, seed 0, dev/test split stratified by label): the
**balanced effect** (nats of log-odds, (a(+1) − a(−1))/2, aligned with the expected sign) with its 95 % CI on the
dev items, the bias, and the KL it spends. The words readout (sentiment) adds a generation check: greedy replies of
24 tokens to the dev openings at c = −1, 0, +1, scored by (positive − negative) lexicon words per word.

The chosen concept is the one whose smallest dev effect over the models is largest among those whose CI excludes 0
on every model. Writes ``OUT/<model>.json`` (resumable: finished models are skipped) and ``docs/positive_control.md``
(``--doc``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONCEPTS = ("honesty", "sentiment", "openness")


def concept_datasets(concept, data_dir, n_items: int, seed: int):
    from innerpissa.eval.datasets import data_dir as resolve
    from innerpissa.eval.datasets import load_mwe, subsample

    if concept.readout == "words":
        return [concept.words_dataset()]
    root = resolve(data_dir) / "anthropic_mwe" / "persona"
    out = []
    for name in concept.targets:
        if name == "truthfulqa":  # a target only when the user gives its file; not part of the control choice
            continue
        ds = load_mwe(root / f"{name}.jsonl")
        out.append(dataclasses.replace(ds, items=subsample(ds.items, n_items, seed, name=ds.name)))
    return out


def lexicon_rates(model, tok, concept, prompts: list[str], max_new_tokens: int = 24) -> list[float]:
    """Per prompt: (positive − negative lexicon words) / words in the greedy continuation."""
    import torch

    pos, neg = {w.lower() for w in concept.positive_words}, {w.lower() for w in concept.negative_words}
    out = []
    for p in prompts:
        ids = tok(p, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        words = re.findall(r"[a-z]+", tok.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).lower())
        out.append((sum(w in pos for w in words) - sum(w in neg for w in words)) / max(len(words), 1))
    return out


def measure(spec: str, args) -> dict:
    import numpy as np
    import torch

    from innerpissa.concepts import get_concept
    from innerpissa.eval import PromptMethod, TorchEngine, run_suite
    from innerpissa.eval.datasets import NEUTRAL_TEXTS
    from innerpissa.eval.engines import eval_prompt
    from innerpissa.eval.metrics import bootstrap_ci
    from innerpissa.eval.suite import dataset_splits
    from innerpissa.models import load_model

    torch.set_num_threads(args.threads)
    lm = load_model(spec)
    eng = TorchEngine(lm.model, lm.tokenizer, args.batch_size)
    result = {"model": spec, "concepts": {}}
    for name in args.concepts:
        t0 = time.perf_counter()
        concept = get_concept(name)
        datasets = concept_datasets(concept, args.data_dir, args.n_items, args.seed)
        targets = {d.name: concept.targets.get(d.name, 1) for d in datasets}
        method = PromptMethod(instruction=concept.instruction)
        res = run_suite(
            eng,
            [method],
            datasets,
            seed=args.seed,
            progress=False,
            targets=targets,
            concept=name,
            neutral_texts=NEUTRAL_TEXTS[: args.n_neutral],
            meta={"model": spec},
        )
        m = res["methods"]["prompting"]
        rows = {}
        for d in datasets:
            r, sign = m["datasets"][d.name], targets[d.name]
            rows[d.name] = {
                "expected_sign": sign,
                "dev_effect": sign * r["dev"]["effect"],
                "dev_ci": sorted(sign * x for x in r["dev"]["ci"]),
                "dev_bias": r["dev"]["bias"],
                "test_effect": sign * r["effect"],
                "test_ci": sorted(sign * x for x in r["ci"]),
                "test_bias": r["bias"],
                "n_dev": res["datasets"][d.name]["n_dev"],
            }
        entry = {"datasets": rows, "kl_at_1": m["kl_at_coeff"], "abs_dnll_at_1": m["abs_dnll_at_budget"]}
        if concept.readout == "words":
            d = datasets[0]
            dev_idx = dataset_splits([d], args.seed)[d.name][0]
            rates = {}
            for c in (-1.0, 0.0, 1.0):
                prompts = [
                    eval_prompt(lm.tokenizer, d.items[i].question, d.kind, method.user_prefix(c))
                    for i in dev_idx[: args.n_generate]
                ]
                rates[c] = lexicon_rates(lm.model, lm.tokenizer, concept, prompts)
            diff = (np.array(rates[1.0]) - np.array(rates[-1.0])) / 2
            entry["generation_dev"] = {
                "mean_rate": {str(c): float(np.mean(v)) for c, v in rates.items()},
                "effect": float(diff.mean()),
                "ci": list(bootstrap_ci(diff, args.seed)),
                "n": len(diff),
            }
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        result["concepts"][name] = entry
        print(
            f"# {spec} {name}: "
            + "; ".join(
                f"{k} dev {v['dev_effect']:+.3f} [{v['dev_ci'][0]:+.3f}, {v['dev_ci'][1]:+.3f}]"
                for k, v in rows.items()
            ),
            flush=True,
        )
    return result


def choose(results: list[dict]) -> tuple[str | None, dict]:
    """Per concept, the smallest over models of its worst target set's dev effect, and whether every CI excludes 0."""
    scores = {}
    for name in results[0]["concepts"]:
        effects, excl = [], True
        for r in results:
            for row in r["concepts"][name]["datasets"].values():
                effects.append(row["dev_effect"])
                excl &= row["dev_ci"][0] > 0
        scores[name] = {"min_dev_effect": min(effects), "ci_excludes_0_everywhere": excl}
    ok = [n for n, s in scores.items() if s["ci_excludes_0_everywhere"]]
    return (max(ok, key=lambda n: scores[n]["min_dev_effect"]) if ok else None), scores


def markdown(results: list[dict], chosen: str | None, scores: dict, cmd: str) -> str:
    lines = [
        f"Command: `{cmd}`",
        "",
        "| model | concept | readout set | dev balanced effect [95 % CI] | dev bias | test effect [95 % CI] | "
        "KL at ±1 (nats/token) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for name, e in r["concepts"].items():
            for d, row in e["datasets"].items():
                lines.append(
                    f"| {r['model']} | {name} | {d} ({row['n_dev']} dev) | {row['dev_effect']:+.3f} "
                    f"[{row['dev_ci'][0]:+.3f}, {row['dev_ci'][1]:+.3f}] | {row['dev_bias']:+.3f} | "
                    f"{row['test_effect']:+.3f} [{row['test_ci'][0]:+.3f}, {row['test_ci'][1]:+.3f}] | "
                    f"{e['kl_at_1']:.3f} |"
                )
    gens = [
        (r["model"], name, e["generation_dev"])
        for r in results
        for name, e in r["concepts"].items()
        if "generation_dev" in e
    ]
    if gens:
        lines += [
            "",
            "Greedy 24-token replies to the dev openings, (positive − negative lexicon words) per word:",
            "",
            "| model | concept | c = −1 | c = 0 | c = +1 | effect (half difference) [95 % CI] |",
            "|---|---|---|---|---|---|",
        ]
        for model, name, g in gens:
            mr = g["mean_rate"]
            lines.append(
                f"| {model} | {name} | {mr['-1.0']:+.3f} | {mr['0.0']:+.3f} | {mr['1.0']:+.3f} | "
                f"{g['effect']:+.3f} [{g['ci'][0]:+.3f}, {g['ci'][1]:+.3f}] (n={g['n']}) |"
            )
    lines += ["", "| concept | smallest dev effect over models and sets | every dev CI excludes 0 |", "|---|---|---|"]
    lines += [
        f"| {n} | {s['min_dev_effect']:+.3f} | {'yes' if s['ci_excludes_0_everywhere'] else 'no'} |"
        for n, s in scores.items()
    ]
    lines += ["", f"Chosen positive control: **{chosen or 'none'}**."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["embedded:smollm2", "embedded:gemma3-270m"])
    ap.add_argument("--concepts", nargs="+", default=list(CONCEPTS))
    ap.add_argument("--n-items", type=int, default=64, help="items per persona target set (label-balanced)")
    ap.add_argument("--n-neutral", type=int, default=16, help="neutral texts for the KL figure")
    ap.add_argument("--n-generate", type=int, default=16, help="dev openings to generate from (words readout)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", type=Path, default=Path("runs/positive_control"))
    ap.add_argument("--doc", type=Path, default=Path("docs/positive_control.md"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for spec in args.models:
        path = args.out / (re.sub(r"[^A-Za-z0-9_.-]+", "_", spec) + ".json")
        if path.is_file() and set(json.loads(path.read_text())["concepts"]) >= set(args.concepts):
            results.append(json.loads(path.read_text()))
            continue
        res = measure(spec, args)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=1))
        tmp.replace(path)
        results.append(res)
    chosen, scores = choose(results)
    text = markdown(results, chosen, scores, "python scripts/positive_control.py " + " ".join(sys.argv[1:]))
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    args.doc.write_text(
        "# Positive control: which concept does prompting visibly move?\n\n" + __doc__.split("\n\n", 1)[1] + "\n" + text
    )
    print(text)


if __name__ == "__main__":
    main()
