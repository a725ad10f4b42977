"""Training an InnerPiSSA adapter at c = +1 and c = −1 together (docs/design.md §3); losses are in ``objectives``.

Per step, for a batch of N contrastive pairs (positive, negative prompt sharing an assistant suffix):

1. the c = 0 pass (adapter skipped, exact base model, no grad): hidden states h⁰ at the loss block (last K
   tokens) and the log-probs of the assistant-suffix tokens. The base model never changes, so this pass is
   computed once per training pair the schedule draws, before the first step, and reused (``reference_cache``),
   except for objectives that read whole next-token distributions;
2. one steered pass over [pos; neg] at c = +1 and [pos; neg] at c = −1 (per-row coefficients, 4N rows), and for
   ``anchored`` the persona-free prompts at 0 and ±1.

The ruler (basis, preference direction u, σ) is measured once from the base model and frozen, so the adapter
cannot win by rotating it; the sign is fixed by construction: +c moves toward the positive persona. Recipe
options (``TrainConfig``): epochs or steps, cosine or one-cycle schedule, constraint warm-up, weight decay, a
bound on the rotation angle, the ruler's basis (the adapted writer's U, or a base-model PCA basis the adapter
does not control) and, through ``AdapterConfig.depth_range``, adapters only below the loss block.

"Suffix" tokens are those of the unfinished assistant reply the two prompts share (``ContrastivePair.suffix``);
``reprpo-svd`` version 1 also counted the shared end of the persona sentence and the chat-template tokens before
the reply, so its coherence and ordering terms mostly rewarded log p(" person" | persona words).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .adapter import Adapter
from .adapter.layer import skew
from .adapter.model import CONFIG_NAME, WEIGHTS_NAME, atomic_write, block_names, decoder_blocks
from .directions import DIRECTIONS, fisher_direction, mean_difference, pca_direction
from .errors import ConfigError, OutputExistsError, ResumeMismatchError, TrainingDivergedError
from .objectives import BASES, LOSSES, OBJECTIVES, Passes, Ruler, needs_full_distribution, needs_neutral
from .pairs import ContrastivePair
from .prompts import left_pad


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
    max_suffix_tokens: int = 24
    val_every: int = 25
    checkpoint_every: int = 25
    max_loss_factor: float = 100.0  # stop when the loss exceeds this × max(1, first loss): diverging
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
    share_prefix: bool = True  # run the prompt prefix all rows share once per coefficient (same result, faster)
    direction: str = "mean-diff"  # the ruler's u in its basis: directions.DIRECTIONS
    fisher_damping: float = 1e-5  # direction "fisher": λ relative to the mean eigenvalue of the Fisher matrix
    bias_weight: float = 0.0  # > 0: the answer-bias guard (innerpissa.guard) with this weight
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


@dataclass
class PairBatch:
    """Tokenized pairs, rows [pos_0..pos_{N-1}, neg_0..neg_{N-1}], left-padded to a common length T.

    input_ids, attention_mask, position_ids: (2N, T); suffix_mask: (2N, n_keep) marks the trailing tokens that
    positive and negative share (the suffix whose NLL is constrained), aligned to the last n_keep positions.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    suffix_mask: torch.Tensor

    @property
    def n_pairs(self) -> int:
        return self.input_ids.shape[0] // 2

    @property
    def n_rows(self) -> int:
        return self.input_ids.shape[0]

    def repeat(self, k: int) -> PairBatch:
        return PairBatch(
            *(t.repeat(k, 1) for t in (self.input_ids, self.attention_mask, self.position_ids, self.suffix_mask))
        )


def suffix_token_count(tokenizer, text: str, suffix: str) -> int:
    """How many trailing tokens of ``text`` (tokenized without special tokens) spell ``suffix``: the tokens where
    its tokenization departs from that of ``text`` without the suffix. 0 when ``suffix`` is empty or not the end of
    ``text``."""
    if not suffix or not text.endswith(suffix):
        return 0
    full = tokenizer(text, add_special_tokens=False)["input_ids"]
    head = tokenizer(text[: -len(suffix)], add_special_tokens=False)["input_ids"]
    k = 0
    while k < min(len(full), len(head)) and full[k] == head[k]:
        k += 1
    return len(full) - k


def tokenize_pairs(tokenizer, pairs: list[ContrastivePair], max_suffix_tokens: int = 24) -> PairBatch:
    """Tokenize pairs (no special tokens added: prompts are already rendered) into a left-padded PairBatch.

    The suffix mask of a pair covers the trailing tokens both prompts share **and** that spell its assistant
    suffix (``pair.suffix``; for pairs without one, the shared trailing tokens), at most ``max_suffix_tokens`` and
    at least the final token. n_keep (the mask's width, and the number of positions that get logits) is the
    longest suffix in the batch.
    """
    pos = [tokenizer(p.positive, add_special_tokens=False)["input_ids"] for p in pairs]
    neg = [tokenizer(p.negative, add_special_tokens=False)["input_ids"] for p in pairs]
    ids, mask, posids = left_pad(pos + neg, tokenizer.pad_token_id)
    cap = min(max_suffix_tokens, ids.shape[1] - 1)  # every kept token needs a predecessor
    commons = []
    for p, a, b in zip(pairs, pos, neg):
        common = 0
        while common < min(len(a), len(b), cap) and a[-1 - common] == b[-1 - common]:
            common += 1
        if p.suffix:
            common = min(
                common,
                suffix_token_count(tokenizer, p.positive, p.suffix),
                suffix_token_count(tokenizer, p.negative, p.suffix),
            )
        commons.append(max(common, 1))  # pairs with different endings: constrain at least the final token
    n_keep = max(commons)
    suffix = torch.zeros((2 * len(pairs), n_keep), dtype=torch.bool)
    for i, common in enumerate(commons):
        suffix[i, n_keep - common :] = True
        suffix[len(pairs) + i, n_keep - common :] = True
    return PairBatch(ids, mask, posids, suffix)


def tokenize_neutral(tokenizer, pairs: list[ContrastivePair], max_suffix_tokens: int = 24) -> PairBatch:
    """Tokenize the pairs' persona-free prompts (``pair.neutral``) → PairBatch of N rows (suffix mask: the tokens
    that spell ``pair.suffix``, at least the final one).

    Raises:
        ConfigError: a pair without a ``neutral`` prompt.
    """
    missing = [i for i, p in enumerate(pairs) if not p.neutral]
    if missing:
        raise ConfigError(
            f"{len(missing)} pairs have no persona-free prompt (ContrastivePair.neutral; pairs "
            f"{missing[:10]}); the anchored objective (the default) needs the built-in concept "
            "pairs or pairs that carry one; else train with objective='reprpo-svd' "
            "(--objective reprpo-svd)",
            field="objective",
        )
    rows = [tokenizer(p.neutral, add_special_tokens=False)["input_ids"] for p in pairs]
    ids, mask, posids = left_pad(rows, tokenizer.pad_token_id)
    cap = min(max_suffix_tokens, ids.shape[1] - 1)
    counts = [max(1, min(cap, suffix_token_count(tokenizer, p.neutral, p.suffix))) for p in pairs]
    n_keep = max(counts)
    suffix = torch.zeros((len(pairs), n_keep), dtype=torch.bool)
    for i, k in enumerate(counts):
        suffix[i, n_keep - k :] = True
    return PairBatch(ids, mask, posids, suffix)


def forward_states(
    model, batch: PairBatch, block: torch.nn.Module, last_k: int, full: bool = False, past_key_values=None
):
    """One forward pass → (hidden (B, last_k, d) at ``block``'s output, token log-probs (B, n_keep), and with
    ``full`` the whole next-token log-distributions (B, n_keep, V), else None).

    Only the last n_keep + 1 positions get logits (``logits_to_keep``), which keeps big-vocabulary models cheap.
    With ``past_key_values`` (a cache of a shared prefix), ``batch.attention_mask`` covers prefix + rows and the
    rows continue the prefix.
    """
    captured = {}

    def hook(_m, _a, out):
        captured["h"] = (out[0] if isinstance(out, tuple) else out)[:, -last_k:]

    n_keep = batch.suffix_mask.shape[1]
    handle = block.register_forward_hook(hook)
    try:
        out = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            logits_to_keep=n_keep + 1,
            past_key_values=past_key_values,
            use_cache=past_key_values is not None,
        )
    finally:
        handle.remove()
    logp = out.logits[:, :-1].float().log_softmax(-1)  # (B, n_keep, V)
    targets = batch.input_ids[:, -n_keep:]  # the tokens the kept positions predict
    token_logp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, n_keep)
    return captured["h"].float(), token_logp, (logp if full else None)


def shared_prefix_len(batch: PairBatch, keep_tail: int) -> int:
    """Length P of the token prefix every row of ``batch`` starts with (e.g. the system prompt and "Pretend
    you're"), limited so that each row keeps at least ``keep_tail`` tokens after it."""
    lengths = batch.attention_mask.sum(-1)
    t = batch.input_ids.shape[1]
    shortest = int(lengths.min())
    first = batch.input_ids[0, t - int(lengths[0]) :]
    p = min(shortest - keep_tail, first.shape[0])
    for r in range(batch.n_rows):
        row = batch.input_ids[r, t - int(lengths[r]) :]
        same = (row[:p] == first[:p]).long()
        p = int(same.cumprod(0).sum()) if p > 0 else 0
    return max(p, 0)


def steered_forward(
    adapter: Adapter,
    batch: PairBatch,
    coeffs: list[float],
    block: torch.nn.Module,
    last_k: int,
    full: bool = False,
    min_prefix: int = 8,
):
    """``forward_states`` of ``batch`` at each coefficient in ``coeffs`` → outputs for G·B rows, group-major
    (rows of coefficient g at g·B … g·B + B − 1), sharing the prompt prefix all rows start with.

    The shared prefix (``shared_prefix_len``) runs once per coefficient (G rows) and its key/value cache is
    repeated for the B rows; the rest of each row follows it, padded between prefix and rest, with positions
    counting real tokens. Same outputs as running the full rows (to float rounding; tests compare both), with
    roughly (P + (T − P)·B) / (T·B) of the work. Falls back to full rows when the prefix is shorter than
    ``min_prefix`` tokens, or when the model has a sliding attention window shorter than the rows (the padding
    between prefix and rest would count against the window).
    """
    model, b, g = adapter.model, batch.n_rows, len(coeffs)
    n_keep = batch.suffix_mask.shape[1]
    p = shared_prefix_len(batch, max(last_k, n_keep + 1))
    per_row = torch.tensor(coeffs, dtype=torch.float32).repeat_interleave(b)
    window = getattr(getattr(model, "config", None), "sliding_window", None)
    if window is not None and window < batch.input_ids.shape[1]:  # padding inside the window would shift it
        p = 0
    if p < min_prefix:
        with adapter.steer(per_row):
            return forward_states(model, batch.repeat(g), block, last_k, full)
    lengths = batch.attention_mask.sum(-1)
    t = batch.input_ids.shape[1]
    prefix = batch.input_ids[0, t - int(lengths[0]) :][:p]
    rest = [batch.input_ids[r, t - int(lengths[r]) + p :].tolist() for r in range(b)]
    ids, mask, pos = left_pad(rest, 0)  # padding sits between prefix and rest; masked, its id is irrelevant
    pos = torch.where(mask.bool(), pos + p, torch.zeros_like(pos))
    with adapter.steer(torch.tensor(coeffs, dtype=torch.float32)):
        cache = model(
            input_ids=prefix.expand(g, -1), position_ids=torch.arange(p).expand(g, -1), use_cache=True
        ).past_key_values
    cache.batch_repeat_interleave(b)
    rest_batch = PairBatch(
        ids.repeat(g, 1),
        torch.cat([torch.ones(g * b, p, dtype=mask.dtype), mask.repeat(g, 1)], 1),
        pos.repeat(g, 1),
        batch.suffix_mask.repeat(g, 1),
    )
    with adapter.steer(per_row):
        return forward_states(model, rest_batch, block, last_k, full, past_key_values=cache)


#: Kept for code that imported the old name: the ruler of the loss.
PreferenceDirection = Ruler


def _basis_for_block(adapter: Adapter, block_index: int) -> str:
    """Name of the adapted residual writer whose U basis measures the loss-layer residual."""
    names = block_names(adapter.model)
    for i in range(block_index, -1, -1):
        prefix = names[i] + "."
        cands = [t for t in adapter.target_names if t.startswith(prefix)]
        if cands:
            return cands[-1]  # the later writer of the block (MLP down projection)
    return adapter.target_names[0]


def loss_block_index(n_blocks: int, loss_layer: float) -> int:
    """The decoder block read by the loss: round(loss_layer · n_blocks), at most the last block."""
    return min(n_blocks - 1, int(round(loss_layer * n_blocks)))


@torch.no_grad()
def preference_direction(
    adapter: Adapter, tokenizer, pairs: list[ContrastivePair], cfg: TrainConfig, batch_pairs: int = 16
) -> Ruler:
    """Measure the frozen ruler (``objectives.Ruler``) from the unsteered model on the first
    ``cfg.direction_pairs`` training pairs: last-token differences h_pos − h_neg at the loss block, the basis
    (``cfg.basis``), the unit direction u in that basis (``cfg.direction``: the mean difference, the first principal
    component of the differences, or the natural-gradient direction of ``gap_gradients``; see ``directions``),
    σ and the per-dimension spread.

    Raises:
        ValueError: positive and negative prompts give identical hidden states.
    """
    blocks = decoder_blocks(adapter.model)
    idx = loss_block_index(len(blocks), cfg.loss_layer)
    diffs = []
    pairs = pairs[: cfg.direction_pairs]
    for i in range(0, len(pairs), batch_pairs):
        b = tokenize_pairs(tokenizer, pairs[i : i + batch_pairs], cfg.max_suffix_tokens)
        h, _, _ = forward_states(adapter.model, b, blocks[idx], 1)
        n = b.n_pairs
        diffs.append(h[:n, -1] - h[n:, -1])  # (N, d)
    diffs_t = torch.cat(diffs)  # (n, d)
    mean_diff = diffs_t.mean(0)
    if cfg.basis == "pca":
        rows = diffs_t / diffs_t.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        k = min(cfg.basis_rank, rows.shape[0], rows.shape[1])
        basis = torch.linalg.svd(rows, full_matrices=False).Vh[:k].T.contiguous()  # (d, k)
        name = "pca"
    else:
        name = _basis_for_block(adapter, idx)
        basis = adapter.layer(name).U.detach().clone()  # (d, r)
    proj = diffs_t @ basis  # (n, k)
    coords = basis.T @ mean_diff
    if coords.norm() == 0:
        raise ValueError("positive and negative prompts give identical hidden states: pairs do not differ")
    if cfg.direction == "pca":
        u = pca_direction(proj)
    elif cfg.direction == "fisher":
        chunks = [pairs[i : i + batch_pairs] for i in range(0, len(pairs), batch_pairs)]
        grads = torch.cat(
            [
                gap_gradients(adapter.model, tokenize_pairs(tokenizer, c, cfg.max_suffix_tokens), blocks[idx], basis)
                for c in chunks
            ]
        )
        u = fisher_direction(grads, proj, cfg.fisher_damping)
    else:  # the mean difference, projected first: coords / ‖coords‖ exactly, as before this option existed
        u = mean_difference(coords[None])
    spread = proj.std(0) if proj.shape[0] > 1 else proj.abs()[0]
    spread = spread.clamp_min(max(0.1 * float(spread.median()), 1e-6))
    sigma = abs(float((proj @ u).mean()))
    return Ruler(idx, name, basis, u, sigma, spread)


def gap_gradients(model, batch: PairBatch, block: torch.nn.Module, basis: torch.Tensor) -> torch.Tensor:
    """Per-pair gradients of the log-likelihood gap with respect to a shift of the residual stream.

    gap_i(z) = log p(suffix_i | pos_i) − log p(suffix_i | neg_i) (nats, summed over the suffix tokens) when B z is
    added to ``block``'s output at every position of both prompts of pair i; returns ∂gap_i/∂z at z = 0, shape
    (N, k) for a basis B (d, k). One backward pass: pair i's shift reaches only pair i's rows.
    """
    n = batch.n_pairs
    z = torch.zeros(n, basis.shape[1], dtype=basis.dtype, requires_grad=True)

    def shift(_m, _a, out):
        add = (z @ basis.T).repeat(2, 1)[:, None, :]  # rows [pos; neg] share their pair's shift, (2N, 1, d)
        if isinstance(out, tuple):
            return (out[0] + add.to(out[0].dtype), *out[1:])
        return out + add.to(out.dtype)

    handle = block.register_forward_hook(shift)
    try:
        with torch.enable_grad():
            _, lp, _ = forward_states(model, batch, block, 1)
            total = (lp * batch.suffix_mask).sum(-1)  # (2N,)
            (grad,) = torch.autograd.grad((total[:n] - total[n:]).sum(), z)
    finally:
        handle.remove()
    return grad.detach().float()


def compute_passes(
    adapter: Adapter,
    batch: PairBatch,
    ruler: Ruler,
    cfg: TrainConfig,
    block: torch.nn.Module,
    free: PairBatch | None = None,
    reference: tuple | None = None,
) -> Passes:
    """Run the passes an objective needs: c = 0 (no grad; or ``reference`` = (h0, lp0) given), and c = +1 and
    c = −1 together (per-row coefficients, 4N rows); persona-free rows ``free`` at 0 and ±1 when given."""
    model, n = adapter.model, batch.n_pairs
    full = needs_full_distribution(cfg.objective)
    logp0 = None
    if reference is None or full:
        with torch.no_grad():
            h0, lp0, logp0 = forward_states(model, batch, block, cfg.last_k, full)
    else:
        h0, lp0 = reference
    min_prefix = 8 if cfg.share_prefix else 1 << 30
    # rows: [pos, neg] at +1, then at −1
    h, lp, logp = steered_forward(adapter, batch, [1.0, -1.0], block, cfg.last_k, full, min_prefix)
    p = Passes(
        h0=h0,
        lp0=lp0,
        h=h.view(2, 2 * n, *h.shape[1:]),
        lp=lp.view(2, 2 * n, -1),
        mask=batch.suffix_mask,
        logp0=logp0,
        logp=None if logp is None else logp.view(2, 2 * n, *logp.shape[1:]),
    )
    if free is not None:
        with torch.no_grad():
            f0, flp0, _ = forward_states(model, free, block, cfg.last_k)
        m = free.n_rows
        f, flp, _ = steered_forward(adapter, free, [1.0, -1.0], block, cfg.last_k, False, min_prefix)
        p.free0, p.free_lp0, p.free_mask = f0, flp0, free.suffix_mask
        p.free, p.free_lp = f.view(2, m, *f.shape[1:]), flp.view(2, m, -1)
    return p


def reprpo_loss(
    adapter: Adapter,
    batch: PairBatch,
    pref: Ruler,
    cfg: TrainConfig,
    block: torch.nn.Module,
    free: PairBatch | None = None,
    omega: float = 1.0,
    reference: tuple | None = None,
) -> tuple[torch.Tensor, dict]:
    """The configured objective (``cfg.objective``, see ``objectives``) on one batch → (scalar loss, metrics)."""
    passes = compute_passes(adapter, batch, pref, cfg, block, free, reference)
    return LOSSES[cfg.objective](passes, pref, cfg, omega)


def check_pairs_differ(tokenizer, pairs: list[ContrastivePair], what: str = "training pairs") -> None:
    """Refuse pairs whose positive and negative prompts tokenize to the same ids (e.g. differ in whitespace only):
    their gradient is float noise.

    Raises:
        ConfigError: naming the offending pairs (0-based indices; pair files are checked per line on load).
    """
    same = [
        i
        for i, p in enumerate(pairs)
        if tokenizer(p.positive, add_special_tokens=False)["input_ids"]
        == tokenizer(p.negative, add_special_tokens=False)["input_ids"]
    ]
    if same:
        raise ConfigError(
            f"{len(same)} of {len(pairs)} {what} tokenize to identical positive and negative prompts "
            f"(pairs {same[:10]}); a pair must differ in tokens, not only in whitespace",
            field=what,
        )


def pairs_sha256(pairs: list[ContrastivePair]) -> str:
    """sha256 over the ordered (positive, negative) texts: identifies the data of a run."""
    h = hashlib.sha256()
    for p in pairs:
        h.update(json.dumps([p.positive, p.negative]).encode())
    return h.hexdigest()


RUN_STATE = "run_state.json"
_OWN_FILES = (
    "metrics.jsonl",
    "train_config.json",
    RUN_STATE,
    f"adapter/{WEIGHTS_NAME}",
    f"adapter/{CONFIG_NAME}",
    "checkpoint/state.pt",
)


def _prepare_run_dir(run: Path, signature: dict, overwrite: bool) -> int:
    """Decide fresh start vs resume for ``run``; returns the step to start from (0 = fresh).

    A directory this function has not written (no ``run_state.json``) must be empty; one that holds a run with
    another signature, or a finished run, is refused — with ``overwrite`` the run's own files are removed and
    training starts fresh (other files are kept). Metrics past the checkpoint are dropped on resume.
    """
    state_path = run / RUN_STATE
    if overwrite:
        for f in _OWN_FILES:
            (run / f).unlink(missing_ok=True)
        for sub in ("checkpoint", "adapter"):
            if (run / sub).is_dir() and not any((run / sub).iterdir()):
                (run / sub).rmdir()
        return 0
    if not state_path.is_file():
        if run.is_dir() and any(run.iterdir()):
            raise OutputExistsError(
                "is not empty and holds no innerpissa run (no run_state.json); pass --overwrite "
                "(overwrite=True) to train there anyway, or choose another --out",
                path=run,
            )
        return 0
    try:
        prev = json.loads(state_path.read_text())
        prev_sig, finished = prev["signature"], bool(prev["finished"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ResumeMismatchError(
            f"unreadable run state ({e}); pass --overwrite to start fresh", path=state_path
        ) from None
    if prev_sig != signature:
        diffs = _signature_diff(prev_sig, signature)
        raise ResumeMismatchError(
            f"holds a run with another configuration or data ({'; '.join(diffs[:4])}); "
            "pass --overwrite to start fresh there, or choose another --out",
            path=run,
        )
    if finished:
        raise OutputExistsError(
            "holds a finished run with this configuration; pass --overwrite to train again, or choose another --out",
            path=run,
        )
    start = 0
    ck = run / "checkpoint" / "state.pt"
    if ck.is_file():
        start = int(torch.load(ck, map_location="cpu", weights_only=True)["step"])
    metrics = run / "metrics.jsonl"
    if metrics.is_file():  # drop records past the checkpoint so a resumed run never duplicates steps
        keep = [ln for ln in metrics.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= start]
        atomic_write(metrics, lambda p: Path(p).write_text("".join(k + "\n" for k in keep)))
    return start


def _signature_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two nested signature dicts ("steps: 125 -> 100")."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _signature_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            short = "pairs differ" if k.endswith("sha256") else f"{a!r} -> {b!r}"
            out.append(f"{prefix}{k}: {short}")
    return out


def _write_run_state(run: Path, signature: dict, step: int, finished: bool) -> None:
    state = {"signature": signature, "step": step, "finished": finished}
    atomic_write(run / RUN_STATE, lambda p: Path(p).write_text(json.dumps(state, indent=1)))


def _seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def reference_cache(
    adapter: Adapter,
    tokenizer,
    pairs: list[ContrastivePair],
    cfg: TrainConfig,
    block: torch.nn.Module,
    only: list[int] | None = None,
) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The c = 0 pass of the training pairs, computed once (the base model never changes during training):
    pair index → (h0 (2, K, d) for [pos, neg], lp0 of its suffix tokens for pos (k,) and neg (k,)). ``only``: the
    pair indices to cache (default all; ``train`` passes the pairs its schedule will draw, so a short run does not
    pay for pairs it never sees). Chunks of ``cfg.batch_pairs`` in index order, so a resumed run rebuilds exactly
    the same cache."""
    ids = sorted(set(range(len(pairs)) if only is None else only))
    out = {}
    for i in range(0, len(ids), cfg.batch_pairs):
        chunk = ids[i : i + cfg.batch_pairs]
        b = tokenize_pairs(tokenizer, [pairs[j] for j in chunk], cfg.max_suffix_tokens)
        h0, lp0, _ = forward_states(adapter.model, b, block, cfg.last_k)
        n = b.n_pairs
        for j, pair_index in enumerate(chunk):
            k = int(b.suffix_mask[j].sum())
            out[pair_index] = (torch.stack([h0[j], h0[n + j]]), lp0[j, -k:].clone(), lp0[n + j, -k:].clone())
    return out


def scheduled_pairs(n_pairs: int, cfg: TrainConfig, total: int) -> list[int]:
    """The training-pair indices the sampler of ``train`` draws over ``total`` steps (sorted, each once)."""
    gen, order, used = random.Random(cfg.seed), [], set()
    for _ in range(total):
        idx, order = _next_batch(order, gen, n_pairs, cfg.batch_pairs)
        used.update(idx)
    return sorted(used)


def _batch_reference(cache, idx: list[int], batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Assemble cached c = 0 outputs for the pairs ``idx`` in ``batch``'s row layout → (h0 (2N, K, d), lp0)."""
    n, n_keep = len(idx), batch.suffix_mask.shape[1]
    h0 = torch.stack([cache[i][0][0] for i in idx] + [cache[i][0][1] for i in idx])
    lp0 = torch.zeros(2 * n, n_keep)
    for r, i in enumerate(idx):
        k = cache[i][1].shape[0]
        if int(batch.suffix_mask[r].sum()) != k:
            raise RuntimeError("reference cache and batch disagree on a suffix length (tokenizer changed?)")
        lp0[r, n_keep - k :] = cache[i][1]
        lp0[n + r, n_keep - k :] = cache[i][2]
    return h0, lp0


@torch.no_grad()
def bound_rotations(adapter: Adapter, max_angle: float) -> None:
    """Scale each layer's θ so that ‖A‖₂ ≤ 2·tan(max_angle / 2): every principal angle of the Cayley rotation at
    |c| = 1 is then ≤ max_angle (A's eigenvalues ±iλ rotate by 2·atan(λ/2))."""
    limit = 2.0 * math.tan(max_angle / 2)
    for name in adapter.target_names:
        lay = adapter.layer(name)
        if not lay.rotate:
            continue
        norm = float(torch.linalg.matrix_norm(skew(lay.theta), ord=2))
        if norm > limit:
            lay.theta.mul_(limit / norm)


@torch.no_grad()
def adapter_stats(adapter: Adapter) -> dict:
    """Training diagnostics: the largest ‖A‖₂ and rotation angle at |c| = 1 (radians), the mean ‖δ‖/‖S‖, and the
    mean ratio ‖M_even‖_F / ‖M_odd‖_F of the parts of M(c) even and odd in c at |c| = 1 (0 for a purely odd,
    i.e. exactly reversible-in-sign, adapter)."""
    rot, rel, eo = 0.0, [], []
    for name in adapter.target_names:
        lay = adapter.layer(name)
        if lay.rotate:
            rot = max(rot, float(torch.linalg.matrix_norm(skew(lay.theta), ord=2)))
        rel.append(float(lay.delta.norm() / lay.S.norm()))
        m = lay.steer_matrix(torch.tensor([1.0, -1.0]))
        odd, even = (m[0] - m[1]) / 2, (m[0] + m[1]) / 2
        eo.append(float(even.norm() / odd.norm().clamp_min(1e-12)))
    return {
        "rot_norm_max": rot,
        "rot_angle_max": 2 * math.atan(rot / 2),
        "delta_rel": sum(rel) / len(rel),
        "m_even_odd": sum(eo) / len(eo),
    }


def _scheduler(opt, cfg: TrainConfig, total: int):
    if cfg.schedule == "one-cycle":  # linear lr/25 → lr over 10 % of training, cosine back to lr/25 (Smith 2018)
        w, lo = max(1, round(0.1 * total)), 1 / 25

        def one_cycle(k: int) -> float:
            if k < w:
                return lo + (1 - lo) * k / w
            return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * min(1.0, (k - w) / max(1, total - w))))

        return torch.optim.lr_scheduler.LambdaLR(opt, one_cycle)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: min(1.0, (k + 1) / 10) * 0.5 * (1 + math.cos(math.pi * min(k, total) / total))
    )


def constraint_weight(step: int, total: int, warmup: float) -> float:
    """ω(step): the constraint terms' weight, ramping linearly from 1/W to 1 over the first W = warmup·total steps."""
    if warmup <= 0:
        return 1.0
    return min(1.0, (step + 1) / max(1.0, warmup * total))


def train(
    adapter: Adapter,
    tokenizer,
    train_pairs: list[ContrastivePair],
    val_pairs: list[ContrastivePair],
    cfg: TrainConfig,
    run_dir: str | Path | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Train ``adapter`` in place with ``cfg.objective``; resumes from ``run_dir/checkpoint`` when present.

    Writes to ``run_dir``: ``run_state.json`` (the run's signature: training and adapter config, a sha256 of the
    pairs, the base fingerprint, the objective; step; finished), ``train_config.json`` (resolved),
    ``metrics.jsonl`` (one line per step with the loss terms and ``adapter_stats``, and per validation),
    ``checkpoint/state.pt`` (adapter + optimizer + scheduler + step, loaded with ``weights_only=True``, atomic,
    every ``checkpoint_every`` steps) and the final adapter in ``adapter/``. A rerun resumes only a matching
    unfinished run; anything else is refused unless ``overwrite``, which deletes the run's own files (never
    others) and starts fresh. The c = 0 pass of the training pairs is computed once and reused (objectives that
    read whole distributions recompute it per step). Returns the last validation metrics.

    Raises:
        ValueError: fewer training pairs than one batch.
        ConfigError: pairs whose two prompts tokenize identically; ``anchored`` with pairs lacking a neutral prompt.
        ResumeMismatchError: ``run_dir`` holds a run with another configuration or other pairs.
        OutputExistsError: ``run_dir`` holds a finished run, or files that are not a run.
        TrainingDivergedError: the loss became non-finite or exceeded ``max_loss_factor`` × max(1, first loss),
            or a parameter became non-finite (the adapter is not saved; lower ``lr``).
    """
    cfg.validate()
    if len(train_pairs) < cfg.batch_pairs:
        raise ValueError(f"{len(train_pairs)} training pairs < batch_pairs={cfg.batch_pairs}")
    check_pairs_differ(tokenizer, train_pairs)
    check_pairs_differ(tokenizer, val_pairs, "validation pairs")
    with_free = needs_neutral(cfg.objective)
    if with_free:
        tokenize_neutral(tokenizer, train_pairs[:1] + [p for p in train_pairs if not p.neutral][:1])
    _seed_all(cfg.seed)
    model = adapter.model
    total = cfg.total_steps(len(train_pairs))
    run = Path(run_dir) if run_dir else None
    loss_id = {"name": cfg.objective, "version": OBJECTIVES[cfg.objective]}
    if cfg.basis == "adapter-u" and not isinstance(adapter, Adapter):
        raise ConfigError(
            "basis 'adapter-u' reads the InnerPiSSA adapter's singular vectors; use basis 'pca' for "
            f"a {adapter.meta.get('family', type(adapter).__name__)} adapter",
            field="basis",
        )
    same_result = ("share_prefix",)  # settings that change speed, not the trained adapter
    signature = {
        "train_config": {k: v for k, v in asdict(cfg).items() if k not in same_result},
        "adapter_config": adapter.config.to_dict(),
        "family": adapter.meta.get("family", "innerpissa"),
        "train_pairs_sha256": pairs_sha256(train_pairs),
        "val_pairs_sha256": pairs_sha256(val_pairs),
        "base_fingerprint": adapter.base_fingerprint,
        "loss": loss_id,
    }
    signature = json.loads(json.dumps(signature))  # tuples -> lists, as read back from run_state.json
    start = 0
    if run is not None:
        start = _prepare_run_dir(run, signature, overwrite)
    pref = preference_direction(adapter, tokenizer, train_pairs, cfg)
    block = decoder_blocks(model)[pref.block_index]
    cache = (
        None
        if needs_full_distribution(cfg.objective)
        else reference_cache(
            adapter, tokenizer, train_pairs, cfg, block, only=scheduled_pairs(len(train_pairs), cfg, total)
        )
    )
    adapter.meta.update(
        {
            "loss": loss_id,
            "train_config": asdict(cfg),
            "coeff_range": [-1.0, 1.0],
            "preference_direction": pref.to_meta(),
        }
    )
    params = (
        list(adapter.parameters())
        if not isinstance(adapter, Adapter)
        else [p for p in adapter.parameters() if p.requires_grad]
    )
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = _scheduler(opt, cfg, total)
    if run is not None:
        run.mkdir(parents=True, exist_ok=True)
        _write_run_state(run, signature, start, False)
        atomic_write(run / "train_config.json", lambda p: Path(p).write_text(json.dumps(asdict(cfg), indent=2)))
        if start:
            state = torch.load(run / "checkpoint" / "state.pt", map_location="cpu", weights_only=True)
            adapter.load_state_dict(state["adapter"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
    guard = None
    if cfg.bias_weight > 0:
        from .guard import BiasGuard

        guard = BiasGuard(model, tokenizer, cfg.bias_batch)
    gen = random.Random(cfg.seed)
    order: list[int] = []
    for _ in range(start):  # replay the sampler so a resumed run sees the same batches
        order = _next_batch(order, gen, len(train_pairs), cfg.batch_pairs)[1]
    last_val: dict = {}
    first_loss: float | None = None
    bar = tqdm(range(start, total), desc="train", disable=not progress, initial=start, total=total)
    for step in bar:
        idx, order = _next_batch(order, gen, len(train_pairs), cfg.batch_pairs)
        chosen = [train_pairs[i] for i in idx]
        batch = tokenize_pairs(tokenizer, chosen, cfg.max_suffix_tokens)
        free = tokenize_neutral(tokenizer, chosen, cfg.max_suffix_tokens) if with_free else None
        omega = constraint_weight(step, total, cfg.constraint_warmup)
        t0 = time.perf_counter()
        ref = _batch_reference(cache, idx, batch) if cache is not None else None
        loss, m = reprpo_loss(adapter, batch, pref, cfg, block, free, omega, ref)
        if guard is not None:  # the answer-bias guard (guard.py)
            g, shift_plus, shift_minus = guard.term(adapter, step)
            loss = loss + cfg.bias_weight * omega * g
            m.update(loss=loss.item(), guard=g.item(), yes_shift_plus=shift_plus, yes_shift_minus=shift_minus)
        first_loss = m["loss"] if first_loss is None else first_loss
        _check_divergence(m["loss"], first_loss, step + 1, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if cfg.max_angle > 0 and isinstance(adapter, Adapter):
            bound_rotations(adapter, cfg.max_angle)
        if not all(torch.isfinite(p).all() for p in params):
            raise TrainingDivergedError(
                f"adapter parameters became non-finite at step {step + 1}; lower --lr "
                f"(now {cfg.lr:g}) and rerun with --overwrite",
                field="lr",
            )
        m.update(
            step=step + 1,
            seconds=time.perf_counter() - t0,
            lr=sched.get_last_lr()[0],
            omega=omega,
            **(adapter_stats(adapter) if isinstance(adapter, Adapter) else adapter.stats()),
        )
        bar.set_postfix(
            loss=f"{m['loss']:.3f}", sep=f"+{m['ds_plus']:.2f}/-{m['ds_minus']:.2f}", dnll=f"{m['dnll']:.3f}"
        )
        records = [m]
        if (step + 1) % cfg.val_every == 0 or step + 1 == total:
            last_val = validate(adapter, tokenizer, val_pairs, pref, cfg, block)
            records.append({"step": step + 1, **{f"val_{k}": v for k, v in last_val.items()}})
        if run is not None:
            with open(run / "metrics.jsonl", "a") as f:
                for r in records:
                    f.write(json.dumps(r, allow_nan=False) + "\n")
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < total:
                (run / "checkpoint").mkdir(exist_ok=True)
                state = {
                    "adapter": adapter.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "step": step + 1,
                }
                atomic_write(run / "checkpoint" / "state.pt", lambda p, state=state: torch.save(state, p))
                _write_run_state(run, signature, step + 1, False)
    if run is not None:
        adapter.save(run / "adapter")
        _write_run_state(run, signature, total, True)
        shutil.rmtree(run / "checkpoint", ignore_errors=True)  # finished: the adapter is the result
    return last_val


def _check_divergence(loss: float, first: float, step: int, cfg: TrainConfig) -> None:
    """Raise TrainingDivergedError when ``loss`` is non-finite or > max_loss_factor × max(1, first)."""
    limit = cfg.max_loss_factor * max(1.0, first)
    if not math.isfinite(loss) or loss > limit:
        raise TrainingDivergedError(
            f"training diverged at step {step}: loss {loss:.4g} (first step {first:.4g}, "
            f"limit {limit:.4g}); lower --lr (now {cfg.lr:g}) and rerun with --overwrite",
            field="lr",
        )


def _next_batch(order: list[int], gen: random.Random, n: int, k: int) -> tuple[list[int], list[int]]:
    """Draw k indices from a shuffled epoch order, reshuffling when exhausted."""
    if len(order) < k:
        fresh = list(range(n))
        gen.shuffle(fresh)
        order = order + fresh
    return order[:k], order[k:]


@torch.no_grad()
def validate(
    adapter: Adapter, tokenizer, pairs: list[ContrastivePair], pref: Ruler, cfg: TrainConfig, block: torch.nn.Module
) -> dict:
    """Mean loss terms of ``cfg.objective`` on the first ``cfg.val_pairs`` held-out pairs (no grad, ω = 1)."""
    totals: dict[str, float] = {}
    n = 0
    pairs = pairs[: cfg.val_pairs]
    for i in range(0, len(pairs), cfg.batch_pairs):
        chunk = pairs[i : i + cfg.batch_pairs]
        free = tokenize_neutral(tokenizer, chunk, cfg.max_suffix_tokens) if needs_neutral(cfg.objective) else None
        _, m = reprpo_loss(adapter, tokenize_pairs(tokenizer, chunk, cfg.max_suffix_tokens), pref, cfg, block, free)
        for k, v in m.items():
            totals[k] = totals.get(k, 0.0) + v * len(chunk)
        n += len(chunk)
    return {k: v / max(n, 1) for k, v in totals.items()}
