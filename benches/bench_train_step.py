"""Training-step benchmark: one InnerPiSSA training step ÷ a plain forward+backward on the same batch.

    python benches/bench_train_step.py [--model embedded:smollm2] [--batch-pairs 8] [--repeats 5]

Baseline (measured in the same run, same batch of 2N prompts): forward + backward of the base model with the
suffix NLL as loss and gradients only for one trainable residual vector added at the first adapted layer, i.e.
the cheapest backward that still reaches the same depth. Three versions of the reprpo-svd step, each with AdamW:

- ``full rows, c=0 pass per step``: the trainer's passes before 2026-12-02 (a no-grad c = 0 pass over the 2N
  rows, then c = ±1 stacked over 4N full rows), with today's assistant-suffix mask (fewer logit positions than
  the 24 the old mask kept);
- ``cached c=0``: the c = 0 pass read from the per-pair cache the trainer now builds once;
- ``cached c=0 + shared prefix``: also runs the prompt prefix every row shares once per coefficient
  (``train.steered_forward``), the trainer's default.

Prints medians over repeats and each as a ratio to the baseline.
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
        preference_direction,
        reference_cache,
        reprpo_loss,
        shared_prefix_len,
        tokenize_pairs,
    )

    lm = load_model(args.model)
    model, tok = lm.model, lm.tokenizer
    pairs = list(make_honesty_pairs(tok, seed=0).train)
    adapter = attach(model, AdapterConfig())
    cfg = TrainConfig(batch_pairs=args.batch_pairs, direction_pairs=32)
    pref = preference_direction(adapter, tok, pairs, cfg)
    block = decoder_blocks(model)[pref.block_index]
    batch = tokenize_pairs(tok, pairs[: args.batch_pairs], cfg.max_suffix_tokens)
    params = [p for p in adapter.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    first = int(adapter.target_names[0].split(".layers.")[1].split(".")[0])
    vec = torch.zeros(model.config.hidden_size, requires_grad=True)
    hook_block = decoder_blocks(model)[first]

    def plain_step():
        h = hook_block.register_forward_hook(lambda m, a, o: (o[0] + vec,) + o[1:] if isinstance(o, tuple) else o + vec)
        try:
            _, lp, _ = forward_states(model, batch, block, cfg.last_k)
            loss = -(lp * batch.suffix_mask).sum() / batch.suffix_mask.sum()
            loss.backward()
        finally:
            h.remove()
        vec.grad = None

    cache = reference_cache(adapter, tok, pairs[: args.batch_pairs], cfg, block)
    ref = batch_reference(cache, list(range(args.batch_pairs)), batch)

    def step(share: bool, cached: bool):
        def run():
            c = dataclasses.replace(cfg, share_prefix=share)
            loss, _ = reprpo_loss(adapter, batch, pref, c, block, reference=ref if cached else None)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return run

    def timeit(fn):
        fn()  # warm-up
        out = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
        return statistics.median(out)

    t_plain = timeit(plain_step)
    steps = {
        "full rows, c=0 pass per step": timeit(step(False, False)),
        "cached c=0": timeit(step(False, True)),
        "cached c=0 + shared prefix": timeit(step(True, True)),
    }
    n_tok = int(batch.attention_mask.sum())
    print(
        f"model={lm.spec} batch={args.batch_pairs} pairs ({2 * args.batch_pairs} rows, {n_tok} tokens, "
        f"T={batch.input_ids.shape[1]}, shared prefix {shared_prefix_len(batch, 5)} tokens, suffix tokens kept "
        f"{batch.suffix_mask.shape[1]}) threads={args.threads} rank={adapter.config.rank} "
        f"targets={len(adapter.target_names)}"
    )
    print(f"{'plain forward+backward':32s}: {t_plain * 1000:8.1f} ms/step  (1.00)")
    for name, t in steps.items():
        print(f"{name:32s}: {t * 1000:8.1f} ms/step  ({t / t_plain:.2f} x plain)")


if __name__ == "__main__":
    main()
