"""Hyperparameters of an InnerPiSSA adapter (DESIGN.md §2)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class AdapterConfig:
    """Which layers to adapt and how.

    Attributes:
        rank: r, the number of top singular directions adapted per layer. ``None`` -> hidden_size // 8
            (DESIGN §2: r ≈ d/8–d/4).
        depth_range: (start, stop) as fractions of depth; adapted layers are those from round(start·L) up to
            L−3 when stop is None, else up to round(stop·L) (inclusive). Default (0.3, None).
        n_layers: adapt this many evenly spaced layers of the range; ``None`` adapts all of them.
        modules: which residual writers to adapt in each block: ``"attn"`` (attention output projection)
            and/or ``"mlp"`` (MLP down projection). Found by structure, not by name.
        scale: ``"additive"`` (S + cδ, default) or ``"multiplicative"`` (S ⊙ exp(cδ)).
        rotate: learn the Cayley rotation of V (``False`` leaves only the singular-value offset, which makes
            M(c) = c·diag(δ) exactly linear in c).
        init_std: standard deviation of the initial skew generator A and offset δ (small and non-zero, so the
            c = +1 and c = −1 gradients do not cancel at the first step).
        seed: seed of that initialisation.
    """

    rank: int | None = None
    depth_range: tuple[float, float | None] = (0.3, None)
    n_layers: int | None = None
    modules: tuple[str, ...] = ("attn", "mlp")
    scale: str = "additive"
    rotate: bool = True
    init_std: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.scale not in ("additive", "multiplicative"):
            raise ValueError(f"AdapterConfig.scale must be 'additive' or 'multiplicative', got {self.scale!r}")
        bad = set(self.modules) - {"attn", "mlp"}
        if bad or not self.modules:
            raise ValueError(f"AdapterConfig.modules must be a non-empty subset of ('attn', 'mlp'), got {self.modules}")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"AdapterConfig.rank must be >= 1, got {self.rank}")
        self.depth_range = tuple(self.depth_range)
        self.modules = tuple(self.modules)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AdapterConfig":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)
