"""Steering methods compared in one evaluator (docs/design.md §6), all built from the same contrastive pairs.

A method has a ``name``, a symmetric ``coeffs`` sweep (0 included), a ``kind`` that tells the engines how to
apply it, ``steer(c)`` (a torch context manager; a no-op for prompting) and ``user_prefix(c)`` (text put at the
start of the user turn; None except for prompting). c = 0 is the unsteered model for every method.

- ``AdapterMethod`` (kind ``"adapter"``): the trained InnerPiSSA adapter (``with adapter.steer(c)``), or an adapter
  directory for the Rust engine.
- ``PromptMethod`` (kind ``"prompt"``): the persona sentence, positive at c > 0 and negative at c < 0, put at the
  start of the user turn — where the training pairs put it — while the chat template's default system prompt is
  kept at every c (replacing the system turn only at c ≠ 0 would confound the baseline).
- ``VectorMethod`` (kind ``"vector"``): add c·v_ℓ to the output of decoder block ℓ (activation addition, as repeng's
  ControlModel and llama.cpp's ``--control-vector`` do). Made by ``pca_control_vector`` (the real ``repeng``
  library, PCA of paired differences, Zou et al. 2023 / Vogel 2024), ``mean_difference_control_vector`` (CAA,
  Rimsky et al. 2024) or ``random_control_vector`` (random directions, norm matched per layer).
- ``HookMethod`` (kind ``"hook"``): any torch context manager factory; torch engine only (tests, custom methods).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..adapter import Adapter, decoder_blocks
from ..errors import ConfigError, NonFiniteError
from ..hooks import capture_outputs, forward_hooks, on_model_device, run_until, shift_output
from ..pairs import ContrastivePair, persona_instruction
from .engines import check_sweep_coeffs

KNOWN_METHODS = ("innerpissa", "prompting", "pca", "mean-diff", "random")


@dataclass
class AdapterMethod:
    """The InnerPiSSA adapter at coefficient c (an ``Adapter``, or a saved adapter directory for the Rust engine)."""

    adapter: Adapter | str
    coeffs: tuple[float, ...] = (-2.0, -1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0, 2.0)
    name: str = "innerpissa"
    kind: str = "adapter"

    def __post_init__(self) -> None:
        self.coeffs = check_sweep_coeffs(self.coeffs)

    def steer(self, c: float):
        return self.adapter.steer(c)

    def user_prefix(self, c: float) -> str | None:
        return None


@dataclass
class PromptMethod:
    """Persona prompting: ``persona_instruction(c > 0)`` at the start of the user turn for c ≠ 0; |c| is ignored."""

    coeffs: tuple[float, ...] = (-1.0, 0.0, 1.0)
    name: str = "prompting"
    kind: str = "prompt"
    instruction: Callable[[bool], str] = persona_instruction

    def __post_init__(self) -> None:
        self.coeffs = check_sweep_coeffs(self.coeffs)

    def steer(self, c: float):
        return contextlib.nullcontext()

    def user_prefix(self, c: float) -> str | None:
        return None if c == 0 else self.instruction(c > 0)


@dataclass
class VectorMethod:
    """Activation addition: block ℓ's output += c·directions[ℓ] at every position. directions[ℓ]: (d,)."""

    model: torch.nn.Module | None
    directions: dict[int, torch.Tensor]
    coeffs: tuple[float, ...] = (-8.0, -4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0, 8.0)
    name: str = "pca"
    meta: dict = field(default_factory=dict)
    kind: str = "vector"

    def __post_init__(self) -> None:
        self.coeffs = check_sweep_coeffs(self.coeffs)
        bad = [k for k, v in self.directions.items() if not torch.isfinite(torch.as_tensor(v)).all()]
        if bad:
            raise NonFiniteError(f"control vector {self.name!r} holds NaN/inf at blocks {bad}", field=self.name)

    @contextlib.contextmanager
    def steer(self, c: float):
        if c == 0:
            yield
            return
        blocks = decoder_blocks(self.model)
        # c · v added to the block's output at every position (activation addition, Turner et al. 2023)
        hooks = [(blocks[layer], shift_output(lambda _h, v=vec: c * v)) for layer, vec in self.directions.items()]
        with forward_hooks(hooks):
            yield

    def user_prefix(self, c: float) -> str | None:
        return None


@dataclass
class HookMethod:
    """A method given as ``make(c) -> context manager`` around torch forward passes (torch engine only)."""

    make: Callable[[float], contextlib.AbstractContextManager]
    coeffs: tuple[float, ...] = (-1.0, 0.0, 1.0)
    name: str = "hook"
    kind: str = "hook"

    def __post_init__(self) -> None:
        self.coeffs = check_sweep_coeffs(self.coeffs)

    def steer(self, c: float):
        return self.make(c) if c != 0 else contextlib.nullcontext()

    def user_prefix(self, c: float) -> str | None:
        return None


def check_methods(names) -> tuple[str, ...]:
    """Validate method names before any compute (a typo must not give an empty report).

    Raises:
        ConfigError: an unknown or empty name, or no names at all.
    """
    names = tuple(n.strip() for n in names)
    unknown = [n for n in names if n not in KNOWN_METHODS]
    if unknown or not names:
        raise ConfigError(
            f"--methods: unknown method(s) {unknown or names}; choose from {', '.join(KNOWN_METHODS)}", field="methods"
        )
    return names


def build_methods(
    model,
    tokenizer,
    adapter: Adapter | str | None,
    pairs: list[ContrastivePair],
    seed: int,
    include: tuple[str, ...] = KNOWN_METHODS,
    layers: list[int] | None = None,
    adapter_coeffs=None,
    vector_coeffs=None,
    engine=None,
    instruction: Callable[[bool], str] | None = None,
) -> list:
    """The steering methods to compare, all from the same ``pairs``.

    Vectors (PCA, mean-difference, random) act on ``layers`` (default: the adapter's layers, or 30 %..L−3). The
    PCA direction (unit length from repeng's recipe) is scaled at each layer to the norm of the mean-difference
    vector there, and the random one has the PCA vector's norm, so c means the same size of push for all three
    and on every model (unit directions were far too small for Gemma 3's residual stream: c = 8 spent 6e-5 nats of
    KL); all three sweep c in ±{0.25, 0.5, 1, 2} unless ``vector_coeffs`` is given.
    With ``engine`` (a ``RustEngine``) their hidden states come from the Rust engine and ``model`` may be None.
    ``instruction(positive) -> str`` is the prompting baseline's persona sentence (default: honesty's).

    Raises:
        ConfigError: an unknown method name.
    """
    include = check_methods(include)
    methods = []
    if adapter is not None and "innerpissa" in include:
        methods.append(
            AdapterMethod(adapter) if adapter_coeffs is None else AdapterMethod(adapter, tuple(adapter_coeffs))
        )
    if "prompting" in include:
        methods.append(PromptMethod() if instruction is None else PromptMethod(instruction=instruction))
    vec_names = [n for n in ("pca", "mean-diff", "random") if n in include]
    if vec_names:
        if layers is None:
            from ..adapter.config import AdapterConfig
            from ..adapter.targets import select_layers

            cfg = adapter.config if isinstance(adapter, Adapter) else AdapterConfig()
            n_blocks = engine.config["n_layer"] if engine is not None else len(decoder_blocks(model))
            layers = select_layers(n_blocks, cfg)
        grid = (-2.0, -1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0, 2.0)
        kw = {"coeffs": tuple(vector_coeffs) if vector_coeffs is not None else grid}
        if engine is not None:
            from .rust_engine import mean_difference_control_vector as rust_md
            from .rust_engine import pca_control_vector as rust_pca

            md = rust_md(engine, pairs, layers)
            pca = rust_pca(engine, pairs, layers) if {"pca", "random"} & set(include) else None
        else:
            md = mean_difference_control_vector(model, tokenizer, pairs, layers)
            pca = pca_control_vector(model, tokenizer, pairs, layers) if {"pca", "random"} & set(include) else None
        if pca is not None:  # c in the units of the pairs' own difference, on every model (not |v| = 1)
            pca = {ell: v * md[ell].norm() for ell, v in pca.items()}
        if "pca" in include:
            methods.append(VectorMethod(model, pca, name="pca", **kw))
        if "mean-diff" in include:
            methods.append(VectorMethod(model, md, name="mean-diff", **kw))
        if "random" in include:
            methods.append(VectorMethod(model, random_control_vector(pca, seed), name="random", **kw))
    return methods


def _import_repeng():
    """Import repeng 0.4.0 under numpy 2.

    repeng 0.4.0 annotates with ``np.float_``, removed in numpy 2.0 (it is an alias of ``np.float64``); the alias
    is restored before import. repeng is installed with ``--no-deps`` because it pins numpy < 2.
    """
    if not hasattr(np, "float_"):
        np.float_ = np.float64  # type: ignore[attr-defined]
    import repeng

    return repeng


def pca_control_vector(
    model, tokenizer, pairs: list[ContrastivePair], layers: list[int], batch_size: int = 32
) -> dict[int, torch.Tensor]:
    """Train a PCA control vector with repeng (``ControlVector.train``, method ``pca_diff``) on ``pairs``.

    Returns unit directions per block index, (d,) fp32, signed so that +c moves toward the positive prompts.
    """
    repeng = _import_repeng()
    dataset = [repeng.DatasetEntry(positive=p.positive, negative=p.negative) for p in pairs]
    padding_side = tokenizer.padding_side
    try:
        vec = repeng.ControlVector.train(
            model, tokenizer, dataset, hidden_layers=layers, batch_size=batch_size, method="pca_diff"
        )
    finally:
        tokenizer.padding_side = padding_side
    return {int(k): torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in vec.directions.items()}


@torch.no_grad()
def last_token_states(
    model: torch.nn.Module, tokenizer, texts: list[str], layers: list[int], batch_size: int = 16
) -> dict[int, torch.Tensor]:
    """Decoder-block outputs at each text's last token: {block ℓ: (n, d) float32}. Texts are used verbatim
    (no special tokens added), left-padded, so position −1 is every row's last real token."""
    from ..prompts import left_pad

    blocks = decoder_blocks(model)
    out: dict[int, list[torch.Tensor]] = {ell: [] for ell in layers}
    with capture_outputs({ell: blocks[ell] for ell in layers}, lambda h: h[:, -1].float().cpu()) as captured:
        for i in range(0, len(texts), batch_size):
            seqs = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts[i : i + batch_size]]
            ids, mask, pos = on_model_device(model, *left_pad(seqs, tokenizer.pad_token_id))
            top = blocks[max(layers)]  # nothing above the highest block read is run
            run_until(model, top, input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
            for ell in layers:
                out[ell].append(captured[ell])
    return {ell: torch.cat(v) for ell, v in out.items()}


def mean_difference_control_vector(
    model, tokenizer, pairs: list[ContrastivePair], layers: list[int], batch_size: int = 16
) -> dict[int, torch.Tensor]:
    """Mean-difference (CAA) control vector: v_ℓ = mean over pairs of h_ℓ(positive) − h_ℓ(negative).

    h_ℓ is decoder block ℓ's output at the last prompt token (``last_token_states``). Not normalised: c = 1
    shifts block ℓ by the average positive − negative gap. Source: Rimsky et al. 2024 (Contrastive Activation
    Addition); Turner et al. 2023 (ActAdd). Returns {ℓ: (d,) fp32}.
    """
    pos = last_token_states(model, tokenizer, [p.positive for p in pairs], layers, batch_size)
    neg = last_token_states(model, tokenizer, [p.negative for p in pairs], layers, batch_size)
    return {ell: (pos[ell] - neg[ell]).mean(0) for ell in layers}


def random_control_vector(like: dict[int, torch.Tensor], seed: int) -> dict[int, torch.Tensor]:
    """Random directions with the same per-layer norms as ``like`` (a matched-norm null baseline)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for layer, vec in like.items():
        r = torch.randn(vec.shape, generator=gen)
        out[layer] = r / r.norm() * vec.norm()
    return out
