"""Polynomial basis for the steering matrix: M(c) ≈ Σ_{k=1..K} c^k M_k over a coefficient range (docs/design.md §7).

Why: llama.cpp scales a LoRA adapter by one run-time float and standard ONNX has no matrix inverse, so neither can
evaluate the Cayley map R(c) = (I − cA/2)⁻¹(I + cA/2) for a coefficient chosen at run time. A polynomial in c
without a constant term can: K adapters with lora_b = U M_k, applied with scales c, c², …, c^K. M(0) = 0 is kept
exactly. Because ΔW(c) = U M(c) Vᵀ with orthonormal U, V, ‖ΔŴ(c) − ΔW(c)‖_F = ‖M̂(c) − M(c)‖_F, so the
error of every export built on this fit is measured exactly in r×r space.

The additive variant without rotation has M(c) = c·diag(δ), which K = 1 represents exactly.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from ..adapter.layer import InnerPiSSALayer


@dataclass(frozen=True)
class PolyFit:
    """M(c) ≈ Σ_{k=1..K} c^k · matrices[k−1] for c in ``c_range``.

    Attributes:
        matrices: (K, r, r) float64.
        c_range: (c_min, c_max) the fit and the error check cover.
        max_rel_error: max over the check grid (c ≠ 0) of ‖M̂(c) − M(c)‖_F / ‖M(c)‖_F (dimensionless).
        max_abs_error: max over the check grid of ‖M̂(c) − M(c)‖_F (units of the singular values).
    """

    matrices: np.ndarray
    c_range: tuple[float, float]
    max_rel_error: float
    max_abs_error: float

    @property
    def degree(self) -> int:
        return int(self.matrices.shape[0])

    def evaluate(self, c: float) -> np.ndarray:
        """M̂(c), (r, r) float64."""
        powers = np.array([c ** (k + 1) for k in range(self.degree)])
        return np.einsum("k,kij->ij", powers, self.matrices)


def exact_steer_matrices(layer: InnerPiSSALayer, coeffs: np.ndarray) -> np.ndarray:
    """M(c) for each coefficient, (G, r, r) float64, computed in float64 from the layer's parameters."""
    lay = copy.deepcopy(layer).double().cpu()
    with torch.no_grad():
        return lay.steer_matrix(torch.as_tensor(np.asarray(coeffs, dtype=np.float64))).numpy()


def exact_at(adapter, coeff: float) -> dict[str, np.ndarray]:
    """{target module: M(c) (r, r) float64} for one coefficient."""
    return {n: exact_steer_matrices(adapter.layer(n), [float(coeff)])[0] for n in adapter.target_names}


def is_linear(layer: InnerPiSSALayer) -> bool:
    """True when M(c) = c·diag(δ) exactly (additive offsets, no rotation): one adapter serves every c."""
    return layer.scale == "additive" and not layer.rotate


def _grids(c_range: tuple[float, float], n_fit: int, n_check: int) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = float(c_range[0]), float(c_range[1])
    if not hi > lo:
        raise ValueError(f"coefficient range ({lo}, {hi}) is empty")
    nodes = (lo + hi) / 2 + (hi - lo) / 2 * np.cos(np.pi * (np.arange(n_fit) + 0.5) / n_fit)  # Chebyshev points
    check = np.unique(np.concatenate([np.linspace(lo, hi, n_check), [lo, hi]]))
    return nodes, check


def _fit(layer: InnerPiSSALayer, c_range, degree: int, nodes, target, check, exact) -> PolyFit:
    if degree < 1:
        raise ValueError(f"polynomial degree {degree} < 1")
    r = layer.rank
    if is_linear(layer):
        mats = np.zeros((degree, r, r))
        mats[0] = np.diag(layer.delta.detach().double().cpu().numpy())
    else:
        design = np.stack([nodes ** (k + 1) for k in range(degree)], axis=1)  # (G, K)
        scale = np.abs(design).max(axis=0)  # column scaling keeps the least-squares problem well conditioned
        coef, *_ = np.linalg.lstsq(design / scale, target.reshape(len(nodes), r * r), rcond=None)
        mats = (coef / scale[:, None]).reshape(degree, r, r)
    powers = np.stack([check ** (k + 1) for k in range(degree)], axis=1)
    approx = np.einsum("gk,kij->gij", powers, mats)
    err = np.linalg.norm((approx - exact).reshape(len(check), -1), axis=1)
    norm = np.linalg.norm(exact.reshape(len(check), -1), axis=1)
    nz = norm > 0
    rel = float((err[nz] / norm[nz]).max()) if nz.any() else 0.0
    return PolyFit(
        matrices=mats, c_range=(float(c_range[0]), float(c_range[1])), max_rel_error=rel, max_abs_error=float(err.max())
    )


def fit_polynomial(
    layer: InnerPiSSALayer, c_range: tuple[float, float], degree: int, n_fit: int = 257, n_check: int = 1001
) -> PolyFit:
    """Least-squares fit of M(c) ≈ Σ_{k=1..degree} c^k M_k on ``n_fit`` Chebyshev points of ``c_range``.

    The error is then measured on ``n_check`` evenly spaced points (plus the range ends), in float64.

    Raises:
        ValueError: an empty range or a degree < 1.
    """
    nodes, check = _grids(c_range, n_fit, n_check)
    return _fit(
        layer, c_range, degree, nodes, exact_steer_matrices(layer, nodes), check, exact_steer_matrices(layer, check)
    )


def fit_adapter(
    adapter, c_range: tuple[float, float], degree: int | None = None, max_degree: int = 8, tol: float = 1e-3
) -> dict[str, PolyFit]:
    """Fit every layer of ``adapter`` with one common degree.

    With ``degree=None`` the smallest K ≤ ``max_degree`` whose worst layer's relative error is ≤ ``tol`` is used
    (K = 1 for the linear variant); if none reaches ``tol``, K = ``max_degree`` and its error is reported.
    Returns {target module name: PolyFit}.
    """
    nodes, check = _grids(c_range, 257, 1001)
    exact = {
        n: (exact_steer_matrices(adapter.layer(n), nodes), exact_steer_matrices(adapter.layer(n), check))
        for n in adapter.target_names
    }

    def fit_all(k: int) -> dict[str, PolyFit]:
        return {
            n: _fit(adapter.layer(n), c_range, k, nodes, exact[n][0], check, exact[n][1]) for n in adapter.target_names
        }

    if degree is not None:
        return fit_all(degree)
    for k in range(1, max_degree + 1):
        fits = fit_all(k)
        if max(f.max_rel_error for f in fits.values()) <= tol:
            return fits
    return fits
