"""The search's tables: ``summary.md`` (one table per rung, best first) and the per-seed summary with t-intervals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .grid import Grid


def write_summary(rows: list[dict], path: Path, grid: Grid) -> None:
    """summary.md: the baselines, then one table per rung, best score first (numbers on dev items)."""
    from ..outputs import atomic_write

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
