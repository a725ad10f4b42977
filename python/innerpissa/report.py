"""Write an evaluation's ``results.json``, ``report.md`` and one dose-response PNG per dataset."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .adapter.model import atomic_write


def _fmt(x, nd=2) -> str:
    return "–" if x is None else f"{x:+.{nd}f}"


def markdown_report(results: dict) -> str:
    """Tables: per labelled dataset (effect ± CI, ρ, ΔNLL, invalid), decision shift on unlabelled sets."""
    methods = results["methods"]
    meta = results["meta"]
    lines = [f"# innerpissa evaluation — {meta.get('model', '')}", "",
             f"Command: `{meta.get('command', '')}`  ", f"Seed: {meta.get('seed')}; date: {meta.get('date')}; "
             f"items per dataset (dev/test): see tables.", "",
             "Effect = mean over test items of the least-squares slope of the label-aligned Yes/No log-odds "
             "(nats) against the normalised coefficient t = c / C, where ±C is the method's usable range chosen "
             "on the dev items (neutral ΔNLL ≤ 0.2 nats/token, invalid rate ≤ +5 points). 95 % bootstrap CI over "
             "items. Positive = toward the dataset's behaviour as c grows.", "",
             "## Usable ranges", "", "| method | swept c | usable C | usable? | ΔNLL at ±C |", "|---|---|---|---|---|"]
    for name, m in methods.items():
        cmax = m["usable_cmax"]
        dn = max(m["neutral_dnll"][m["coeffs"].index(cmax)], m["neutral_dnll"][m["coeffs"].index(-cmax)])
        lines.append(f"| {name} | {m['coeffs']} | {cmax:g} | {'yes' if m['usable'] else 'no'} | {dn:+.3f} |")
    datasets = results["datasets"]
    lab = [d for d, info in datasets.items() if info["labelled"]]
    unl = [d for d, info in datasets.items() if not info["labelled"]]
    for d in lab:
        info = datasets[d]
        lines += ["", f"## {d}", "", f"{info['n_test']} test items (of {info['n_items']}); "
                  f"expected sign for the steered concept: {info.get('expected_sign', '?')}", "",
                  "| method | effect [95 % CI] | Spearman ρ | ΔNLL | invalid c=0 → ±C | mean abs Δscore |",
                  "|---|---|---|---|---|---|"]
        for name, m in methods.items():
            r = m["datasets"][d]
            lines.append(f"| {name} | {_fmt(r['effect'])} [{_fmt(r['ci'][0])}, {_fmt(r['ci'][1])}] | "
                         f"{_fmt(r['spearman'])} | {r['dnll']:+.3f} | {r['invalid_rate_c0']:.2f} → "
                         f"{r['invalid_rate_cmax']:.2f} | {r['mean_abs_shift']:.2f} |")
    if unl:
        lines += ["", "## Unlabelled sets: decision shift at ±C", "",
                  "| dataset | method | mean abs Δscore (nats) | flip rate |", "|---|---|---|---|"]
        for d in unl:
            for name, m in methods.items():
                r = m["datasets"][d]
                lines.append(f"| {d} | {name} | {r['mean_abs_shift']:.2f} | {r['flip_rate']:.2f} |")
    return "\n".join(lines) + "\n"


def plot_dose_response(results: dict, dataset: str, path: Path) -> None:
    """Mean label-aligned log-odds vs normalised coefficient per method, ±1 SE band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, m in results["methods"].items():
        curve = m["datasets"][dataset].get("curve")
        if not curve:
            continue
        t, mu, se = curve["t"], curve["mean_a"], curve["se"]
        ax.plot(t, mu, marker="o", label=f"{name} (C={m['usable_cmax']:g})")
        ax.fill_between(t, [a - s for a, s in zip(mu, se)], [a + s for a, s in zip(mu, se)], alpha=0.15)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("normalised steering coefficient t = c / C")
    ax.set_ylabel("label-aligned log-odds (nats)")
    ax.set_title(dataset)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def strict_json(obj):
    """A copy of ``obj`` whose non-finite floats (undefined statistics: a CI of no items, ρ of a constant curve)
    are ``None``, so ``results.json`` is valid JSON (RFC 8259 has no NaN). Scores are checked finite upstream."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def write_report(results: dict, out_dir: str | Path) -> Path:
    """Write results.json, report.md and <dataset>.png files into ``out_dir`` (atomic per file)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(strict_json(results), indent=1, allow_nan=False)
    atomic_write(out / "results.json", lambda p: Path(p).write_text(text))
    atomic_write(out / "report.md", lambda p: Path(p).write_text(markdown_report(results)))
    for d, info in results["datasets"].items():
        if info["labelled"]:
            plot_dose_response(results, d, out / f"{d}.png")
    return out
