"""Task subspaces and weighted orthogonal Procrustes between two models' activations (docs/design.md §9).

Given the *same* paired differences read in a teacher (d_T) and a student (d_S) — row i is, e.g., the N − S
difference of manifest item i in each model — each model gets a task subspace (top-k right singular vectors of its
stacked differences), the rows are expressed in k coordinates, and an orthogonal k×k map R is fitted in closed form:

    R = argmin_{RᵀR = I} Σ_i w_i ‖a_i R − b_i‖²  =  P Qᵀ,   where  Aᵀ diag(w) B = P Σ Qᵀ  (SVD)

(Schönemann 1966, "A generalized solution of the orthogonal Procrustes problem"; row weights as in Gower &
Dijksterhuis 2004, "Procrustes Problems", §3). Each model's coordinates are divided by their RMS row norm first,
so hidden-state scale differences between the models do not enter R; the scales are kept to map vectors back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def task_subspace(diffs: torch.Tensor, k: int) -> torch.Tensor:
    """Orthonormal basis (d, k) of the top-k right singular vectors of ``diffs`` (n, d), not mean-centred.

    Not centring keeps the mean difference (the contrast direction itself) inside the subspace.
    Raises:
        ValueError: k larger than min(n, d).
    """
    n, d = diffs.shape
    if not 1 <= k <= min(n, d):
        raise ValueError(f"subspace size k={k} must be in 1..min(n={n}, d={d})")
    _, _, vh = torch.linalg.svd(diffs.double(), full_matrices=False)
    return vh[:k].T.contiguous()


def weighted_procrustes(a: torch.Tensor, b: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Orthogonal R (k, k) minimising Σ_i w_i ‖a_i R − b_i‖² for a, b (n, k) and weights (n,) ≥ 0.

    Raises:
        ValueError: shape mismatch or negative / all-zero weights.
    """
    if a.shape != b.shape:
        raise ValueError(f"Procrustes needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    w = torch.ones(a.shape[0], dtype=torch.float64) if weights is None else weights.double()
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError("Procrustes row weights must be ≥ 0 and not all zero")
    m = a.double().T @ (w[:, None] * b.double())  # (k, k)
    p, _, qh = torch.linalg.svd(m)
    return p @ qh


@dataclass
class AlignmentMap:
    """Teacher → student map: v_S = (s_S / s_T) · B_S · Rᵀ-applied coordinates of v_T in B_T.

    Attributes:
        teacher_basis: B_T (d_T, k) orthonormal. student_basis: B_S (d_S, k) orthonormal.
        rotation: R (k, k) orthogonal, acting on row vectors of teacher coordinates.
        teacher_scale, student_scale: RMS row norms of the fitted coordinates (hidden-state units).
        residual: Σ w ‖â R − b̂‖² / Σ w ‖b̂‖² on the fitted rows (â, b̂ scale-normalised); 0 is a perfect fit,
            ~2 is what unrelated spaces give.
    """

    teacher_basis: torch.Tensor
    student_basis: torch.Tensor
    rotation: torch.Tensor
    teacher_scale: float
    student_scale: float
    residual: float

    @property
    def k(self) -> int:
        return self.rotation.shape[0]

    def map(self, v_teacher: torch.Tensor) -> torch.Tensor:
        """Carry teacher vectors (d_T,) or (n, d_T) into student space, (d_S,) or (n, d_S) float32."""
        coords = v_teacher.double() @ self.teacher_basis / self.teacher_scale
        return (coords @ self.rotation @ self.student_basis.T * self.student_scale).float()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "teacher_basis": self.teacher_basis.float(),
            "student_basis": self.student_basis.float(),
            "rotation": self.rotation.float(),
            "scales": torch.tensor([self.teacher_scale, self.student_scale, self.residual]),
        }

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> AlignmentMap:
        s = sd["scales"].double()
        return cls(
            sd["teacher_basis"].double(),
            sd["student_basis"].double(),
            sd["rotation"].double(),
            float(s[0]),
            float(s[1]),
            float(s[2]),
        )


def fit_alignment(
    teacher_diffs: torch.Tensor, student_diffs: torch.Tensor, k: int, weights: torch.Tensor | None = None
) -> AlignmentMap:
    """Fit the teacher → student map on paired differences (n, d_T) and (n, d_S) with row weights (n,).

    Raises:
        ValueError: different row counts, or k out of range (see ``task_subspace``).
    """
    if teacher_diffs.shape[0] != student_diffs.shape[0]:
        raise ValueError(
            f"teacher has {teacher_diffs.shape[0]} rows, student {student_diffs.shape[0]}: the rows "
            "must be the same paired differences"
        )
    bt, bs = task_subspace(teacher_diffs, k), task_subspace(student_diffs, k)
    a, b = teacher_diffs.double() @ bt, student_diffs.double() @ bs
    st, ss = float(a.pow(2).sum(1).mean().sqrt()), float(b.pow(2).sum(1).mean().sqrt())
    a, b = a / st, b / ss
    w = torch.ones(a.shape[0], dtype=torch.float64) if weights is None else weights.double()
    r = weighted_procrustes(a, b, w)
    resid = float((w[:, None] * (a @ r - b).pow(2)).sum() / (w[:, None] * b.pow(2)).sum())
    return AlignmentMap(bt, bs, r, st, ss, resid)


def cosine(u: torch.Tensor, v: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(u.double().flatten(), v.double().flatten(), dim=0))
