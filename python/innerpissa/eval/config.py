"""One object for what an evaluation reads and how: methods, KL budget, datasets, engine.

:class:`EvalConfig` is what ``ipissa eval`` and ``ipissa run`` hand to the evaluator; ``validate`` checks every
field before any model loads, so a typo fails in a second, not after minutes of training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from ..errors import ConfigError


class EngineChoice(str, Enum):
    """Which forward pass evaluates: ``rust`` (GGUF models it reads, every coefficient in one pass), ``torch``
    (transformers, any model) or ``auto`` (rust where the model is such a GGUF file, else torch)."""

    auto = "auto"
    torch = "torch"
    rust = "rust"


class WeightsChoice(str, Enum):
    """The Rust engine's weights: ``f32`` (de-quantized; matches torch), ``native`` (the GGUF's quantized blocks)
    or ``q8_0`` (int8 blocks). The last two save memory only (docs/benchmarks.md)."""

    f32 = "f32"
    native = "native"
    q8_0 = "q8_0"


@dataclass
class EvalConfig:
    """Evaluation settings (the ``ipissa eval`` options of the same names).

    Attributes:
        methods: method names (``innerpissa``, ``prompting``, ``pca``, ``mean-diff``, ``random``).
        kl_budget: the common coherence budget, nats/token of KL(p₀ ‖ p_c) on neutral text.
        data_dir: folder with ``dailydilemmas/`` and ``anthropic_mwe/`` (None: the default search).
        n_target, n_other, n_dd: items per target persona set, per off-target set, DailyDilemmas situations.
        truthfulqa: TruthfulQA.csv to add as a multiple-choice set, or None.
        batch_size: prompts per forward pass.
        dd_file, dd_value: DailyDilemmas in the per-action layout and the value that labels its items.
        mwe: model-written-eval JSONL files replacing the persona sets.
        engine, weights: see :class:`EngineChoice`, :class:`WeightsChoice`.
        seed: item sampling, dev/test split and the random vector.
        dev_items: also score the dev items (``run_suite(score_other_split=True)``); the reported test numbers
            are the same either way.
    """

    methods: tuple[str, ...] = ("innerpissa", "prompting", "pca", "mean-diff", "random")
    kl_budget: float = 0.05
    data_dir: Path | None = None
    n_target: int = 64
    n_other: int = 16
    n_dd: int = 48
    truthfulqa: Path | None = None
    batch_size: int = 32
    dd_file: Path | None = None
    dd_value: str | None = None
    mwe: list[Path] = field(default_factory=list)
    engine: EngineChoice = EngineChoice.auto
    weights: WeightsChoice = WeightsChoice.f32
    seed: int = 0
    dev_items: bool = False

    def validate(self) -> EvalConfig:
        """Check every field without loading a model; returns self.

        Raises:
            ConfigError: an unknown method, a bad budget, engine or weights, a non-positive count.
            EvalDataError: a TruthfulQA file that does not parse (read here, before any compute).
        """
        from .datasets import load_truthfulqa
        from .methods import check_methods
        from .metrics import check_budget

        if isinstance(self.methods, str):
            self.methods = tuple(self.methods.split(","))
        self.methods = check_methods(self.methods)
        self.kl_budget = check_budget(self.kl_budget)
        for name, enum in (("engine", EngineChoice), ("weights", WeightsChoice)):
            try:
                setattr(self, name, enum(getattr(self, name)))
            except ValueError:
                allowed = ", ".join(e.value for e in enum)
                raise ConfigError(
                    f"--{name} must be one of {allowed}; got {getattr(self, name)!r}", field=name
                ) from None
        for name in ("n_target", "n_other", "n_dd", "batch_size"):
            v = getattr(self, name)
            least = 1 if name == "batch_size" else 0
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be a whole number >= {least}, got {v!r}", field=name
                )
        if self.truthfulqa is not None:
            load_truthfulqa(self.truthfulqa)
        return self
