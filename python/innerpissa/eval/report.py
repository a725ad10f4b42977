"""Write an evaluation's ``results.json`` (strict JSON), ``report.md`` and its figures: per labelled dataset the
dose-response (balanced label-aligned log-odds against t = c / C_b) and, per target dataset, the balanced effect
against the coherence cost KL for every method on one plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..outputs import atomic_write


def _f(x, nd: int = 2, sign: bool = True) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:+.{nd}f}" if sign else f"{x:.{nd}f}"


def _ci(r: dict, key: str, ci_key: str) -> str:
    lo, hi = r.get(ci_key, (None, None))
    return f"{_f(r.get(key))} [{_f(lo)}, {_f(hi)}]"


def markdown_report(results: dict) -> str:
    """Tables: methods at the common KL budget; per labelled dataset balanced effect and bias side by side; decision
    shift on unlabelled sets."""
    methods, meta, datasets = results["methods"], results["meta"], results["datasets"]
    budget = next(iter(methods.values()))["kl_budget"] if methods else None
    lines = [
        f"# innerpissa evaluation — {meta.get('model', '')}",
        "",
        f"Command: `{meta.get('command', '')}`  ",
        f"Engine: {meta.get('engine')}; seed {meta.get('seed')}; date {meta.get('date')}.",
        "",
        f"Every method is read at its own **KL-matched coefficient** C_b, where the mean per-token KL(p₀ ‖ p_c) of "
        f"next-token distributions on the neutral texts (worse of ±c) reaches the budget **{budget} nats/token**. "
        'Per test item, the label-aligned log-odds a = y·s (y = +1 when "Yes"/(A) is the dataset\'s behaviour) '
        "at ±C_b gives (a(+C_b) − a(−C_b))/2; the **balanced effect** averages it with equal weight per label class "
        "(a uniform Yes/No shift gives exactly 0), the **bias** is the same half-difference of the raw first-option "
        "log-odds s. 95 % CIs: bootstrap over items within label classes. Units: nats of log-odds per unit t = c/C_b. "
        "Flip score: items crossing to the matching answer between 0 and +C_b minus those crossing away, net of "
        "the median shift. Budget-first sweeps (methods with a coefficient grid): the grid below is swept on the "
        "neutral texts only to find C_b (√KL interpolated, then measured at ±C_b); items are scored at 0, ±C_b/2 "
        "and ±C_b, so every method is read exactly at its budget.",
        "",
        "## Methods at the common budget",
        "",
        "| method | swept c | C_b | KL at ±C_b | \\|ΔNLL\\| at ±C_b | KL at largest swept \\|c\\| |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in methods.items():
        flag = (
            ""
            if m["budget_reached"]
            else (" (over budget)" if m["kl_at_coeff"] > m["kl_budget"] else " (budget not reached in the sweep)")
        )
        cal = m.get("calibration")  # budget-first: the grid was swept on the neutral texts only
        swept = cal["c"] if cal else m["coeffs"]
        top_kl = max(cal["kl"]) if cal else max(m["neutral_kl"])
        lines.append(
            f"| {name} | {', '.join(f'{c:.3g}' for c in swept)} | {m['kl_coeff']:.3g} | "
            f"{m['kl_at_coeff']:.3f}{flag} | {m['abs_dnll_at_budget']:.3f} | {top_kl:.3f} |"
        )
    lab = [d for d, info in datasets.items() if info["labelled"]]
    unl = [d for d, info in datasets.items() if not info["labelled"]]
    for d in lab:
        info = datasets[d]
        want = info.get("expected_sign")
        lines += [
            "",
            f"## {d}" + (" (target)" if want else " (off-target)"),
            "",
            f"{info['n_test']} test items "
            + (
                f"({info.get('n_test_yes', '?')} Yes-matching, {info.get('n_test_no', '?')} No-matching)"
                if info.get("kind") in ("yesno", "ab", None)
                else "(one label class: the score is the true-minus-false answer gap, so bias = effect)"
                if info.get("kind") == "mc"
                else "(one label class: no answer format, so bias = effect)"
            )
            + f" of {info['n_items']}"
            + (f"; a more {info.get('concept', 'steered')} model should show sign {want:+d}" if want else ""),
            "",
            "| method | balanced effect [95 % CI] | bias [95 % CI] | flip score | ρ | − side / + side | "
            "invalid c=0 → ±C_b |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, m in methods.items():
            r = m["datasets"][d]
            lines.append(
                f"| {name} | {_ci(r, 'effect', 'ci')} | {_ci(r, 'bias', 'bias_ci')} | "
                f"{_f(r.get('flip_score'))} | {_f(r.get('spearman'))} | {_f(r.get('effect_neg_side'))} / "
                f"{_f(r.get('effect_pos_side'))} | {r['invalid_rate_c0']:.2f} → {r['invalid_rate_cb']:.2f} |"
            )
    if unl:
        lines += [
            "",
            "## Unlabelled sets: decision shift at ±C_b",
            "",
            "| dataset | method | bias | mean \\|Δs\\| | net of median shift | net flip rate |",
            "|---|---|---|---|---|---|",
        ]
        for d in unl:
            for name, m in methods.items():
                r = m["datasets"][d]
                lines.append(
                    f"| {d} | {name} | {_f(r['bias'])} | {r['mean_abs_shift']:.2f} | "
                    f"{r['decision_shift_net']:.2f} | {r['flip_rate_net']:.2f} |"
                )
    return "\n".join(lines) + "\n"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_dose_response(results: dict, dataset: str, path: Path) -> None:
    """Balanced label-aligned log-odds vs t = c / C_b per method, ±1 SE band."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, m in results["methods"].items():
        curve = m["datasets"][dataset].get("curve")
        if not curve:
            continue
        t, mu, se = curve["t"], curve["mean_a"], curve["se"]
        ax.plot(t, mu, marker="o", label=f"{name} (C_b={m['kl_coeff']:.3g})")
        ax.fill_between(t, [a - s for a, s in zip(mu, se)], [a + s for a, s in zip(mu, se)], alpha=0.15)
    ax.axvspan(-1, 1, color="grey", alpha=0.07)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("t = c / C_b (shaded: inside the KL budget)")
    ax.set_ylabel("balanced label-aligned log-odds (nats)")
    ax.set_title(dataset)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_effect_vs_kl(results: dict, dataset: str, path: Path) -> None:
    """Balanced Δa(c) = a(c) − a(0) against sign(c)·KL(c) for every method: effect per unit of coherence spent."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    budget = None
    for name, m in results["methods"].items():
        curve = m["datasets"][dataset].get("curve")
        if not curve:
            continue
        budget = m["kl_budget"]
        x = [math.copysign(k, c) if c else 0.0 for c, k in zip(curve["c"], m["neutral_kl"])]
        ax.plot(x, curve["delta_a"], marker="o", label=name)
    if budget is not None:
        for b in (-budget, budget):
            ax.axvline(b, color="grey", ls="--", lw=0.8)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlabel("sign(c) · mean KL(p₀ ‖ p_c) on neutral text (nats/token)")
    ax.set_ylabel("balanced Δ label-aligned log-odds (nats)")
    ax.set_title(f"{dataset}: effect against coherence cost")
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
    """Write results.json, report.md, ``<dataset>.png`` per labelled dataset and ``<dataset>.kl.png`` per target
    dataset into ``out_dir`` (atomic per file)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(strict_json(results), indent=1, allow_nan=False)
    atomic_write(out / "results.json", lambda p: Path(p).write_text(text))
    atomic_write(out / "report.md", lambda p: Path(p).write_text(markdown_report(results)))
    for d, info in results["datasets"].items():
        if info["labelled"]:
            plot_dose_response(results, d, out / f"{d}.png")
            if info.get("expected_sign"):
                plot_effect_vs_kl(results, d, out / f"{d}.kl.png")
    return out
