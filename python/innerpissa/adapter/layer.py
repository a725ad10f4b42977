"""One adapted linear layer: the r×r steering matrix M(c) and the delta-form side path (docs/design.md §2).

A linear layer computes y = x Wᵀ + b with W ∈ ℝ^{d_out×d_in}. With the top-r SVD W ≈ U diag(S) Vᵀ
(U: d_out×r, S: r, V: d_in×r, stored, never recomputed) and learned skew A (r×r) and offset δ (r):

    R(c) = (I − cA/2)⁻¹ (I + cA/2)                      (Cayley map; orthogonal; R(−c) = R(c)ᵀ)
    M(c) = diag(S + cδ) R(c)ᵀ − diag(S)                 (additive; multiplicative uses S ⊙ exp(cδ))
    W(c) = W + U M(c) Vᵀ
    y(c) = base(x) + ((x V) M(c)ᵀ) Uᵀ

so M(0) = 0 and the c = 0 output is the base output. Source: docs/design.md §2 (InnerPiSSA), after PiSSA
(Meng et al. 2024) for the SVD split and Cayley (1846) for the rotation.
"""

from __future__ import annotations

import torch
from torch import nn


def skew(theta: torch.Tensor) -> torch.Tensor:
    """Skew-symmetric A = triu(θ, 1) − triu(θ, 1)ᵀ, shape (r, r)."""
    upper = torch.triu(theta, diagonal=1)
    return upper - upper.T


def cayley(a: torch.Tensor, coeff: torch.Tensor) -> torch.Tensor:
    """Cayley rotation R(c) = (I − cA/2)⁻¹(I + cA/2).

    Args:
        a: skew-symmetric (r, r), fp32.
        coeff: scalar () or per-sample (B,) steering coefficients.
    Returns:
        (r, r) for a scalar coefficient, (B, r, r) for a vector. Orthogonal for any real c since A is skew.

    On CPU a vector of coefficients is solved one (r, r) system at a time: PyTorch 2.15's batched CPU solve fails
    for r ≥ 256 ("Pivots given to lu_solve must all be greater or equal to 1", MKL's ?LASWP rejecting its
    arguments; measured on this project's CI machine), which the default rank d/8 reaches at d ≥ 2048.
    """
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    ca = coeff.reshape(*coeff.shape, 1, 1) * a / 2  # (..., r, r)
    if ca.dim() == 3 and a.device.type == "cpu":
        return torch.stack([torch.linalg.solve(eye - m, eye + m) for m in ca])
    return torch.linalg.solve(eye - ca, eye + ca)


class InnerPiSSALayer(nn.Module):
    """Adapter state for one linear layer: frozen bases U, S, V and trainable θ (→ A) and δ.

    Shapes: U (d_out, r), S (r,), V (d_in, r), θ (r, r) of which only the strict upper triangle is used,
    δ (r,). All fp32; the delta is cast to the activation dtype.
    """

    def __init__(
        self,
        u: torch.Tensor,
        s: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: str = "additive",
        rotate: bool = True,
        rotate_side: str = "v",
        init_std: float = 1e-3,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        r = s.shape[0]
        if u.shape[1] != r or v.shape[1] != r:
            raise ValueError(f"U {tuple(u.shape)}, S {tuple(s.shape)}, V {tuple(v.shape)} disagree on the rank")
        self.register_buffer("U", u.float().contiguous())
        self.register_buffer("S", s.float().contiguous())
        self.register_buffer("V", v.float().contiguous())
        self.scale = scale
        self.rotate = rotate
        self.rotate_side = rotate_side
        self.theta = nn.Parameter(torch.randn(r, r, generator=generator) * init_std, requires_grad=rotate)
        self.delta = nn.Parameter(torch.randn(r, generator=generator) * init_std)

    @property
    def rank(self) -> int:
        return self.S.shape[0]

    def rotation(self, coeff: torch.Tensor) -> torch.Tensor:
        """R(c): (r, r) or (B, r, r); the identity when rotation is off."""
        if not self.rotate:
            eye = torch.eye(self.rank, dtype=self.S.dtype, device=self.S.device)
            return eye if coeff.ndim == 0 else eye.expand(coeff.shape[0], -1, -1)
        return cayley(skew(self.theta), coeff)

    def steer_matrix(self, coeff: float | torch.Tensor) -> torch.Tensor:
        """M(c) = diag(S')·R(c)ᵀ − diag(S) (rotation of V), or its transpose R(c)·diag(S') − diag(S) (rotation of
        U, ``rotate_side="u"``); (r, r) for a scalar c, (B, r, r) for c of shape (B,).

        S' = S + cδ (additive) or S ⊙ exp(cδ) (multiplicative). M(0) = 0 exactly. Computed in the layer's dtype
        (fp32; fp64 after ``.double()``).
        """
        c = torch.as_tensor(coeff, dtype=self.S.dtype, device=self.S.device)
        if c.ndim == 1:  # per-row coefficients: build M once per distinct value, then index
            uniq, inverse = torch.unique(c, return_inverse=True)
            return self._steer_matrix(uniq)[inverse]
        return self._steer_matrix(c)

    def _steer_matrix(self, c: torch.Tensor) -> torch.Tensor:
        cs = c.reshape(*c.shape, 1)  # (..., 1)
        if self.scale == "additive":
            s_new = self.S + cs * self.delta  # (..., r)
        else:
            s_new = self.S * torch.exp(cs * self.delta)
        rot_t = self.rotation(c).transpose(-1, -2)  # (..., r, r)
        m = s_new.unsqueeze(-1) * rot_t - torch.diag_embed(self.S.expand_as(s_new))
        return m.transpose(-1, -2) if self.rotate_side == "u" else m

    def delta_output(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """((x V) Mᵀ) Uᵀ for x (B, T, d_in) and M (r, r) or (B, r, r); returns (B, T, d_out) in x's dtype."""
        xv = x.float() @ self.V  # (B, T, r)
        xvm = xv @ m.transpose(-1, -2)  # (B, T, r)
        return (xvm @ self.U.T).to(x.dtype)  # (B, T, d_out)

    def delta_weight(self, coeff: float) -> torch.Tensor:
        """Dense ΔW(c) = U M(c) Vᵀ, (d_out, d_in), fp32 — for merging and export only."""
        return self.U @ self.steer_matrix(coeff) @ self.V.T
