"""Memory and set-up cost of the default adapter on real model shapes: does it scale with the adapter, not the model?

    python benches/bench_memory.py [--shapes qwen3-4b llama-3.1-8b] [--layers N] [--threads 2]

For each shape (the public configs of Qwen3-4B and Llama-3.1-8B, written below; rope scaling left out, it does not
change sizes) a child process builds a randomly initialised model in bf16 (``--layers`` builds only the first N
decoder blocks of it, to fit a small machine: per-module costs are unchanged, totals scale with the adapted layers),
attaches the default adapter (``AdapterConfig()``: residual writers from 0.3 of depth to L − 3, r = d/8, SVD in
the Rust core) and runs one training step of the default objective at batch 1 (one contrastive pair; the ruler
from 8 pairs, the c = 0 cache and one validation pair included). Reported, per shape:

- the model's parameter bytes, and peak resident memory (RSS) after building it;
- SVD set-up: seconds for the adapter's top-r SVDs (``attach``), and on the first two targeted matrices the Rust
  SVD against ``torch.linalg.svd`` in the same process (ratio);
- the adapter: trainable parameters and bytes (θ, δ), and all its tensors' bytes (U, S, V kept in fp32);
  expected O(r·(d_in + d_out)) per module;
- peak RSS during ``attach`` and during the training step, each minus the RSS before it (the extra memory).

Gradient checkpointing is not used: training refuses it (docs/design.md §10, pitfall 11). RSS is sampled every
10 ms by a thread (psutil), so very short peaks can be missed. One process at a time; nothing else heavy beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SHAPES = {
    "qwen3-4b": {
        "model_type": "qwen3",
        "hidden_size": 2560,
        "intermediate_size": 9728,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 40960,
    },
    "llama-3.1-8b": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 131072,
    },
}


class PeakRSS:
    """Sample this process's RSS every 10 ms; ``peak()`` since the last ``reset()``, in bytes."""

    def __init__(self):
        import psutil

        self.proc, self.max, self.stop = psutil.Process(), 0, False
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while not self.stop:
            self.max = max(self.max, self.proc.memory_info().rss)
            time.sleep(0.01)

    def now(self) -> int:
        return self.proc.memory_info().rss

    def reset(self) -> int:
        self.max = self.now()
        return self.max

    def peak(self) -> int:
        return max(self.max, self.now())


def child(shape: str, layers: int | None, threads: int) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from innerpissa import AdapterConfig, attach
    from innerpissa.models import load_model
    from innerpissa.pairs import make_honesty_pairs
    from innerpissa.svd import top_r_svd
    from innerpissa.train import TrainConfig, train

    torch.set_num_threads(threads)
    rss = PeakRSS()
    cfg_kw = dict(SHAPES[shape])
    cfg_kw["num_hidden_layers"] = layers or cfg_kw["num_hidden_layers"]
    cfg = AutoConfig.for_model(cfg_kw.pop("model_type"), **cfg_kw)
    tok = load_model(None).tokenizer  # the embedded SmolLM2 tokenizer: its ids fit every vocabulary here
    split = make_honesty_pairs(tok, n_pairs=300, seed=0)
    out: dict = {"shape": shape, "layers": cfg.num_hidden_layers, "threads": threads}

    base = rss.reset()
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval().requires_grad_(False)
    out["build_s"] = time.perf_counter() - t0
    out["model_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    out["rss_model"] = rss.peak() - base

    before = rss.reset()
    t0 = time.perf_counter()
    adapter = attach(model, AdapterConfig())
    out["attach_s"] = time.perf_counter() - t0
    out["attach_extra_peak"] = rss.peak() - before
    lays = [adapter.layer(n) for n in adapter.target_names]
    out["targets"] = len(lays)
    out["rank"] = adapter.config.rank
    out["trainable"] = sum(p.numel() for p in adapter.parameters() if p.requires_grad)
    out["trainable_bytes"] = sum(p.numel() * p.element_size() for p in adapter.parameters() if p.requires_grad)
    out["adapter_bytes"] = sum(t.numel() * t.element_size() for t in adapter.state_dict().values())
    out["r_din_dout"] = sum(lay.rank * (lay.U.shape[0] + lay.V.shape[0]) for lay in lays)

    mods = dict(model.named_modules())
    sample = [mods[n].weight.detach().float() for n in adapter.target_names[:2]]
    t0 = time.perf_counter()
    top_r_svd(sample, adapter.config.rank)
    out["svd2_rust_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for w in sample:
        torch.linalg.svd(w, full_matrices=False)
    out["svd2_torch_s"] = time.perf_counter() - t0
    del sample

    before = rss.reset()
    tcfg = TrainConfig(steps=1, batch_pairs=1, direction_pairs=8, val_pairs=1, val_every=1)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        pairs, val = list(split.train)[:16], list(split.val)[:1]
        train(adapter, tok, pairs, val, tcfg, run_dir=Path(tmp) / "run", progress=False)
        out["train_call_s"] = time.perf_counter() - t0
        step = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
        out["step_s"] = next(r["seconds"] for r in step if "seconds" in r)
    out["train_extra_peak"] = rss.peak() - before
    rss.stop = True
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--layers", type=int, default=None, help="decoder blocks to build (default: all of the shape's)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.layers, args.threads)), flush=True)
        return
    rows = []
    for shape in args.shapes:
        cmd = [sys.executable, __file__, "--child", shape, "--threads", str(args.threads)]
        if args.layers:
            cmd += ["--layers", str(args.layers)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
        if res.returncode or not line:
            sys.exit(f"{shape}: child failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
        rows.append(json.loads(line[0][len("RESULT ") :]))
    gib, mib = 2**30, 2**20
    print(
        "| shape | blocks built | model params (bf16) | RSS after build | attach (SVD) s | Rust ÷ torch SVD "
        "(2 matrices) | targets, r | adapter trainable | adapter tensors | Σ r·(d_in + d_out) × 4 B | "
        "attach extra peak | train step s | train extra peak |"
    )
    print("|" + "---|" * 13)
    for r in rows:
        print(
            f"| {r['shape']} | {r['layers']} | {r['model_bytes'] / gib:.2f} GiB | {r['rss_model'] / gib:.2f} GiB | "
            f"{r['attach_s']:.1f} | {r['svd2_rust_s'] / r['svd2_torch_s']:.2f} "
            f"({r['svd2_rust_s']:.1f} / {r['svd2_torch_s']:.1f} s) | {r['targets']}, {r['rank']} | "
            f"{r['trainable']:,} ({r['trainable_bytes'] / mib:.1f} MiB) | {r['adapter_bytes'] / mib:.0f} MiB | "
            f"{r['r_din_dout'] * 4 / mib:.0f} MiB | {r['attach_extra_peak'] / mib:.0f} MiB | {r['step_s']:.1f} | "
            f"{r['train_extra_peak'] / mib:.0f} MiB |"
        )


if __name__ == "__main__":
    main()
