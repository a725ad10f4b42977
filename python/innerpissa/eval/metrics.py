"""From raw sweeps to numbers that a Yes/No bias cannot fake (docs/design.md §5 "label balance", "equal cost").

Per method, the **KL-matched coefficient** C_b is the |c| at which the two-sided coherence cost
max(KL(+c), KL(−c)) — mean per-token KL(p₀ ‖ p_c) of next-token distributions on the neutral texts, nats/token —
reaches the budget (default ``KL_BUDGET`` = 0.05), by linear interpolation of √KL over the swept |c| from
KL(0) = 0 (KL is quadratic in a small c).
Every method is read at its own C_b, so all methods spend the same coherence. Item scores at ±C_b are linearly
interpolated between swept coefficients. A method whose sweep never reaches the budget is read at its largest
swept |c| and flagged (``budget_reached`` false). Prompting has one dose (the persona sentence or not) and is
read at |c| = 1; its KL is reported, and ``budget_reached`` says whether it stays inside the budget.

Per labelled dataset (test items; y_i = +1 when "Yes"/(A) is the target behaviour, −1 otherwise), with raw
first-option log-odds s_i(c) and label-aligned a_i(c) = y_i·s_i(c):

- **balanced effect** at the budget: ½·[mean over y=+1 items + mean over y=−1 items] of (a_i(+C_b) − a_i(−C_b))/2
  (nats per unit of t = c/C_b). Equal weight per label class, so a uniform shift s_i(c) = s_i(0) + b·c gives
  exactly 0. 95 % CI: bootstrap resampling items within each label class.
- **bias** at the budget: mean over items of (s_i(+C_b) − s_i(−C_b))/2 (not label-aligned, classes weighted
  equally): the uniform answer shift. Also both as least-squares **slopes per unit c** over the swept c inside
  ±max(C_b, smallest swept |c|) (``effect_slope``, ``bias_slope``).
- **flip score**: items whose answer crosses to the matching side between c = 0 and +C_b minus those crossing
  away, over all items, after subtracting the median raw shift (so a uniform shift flips nothing).
- **Spearman ρ** between c and the balanced mean a(c) over the swept c inside the range; **symmetry**: the
  balanced effect on the negative side (a(0) − a(−C_b)) and on the positive side (a(+C_b) − a(0)).
- side effects (off-target sets): mean |Δa| at ±C_b, and the bias.

Unlabelled sets (DailyDilemmas without value labels): **decision shift net of the median shift** (mean
|Δs_i − median Δs| at ±C_b) and the net flip rate (sign of s_i − median shift differs between −C_b and +C_b).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr

from ..errors import ConfigError, NonFiniteError
from .engines import MIN_MASS, Sweep

KL_BUDGET = 0.05  # nats/token, mean KL(p0 || pc) on the neutral texts
N_BOOT = 2000


def check_budget(budget: float) -> float:
    """A KL budget must be a finite number > 0 (nats/token). Raises ConfigError."""
    b = float(budget)
    if not np.isfinite(b) or b <= 0:
        raise ConfigError(f"KL budget must be a finite number > 0 nats/token, got {budget!r}", field="kl_budget")
    return b


def kl_matched_coeff(coeffs, kl, budget: float = KL_BUDGET) -> tuple[float, bool]:
    """|c| where the two-sided cost max(KL(+c), KL(−c)) reaches ``budget``, interpolated linearly in √KL from
    (0, 0).

    KL(p₀ ‖ p_c) is quadratic in a small steering coefficient (its second-order term is the Fisher form of the
    logit change, which is linear in c), so √KL is close to linear in |c| and a linear interpolation of √KL finds
    the budget between grid points, including below the smallest swept |c|, without the bias a linear
    interpolation of KL itself has there (it would put C_b at budget/KL(c₁)·c₁ instead of √(budget/KL(c₁))·c₁).

    Args:
        coeffs: swept coefficients (symmetric, with 0).  kl: mean per-token KL at each, nats/token.
    Returns:
        (C_b, reached); when the budget is never reached, (largest swept |c|, False).
    """
    coeffs = [float(c) for c in coeffs]
    mags = sorted({abs(c) for c in coeffs if c != 0})
    xs, ys = [0.0], [0.0]
    for m in mags:
        ys.append(max(float(kl[coeffs.index(m)]), float(kl[coeffs.index(-m)]), 0.0) ** 0.5)
        xs.append(m)
    target = budget**0.5
    for i in range(1, len(xs)):
        if ys[i] >= target:
            frac = (target - ys[i - 1]) / (ys[i] - ys[i - 1]) if ys[i] > ys[i - 1] else 1.0
            return xs[i - 1] + frac * (xs[i] - xs[i - 1]), True
    return xs[-1], False


def interp_rows(coeffs, values: np.ndarray, c: float) -> np.ndarray:
    """Linear interpolation of ``values`` (n_coeffs, n) at coefficient ``c`` → (n,)."""
    cs = np.asarray(coeffs, dtype=float)
    order = np.argsort(cs)
    v = np.asarray(values, dtype=float)[order]
    cs = cs[order]
    return np.array([np.interp(c, cs, v[:, j]) for j in range(v.shape[1])])


def item_slopes(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Least-squares slope of each column of y (n_x, n) against x (n_x,) → (n,)."""
    xc = x - x.mean()
    return (xc[:, None] * (y - y.mean(0))).sum(0) / (xc**2).sum()


def balanced_mean(values: np.ndarray, y: np.ndarray) -> float:
    """½(mean over y = +1 + mean over y = −1) of values (n,); the plain mean when one class is absent."""
    parts = [values[y == k].mean() for k in (1, -1) if (y == k).any()]
    return float(np.mean(parts))


def balanced_se(values: np.ndarray, y: np.ndarray) -> float:
    """Standard error of ``balanced_mean``: √(Σ_k var_k / n_k) / (number of classes); 0 with < 2 items a class."""
    parts = [values[y == k] for k in (1, -1) if (y == k).sum() > 1]
    if not parts:
        return 0.0
    return float(np.sqrt(sum(p.var(ddof=1) / len(p) for p in parts)) / len(parts))


def balanced_ci(values: np.ndarray, y: np.ndarray, seed: int = 0, n_boot: int = N_BOOT) -> tuple[float, float]:
    """95 % percentile CI of ``balanced_mean`` by resampling items within each label class."""
    if len(values) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    stats = []
    groups = [values[y == k] for k in (1, -1) if (y == k).any()]
    for _ in range(n_boot):
        stats.append(np.mean([g[rng.integers(0, len(g), len(g))].mean() for g in groups]))
    return float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))


def bootstrap_ci(x: np.ndarray, seed: int = 0, n_boot: int = N_BOOT) -> tuple[float, float]:
    """95 % percentile bootstrap CI of the mean of x (n,)."""
    return balanced_ci(np.asarray(x, dtype=float), np.ones(len(x)), seed, n_boot)


def check_finite_sweep(sw: Sweep) -> None:
    """Refuse a sweep with NaN/inf scores, NLL or KL: a broken method must not be reported as a result.

    Raises:
        NonFiniteError: naming the method, the dataset and the coefficient.
    """
    for k, c in enumerate(sw.coeffs):
        for what, v in (("neutral-text NLL", sw.neutral_nll[k]), ("neutral-text KL", sw.neutral_kl[k])):
            if not np.isfinite(v):
                raise NonFiniteError(
                    f"method {sw.method!r}: {what} is {v} at c={c:g}; its adapter or vector holds "
                    "NaN/inf or |c| is far too large",
                    field=sw.method,
                )
        for name, rows in sw.scores.items():
            if not np.isfinite(np.asarray(rows[k], dtype=float)).all():
                raise NonFiniteError(
                    f"method {sw.method!r}: non-finite answer scores on {name} at c={c:g}; its "
                    "adapter or vector holds NaN/inf or |c| is far too large",
                    field=sw.method,
                )


def dataset_metrics(sw: Sweep, name: str, labels: np.ndarray, idx: np.ndarray, cb: float, seed: int = 0) -> dict:
    """All numbers of one method on one dataset's items ``idx`` at the KL-matched coefficient ``cb``."""
    coeffs = np.asarray(sw.coeffs, dtype=float)
    s = np.asarray(sw.scores[name], dtype=float)[:, idx]  # (n_c, n)
    mass = np.asarray(sw.mass[name], dtype=float)[:, idx]
    y = labels[idx]
    s0 = s[list(coeffs).index(0.0)]
    sp, sm = interp_rows(coeffs, s, cb), interp_rows(coeffs, s, -cb)
    mp, mm = interp_rows(coeffs, mass, cb), interp_rows(coeffs, mass, -cb)
    smallest = min(abs(coeffs[coeffs != 0]))
    inside = np.abs(coeffs) <= max(cb, smallest) + 1e-12
    out = {
        "n_items": int(len(idx)),
        "n_yes_matching": int((y == 1).sum()),
        "n_no_matching": int((y == -1).sum()),
        "invalid_rate_c0": float((mass[list(coeffs).index(0.0)] < MIN_MASS).mean()),
        "invalid_rate_cb": float(max((mp < MIN_MASS).mean(), (mm < MIN_MASS).mean())),
    }
    weights = y if (y != 0).any() else np.ones(len(y))  # class weights for the bias; unlabelled: plain mean
    bias_items = (sp - sm) / 2
    out["bias"] = balanced_mean(bias_items, weights)
    out["bias_ci"] = list(balanced_ci(bias_items, weights, seed))
    out["bias_slope"] = balanced_mean(item_slopes(s[inside], coeffs[inside]), weights)
    shift_p, shift_m = sp - s0, sm - s0
    med_p, med_m = np.median(shift_p), np.median(shift_m)
    out["mean_abs_shift"] = float((np.abs(shift_p) + np.abs(shift_m)).mean() / 2)
    out["decision_shift_net"] = float((np.abs(shift_p - med_p) + np.abs(shift_m - med_m)).mean() / 2)
    out["flip_rate_net"] = float((np.sign(sp - med_p) != np.sign(sm - med_m)).mean())
    if (y != 0).any():
        lab = y != 0
        yl = y[lab]
        a = s[:, lab] * yl  # (n_c, n_lab)
        ap, am, a0 = sp[lab] * yl, sm[lab] * yl, s0[lab] * yl
        items = (ap - am) / 2
        mean_a = np.array([balanced_mean(row, yl) for row in a])
        ins = inside
        rho = spearmanr(coeffs[ins], mean_a[ins]).statistic if ins.sum() > 2 else float(np.sign(mean_a[-1] - mean_a[0]))
        ap_net = (sp[lab] - med_p) * yl
        to_match = ((a0 <= 0) & (ap_net > 0)).sum()
        away = ((a0 > 0) & (ap_net <= 0)).sum()
        se = [balanced_se(row, yl) for row in a]
        out.update(
            {
                "effect": balanced_mean(items, yl),
                "ci": list(balanced_ci(items, yl, seed)),
                "effect_slope": balanced_mean(item_slopes(a[inside], coeffs[inside]), yl),
                "effect_neg_side": balanced_mean(a0 - am, yl),
                "effect_pos_side": balanced_mean(ap - a0, yl),
                "spearman": float(rho) if np.isfinite(rho) else float("nan"),
                "flip_score": float((to_match - away) / len(yl)),
                "curve": {
                    "c": coeffs.tolist(),
                    "t": (coeffs / cb).tolist(),
                    "mean_a": mean_a.tolist(),
                    "delta_a": (mean_a - mean_a[list(coeffs).index(0.0)]).tolist(),
                    "se": se,
                },
                "item_effects": items.tolist(),
                "item_labels": yl.astype(int).tolist(),
            }
        )
    return out


def summarize(
    sweeps: list[Sweep],
    datasets,
    splits: dict[str, tuple[np.ndarray, np.ndarray]],
    seed: int = 0,
    kl_budget: float = KL_BUDGET,
    report_split: str = "test",
) -> dict:
    """Metrics for every method × dataset on the test split at each method's KL-matched coefficient.

    Args:
        splits: dataset → (dev indices, test indices). The budget coefficient comes from the neutral texts,
            which are shared; nothing is fitted on test items.
        report_split: ``"test"`` (the numbers, with the dev items' effect and bias under ``"dev"``) or ``"dev"``
            (choices made during a search: dev items only, test items never read).
    Raises:
        ConfigError: a bad budget or ``report_split``.
    """
    kl_budget = check_budget(kl_budget)
    if report_split not in ("test", "dev"):
        raise ConfigError(f"report_split must be 'test' or 'dev', got {report_split!r}", field="report_split")
    main = 1 if report_split == "test" else 0
    result = {}
    for sw in sweeps:
        check_finite_sweep(sw)
        if sw.kind == "prompt":  # one dose (persona or not): read at |c| = 1, its KL reported as spent
            cb = max(abs(c) for c in sw.coeffs)
            reached = max(sw.neutral_kl) <= kl_budget
        elif sw.kl_coeff is not None:  # a budget-first sweep found C_b before scoring items
            cb, reached = sw.kl_coeff, bool(sw.budget_reached)
        else:
            cb, reached = kl_matched_coeff(sw.coeffs, sw.neutral_kl, kl_budget)
        i0 = sw.coeffs.index(0.0)
        nll = np.asarray(sw.neutral_nll) - sw.neutral_nll[i0]
        dnll = max(abs(float(np.interp(cb, sw.coeffs, nll))), abs(float(np.interp(-cb, sw.coeffs, nll))))
        kl_at = max(float(np.interp(cb, sw.coeffs, sw.neutral_kl)), float(np.interp(-cb, sw.coeffs, sw.neutral_kl)))
        per = {}
        for d in datasets:
            labels = np.array([it.label for it in d.items])
            per[d.name] = dataset_metrics(sw, d.name, labels, splits[d.name][main], cb, seed)
            if report_split == "test" and len(splits[d.name][0]):  # dev items scored too (run_suite)
                per[d.name]["dev"] = {
                    k: v
                    for k, v in dataset_metrics(sw, d.name, labels, splits[d.name][0], cb, seed).items()
                    if k in ("effect", "ci", "bias", "bias_ci")
                }
        result[sw.method] = {
            "coeffs": sw.coeffs,
            "kl_budget": kl_budget,
            "kl_coeff": cb,
            "budget_reached": reached,
            "abs_dnll_at_budget": dnll,
            "kl_at_coeff": kl_at,
            "neutral_dnll": nll.tolist(),
            "neutral_kl": list(sw.neutral_kl),
            "calibration": sw.calibration,
            "datasets": per,
        }
    return result


def pooled_effect(
    per_seed_items: list[list[float]], labels: list[int] | None = None, seed: int = 0
) -> tuple[float, float, float, list[float]]:
    """Balanced effect over training seeds: average each item's effect across seeds, then the class-stratified
    bootstrap over items.

    Args:
        per_seed_items: one list of per-item effects (same items, same order) per seed.
        labels: the items' labels (±1); None weighs items equally.
    Returns: (effect, CI low, CI high, per-seed effects).
    """
    s = np.array(per_seed_items)  # (n_seeds, n_items)
    y = np.ones(s.shape[1]) if labels is None else np.asarray(labels)
    lo, hi = balanced_ci(s.mean(0), y, seed)
    return balanced_mean(s.mean(0), y), lo, hi, [balanced_mean(row, y) for row in s]


def pool_seeds(per_seed: list[dict], seed: int = 0) -> dict:
    """One method's numbers on one dataset pooled over training seeds.

    Args:
        per_seed: ``dataset_metrics`` outputs of the same items (same order), one per training seed; each is read
            at its own seed's KL-matched coefficient.
    Returns: ``effect`` and ``ci`` from ``pooled_effect`` (items averaged over seeds, then the class-stratified
        bootstrap over items; nats), ``effect_seeds`` (each seed's balanced effect), ``bias`` (mean over seeds,
        nats) with ``bias_seeds``, ``spearman_seeds`` (each seed's Spearman ρ of the effect over the sweep, None where
        undefined; unsigned, so a set whose expected sign is − wants −1), the mean ``effect_neg_side`` /
        ``effect_pos_side``, ``decision_shift_net``, invalid rates and ``flip_score`` over seeds, and
        ``n_seeds``. A dataset without labels gets the bias fields only.
    Raises:
        ValueError: no seeds, or seeds scored on different items.
    """
    if not per_seed:
        raise ValueError("pool_seeds needs at least one seed's metrics")
    out: dict = {
        "n_seeds": len(per_seed),
        "n_items": per_seed[0]["n_items"],
        "bias_seeds": [float(m["bias"]) for m in per_seed],
    }
    out["bias"] = float(np.mean(out["bias_seeds"]))
    for k in ("decision_shift_net", "invalid_rate_c0", "invalid_rate_cb", "flip_score"):
        if all(k in m for m in per_seed):
            out[k] = float(np.mean([m[k] for m in per_seed]))
    if "item_effects" not in per_seed[0]:
        return out
    labels = per_seed[0]["item_labels"]
    if any(m["item_labels"] != labels for m in per_seed):
        raise ValueError("pool_seeds: the seeds were scored on different items (item_labels differ)")
    eff, lo, hi, per = pooled_effect([m["item_effects"] for m in per_seed], labels, seed)
    rhos = [
        float(m["spearman"]) if m.get("spearman") is not None and np.isfinite(m["spearman"]) else None for m in per_seed
    ]
    out.update(
        effect=eff,
        ci=[lo, hi],
        effect_seeds=per,
        spearman_seeds=rhos,
        effect_neg_side=float(np.mean([m["effect_neg_side"] for m in per_seed])),
        effect_pos_side=float(np.mean([m["effect_pos_side"] for m in per_seed])),
    )
    return out
