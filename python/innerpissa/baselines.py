"""Steering methods compared in one evaluator (DESIGN.md §6), all built from the same contrastive pairs.

A method maps a steering coefficient c to (a) a context in which the model runs and (b) an optional system
prompt. c = 0 is the unsteered model for every method, so the evaluator computes it once.

- ``AdapterMethod``: the trained InnerPiSSA adapter (``with adapter.steer(c)``).
- ``PromptMethod``: persona system prompt; c = +1 positive persona, 0 none, −1 negative persona.
- ``VectorMethod``: add c·v_ℓ to the output of decoder block ℓ (activation addition, as repeng's ControlModel
  and llama.cpp's ``--control-vector`` do). Made by ``pca_control_vector`` (the real ``repeng`` library,
  PCA of paired differences, Zou et al. 2023 / Vogel 2024), ``mean_difference_control_vector`` (CAA, Rimsky
  et al. 2024) or ``random_control_vector`` (random unit directions, norm matched per layer).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import NonFiniteError
from .adapter import Adapter, decoder_blocks
from .evaluate import check_sweep_coeffs
from .pairs import ContrastivePair, persona_instruction


@dataclass
class AdapterMethod:
    adapter: Adapter
    coeffs: tuple[float, ...] = (-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0)
    name: str = "innerpissa"

    def __post_init__(self) -> None:
        self.coeffs = check_sweep_coeffs(self.coeffs)

    def steer(self, c: float):
        return self.adapter.steer(c)

    def system(self, c: float) -> str | None:
        return None


@dataclass
class PromptMethod:
    coeffs: tuple[float, ...] = (-1.0, 0.0, 1.0)
    name: str = "prompting"

    def steer(self, c: float):
        return contextlib.nullcontext()

    def system(self, c: float) -> str | None:
        return None if c == 0 else persona_instruction(c > 0)


@dataclass
class VectorMethod:
    """Activation addition: block ℓ's output += c·directions[ℓ] at every position. directions[ℓ]: (d,)."""

    model: torch.nn.Module
    directions: dict[int, torch.Tensor]
    coeffs: tuple[float, ...] = (-4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0)
    name: str = "pca"
    meta: dict = field(default_factory=dict)

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
        handles = []

        def make_hook(vec: torch.Tensor):
            def hook(_m, _a, out):
                if isinstance(out, tuple):
                    return (out[0] + c * vec.to(out[0].dtype),) + out[1:]
                return out + c * vec.to(out.dtype)
            return hook

        try:
            for layer, vec in self.directions.items():
                handles.append(blocks[layer].register_forward_hook(make_hook(vec)))
            yield
        finally:
            for h in handles:
                h.remove()

    def system(self, c: float) -> str | None:
        return None


def _import_repeng():
    """Import repeng 0.4.0 under numpy 2.

    repeng 0.4.0 annotates with ``np.float_``, removed in numpy 2.0 (it is an alias of ``np.float64``); the alias
    is restored before import. repeng is installed with ``--no-deps`` because it pins numpy < 2.
    """
    if not hasattr(np, "float_"):
        np.float_ = np.float64  # type: ignore[attr-defined]
    import repeng

    return repeng


def pca_control_vector(model, tokenizer, pairs: list[ContrastivePair], layers: list[int],
                       batch_size: int = 32) -> dict[int, torch.Tensor]:
    """Train a PCA control vector with repeng (``ControlVector.train``, method ``pca_diff``) on ``pairs``.

    Returns unit directions per block index, (d,) fp32, signed so that +c moves toward the positive prompts.
    """
    repeng = _import_repeng()
    dataset = [repeng.DatasetEntry(positive=p.positive, negative=p.negative) for p in pairs]
    padding_side = tokenizer.padding_side
    try:
        vec = repeng.ControlVector.train(model, tokenizer, dataset, hidden_layers=layers, batch_size=batch_size,
                                         method="pca_diff")
    finally:
        tokenizer.padding_side = padding_side
    return {int(k): torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in vec.directions.items()}


@torch.no_grad()
def last_token_states(model: torch.nn.Module, tokenizer, texts: list[str], layers: list[int],
                      batch_size: int = 16) -> dict[int, torch.Tensor]:
    """Decoder-block outputs at each text's last token: {block ℓ: (n, d) float32}. Texts are used verbatim
    (no special tokens added), left-padded, so position −1 is every row's last real token."""
    from .train import left_pad

    blocks = decoder_blocks(model)
    device = next(model.parameters()).device
    captured: dict[int, torch.Tensor] = {}
    out: dict[int, list[torch.Tensor]] = {ell: [] for ell in layers}

    def make_hook(ell: int):
        def hook(_m, _a, o):
            captured[ell] = (o[0] if isinstance(o, tuple) else o)[:, -1].float().cpu()
        return hook

    handles = [blocks[ell].register_forward_hook(make_hook(ell)) for ell in layers]
    try:
        for i in range(0, len(texts), batch_size):
            seqs = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts[i:i + batch_size]]
            ids, mask, pos = left_pad(seqs, tokenizer.pad_token_id)
            model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                  logits_to_keep=1, use_cache=False)
            for ell in layers:
                out[ell].append(captured[ell])
    finally:
        for h in handles:
            h.remove()
    return {ell: torch.cat(v) for ell, v in out.items()}


def mean_difference_control_vector(model, tokenizer, pairs: list[ContrastivePair], layers: list[int],
                                   batch_size: int = 16) -> dict[int, torch.Tensor]:
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
