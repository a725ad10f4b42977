"""From raw sweeps to honest numbers (DESIGN.md §5).

- label-aligned score a_i(c) = y_i · score_i(c), y_i = +1 when "Yes" is the dataset's target behaviour;
- usable range of a method: the largest C such that every swept |c| ≤ C has neutral-text ΔNLL ≤ 0.2 nats/token
  and an invalid-answer rate at most 5 points above c = 0, chosen on the **dev** items;
- effect: per test item, least-squares slope of a_i against t = c / C over the usable sweep, averaged over
  items, with a 95 % percentile bootstrap CI over items. Units: nats of log-odds per unit of normalised
  coefficient, i.e. roughly half the change in log-odds from −C to +C. Signed: > 0 moves toward the target;
- Spearman ρ between t and the mean a(t); mean |Δscore| (decision shift / side effect) and flip rate at ±C.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr

from .errors import NonFiniteError
from .evaluate import MIN_MASS, Sweep

MAX_DNLL = 0.2  # nats/token
MAX_INVALID_INCREASE = 0.05


def item_slopes(a: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Least-squares slope of each column of a (n_coeffs, n_items) against t (n_coeffs,) → (n_items,)."""
    tc = t - t.mean()
    return (tc[:, None] * (a - a.mean(0))).sum(0) / (tc ** 2).sum()


def bootstrap_ci(x: np.ndarray, seed: int = 0, n_boot: int = 2000) -> tuple[float, float]:
    """95 % percentile bootstrap CI of the mean of x (n,)."""
    if len(x) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def usable_range(sweep: Sweep, dev_index: dict[str, np.ndarray]) -> tuple[float, bool]:
    """Largest |c| of the sweep inside the usable range (see module doc); (C, True) or (smallest |c|, False)."""
    coeffs = np.array(sweep.coeffs)
    i0 = int(np.flatnonzero(coeffs == 0)[0])
    dnll = np.array(sweep.neutral_nll) - sweep.neutral_nll[i0]
    inv = np.array([np.mean(np.concatenate([np.array(sweep.mass[d][k])[dev_index[d]] < MIN_MASS
                                            for d in sweep.mass])) for k in range(len(coeffs))])
    ok = (dnll <= MAX_DNLL) & (inv <= inv[i0] + MAX_INVALID_INCREASE)
    best = None
    for mag in sorted(set(np.abs(coeffs[coeffs != 0]))):
        inside = np.abs(coeffs) <= mag
        if ok[inside].all() and (coeffs == mag).any() and (coeffs == -mag).any():
            best = mag
        else:
            break
    if best is None:
        return float(min(np.abs(coeffs[coeffs != 0]))), False
    return float(best), True


def dataset_metrics(sweep: Sweep, name: str, labels: np.ndarray, test_idx: np.ndarray, cmax: float,
                    seed: int = 0) -> dict:
    """Effect, CI, ρ, ΔNLL, invalid rate and shifts of one method on one dataset's test items at range ±cmax."""
    coeffs = np.array(sweep.coeffs)
    inside = np.abs(coeffs) <= cmax + 1e-9
    t = coeffs[inside] / cmax
    scores = np.array(sweep.scores[name])[:, test_idx]  # (n_coeffs, n_test)
    mass = np.array(sweep.mass[name])[:, test_idx]
    y = labels[test_idx]
    i0 = int(np.flatnonzero(coeffs == 0)[0])
    ip, im = int(np.flatnonzero(coeffs == cmax)[0]), int(np.flatnonzero(coeffs == -cmax)[0])
    dnll = np.array(sweep.neutral_nll) - sweep.neutral_nll[i0]
    out = {
        "n_test": int(len(test_idx)),
        "coeff_range": [-cmax, cmax],
        "dnll": float(max(dnll[ip], dnll[im])),
        "invalid_rate_c0": float((mass[i0] < MIN_MASS).mean()),
        "invalid_rate_cmax": float(max((mass[ip] < MIN_MASS).mean(), (mass[im] < MIN_MASS).mean())),
        "mean_abs_shift": float((np.abs(scores[ip] - scores[i0]) + np.abs(scores[im] - scores[i0])).mean() / 2),
        "flip_rate": float((np.sign(scores[ip]) != np.sign(scores[im])).mean()),
    }
    labelled = y != 0
    if labelled.any():
        a = scores[inside][:, labelled] * y[labelled]  # (n_in, n_lab)
        slopes = item_slopes(a, t)
        lo, hi = bootstrap_ci(slopes, seed)
        mean_a = a.mean(1)
        rho = spearmanr(t, mean_a).statistic if len(t) > 2 else float(np.sign(mean_a[-1] - mean_a[0]))
        out.update({
            "effect": float(slopes.mean()), "ci": [lo, hi], "spearman": float(rho),
            "curve": {"t": t.tolist(), "mean_a": mean_a.tolist(),
                      "se": (a.std(1, ddof=1) / np.sqrt(a.shape[1])).tolist() if a.shape[1] > 1 else [0.0] * len(t)},
            "slopes": slopes.tolist(),
        })
    return out


def check_finite_sweep(sw: Sweep) -> None:
    """Refuse a sweep with NaN/inf scores or neutral NLL: a broken method must not be reported as a result.

    Raises:
        NonFiniteError: naming the method, the dataset and the coefficient.
    """
    for k, c in enumerate(sw.coeffs):
        if not np.isfinite(sw.neutral_nll[k]):
            raise NonFiniteError(f"method {sw.method!r}: neutral-text NLL is {sw.neutral_nll[k]} at c={c:g}; its "
                                 "adapter or vector holds NaN/inf or |c| is far too large", field=sw.method)
        for name, rows in sw.scores.items():
            if not np.isfinite(np.asarray(rows[k], dtype=float)).all():
                raise NonFiniteError(f"method {sw.method!r}: non-finite Yes/No scores on {name} at c={c:g}; its "
                                     "adapter or vector holds NaN/inf or |c| is far too large", field=sw.method)


def summarize(sweeps: list[Sweep], datasets, splits: dict[str, tuple[np.ndarray, np.ndarray]],
              seed: int = 0) -> dict:
    """Metrics for every method × dataset. splits: dataset → (dev indices, test indices)."""
    result = {}
    dev = {d: s[0] for d, s in splits.items()}
    for sw in sweeps:
        check_finite_sweep(sw)
        cmax, usable = usable_range(sw, dev)
        per = {}
        for d in datasets:
            labels = np.array([it.label for it in d.items])
            per[d.name] = dataset_metrics(sw, d.name, labels, splits[d.name][1], cmax, seed)
        i0 = sw.coeffs.index(0.0)
        result[sw.method] = {
            "coeffs": sw.coeffs, "usable_cmax": cmax, "usable": usable,
            "neutral_dnll": [x - sw.neutral_nll[i0] for x in sw.neutral_nll],
            "datasets": per,
        }
    return result


def pooled_effect(per_seed_slopes: list[list[float]], seed: int = 0) -> tuple[float, float, float, list[float]]:
    """Effect over training seeds: average each item's slope across seeds, then bootstrap over items.

    Args: per_seed_slopes: one list of per-item slopes (same items, same order) per seed.
    Returns: (effect, CI low, CI high, per-seed effects).
    """
    s = np.array(per_seed_slopes)  # (n_seeds, n_items)
    lo, hi = bootstrap_ci(s.mean(0), seed)
    return float(s.mean()), lo, hi, [float(x) for x in s.mean(1)]
