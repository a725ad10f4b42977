"""The forward passes of a training step: hidden states at the loss block and suffix log-probs at c = 0 and at
c = ±1 (``compute_passes``), the shared-prefix trick (``steered_forward``), and the c = 0 reference cache.

Per step, for a batch of N contrastive pairs: the c = 0 pass (adapter skipped, exact base model, no grad) is
computed once per training pair before the first step and reused (``reference_cache``), except for objectives
that read whole next-token distributions; then one steered pass over [pos; neg] at c = +1 and [pos; neg] at
c = −1 (per-row coefficients, 4N rows), and for ``anchored`` the persona-free prompts at ±1 (their c = 0 pass is
cached with the pair's).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch

from ..adapter import Adapter
from ..adapter.targets import block_names, decoder_blocks
from ..hooks import (
    branch_rows,
    capture_outputs,
    forward_hooks,
    logit_positions,
    on_model_device,
    run_until,
    shift_output,
)
from ..pairs import ContrastivePair
from ..prompts import left_pad
from .batches import PairBatch, tokenize_pairs
from .objectives import Passes, Ruler, needs_full_distribution

if TYPE_CHECKING:
    from .config import TrainConfig


def forward_states(
    model,
    batch: PairBatch,
    block: torch.nn.Module,
    last_k: int,
    full: bool = False,
    past_key_values=None,
    groups: int = 1,
):
    """One forward pass → (hidden (B, last_k, d) at ``block``'s output, token log-probs (B, n_keep), and with
    ``full`` the whole next-token log-distributions (B, n_keep, V), else None).

    Only the n_keep positions that predict the last n_keep tokens get logits (``hooks.logit_positions``: one
    matmul of the output head, which keeps big-vocabulary models cheap). With ``past_key_values`` (a cache of a
    shared prefix), ``batch.attention_mask`` covers prefix + rows and the rows continue the prefix. ``groups``:
    the pass runs under ``hooks.branch_rows`` with that many groups, so every output has ``groups``·B rows.

    The batch is moved to the model's device; the outputs come back on the CPU (differentiably), where the
    objectives compute the loss.
    """
    n_keep = batch.suffix_mask.shape[1]
    t = batch.input_ids.shape[1]
    ids, mask, pos = on_model_device(model, batch.input_ids, batch.attention_mask, batch.position_ids)
    with capture_outputs({"h": block}, lambda h: h[:, -last_k:]) as captured:
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            logits_to_keep=logit_positions(model, t - n_keep - 1, t - 1),
            past_key_values=past_key_values,
            use_cache=past_key_values is not None,
        )
    logp = out.logits.float().log_softmax(-1)  # (B, n_keep, V)
    targets = ids[:, -n_keep:].repeat(groups, 1)  # the tokens the kept positions predict
    token_logp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, n_keep)
    return captured["h"].float().cpu(), token_logp.cpu(), (logp.cpu() if full else None)


@torch.no_grad()
def block_states(model, batch: PairBatch, block: torch.nn.Module, last_k: int) -> torch.Tensor:
    """Hidden states (B, last_k, d) at ``block``'s output, on the CPU, from a no-grad pass that stops there
    (``hooks.run_until``: the blocks above and the output head are not run)."""
    ids, mask, pos = on_model_device(model, batch.input_ids, batch.attention_mask, batch.position_ids)
    with capture_outputs({"h": block}, lambda h: h[:, -last_k:]) as captured:
        run_until(model, block, input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
    return captured["h"].float().cpu()


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
    share_lower: bool = True,
):
    """``forward_states`` of ``batch`` at each coefficient in ``coeffs`` → outputs for G·B rows, group-major
    (rows of coefficient g at g·B … g·B + B − 1), sharing what the coefficients share.

    - The shared prompt prefix (``shared_prefix_len``) runs once per coefficient (G rows) and its key/value cache
      is repeated for the B rows; the rest of each row follows it, padded between prefix and rest, with positions
      counting real tokens: roughly (P + (T − P)·B) / (T·B) of the work. Off when the prefix is shorter than
      ``min_prefix`` tokens, or when the model has a sliding attention window shorter than the rows (the padding
      between prefix and rest would count against the window).
    - With ``share_lower``, the blocks below the first adapted one (and below ``block``) run once on B rows and
      the rest on G·B (``hooks.branch_rows``): nothing below the adapter depends on c.

    Same outputs as running the full rows G times (to float rounding; tests compare both).
    """
    per_row = torch.tensor(coeffs, dtype=torch.float32).repeat_interleave(batch.n_rows)
    per_group = torch.tensor(coeffs, dtype=torch.float32)
    branch = None  # None: the rows themselves are repeated G times
    if share_lower:
        blocks = decoder_blocks(adapter.model)
        branch = (blocks, min(first_adapted_block(adapter), list(blocks).index(block)))
    return _prefix_forward(
        adapter.model,
        batch,
        len(coeffs),
        lambda rows: adapter.steer(per_row if rows else per_group),
        block,
        last_k,
        full,
        min_prefix,
        branch,
    )


def first_adapted_block(adapter) -> int:
    """Index of the lowest decoder block that holds one of ``adapter.target_names`` (0 when none is found)."""
    names = block_names(adapter.model)
    found = [i for i, n in enumerate(names) if any(t.startswith(n + ".") for t in adapter.target_names)]
    return found[0] if found else 0


def base_forward(model, batch: PairBatch, block: torch.nn.Module, last_k: int, full: bool = False, min_prefix: int = 8):
    """``forward_states`` of the unsteered model (no adapter hooks) with the shared-prefix trick of
    ``steered_forward`` for one group: the c = 0 reference passes."""
    return _prefix_forward(
        model, batch, 1, lambda _rows: contextlib.nullcontext(), block, last_k, full, min_prefix, None
    )


def _prefix_forward(model, batch: PairBatch, g: int, steer, block, last_k: int, full: bool, min_prefix: int, branch):
    """The pass of ``batch`` repeated for g groups: ``steer(False)`` is the context of the prefix pass (one row per
    group), ``steer(True)`` that of the rows (g·B, group-major); ``branch`` = (blocks, start) runs the blocks
    below ``start`` once for all groups (``hooks.branch_rows``), None repeats the rows themselves."""
    b, n_keep = batch.n_rows, batch.suffix_mask.shape[1]
    if branch is not None and g > 1:
        blocks, start = branch
        shared = lambda: branch_rows(blocks, start, g)  # noqa: E731
        reps, groups = 1, g
    else:
        shared = contextlib.nullcontext
        reps, groups = g, 1
    p = shared_prefix_len(batch, max(last_k, n_keep + 1))
    window = getattr(getattr(model, "config", None), "sliding_window", None)
    if window is not None and window < batch.input_ids.shape[1]:  # padding inside the window would shift it
        p = 0
    if p < min_prefix:
        with steer(True), shared():
            rows = batch.repeat(reps) if reps > 1 else batch
            return forward_states(model, rows, block, last_k, full, groups=groups)
    lengths = batch.attention_mask.sum(-1)
    t = batch.input_ids.shape[1]
    prefix = batch.input_ids[0, t - int(lengths[0]) :][:p]
    rest = [batch.input_ids[r, t - int(lengths[r]) + p :].tolist() for r in range(b)]
    ids, mask, pos = left_pad(rest, 0)  # padding sits between prefix and rest; masked, its id is irrelevant
    pos = torch.where(mask.bool(), pos + p, torch.zeros_like(pos))
    with steer(False), shared():
        prefix_ids, prefix_pos = on_model_device(model, prefix.expand(reps, -1), torch.arange(p).expand(reps, -1))
        cache = model(
            input_ids=prefix_ids,
            position_ids=prefix_pos,
            use_cache=True,
            logits_to_keep=1,  # only its key/value cache is read
        ).past_key_values
    cache.batch_repeat_interleave(b)  # each group's (or the one shared) prefix row for every row
    rest_batch = PairBatch(
        ids.repeat(reps, 1),
        torch.cat([torch.ones(reps * b, p, dtype=mask.dtype), mask.repeat(reps, 1)], 1),
        pos.repeat(reps, 1),
        batch.suffix_mask.repeat(reps, 1),
    )
    with steer(True), shared():
        return forward_states(model, rest_batch, block, last_k, full, past_key_values=cache, groups=groups)


def compute_passes(
    adapter: Adapter,
    batch: PairBatch,
    ruler: Ruler,
    cfg: TrainConfig,
    block: torch.nn.Module,
    free: PairBatch | None = None,
    reference: tuple | None = None,
    free_reference: tuple | None = None,
) -> Passes:
    """Run the passes an objective needs: c = 0 (no grad; or ``reference`` = (h0, lp0) given), and c = +1 and
    c = −1 together (per-row coefficients, 4N rows); persona-free rows ``free`` at 0 (or ``free_reference`` =
    (f0, flp0) given, from ``batch_free_reference``) and ±1 when given."""
    model, n = adapter.model, batch.n_pairs
    full = needs_full_distribution(cfg.objective)
    logp0 = None
    min_prefix = 8 if cfg.share_prefix else 1 << 30
    if reference is None or full:
        with torch.no_grad():
            h0, lp0, logp0 = base_forward(model, batch, block, cfg.last_k, full, min_prefix)
    else:
        h0, lp0 = reference
    # rows: [pos, neg] at +1, then at −1
    share = cfg.share_prefix
    h, lp, logp = steered_forward(adapter, batch, [1.0, -1.0], block, cfg.last_k, full, min_prefix, share)
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
        if free_reference is None:
            with torch.no_grad():
                f0, flp0, _ = base_forward(model, free, block, cfg.last_k, False, min_prefix)
        else:
            f0, flp0 = free_reference
        m = free.n_rows
        f, flp, _ = steered_forward(adapter, free, [1.0, -1.0], block, cfg.last_k, False, min_prefix, share)
        p.free0, p.free_lp0, p.free_mask = f0, flp0, free.suffix_mask
        p.free, p.free_lp = f.view(2, m, *f.shape[1:]), flp.view(2, m, -1)
    return p


@torch.no_grad()
def reference_cache(
    adapter: Adapter,
    tokenizer,
    pairs: list[ContrastivePair],
    cfg: TrainConfig,
    block: torch.nn.Module,
    only: list[int] | None = None,
    free: bool = False,
) -> dict[int, tuple]:
    """The c = 0 pass of the training pairs, computed once (the base model never changes during training):
    pair index → (h0 (2, K, d) for [pos, neg], lp0 of its suffix tokens for pos (k,) and neg (k,)), and with
    ``free`` also the pair's persona-free prompt (``tokenize_neutral``): f0 (K, d) and its suffix lp0 (k',).
    ``only``: the pair indices to cache (default all; ``train`` passes the pairs its schedule will draw, so a short
    run does not pay for pairs it never sees). Chunks of ``cfg.batch_pairs`` in index order, so a resumed run
    rebuilds exactly the same cache."""
    from .batches import tokenize_neutral

    ids = sorted(set(range(len(pairs)) if only is None else only))
    min_prefix = 8 if cfg.share_prefix else 1 << 30
    out = {}
    for i in range(0, len(ids), cfg.batch_pairs):
        chunk = ids[i : i + cfg.batch_pairs]
        chosen = [pairs[j] for j in chunk]
        b = tokenize_pairs(tokenizer, chosen, cfg.max_suffix_tokens)
        h0, lp0, _ = base_forward(adapter.model, b, block, cfg.last_k, False, min_prefix)
        if free:
            fb = tokenize_neutral(tokenizer, chosen, cfg.max_suffix_tokens)
            f0, flp0, _ = base_forward(adapter.model, fb, block, cfg.last_k, False, min_prefix)
        n = b.n_pairs
        for j, pair_index in enumerate(chunk):
            k = int(b.suffix_mask[j].sum())
            entry = (torch.stack([h0[j], h0[n + j]]), lp0[j, -k:].clone(), lp0[n + j, -k:].clone())
            if free:
                kf = int(fb.suffix_mask[j].sum())
                entry += (f0[j].clone(), flp0[j, -kf:].clone())
            out[pair_index] = entry
    return out


def batch_reference(cache, idx: list[int], batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
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


def batch_free_reference(cache, idx: list[int], free: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Assemble the cached c = 0 outputs of the persona-free prompts of pairs ``idx`` (``reference_cache`` with
    ``free=True``) in ``free``'s row layout → (f0 (N, K, d), flp0 (N, n_keep))."""
    n_keep = free.suffix_mask.shape[1]
    if any(len(cache[i]) < 5 for i in idx):
        raise RuntimeError("reference cache was built without the persona-free prompts (free=False)")
    f0 = torch.stack([cache[i][3] for i in idx])
    flp0 = torch.zeros(len(idx), n_keep)
    for r, i in enumerate(idx):
        k = cache[i][4].shape[0]
        if int(free.suffix_mask[r].sum()) != k:
            raise RuntimeError("reference cache and batch disagree on a suffix length (tokenizer changed?)")
        flp0[r, n_keep - k :] = cache[i][4]
    return f0, flp0


def gap_gradients(model, batch: PairBatch, block: torch.nn.Module, basis: torch.Tensor) -> torch.Tensor:
    """Per-pair gradients of the log-likelihood gap with respect to a shift of the residual stream.

    gap_i(z) = log p(suffix_i | pos_i) − log p(suffix_i | neg_i) (nats, summed over the suffix tokens) when B z is
    added to ``block``'s output at every position of both prompts of pair i; returns ∂gap_i/∂z at z = 0, shape
    (N, k) for a basis B (d, k). One backward pass: pair i's shift reaches only pair i's rows.
    """
    n = batch.n_pairs
    z = torch.zeros(n, basis.shape[1], dtype=basis.dtype, requires_grad=True)

    # rows [pos; neg] share their pair's shift: (2N, 1, d)
    shift = shift_output(lambda _h: (z @ basis.T).repeat(2, 1)[:, None, :])
    with forward_hooks([(block, shift)]), torch.enable_grad():
        _, lp, _ = forward_states(model, batch, block, 1)
        total = (lp * batch.suffix_mask).sum(-1)  # (2N,)
        (grad,) = torch.autograd.grad((total[:n] - total[n:]).sum(), z)
    return grad.detach().float()
