"""Training-step benchmark: one InnerPiSSA training step ÷ a plain forward+backward of the same rows.

    python benches/bench_train_step.py [--model embedded:smollm2] [--objective anchored] [--batch-pairs 8]
                                       [--repeats 5]

Baseline (measured in the same run): one forward + backward of the base model over the distinct rows of the
step's batch (the 2N pair prompts, and for ``anchored`` the N persona-free prompts), full rows, the suffix NLL as
loss and gradients only for one trainable residual vector added at the first adapted block: the cheapest backward
that still reaches the same depth. The step runs those rows at c = +1 and c = −1 (twice the rows), so a ratio of
2 would mean it costs exactly two plain passes. Three versions of the step, each with AdamW and the rotation bound:

- ``no cache, full rows``: the c = 0 pass run every step and every row run whole at each c (``share_prefix``
  off);
- ``strided logits, lower blocks per c``: the step as it was before 2026-12-07 (but for the prefix pass's logits,
  now one position): the output head applied to the strided view ``hidden[:, a:b]`` (transformers' int
  ``logits_to_keep``), which runs as a batched matmul reading the head weight once per row, and the blocks below
  the adapter run again for each coefficient;
- ``lower blocks per c``: the same with today's contiguous output-head input;
- ``default``: the trainer's step (c = 0 outputs from the per-pair cache, the shared prompt prefix run once per
  coefficient, the blocks below the first adapted one run once for both coefficients, the output head on a
  contiguous copy of the kept positions).

Prints medians over repeats (the variants timed round-robin, so a drift of the machine's speed hits them alike)
and each as a ratio to the baseline, and the one-off costs of a run: the ruler (``direction_pairs`` pairs) and the
c = 0 cache per training pair.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--objective", default="anchored")
    ap.add_argument("--batch-pairs", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from innerpissa import AdapterConfig, attach
    from innerpissa.adapter import decoder_blocks
    from innerpissa.models import load_model
    from innerpissa.pairs import make_honesty_pairs
    from innerpissa.train import (
        TrainConfig,
        batch_reference,
        forward_states,
        passes,
        preference_direction,
        reference_cache,
        reprpo_loss,
        shared_prefix_len,
        tokenize_neutral,
        tokenize_pairs,
    )
    from innerpissa.train.batches import PairBatch
    from innerpissa.train.loop import bound_rotations
    from innerpissa.train.objectives import needs_neutral
    from innerpissa.train.passes import batch_free_reference

    lm = load_model(args.model)
    model, tok = lm.model, lm.tokenizer
    pairs = list(make_honesty_pairs(tok, seed=0).train)
    adapter = attach(model, AdapterConfig())
    cfg = TrainConfig(objective=args.objective, batch_pairs=args.batch_pairs)
    t = time.perf_counter()
    pref = preference_direction(adapter, tok, pairs, cfg)
    t_ruler = time.perf_counter() - t
    block = decoder_blocks(model)[pref.block_index]
    chosen = pairs[: args.batch_pairs]
    idx = list(range(args.batch_pairs))
    batch = tokenize_pairs(tok, chosen, cfg.max_suffix_tokens)
    free = tokenize_neutral(tok, chosen, cfg.max_suffix_tokens) if needs_neutral(cfg.objective) else None
    t = time.perf_counter()
    cache = reference_cache(adapter, tok, pairs, cfg, block, only=idx, free=free is not None)
    t_cache = (time.perf_counter() - t) / len(idx)
    ref = batch_reference(cache, idx, batch)
    free_ref = batch_free_reference(cache, idx, free) if free is not None else None
    params = [p for p in adapter.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    first = int(adapter.target_names[0].split(".layers.")[1].split(".")[0])
    vec = torch.zeros(model.config.hidden_size, requires_grad=True)
    hook_block = decoder_blocks(model)[first]
    rows = [batch] if free is None else [batch, _stack(batch, free, PairBatch)]

    def plain_step():
        h = hook_block.register_forward_hook(lambda m, a, o: (o[0] + vec,) + o[1:] if isinstance(o, tuple) else o + vec)
        try:
            b = rows[-1]
            _, lp, _ = forward_states(model, b, block, cfg.last_k)
            loss = -(lp * b.suffix_mask).sum() / b.suffix_mask.sum()
            loss.backward()
        finally:
            h.remove()
        vec.grad = None

    def step(share: bool, cached: bool, strided: bool = False, lower: bool = True):
        def run():
            c = dataclasses.replace(cfg, share_prefix=share)
            saved = passes.logit_positions, passes.first_adapted_block
            if strided:
                passes.logit_positions = lambda _model, a, b: slice(a, b)  # transformers slices hidden[:, a:b]
            if not lower:
                passes.first_adapted_block = lambda _adapter: 0  # branch at block 0: every block per coefficient
            try:
                loss, _ = reprpo_loss(
                    adapter,
                    batch,
                    pref,
                    c,
                    block,
                    free,
                    reference=ref if cached else None,
                    free_reference=free_ref if cached else None,
                )
            finally:
                passes.logit_positions, passes.first_adapted_block = saved
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bound_rotations(adapter, cfg.max_angle)

        return run

    variants = {
        "plain forward+backward": plain_step,
        "no cache, full rows": step(False, False),
        "strided logits, lower blocks per c": step(True, True, strided=True, lower=False),
        "lower blocks per c": step(True, True, lower=False),
        "default": step(True, True),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():
        fn()  # warm-up
    for _ in range(args.repeats):  # round-robin, so a drift of the machine's speed hits every variant alike
        for name, fn in variants.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    t_plain = med.pop("plain forward+backward")
    steps = med
    b = rows[-1]
    print(
        f"model={lm.spec} objective={cfg.objective} batch={args.batch_pairs} pairs: plain pass over {b.n_rows} "
        f"rows ({int(b.attention_mask.sum())} tokens, T={b.input_ids.shape[1]}); shared prefix "
        f"{shared_prefix_len(batch, 5)} tokens (pairs), suffix tokens kept {batch.suffix_mask.shape[1]}; "
        f"threads={args.threads} rank={adapter.config.rank} targets={len(adapter.target_names)}"
    )
    print(f"{'plain forward+backward':36s}: {t_plain * 1000:8.1f} ms/step  (1.00)")
    for name, t in steps.items():
        print(f"{name:36s}: {t * 1000:8.1f} ms/step  ({t / t_plain:.2f} x plain)")
    print(f"one-off: ruler over {cfg.direction_pairs} pairs {t_ruler:.1f} s; c = 0 cache {t_cache * 1000:.0f} ms/pair")


def _stack(batch, free, cls):
    """The pair rows and the persona-free rows as one left-padded batch (the plain pass's rows)."""
    import torch.nn.functional as F

    t = max(batch.input_ids.shape[1], free.input_ids.shape[1])
    k = max(batch.suffix_mask.shape[1], free.suffix_mask.shape[1])

    def pad(x, n):
        return F.pad(x, (n - x.shape[1], 0))

    return cls(
        torch.cat([pad(batch.input_ids, t), pad(free.input_ids, t)]),
        torch.cat([pad(batch.attention_mask, t), pad(free.attention_mask, t)]),
        torch.cat([pad(batch.position_ids, t), pad(free.position_ids, t)]),
        torch.cat([pad(batch.suffix_mask, k), pad(free.suffix_mask, k)]),
    )


if __name__ == "__main__":
    main()
