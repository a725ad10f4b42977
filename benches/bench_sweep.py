"""Benchmark: a coefficient sweep on SmolLM2, the PyTorch evaluator vs the Rust engine (``ipissa sweep``), in one
process on the same prompts, plus llama.cpp's forward on the same GGUF as a reference point.

    python benches/bench_sweep.py [--model SPEC] [--adapter DIR] [--n 200] [--coeffs -2,-1,0,1,2] [--threads 2]
                                  [--seed 0] [--modes f32,native,q8_0] [--no-llamacpp]

--model: any GGUF spec ``ipissa sweep`` takes (default: the embedded SmolLM2; ``embedded:gemma3-270m`` for the
Gemma 3 parity and speed check).

Prompts: the first --n eval prompts of the default suite (every dataset of ``suite.default_datasets``, seeded
subsets, interleaved), rendered and tokenized exactly as ``evaluate.answer_scores`` does. Adapter: --adapter, or
a freshly attached one with random parameters large enough to steer (seeded). Work measured per engine: Yes/No
log-odds of every prompt at every coefficient ("prompt-evals" = prompts × coefficients).

- torch: ``evaluate.answer_scores`` (batch 32, length-sorted, left-padded, last-position logits only) once per
  coefficient inside ``adapter.steer(c)``, as ``evaluate.run_sweep`` does.
- rust f32 / native / q8_0: ``RustEngine.answer_scores`` with every coefficient as a branch of one packed pass
  (weights de-quantized to f32, the GGUF's own Q4_1 blocks via candle, or re-quantized Q8_0 via candle).
- llama.cpp (llama-cpp-python, if installed): c = 0 only, one ``eval`` per prompt on the shipped Q4_1 GGUF and
  on an F32 copy; its prompts/s is per coefficient (a sweep of K coefficients takes K times as long).

Each number is one timed run after a warm-up on 8 prompts; |Δ| is the largest Yes/No log-odds difference from
torch over all prompts and coefficients (nats). Repeated processes vary by ~±10–25 % on these VMs.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model spec (default: the embedded SmolLM2)")
    ap.add_argument("--adapter", type=Path, default=None)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--coeffs", default="-2,-1,0,1,2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--modes", default="f32,native,q8_0", help="rust weight modes to time")
    ap.add_argument("--no-llamacpp", action="store_true")
    args = ap.parse_args()
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from innerpissa import AdapterConfig, attach, load_adapter
    from innerpissa.eval.engines import answer_scores, eval_prompt
    from innerpissa.eval.rust_engine import RustEngine
    from innerpissa.eval.suite import default_datasets
    from innerpissa.models import gguf_for_spec, load_model

    coeffs = [float(c) for c in args.coeffs.split(",")]
    lm = load_model(args.model)
    model, tok = lm.model, lm.tokenizer
    tmp = tempfile.TemporaryDirectory()
    if args.adapter:
        adapter = load_adapter(model, args.adapter)
        adir = args.adapter
    else:
        adapter = attach(model, AdapterConfig(seed=args.seed))
        g = torch.Generator().manual_seed(args.seed)
        for name in adapter.target_names:
            lay = adapter.layer(name)
            lay.theta.data = torch.randn(lay.theta.shape, generator=g) * 0.02
            lay.delta.data = torch.randn(lay.delta.shape, generator=g) * 0.1 * lay.S
        adir = Path(tmp.name) / "adapter"
        adapter.save(adir)
    ds = default_datasets(args.data_dir, seed=args.seed)
    items = [(d, it) for d in ds for it in d.items]
    order = np.random.RandomState(args.seed).permutation(len(items))[: args.n]
    prompts = [eval_prompt(tok, items[i][1].question, items[i][0].kind) for i in order]
    n_tok = sum(len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    print(
        f"# {lm.spec}: {len(prompts)} prompts ({n_tok / len(prompts):.1f} tokens on average), coefficients {coeffs}, "
        f"{args.threads} threads, {platform.processor() or platform.machine()}, torch {torch.__version__}"
    )

    def torch_sweep(ps):
        out = []
        for c in coeffs:
            with torch.inference_mode(), adapter.steer(c):
                out.append(answer_scores(model, tok, ps, "yesno", 32)[0])
        return np.array(out)

    torch_sweep(prompts[:8])
    t0 = time.perf_counter()
    ref = torch_sweep(prompts)
    t_torch = time.perf_counter() - t0
    rate_torch = len(prompts) * len(coeffs) / t_torch
    rows = [("torch (transformers, fp32)", t_torch, rate_torch, 0.0)]

    def done(row):  # progress as each engine finishes; the table is printed at the end
        rows.append(row)
        print(f"# {row[0]}: {row[1]:.1f} s, {row[2]:.1f} prompt-evals/s, max |Δ| {row[3]:.1e}", flush=True)

    print(f"# {rows[0][0]}: {t_torch:.1f} s", flush=True)
    gguf = gguf_for_spec(lm.spec)
    for mode in [m for m in args.modes.split(",") if m]:
        t0 = time.perf_counter()
        eng = RustEngine(gguf, tok, weights=mode)
        eng.load_adapter(adir)
        t_load = time.perf_counter() - t0
        branches = [("adapter", c) for c in coeffs]
        eng.answer_scores(prompts[:8], "yesno", branches)
        t0 = time.perf_counter()
        got = eng.answer_scores(prompts, "yesno", branches)[0]
        t = time.perf_counter() - t0
        done((f"rust {mode} (load {t_load:.1f} s)", t, len(prompts) * len(coeffs) / t, float(np.abs(got - ref).max())))
    if not args.no_llamacpp:
        try:
            from innerpissa.eval.engines import answer_token_sets
            from innerpissa.export.gguf_io import dequantize_gguf
            from innerpissa.export.llamacpp import LlamaCppRunner

            f32 = dequantize_gguf(gguf, Path(tmp.name) / "f32.gguf")
            pos, neg = answer_token_sets(tok)
            seqs = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
            c0 = coeffs.index(0.0) if 0.0 in coeffs else None
            for label, path in (("llama.cpp Q4_1 (c = 0 only)", gguf), ("llama.cpp F32 (c = 0 only)", f32)):
                with LlamaCppRunner(path, n_threads=args.threads) as r:
                    r.logprobs(seqs[0])
                    t0 = time.perf_counter()
                    sc = []
                    for s in seqs:
                        lp = r.logprobs(s)[-1]
                        sc.append(np.logaddexp.reduce(lp[pos]) - np.logaddexp.reduce(lp[neg]))
                    t = time.perf_counter() - t0
                err = float(np.abs(np.array(sc) - ref[c0]).max()) if c0 is not None else float("nan")
                done((label, t, len(seqs) / t, err))
        except ImportError as e:
            print(f"# llama.cpp reference skipped: {e}")
    print("| engine | seconds | prompt-evals/s | vs torch | max abs Δ log-odds vs torch (nats) |")
    print("|---|---|---|---|---|")
    for name, t, rate, err in rows:
        print(f"| {name} | {t:.1f} | {rate:.1f} | {rate / rate_torch:.2f}x | {err:.1e} |")


if __name__ == "__main__":
    main()
