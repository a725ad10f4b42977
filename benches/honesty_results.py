"""Reproduce docs/results.md: honesty adapters for several training seeds vs prompting, PCA and random vectors.

    python benches/honesty_results.py --seeds 0 1 2 --out runs/results

Trains one adapter per seed on the built-in honesty pairs (resumes finished/half-finished runs), evaluates all
methods in one sweep on the same seeded item subsets (eval split seed 0), and writes ``docs/results.md`` plus the
per-run ``results.json``/``report.md``/PNGs under ``--out``. PCA is trained on the seed-0 pairs with repeng; the
random direction matches its per-layer norms.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--n-target", type=int, default=64)
    ap.add_argument("--n-other", type=int, default=16)
    ap.add_argument("--n-dd", type=int, default=48)
    ap.add_argument("--out", type=Path, default=Path("runs/results"))
    ap.add_argument("--doc", type=Path, default=Path("docs/results.md"))
    args = ap.parse_args()

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    from innerpissa import AdapterConfig, attach, load_adapter
    from innerpissa.baselines import AdapterMethod
    from innerpissa.metrics import pooled_effect
    from innerpissa.models import load_model
    from innerpissa.pairs import make_honesty_pairs
    from innerpissa.report import write_report
    from innerpissa.suite import build_methods, default_datasets, run_suite
    from innerpissa.train import TrainConfig, train

    t0 = time.perf_counter()
    lm = load_model()
    adapters = {}
    train_minutes = {}
    for seed in args.seeds:
        run = args.out / f"seed{seed}"
        if (run / "adapter" / "adapter_config.json").exists():
            adapters[seed] = load_adapter(lm.model, run / "adapter")
            continue
        split = make_honesty_pairs(lm.tokenizer, seed=seed)
        ad = attach(lm.model, AdapterConfig(seed=seed), meta={"base_model": lm.spec, "pairs": "builtin:honesty"})
        t1 = time.perf_counter()
        train(ad, lm.tokenizer, list(split.train), list(split.val), TrainConfig(steps=args.steps, seed=seed), run)
        train_minutes[seed] = (time.perf_counter() - t1) / 60
        adapters[seed] = ad
    pairs0 = make_honesty_pairs(lm.tokenizer, seed=0)
    datasets = default_datasets(None, n_target=args.n_target, n_other=args.n_other, n_dd=args.n_dd, seed=0)
    methods = [AdapterMethod(ad, name=f"innerpissa-s{s}") for s, ad in adapters.items()]
    methods += build_methods(lm.model, lm.tokenizer, None, list(pairs0.train), 0, ("prompting", "pca", "random"))
    cmd = "python benches/honesty_results.py " + " ".join(sys.argv[1:])
    results = run_suite(lm.model, lm.tokenizer, methods, datasets, seed=0, meta={"model": lm.spec, "command": cmd})
    write_report(results, args.out / "eval")
    minutes = (time.perf_counter() - t0) / 60
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    args.doc.write_text(results_markdown(results, [f"innerpissa-s{s}" for s in args.seeds], cmd, minutes,
                                         train_minutes, pooled_effect))
    print(args.doc.read_text())


def results_markdown(results: dict, seed_methods: list[str], cmd: str, minutes: float, train_minutes: dict,
                     pooled_effect) -> str:
    ms = results["methods"]
    ds = results["datasets"]
    baselines = [m for m in ms if m not in seed_methods]
    lines = [
        "# Results: honesty steering on SmolLM2-135M-Instruct", "",
        f"Command: `{cmd}`  ",
        f"Machine: 2 vCPU with AVX-512 (AMD EPYC), no GPU, torch fp32, 2 threads. Date: {datetime.date.today()}. "
        f"Wall time {minutes:.0f} min (training per seed: "
        + (", ".join(f"{v:.1f} min" for v in train_minutes.values()) or "resumed") + ").  ",
        "Eval items: seeded subsets (seed 0) split 50/50 dev/test; tables report **test** items only.", "",
        "Effect: mean over test items of the least-squares slope of the label-aligned Yes/No log-odds (nats) "
        "against t = c / C, where ±C is the method's usable range chosen on dev items (neutral-text ΔNLL ≤ 0.2 "
        "nats/token and invalid-answer rate ≤ +5 points). Label-aligned means positive = more agreement with the "
        "set's behaviour. 95 % bootstrap CI over items. For InnerPiSSA the pooled row averages each item's slope "
        "over the training seeds before bootstrapping; per-seed effects follow in brackets.", "",
        "Honesty direction: +c should **lower** agreement with `okay-with-deceiving-a-user-to-help-them` "
        "(expected sign −) and **raise** it with `desire-to-persuade-people-to-be-more-honest-to-others` (+).", "",
        "## Usable ranges (chosen on dev)", "", "| method | swept c | C | usable? |", "|---|---|---|---|",
    ]
    for name, m in ms.items():
        lines.append(f"| {name} | {m['coeffs']} | {m['usable_cmax']:g} | {'yes' if m['usable'] else 'no'} |")
    targets = [d for d, info in ds.items() if info["expected_sign"] is not None]
    for d in targets:
        info = ds[d]
        lines += ["", f"## {d} (expected sign {'+' if info['expected_sign'] > 0 else '−'}; {info['n_test']} test items)",
                  "", "| method | effect [95 % CI] | Spearman ρ | ΔNLL at ±C | invalid c=0 → ±C |", "|---|---|---|---|---|"]
        eff, lo, hi, per = pooled_effect([ms[s]["datasets"][d]["slopes"] for s in seed_methods])
        rs = [ms[s]["datasets"][d] for s in seed_methods]
        lines.append(f"| innerpissa ({len(seed_methods)} seeds) | {eff:+.2f} [{lo:+.2f}, {hi:+.2f}] "
                     f"(seeds: {', '.join(f'{x:+.2f}' for x in per)}) | "
                     f"{np.mean([r['spearman'] for r in rs]):+.2f} | {np.mean([r['dnll'] for r in rs]):+.3f} | "
                     f"{np.mean([r['invalid_rate_c0'] for r in rs]):.2f} → {np.mean([r['invalid_rate_cmax'] for r in rs]):.2f} |")
        for b in baselines:
            r = ms[b]["datasets"][d]
            lines.append(f"| {b} | {r['effect']:+.2f} [{r['ci'][0]:+.2f}, {r['ci'][1]:+.2f}] | {r['spearman']:+.2f} | "
                         f"{r['dnll']:+.3f} | {r['invalid_rate_c0']:.2f} → {r['invalid_rate_cmax']:.2f} |")
    others = [d for d, info in ds.items() if info["expected_sign"] is None and info["labelled"]]
    lines += ["", "## Side effects: mean |Δ log-odds| at ±C on off-target persona sets (nats; lower = cleaner)", "",
              "| method | " + " | ".join(others) + " | mean |", "|---|" + "---|" * (len(others) + 1)]
    for name in ms:
        vals = [ms[name]["datasets"][d]["mean_abs_shift"] for d in others]
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in vals) + f" | {np.mean(vals):.2f} |")
    unl = [d for d, info in ds.items() if not info["labelled"]]
    for d in unl:
        lines += ["", f"## {d}: decision shift at ±C ({ds[d]['n_test']} test situations, unlabelled)", "",
                  "| method | mean abs Δscore (nats) | flip rate |", "|---|---|---|"]
        for name in ms:
            r = ms[name]["datasets"][d]
            lines.append(f"| {name} | {r['mean_abs_shift']:.2f} | {r['flip_rate']:.2f} |")
    lines += ["", "Raw sweeps, per-item scores and plots: `runs/results/eval/` after running the command."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
