"""Preference directions from contrastive pairs: the axis along which the loss (``objectives.Ruler``) reads the
adapter's effect, and the direction of a steering-vector baseline.

Every function takes per-pair quantities in some coordinate system of the residual stream (the full d, or the k
coordinates of a basis) and returns a unit direction in the same coordinates, signed so that the pairs' mean
difference (positive − negative) projects positively on it.

- ``mean_difference``: the normalised mean of h_pos − h_neg (CAA, Rimsky et al. 2024).
- ``pca_direction``: the first principal component of the centred differences (repeng's ``pca_diff``, Zou et al.
  2023 / Vogel 2024).
- ``fisher_direction``: the natural-gradient direction (F + λ·(tr F / k)·I)⁻¹ ḡ of per-pair gradients g_i of the
  pair's log-likelihood gap (``train.gap_gradients``), with F the empirical Fisher (1/n) Σ g_i g_iᵀ or its
  covariance form (g_i − ḡ centred), damped by λ relative to its mean eigenvalue (Amari 1998; the damped
  covariance form after the research notes, where λ = 1e-5 worked better than 1e-4 or 1e-3).
- ``sample_wise``: each pair's own normalised difference, (n, ·): a direction per pair, not one for all.
"""

from __future__ import annotations

import torch

DIRECTIONS = ("mean-diff", "pca", "fisher")


def _signed_unit(v: torch.Tensor, diffs: torch.Tensor) -> torch.Tensor:
    n = v.norm()
    if not torch.isfinite(n) or n == 0:
        raise ValueError("the pairs give no direction (all differences are zero)")
    v = v / n
    return -v if float(diffs.mean(0) @ v) < 0 else v


def mean_difference(diffs: torch.Tensor) -> torch.Tensor:
    """diffs (n, k) of h_pos − h_neg → unit (k,) along their mean. Raises ValueError if the mean is zero."""
    return _signed_unit(diffs.mean(0), diffs)


def pca_direction(diffs: torch.Tensor) -> torch.Tensor:
    """diffs (n, k), n ≥ 2 → unit (k,): the first principal component of the centred differences, signed along
    their mean. Raises ValueError for fewer than two pairs."""
    if diffs.shape[0] < 2:
        raise ValueError("a principal component needs at least two pairs")
    centred = diffs - diffs.mean(0)
    return _signed_unit(torch.linalg.svd(centred, full_matrices=False).Vh[0], diffs)


def sample_wise(diffs: torch.Tensor) -> torch.Tensor:
    """diffs (n, k) → (n, k), each row normalised (rows of zero norm stay zero)."""
    return diffs / diffs.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def fisher_direction(
    grads: torch.Tensor, diffs: torch.Tensor, damping: float = 1e-5, covariance: bool = True
) -> torch.Tensor:
    """Natural-gradient direction (module docstring).

    Args:
        grads: (n, k) per-pair gradients of the log-likelihood gap (nats per unit of coordinate).
        diffs: (n, k) h_pos − h_neg in the same coordinates (fixes the sign only).
        damping: λ, relative to the mean eigenvalue tr F / k (> 0).
        covariance: centre the gradients before the outer products (the covariance form of F).
    Returns:
        unit (k,) direction, float32.
    Raises:
        ValueError: damping ≤ 0, or mismatched shapes.
    """
    if damping <= 0:
        raise ValueError(f"damping must be > 0, got {damping}")
    if grads.shape != diffs.shape:
        raise ValueError(f"grads {tuple(grads.shape)} and diffs {tuple(diffs.shape)} differ in shape")
    g = grads.double()
    mean = g.mean(0)
    c = g - mean if covariance else g
    fim = c.T @ c / g.shape[0]
    k = fim.shape[0]
    scale = float(torch.trace(fim)) / k or 1.0
    v = torch.linalg.solve(fim + damping * scale * torch.eye(k, dtype=fim.dtype), mean)
    return _signed_unit(v.float(), diffs.float())
