"""Training objectives for an InnerPiSSA adapter: the frozen ruler they read and three named, versioned losses.

Every objective sees one batch of N contrastive pairs through passes at c = 0 (the base model, no grad) and at
c = +1 and c = −1 (:class:`Passes`), and returns a scalar loss and float metrics. The rows of every pass are
[pos_0 … pos_{N−1}, neg_0 … neg_{N−1}] (and, for ``anchored``, the N persona-free prompts after them).

**The ruler** (:class:`Ruler`, measured once from the base model before training, then frozen): a basis
B (d × k) of the residual stream after the loss block and a unit preference direction u (k,) in it, signed so that
positive prompts project higher; σ, the mean base separation along u, fixes the scale. Two bases:

- ``adapter-u`` (reprpo-svd v1): the U of the adapted residual writer at or below the loss block (k = r);
- ``pca``: the top-k right singular vectors of the row-normalised last-token differences h_pos − h_neg of the
  base model (k = ``basis_rank``), a basis the adapter does not control (AntiPaSTO's "task-difference"
  subspace, arXiv 2601.07473, in our own formulation).

With D_i(c) = mean over the last K tokens of Bᵀ(h_pos,i(c) − h_neg,i(c)) (k,) and s_i(c) = ⟨D_i(c), u⟩:

**reprpo-svd** (version 2; docs/design.md §3, after the ReprPO research code):

    L_sep  = softplus(−β (s(+1) − s(0)) / σ) + softplus(−β (s(0) − s(−1)) / σ)
    L_coh  = w_coh · mean over suffix tokens, both c, of ReLU(NLL_c(t) − NLL_0(t) − τ)²
    g(c)   = [log p_c(suffix | pos) − log p_c(suffix | neg)] − [the same at c = 0]            (nats)
    L_mono = w_mono · (ReLU(m − g(+1)) + ReLU(m + g(−1)))
    L      = L_sep + ω(step) · (L_coh + L_mono [+ L_even, below])

**antiparallel** (version 1; the idea of AntiPaSTO's projection term with the sign fixed, and its coherence
barrier): δ_i(±1) = D_i(±1) − D_i(0), everything divided per dimension by the base spread ς (k,) of D:

    L_proj = ½ [(1 − cos(δ(+1), D(0))) + (1 + cos(δ(−1), D(0)))] · f                     (f: focus, below)
    L_mag  = softplus(−β ⟨δ(+1), û⟩) + softplus(β ⟨δ(−1), û⟩)      (û = u in ς units; magnitude, σ units)
    L_tv   = w_tv · agg_t ReLU(TV_t − κ √(H_0,t + 0.02))²,  TV_t = ½ Σ_v |p_0,t(v) − p_c,t(v)|  (both c)
    L      = L_proj + L_mag + ω(step) · (L_tv + L_mono)

  cos(δ(+1), D(0)) → +1 and cos(δ(−1), D(0)) → −1 ask the two poles to move the pair's difference along its own
  base axis in opposite directions (an odd response in c); f = ‖δ‖_in² / ‖δ‖_full² averaged over both poles,
  the share of the change that stays in the k-dim subspace (AntiPaSTO's "focus"), as a factor that only
  discounts the alignment reward of changes leaking out of the subspace. H_0,t is the entropy (nats) of the base
  next-token distribution at suffix token t, agg is the mean (``tv_tau`` = 0) or the soft maximum
  τ·(logsumexp(x/τ) − log n).

**anchored** (version 1): reprpo-svd plus a *shift* term on persona-free prompts (``ContrastivePair.neutral``,
the pair's suffix after a neutral instruction): with a_i(c) = mean over the last K tokens of
⟨Bᵀ(h_free,i(c) − h_free,i(0)), u⟩ / σ,

    L_shift = w_shift · (ReLU(t − a(+1)) + ReLU(t + a(−1)))       (t: target shift in σ units, default ½)
    L       = L_reprpo + L_shift   (the NLL trust region also covers the persona-free rows)

  This is the one objective that says where a prompt *without* the persona should go (the evaluation prompts
  have none); σ/2 is about the distance from a neutral prompt to either persona along u.

**The even-response penalty** (``even_weight`` = w_even > 0; reprpo-svd and anchored): with the per-token change
Δ_c(t) = log p_c(t) − log p_0(t) of each suffix token,

    ē(t)   = ½ (Δ_{+1}(t) + Δ_{−1}(t))                  (the part of the change that does not flip with c)
    L_even = w_even · ω(step) · mean over suffix tokens (pairs and persona-free rows) of ē(t)²

A steering adapter should act oddly in c (−c undoes +c). A change both poles make, such as a base model learning
to predict the training replies' openings at c = ±1 alike, is not steering: at the evaluation's small
coefficients it spends KL without any signed effect.
The logged ``dnll`` and ``dnll_free`` (ΔNLL averaged over both poles) are −mean ē: the even part's mean.

ω(step) ramps the constraint terms linearly from 1/W to 1 over the first W = ``constraint_warmup`` · steps (1
throughout when 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: objective name → current version. Saved adapters record both; loading accepts versions 1..current.
OBJECTIVES: dict[str, int] = {"reprpo-svd": 2, "antiparallel": 1, "anchored": 1}
BASES = ("adapter-u", "pca")


@dataclass
class Ruler:
    """The frozen measuring frame of the loss (module docstring).

    Attributes:
        block_index: decoder block whose output is read.
        basis_name: ``"pca"`` or the adapted module whose U is the basis.
        basis: B, (d, k) float32.
        u: unit preference direction in the basis, (k,).
        sigma: mean base separation ⟨Bᵀ(h_pos − h_neg), u⟩ over the direction pairs (> 0).
        spread: per-dimension standard deviation of Bᵀ(h_pos − h_neg) over the direction pairs, (k,), floored at
            10 % of its median (the per-dimension units of ``antiparallel``).
    """

    block_index: int
    basis_name: str
    basis: torch.Tensor
    u: torch.Tensor
    sigma: float
    spread: torch.Tensor

    def pair_difference(self, h: torch.Tensor, n_pairs: int) -> torch.Tensor:
        """D = mean over tokens of Bᵀ(h_pos − h_neg) for h (groups·2N, K, d) stacked [pos; neg] per group →
        (groups, N, k)."""
        coords = (h @ self.basis).mean(1)  # (rows, k)
        coords = coords.view(-1, 2, n_pairs, coords.shape[-1])
        return coords[:, 0] - coords[:, 1]

    def separation(self, h: torch.Tensor, n_pairs: int) -> torch.Tensor:
        """s_i = ⟨D_i, u⟩ for h (groups·2N, K, d) → (groups, N)."""
        return self.pair_difference(h, n_pairs) @ self.u

    def to_meta(self) -> dict:
        """The ruler as saved in adapter metadata (the PCA basis included: it is not stored anywhere else)."""
        meta = {
            "block_index": self.block_index,
            "basis": self.basis_name,
            "sigma": self.sigma,
            "u": self.u.tolist(),
            "spread": self.spread.tolist(),
        }
        if self.basis_name == "pca":
            meta["basis_vectors"] = self.basis.T.tolist()  # (k, d)
        return meta


@dataclass
class Passes:
    """Outputs of one training batch (N pairs) at c = 0 and at c = ±1.

    h0: (2N, K, d) hidden states at the loss block, c = 0.  lp0: (2N, n_keep) log p of each kept token, c = 0.
    h: (2, 2N, K, d) at c = +1, −1.  lp: (2, 2N, n_keep).  mask: (2N, n_keep) bool, the assistant-suffix tokens.
    logp0, logp: full next-token log-distributions (2N, n_keep, V) / (2, 2N, n_keep, V), or None when the
    objective does not need them.  free0, free: persona-free rows (``anchored``): hidden (N, K, d) / (2, N, K, d),
    their token log-probs free_lp0 (N, n_free) / free_lp (2, N, n_free) and mask free_mask (N, n_free); else None.
    """

    h0: torch.Tensor
    lp0: torch.Tensor
    h: torch.Tensor
    lp: torch.Tensor
    mask: torch.Tensor
    logp0: torch.Tensor | None = None
    logp: torch.Tensor | None = None
    free0: torch.Tensor | None = None
    free: torch.Tensor | None = None
    free_lp0: torch.Tensor | None = None
    free_lp: torch.Tensor | None = None
    free_mask: torch.Tensor | None = None

    @property
    def n_pairs(self) -> int:
        return self.h0.shape[0] // 2


def needs_full_distribution(objective: str) -> bool:
    """Whether the objective reads whole next-token distributions (the TV barrier)."""
    return objective == "antiparallel"


def needs_neutral(objective: str) -> bool:
    """Whether the objective needs persona-free prompts (``ContrastivePair.neutral``)."""
    return objective == "anchored"


def nll_hinge(lp0: torch.Tensor, lp: torch.Tensor, mask: torch.Tensor, tau: float) -> tuple[torch.Tensor, float]:
    """mean over masked tokens of ReLU(NLL_c − NLL_0 − τ)² and the mean ΔNLL (nats/token).

    lp0: (R, n) base token log-probs; lp: (G, R, n) steered; mask: (R, n) bool.
    """
    d_nll = lp0.unsqueeze(0) - lp  # (G, R, n)
    m = mask.float().unsqueeze(0).expand_as(d_nll)
    pen = (F.relu(d_nll - tau) ** 2 * m).sum() / m.sum()
    return pen, float((d_nll.detach() * m).sum() / m.sum())


def mono_gap(lp0: torch.Tensor, lp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """g(c) = [log p_c(suffix|pos) − log p_c(suffix|neg)] − [same at 0] for lp0 (2N, n), lp (2, 2N, n) → (2, N)."""
    n = lp0.shape[0] // 2
    m = mask.float()
    seq0 = (lp0 * m).sum(-1)
    seq = (lp * m).sum(-1)  # (2, 2N)
    return seq[:, :n] - seq[:, n:] - (seq0[:n] - seq0[n:])


def even_change(lp0: torch.Tensor, lp: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Mean over masked tokens of ē(t)², ē = ½ (Δ_{+1} + Δ_{−1}) with Δ_c = log p_c − log p_0, and the mean ē
    (nats/token; positive: both poles make the tokens likelier).

    lp0: (R, n) base token log-probs; lp: (2, R, n) at c = +1, −1; mask: (R, n) bool.
    """
    even = 0.5 * (lp[0] + lp[1]) - lp0
    m = mask.float()
    return ((even**2) * m).sum() / m.sum(), float((even.detach() * m).sum() / m.sum())


def tv_barrier(
    logp0: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor, kappa: float, tau: float
) -> tuple[torch.Tensor, float]:
    """Total-variation coherence barrier over whole next-token distributions (AntiPaSTO's idea, our form).

    Per kept token t: TV_t = ½ Σ_v |p_0(v) − p_c(v)| ∈ [0, 1] and threshold θ_t = κ·√(H_0,t + 0.02) with H_0,t
    the base entropy in nats (a confident base token allows little change, an uncertain one more). Penalty
    ReLU(TV_t − θ_t)², aggregated over masked tokens of both coefficients by the mean (tau = 0) or the soft
    maximum τ·(logsumexp(x/τ) − log n).

    Args:
        logp0: (R, n, V) base log-probs; logp: (G, R, n, V) steered; mask: (R, n) bool.
    Returns:
        (penalty, mean TV over masked tokens).
    """
    p0 = logp0.exp()
    ent = -torch.special.xlogy(p0, p0).sum(-1)  # (R, n); 0·log 0 = 0 where a base logit is −inf
    theta = kappa * torch.sqrt(ent + 0.02)
    tv = 0.5 * (logp.exp() - p0.unsqueeze(0)).abs().sum(-1)  # (G, R, n)
    pen = F.relu(tv - theta.unsqueeze(0)) ** 2
    sel = mask.unsqueeze(0).expand_as(pen)
    x = pen[sel]
    agg = x.mean() if tau <= 0 else tau * (torch.logsumexp(x / tau, 0) - torch.log(torch.tensor(float(x.numel()))))
    return agg, float(tv.detach()[sel].mean())


def _reprpo_terms(p: Passes, ruler: Ruler, cfg, omega: float) -> tuple[torch.Tensor, dict]:
    n = p.n_pairs
    s0 = ruler.separation(p.h0, n)[0]
    s = ruler.separation(p.h.reshape(-1, *p.h.shape[2:]), n)  # (2, N)
    sep = F.softplus(-cfg.beta * (s[0] - s0) / ruler.sigma) + F.softplus(-cfg.beta * (s0 - s[1]) / ruler.sigma)
    coh, dnll = nll_hinge(p.lp0, p.lp, p.mask, cfg.coherence_tau)
    g = mono_gap(p.lp0, p.lp, p.mask)
    mono = F.relu(cfg.mono_margin - g[0]) + F.relu(cfg.mono_margin + g[1])
    even, _ = even_change(p.lp0, p.lp, p.mask)  # its mean is −dnll: the mean over ±1 of ΔNLL is its even part
    loss = sep.mean() + omega * (cfg.coherence_weight * coh + cfg.mono_weight * mono.mean() + cfg.even_weight * even)
    metrics = {
        "sep": sep.mean().item(),
        "coh": coh.item(),
        "mono": mono.mean().item(),
        "ds_plus": ((s[0] - s0) / ruler.sigma).mean().item(),
        "ds_minus": ((s0 - s[1]) / ruler.sigma).mean().item(),
        "dnll": dnll,
    }
    return loss, metrics


def reprpo_svd(p: Passes, ruler: Ruler, cfg, omega: float = 1.0) -> tuple[torch.Tensor, dict]:
    """The ``reprpo-svd`` loss (module docstring) → (scalar, metrics)."""
    loss, m = _reprpo_terms(p, ruler, cfg, omega)
    return loss, {"loss": loss.item(), **m}


def antiparallel(p: Passes, ruler: Ruler, cfg, omega: float = 1.0) -> tuple[torch.Tensor, dict]:
    """The ``antiparallel`` loss (module docstring) → (scalar, metrics). Needs ``p.logp0``/``p.logp``."""
    if p.logp0 is None or p.logp is None:
        raise ValueError("antiparallel needs the full next-token distributions (Passes.logp0 / logp)")
    n = p.n_pairs
    scale = ruler.spread
    d0 = ruler.pair_difference(p.h0, n)[0] / scale  # (N, k)
    d = ruler.pair_difference(p.h.reshape(-1, *p.h.shape[2:]), n) / scale  # (2, N, k)
    delta = d - d0.unsqueeze(0)
    cos_p = F.cosine_similarity(delta[0], d0, dim=-1)
    cos_m = F.cosine_similarity(delta[1], d0, dim=-1)
    focus = torch.ones_like(cos_p)
    if ruler.basis.shape[1] < ruler.basis.shape[0]:  # the share of the change inside the subspace
        full = p.h.reshape(2, 2, n, *p.h.shape[2:]).mean(3)  # (2 c, pos/neg, N, d)
        full0 = p.h0.view(2, n, *p.h0.shape[1:]).mean(2)  # (pos/neg, N, d)
        dfull = (full[:, 0] - full[:, 1]) - (full0[0] - full0[1]).unsqueeze(0)  # (2, N, d)
        inside = ((dfull @ ruler.basis) ** 2).sum(-1)
        focus = (inside / (dfull**2).sum(-1).clamp_min(1e-12)).mean(0).detach()
    proj = 0.5 * ((1 - cos_p) + (1 + cos_m)) * focus
    u_hat = ruler.u * scale / ruler.sigma  # ⟨δ, û⟩ = ⟨Δ, u⟩ / σ: the shift along u in σ units
    mag = F.softplus(-cfg.beta * (delta[0] @ u_hat)) + F.softplus(cfg.beta * (delta[1] @ u_hat))
    tv, tv_mean = tv_barrier(p.logp0, p.logp, p.mask, cfg.tv_kappa, cfg.tv_tau)
    g = mono_gap(p.lp0, p.lp, p.mask)
    mono = F.relu(cfg.mono_margin - g[0]) + F.relu(cfg.mono_margin + g[1])
    loss = proj.mean() + mag.mean() + omega * (cfg.tv_weight * tv + cfg.mono_weight * mono.mean())
    s0 = ruler.separation(p.h0, n)[0]
    s = ruler.separation(p.h.reshape(-1, *p.h.shape[2:]), n)
    _, dnll = nll_hinge(p.lp0, p.lp, p.mask, cfg.coherence_tau)
    metrics = {
        "loss": loss.item(),
        "proj": proj.mean().item(),
        "mag": mag.mean().item(),
        "tv": tv.item(),
        "tv_mean": tv_mean,
        "mono": mono.mean().item(),
        "cos_plus": cos_p.mean().item(),
        "cos_minus": cos_m.mean().item(),
        "focus": float(focus.mean()),
        "ds_plus": ((s[0] - s0) / ruler.sigma).mean().item(),
        "ds_minus": ((s0 - s[1]) / ruler.sigma).mean().item(),
        "dnll": dnll,
    }
    return loss, metrics


def anchored(p: Passes, ruler: Ruler, cfg, omega: float = 1.0) -> tuple[torch.Tensor, dict]:
    """The ``anchored`` loss (module docstring) → (scalar, metrics). Needs the persona-free rows of ``p``."""
    if p.free0 is None or p.free is None:
        raise ValueError("anchored needs persona-free prompts (ContrastivePair.neutral) in the batch")
    loss, m = _reprpo_terms(p, ruler, cfg, omega)
    a0 = (p.free0 @ ruler.basis @ ruler.u).mean(-1)  # (N,)
    a = (p.free @ ruler.basis @ ruler.u).mean(-1)  # (2, N)
    shift = (a - a0.unsqueeze(0)) / ruler.sigma
    l_shift = F.relu(cfg.shift_target - shift[0]) + F.relu(cfg.shift_target + shift[1])
    coh_free, dnll_free = nll_hinge(p.free_lp0, p.free_lp, p.free_mask, cfg.coherence_tau)
    even_free, _ = even_change(p.free_lp0, p.free_lp, p.free_mask)
    loss = (
        loss
        + cfg.shift_weight * l_shift.mean()
        + omega * (cfg.coherence_weight * coh_free + cfg.even_weight * even_free)
    )
    return loss, {
        "loss": loss.item(),
        **m,
        "shift_plus": shift[0].mean().item(),
        "shift_minus": -shift[1].mean().item(),
        "coh_free": coh_free.item(),
        "dnll_free": dnll_free,
    }


LOSSES = {"reprpo-svd": reprpo_svd, "antiparallel": antiparallel, "anchored": anchored}
