"""``TrainConfig``: the training recipe's hyperparameters, validated on construction (``docs/tuning.md`` has the
search that chose the defaults)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from ..directions import DIRECTIONS
from ..errors import ConfigError
from .objectives import BASES, OBJECTIVES


@dataclass
class TrainConfig:
    """Training hyperparameters. The defaults are the recipe chosen by the dev-split search on SmolLM2 (the
    sentiment positive control; ``docs/tuning.md`` has the table): the ``anchored`` objective read through a PCA
    basis at 0.7 depth, one-cycle schedule with the constraints warmed up over the first 20 %, rotation angles
    bounded by π/4, weight decay 1e-4, 90 steps of 8 pairs (2 epochs of the 360 built-in training pairs)."""

    steps: int = 90
    batch_pairs: int = 8
    direction_pairs: int = 128  # training pairs used to measure the preference direction
    val_pairs: int = 24  # validation pairs scored every val_every steps
    lr: float = 3e-3
    weight_decay: float = 1e-4
    loss_layer: float = 0.7  # fraction of depth whose block output is read
    last_k: int = 4  # tokens at the end of each sequence used for the separation
    beta: float = 1.0
    coherence_tau: float = 0.5  # nats per token of free ΔNLL
    coherence_weight: float = 1.0
    mono_margin: float = 0.1  # nats
    mono_weight: float = 1.0
    even_weight: float = 0.0  # > 0: penalise the part of the suffix ΔNLL that is the same at c = +1 and −1
    max_suffix_tokens: int = 24
    val_every: int = 25
    checkpoint_every: int = 25
    max_loss_factor: float = 100.0  # stop when the objective's loss (answer-bias term excluded) > this × max(1, first)
    seed: int = 0
    objective: str = "anchored"  # objectives.OBJECTIVES
    basis: str = "pca"  # the ruler's basis: adapter-u (the adapted writer's U) or pca (base-model PCA)
    basis_rank: int = 4  # k of the pca basis
    epochs: float = 0.0  # > 0: train this many passes over the training pairs (overrides steps)
    schedule: str = "one-cycle"  # cosine (10-step warm-up, cosine to 0) or one-cycle (10 % warm-up, lr/25 at end)
    constraint_warmup: float = 0.2  # fraction of training over which the constraint terms ramp from 0 to 1
    max_angle: float = 0.7854  # radians (π/4); > 0 bounds the Cayley rotation at |c| = 1 (‖A‖₂ ≤ 2 tan(angle / 2))
    tv_kappa: float = 0.9  # antiparallel: TV threshold κ·√(H₀ + 0.02)
    tv_weight: float = 10.0
    tv_tau: float = 0.0  # 0: mean over tokens; > 0: soft maximum with this temperature
    shift_target: float = 0.5  # anchored: persona-free shift at c = ±1, in σ units
    shift_weight: float = 1.0
    share_prefix: bool = True  # run the shared prompt prefix once per c, the blocks below the adapter once for all c
    direction: str = "mean-diff"  # the ruler's u in its basis: directions.DIRECTIONS
    fisher_damping: float = 1e-5  # direction "fisher": λ relative to the mean eigenvalue of the Fisher matrix
    bias_weight: float = 0.0  # > 0: the answer-bias guard (innerpissa.train.guard) with this weight
    bias_batch: int = 8  # guard questions per step

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check types and ranges of every field.

        Raises:
            ConfigError: naming the field and the allowed range.
        """
        positive_int = (
            "steps",
            "batch_pairs",
            "direction_pairs",
            "last_k",
            "max_suffix_tokens",
            "val_every",
            "checkpoint_every",
            "basis_rank",
            "bias_batch",
        )
        choices = {
            "objective": tuple(OBJECTIVES),
            "basis": BASES,
            "schedule": ("cosine", "one-cycle"),
            "direction": DIRECTIONS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"TrainConfig.{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}", field=name
                )
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in choices:
                continue
            if f.type in ("bool", bool):
                if not isinstance(v, bool):
                    raise ConfigError(f"TrainConfig.{f.name} must be true or false, got {v!r}", field=f.name)
                continue
            if f.type in ("int", int) or f.name in positive_int or f.name in ("val_pairs", "seed"):
                if isinstance(v, bool) or not isinstance(v, int):
                    raise ConfigError(f"TrainConfig.{f.name} must be an integer, got {v!r}", field=f.name)
            elif isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"TrainConfig.{f.name} must be a finite number, got {v!r}", field=f.name)
        for name in positive_int:
            if getattr(self, name) < 1:
                raise ConfigError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}", field=name)
        rules = {
            "val_pairs": (0, None),
            "lr": (0, None),
            "weight_decay": (0, None),
            "beta": (0, None),
            "coherence_tau": (0, None),
            "coherence_weight": (0, None),
            "mono_weight": (0, None),
            "even_weight": (0, None),
            "loss_layer": (0, 1),
            "max_loss_factor": (1, None),
            "epochs": (0, None),
            "constraint_warmup": (0, 1),
            "max_angle": (0, 3.0),
            "tv_kappa": (0, None),
            "tv_weight": (0, None),
            "tv_tau": (0, None),
            "shift_target": (0, None),
            "shift_weight": (0, None),
            "fisher_damping": (0, None),
            "bias_weight": (0, None),
        }
        for name, (lo, hi) in rules.items():
            v = getattr(self, name)
            strict = name in ("lr", "beta", "loss_layer", "fisher_damping")
            if (v <= lo if strict else v < lo) or (hi is not None and v > hi):
                rng = f"{'>' if strict else '>='} {lo}" + (f" and <= {hi}" if hi is not None else "")
                raise ConfigError(f"TrainConfig.{name} must be {rng}, got {v}", field=name)

    def total_steps(self, n_train: int) -> int:
        """Optimizer steps: ``ceil(epochs · n_train / batch_pairs)`` when ``epochs`` > 0, else ``steps``."""
        return max(1, math.ceil(self.epochs * n_train / self.batch_pairs)) if self.epochs > 0 else self.steps


def parse_overrides(items: list[str]) -> dict:
    """``FIELD=VALUE`` strings (the CLI's ``--set``) as ``TrainConfig`` keyword arguments, each VALUE converted to
    the field's type (bool: 1/true/yes or 0/false/no). The values are range-checked when the config is built.

    Raises:
        ConfigError: naming the item, when it is not ``FIELD=VALUE``, FIELD is not a TrainConfig field, or VALUE
            does not convert.
    """
    types = {f.name: type(f.default) for f in fields(TrainConfig)}
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or name not in types:
            raise ConfigError(
                f"--set {item}: expected FIELD=VALUE with FIELD one of TrainConfig's fields ({', '.join(types)})",
                field=name or item,
            )
        kind = types[name]
        try:
            if kind is bool:
                if value.lower() not in ("1", "true", "yes", "0", "false", "no"):
                    raise ValueError(value)
                out[name] = value.lower() in ("1", "true", "yes")
            else:
                out[name] = kind(value)
        except ValueError:
            raise ConfigError(f"--set {item}: {value!r} is not of type {kind.__name__}", field=name) from None
    return out
