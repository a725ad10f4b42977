"""The search's tables: ``summary.md`` (one table per training length, best first) and the per-seed summary with
t-intervals.

Rows are grouped by their training length (``epochs``), not by their rung index: several grids may share one output
directory (``docs/tuning.md`` runs them so), and rung 0 of one grid can be 0.5 epochs while rung 0 of another is 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .grid import Grid


def _epochs(row: dict, grid: Grid) -> float:
    """A trial row's training length in epochs (rows written before rows carried ``epochs``: its grid rung's)."""
    return float(row["epochs"]) if row.get("epochs") is not None else float(grid.tune["rungs"][row["rung"]])


def write_summary(rows: list[dict], path: Path, grid: Grid) -> None:
    """summary.md: the baselines, then one table per training length, shortest first, best score first within it
    (numbers on dev items). Rows of other grids in the same output directory are listed too."""
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
    trials = [r for r in rows if r["kind"] == "trial" and r["score"] is not None]
    for epochs in sorted({_epochs(r, grid) for r in trials}):
        rs = [r for r in trials if _epochs(r, grid) == epochs]
        rung = next((f"Rung {i}: " for i, e in enumerate(t["rungs"]) if float(e) == epochs), "")
        lines += [
            f"## {rung}{epochs:g} epochs ({len(rs)} trials)",
            "",
            head,
            sep,
            *[cells(r) for r in sorted(rs, key=lambda r: -r["score"])],
            "",
        ]
    diverged = [r for r in rows if r["kind"] == "trial" and r["score"] is None]
    if diverged:
        lines += [
            "## Diverged (training stopped; no score)",
            "",
            "| " + " | ".join(["trial", *axes, "epochs", "seed", "why"]) + " |",
            "|" + "---|" * (len(axes) + 4),
            *[
                "| "
                + " | ".join(
                    [r["key"], *[str(r["params"].get(a, "")) for a in axes], f"{_epochs(r, grid):g}"]
                    + [str(r.get("train_seed", "")), r["diverged"].replace("|", "/")]
                )
                + " |"
                for r in diverged
            ],
            "",
        ]
    lines += seed_table(rows, grid)
    text = "\n".join(lines) + "\n"
    atomic_write(path, lambda p: Path(p).write_text(text, encoding="utf-8"))


def seed_summary(rows: list[dict], grid: Grid) -> list[dict]:
    """Per trial setting and training length, the score over training seeds: mean, sample standard deviation, a
    95 % t-interval of the mean (scipy; none for one seed), each seed's score, and the trainable parameter count.
    Seeds whose training diverged have no score: they are left out and counted in ``n_diverged``."""
    from scipy import stats

    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r["kind"] == "trial":
            groups.setdefault(json.dumps([r["params"], _epochs(r, grid)], sort_keys=True), []).append(r)
    out = []
    for group in groups.values():
        rs = [r for r in group if r["score"] is not None]
        if not rs:
            continue
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
                "epochs": _epochs(rs[0], grid),
                "n_seeds": n,
                "mean": float(scores.mean()),
                "sd": sd,
                "ci": ci,
                "scores": {r.get("train_seed"): r["score"] for r in rs},
                "trainable_params": rs[0].get("trainable_params"),
                "n_diverged": len(group) - len(rs),
            }
        )
    return sorted(out, key=lambda g: (g["epochs"], -g["mean"]))


def seed_table(rows: list[dict], grid: Grid) -> list[str]:
    """Markdown lines of ``seed_summary`` (nothing when every trial has one seed)."""
    groups = seed_summary(rows, grid)
    if all(g["n_seeds"] < 2 for g in groups):
        return []
    axes = grid.columns()
    lines = [
        "## Over training seeds",
        "",
        "| " + " | ".join(["epochs", *axes, "seeds", "mean score [95 % t-CI]", "sd", "per seed", "params"]) + " |",
        "|" + "---|" * (len(axes) + 6),
    ]
    for g in groups:
        ci = "" if g["ci"] is None else f" [{g['ci'][0]:+.3f}, {g['ci'][1]:+.3f}]"
        per = ", ".join(f"{v:+.3f}" for v in g["scores"].values())
        per += f"; {g['n_diverged']} diverged" if g["n_diverged"] else ""
        sd = "–" if g["sd"] is None else f"{g['sd']:.3f}"
        vals = [str(g["params"].get(a, "")) for a in axes]
        lines.append(
            f"| {g['epochs']:g} | "
            + " | ".join([*vals, str(g["n_seeds"]), f"{g['mean']:+.3f}{ci}", sd, per, str(g["trainable_params"])])
            + " |"
        )
    return [*lines, ""]
