"""Hyperparameters of an InnerPiSSA adapter (docs/design.md §2)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from ..errors import ConfigError

#: values of ``AdapterConfig.modules``: sublayer roles and groups (``adapter.targets.sublayers``)
MODULE_CHOICES = ("attn", "mlp", "o", "down", "q", "k", "v", "gate", "up", "writers", "readers")


@dataclass
class AdapterConfig:
    """Which layers to adapt and how.

    Attributes:
        rank: r, the number of top singular directions adapted per layer. ``None`` -> hidden_size // 8
            (docs/design.md §2: r ≈ d/8–d/4).
        depth_range: (start, stop) as fractions of depth; adapted layers are those from round(start·L) up to
            L−3 when stop is None, else up to round(stop·L) (inclusive). Default (0.3, None).
        n_layers: adapt this many evenly spaced layers of the range; ``None`` adapts all of them.
        modules: which linear layers of each block to adapt, found by structure, not by name: the residual
            writers ``"attn"`` (attention output projection, alias ``"o"``) and ``"mlp"`` (MLP down projection,
            alias ``"down"``); the readers ``"q"``, ``"k"``, ``"v"``, ``"gate"``, ``"up"``; and the groups
            ``"writers"`` (o, down) and ``"readers"`` (q, k, v, gate, up). Default: the two writers.
        scale: ``"additive"`` (S + cδ, default) or ``"multiplicative"`` (S ⊙ exp(cδ)).
        rotate_side: which singular vectors the Cayley rotation turns: ``"v"`` (the input side, default;
            M(c) = diag(S′) R(c)ᵀ − diag(S)) or ``"u"`` (the output side; M(c) = R(c) diag(S′) − diag(S), the
            transpose of the former with the same parameters), for the ablation of the rotation's side.
        rotate: learn the Cayley rotation of V (``False`` leaves only the singular-value offset, which makes
            M(c) = c·diag(δ) exactly linear in c).
        init_std: standard deviation of the initial skew generator A and offset δ (small and non-zero, so the
            c = +1 and c = −1 gradients do not cancel at the first step).
        seed: seed of that initialisation.
        select: which singular components each layer adapts: ``"top"`` (the top r, default) or ``"data"`` (r of
            the top 4r chosen by how much the training pairs' residual states use them; ``attach(..., pairs=,
            tokenizer=)``, see ``adapter.model.data_aware_components``; the idea of AntiPaSTO, arXiv 2601.07473).
    """

    rank: int | None = None
    depth_range: tuple[float, float | None] = (0.3, None)
    n_layers: int | None = None
    modules: tuple[str, ...] = ("attn", "mlp")
    scale: str = "additive"
    rotate: bool = True
    rotate_side: str = "v"
    init_std: float = 1e-3
    seed: int = 0
    select: str = "top"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, source: str | None = None) -> None:
        """Check every field's type and range.

        Raises:
            ConfigError: naming the field (and ``source``, e.g. the adapter_config.json path) and what is allowed.
        """

        def bad(field: str, want: str, got) -> ConfigError:
            return ConfigError(f"field {field!r} must be {want}, got {got!r}", path=source, field=field)

        def is_int(x) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        def is_num(x) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        if self.rank is not None and not (is_int(self.rank) and self.rank >= 1):
            raise bad("rank", "an integer >= 1 or null", self.rank)
        dr = self.depth_range
        if not isinstance(dr, (list, tuple)) or len(dr) != 2:
            raise bad("depth_range", "a pair [start, stop] of fractions of depth (stop may be null)", dr)
        start, stop = dr
        if not (is_num(start) and 0 <= start <= 1):
            raise bad("depth_range", "[start, stop] with 0 <= start <= 1", dr)
        if stop is not None and not (is_num(stop) and start <= stop <= 1):
            raise bad("depth_range", "[start, stop] with start <= stop <= 1 (or stop null)", dr)
        if self.n_layers is not None and not (is_int(self.n_layers) and self.n_layers >= 1):
            raise bad("n_layers", "an integer >= 1 or null", self.n_layers)
        mods = self.modules
        if (
            not isinstance(mods, (list, tuple))
            or not mods
            or not all(isinstance(m, str) for m in mods)
            or set(mods) - set(MODULE_CHOICES)
        ):
            raise bad("modules", f"a non-empty list drawn from {', '.join(map(repr, MODULE_CHOICES))}", mods)
        if self.scale not in ("additive", "multiplicative"):
            raise bad("scale", "'additive' or 'multiplicative'", self.scale)
        if not isinstance(self.rotate, bool):
            raise bad("rotate", "true or false", self.rotate)
        if self.rotate_side not in ("v", "u"):
            raise bad("rotate_side", "'v' or 'u'", self.rotate_side)
        if not (is_num(self.init_std) and self.init_std >= 0):
            raise bad("init_std", "a finite number >= 0", self.init_std)
        if not is_int(self.seed):
            raise bad("seed", "an integer", self.seed)
        if self.select not in ("top", "data"):
            raise bad("select", "'top' or 'data'", self.select)
        self.depth_range = tuple(dr)
        self.modules = tuple(mods)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str | None = None) -> AdapterConfig:
        """Build from a dict (``adapter`` of adapter_config.json); ``source`` names the file in errors.

        Raises:
            ConfigError: not a dict, an unknown field, or a field of the wrong type or range.
        """
        if not isinstance(d, dict):
            raise ConfigError(
                f"field 'adapter' must be an object, got {type(d).__name__}", path=source, field="adapter"
            )
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(
                f"unknown adapter field(s) {unknown}; known: {sorted(names)}", path=source, field=unknown[0]
            )
        cfg = cls.__new__(cls)
        for f in fields(cls):
            setattr(cfg, f.name, d.get(f.name, f.default))
        cfg.validate(source)
        return cfg
