"""The GPU check: parity of the torch path and of the Rust engine on a GPU, and timings on a real-size shape.

    python benches/gpu_check.py --prepare DIR                    (CPU machine: tiny GGUF, adapter, tokenizer)
    python benches/gpu_check.py --device cuda --check-dir DIR --out OUT [--layers N] [--steps 8]
    python benches/gpu_check.py --device cpu --check-dir DIR --out OUT --quick   (the same code, tiny, on CPU)

``scripts/gpu_check.sh`` wraps the three (build the CUDA wheel and prepare here, run there). Parts:

- **torch parity** (tiny random Llama and Gemma 3 built here, fp32 and bf16, on ``--device``): c = 0 gives the
  base logits bit for bit; the steered logits at c = ±1 against the same model and adapter in fp32 on the CPU
  (max |Δ| in logits, beside the Δ the dtype alone causes at c = 0); ``merge(c)`` against the side path;
  ``unmerge`` restores the weights exactly.
- **Rust parity** (the tiny GGUF and adapter of ``--prepare``): ``Engine(device=...)`` against
  ``Engine(device="cpu")``, yes/no log-odds of 64 prompts for the base and c = ±1 (max |Δ| in nats). An
  extension built without the ``cuda`` feature records the engine's error instead.
- **timing** (a random-weight model with the shape of Qwen3-4B, bf16, ``--layers`` blocks, default all 36;
  tiny with ``--quick``): ``attach`` (top-r SVDs, Rust on the CPU), training seconds per step (default
  objective, 8 pairs a step, the median of the steps after the first), and a sweep point (yes/no scores of 64
  prompts at one coefficient, the median over 5 coefficients).

Writes OUT/gpu_check.json and OUT/gpu_check.md. The tokenizer is the embedded SmolLM2's, saved by ``--prepare``
(the GPU machine has no model packages); its ids fit every vocabulary here.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_memory import SHAPES  # noqa: E402

TINY = {
    "llama": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 6,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256},
    "gemma3": {"model_type": "gemma3_text", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 6,
               "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 256,
               "sliding_window": 4, "layer_types": ["sliding_attention"] * 5 + ["full_attention"]},
}  # fmt: skip
SWEEP_COEFFS = (-1.0, -0.5, 0.0, 0.5, 1.0)


def build(spec: dict, dtype: torch.dtype, device: str, layers: int | None = None, seed: int = 0):
    """A randomly initialised causal LM from a config dict (``model_type`` + fields), eval mode, frozen."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(spec)
    if layers:
        kw["num_hidden_layers"] = layers
    cfg = AutoConfig.for_model(kw.pop("model_type"), **kw)
    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval().requires_grad_(False)


def _steered(adapter, ids, c):
    with torch.no_grad(), adapter.steer(c):
        return adapter.model(input_ids=ids).logits.float().cpu()


def torch_parity(device: str) -> list[dict]:
    """Rows of the torch parity part (see the module docstring)."""
    from innerpissa import AdapterConfig, attach

    rows = []
    for arch, spec in TINY.items():
        for dtype in (torch.float32, torch.bfloat16):
            model = build(spec, dtype, device)
            adapter = attach(model, AdapterConfig(rank=4))
            gen = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for n in adapter.target_names:  # a trained-looking adapter
                    lay = adapter.layer(n)
                    lay.theta.copy_(0.3 * torch.randn(lay.theta.shape, generator=gen))
                    lay.delta.copy_(0.3 * torch.randn(lay.delta.shape, generator=gen))
            ref_model = copy.deepcopy(model).to("cpu", torch.float32)
            ref = attach(ref_model, AdapterConfig(rank=4))
            ref.load_state_dict({k: v.cpu() for k, v in adapter.state_dict().items()})
            ids = torch.randint(0, 256, (2, 16), generator=gen)
            with torch.no_grad():
                base = model(input_ids=ids.to(device)).logits
            row = {
                "arch": arch,
                "dtype": str(dtype).removeprefix("torch."),
                "c0_identical": bool(torch.equal(_steered(adapter, ids.to(device), 0.0), base.float().cpu())),
                "base_vs_cpu_fp32": float((base.float().cpu() - _steered(ref, ids, 0.0)).abs().max()),
            }
            for c in (1.0, -1.0):
                hook = _steered(adapter, ids.to(device), c)
                row[f"c{c:+g}_vs_cpu_fp32"] = float((hook - _steered(ref, ids, c)).abs().max())
                before = {n: p.clone() for n, p in model.named_parameters()}
                adapter.merge(c)
                with torch.no_grad():
                    merged = model(input_ids=ids.to(device)).logits.float().cpu()
                adapter.unmerge()
                row[f"merge{c:+g}_vs_hook"] = float((merged - hook).abs().max())
                row["unmerge_exact"] = row.get("unmerge_exact", True) and all(
                    torch.equal(p, before[n]) for n, p in model.named_parameters()
                )
            rows.append(row)
    return rows


def rust_parity(device: str, check_dir: Path) -> dict:
    """The Rust part: yes/no log-odds on ``device`` against the CPU, for the base and c = ±1."""
    from innerpissa import _rust

    gguf, adapter_dir = check_dir / "tiny.gguf", check_dir / "adapter"
    gen = torch.Generator().manual_seed(2)
    seqs = [
        torch.randint(0, 200, (int(n),), generator=gen).tolist() for n in torch.randint(8, 40, (64,), generator=gen)
    ]
    branches = [_rust.Branch.base(), _rust.Branch.adapter(1.0), _rust.Branch.adapter(-1.0)]
    out: dict = {"device": device}
    scores = {}
    for dev in ("cpu", device):
        try:
            eng = _rust.Engine(str(gguf), device=dev)
        except ValueError as e:
            out["error"] = f"Engine(device={dev!r}): {e}"
            return out
        eng.load_adapter(str(adapter_dir))
        t0 = time.perf_counter()
        scores[dev], _ = eng.yes_no(seqs, branches, [1, 2], [3, 4])
        out[f"{dev}_s"] = time.perf_counter() - t0
    out["max_abs_diff_nats"] = float(abs(scores[device] - scores["cpu"]).max())
    out["c1_moves_nats"] = float(abs(scores["cpu"][1] - scores["cpu"][0]).max())
    return out


def timing(device: str, tokenizer, layers: int | None, steps: int, quick: bool) -> dict:
    """The timing part on the Qwen3-4B shape (or a tiny Llama with ``quick``)."""
    from innerpissa import AdapterConfig, attach, make_honesty_pairs
    from innerpissa.eval.engines import answer_scores
    from innerpissa.prompts import render_prompt
    from innerpissa.train import TrainConfig, train
    from innerpissa.train.guard import guard_questions

    spec = dict(TINY["llama"], vocab_size=len(tokenizer)) if quick else SHAPES["qwen3-4b"]
    t0 = time.perf_counter()
    model = build(spec, torch.bfloat16, device, layers)
    out: dict = {"shape": "tiny-llama" if quick else "qwen3-4b", "layers": model.config.num_hidden_layers}
    out["build_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    adapter = attach(model, AdapterConfig())
    out["attach_s"] = time.perf_counter() - t0
    out["targets"], out["rank"] = len(adapter.target_names), adapter.config.rank
    split = make_honesty_pairs(tokenizer, n_pairs=200, seed=0)
    cfg = TrainConfig(steps=steps, val_every=steps, checkpoint_every=steps, direction_pairs=32, val_pairs=8)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        train(adapter, tokenizer, list(split.train), list(split.val), cfg, run_dir=Path(tmp) / "run", progress=False)
        out["train_call_s"] = time.perf_counter() - t0
        rows = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
        secs = [r["seconds"] for r in rows if "seconds" in r]
    out["step_s"] = statistics.median(secs[1:] or secs)
    prompts = [render_prompt(tokenizer, q) for q in guard_questions()[:64]]
    per_point = []
    for c in SWEEP_COEFFS:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with adapter.steer(c):
            answer_scores(model, tokenizer, prompts)
        per_point.append(time.perf_counter() - t0)
    out["sweep_point_s"] = statistics.median(per_point)
    out["prompts"] = len(prompts)
    if device == "cuda":
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def prepare(check_dir: Path) -> None:
    """Write what the GPU machine cannot make: a tiny Llama GGUF with a trained-looking adapter, and the embedded
    SmolLM2 tokenizer (needs the ``gguf`` package, the test helpers and the embedded model: run it here)."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from tiny_gguf import randomize_adapter, tiny_llama_for_gguf, write_llama_gguf

    from innerpissa import AdapterConfig, attach
    from innerpissa.models import load_model

    check_dir.mkdir(parents=True, exist_ok=True)
    model = tiny_llama_for_gguf()
    write_llama_gguf(model, check_dir / "tiny.gguf")
    adapter = attach(model, AdapterConfig(rank=8))
    randomize_adapter(adapter)
    adapter.save(check_dir / "adapter")
    load_model(None).tokenizer.save_pretrained(check_dir / "tokenizer")
    print(f"gpu_check: wrote {check_dir}/tiny.gguf, adapter/, tokenizer/")


def markdown(res: dict) -> str:
    """The result as markdown tables (for docs/benchmarks.md)."""
    lines = [f"Device: {res['device_name']}; torch {res['torch']}; {res['date']}.", ""]
    lines += ["| model | dtype | c = 0 bit-identical | base vs CPU fp32 | c = +1 vs CPU fp32 | c = −1 vs CPU fp32 |"
              " merge(+1) vs side path | unmerge exact |", "|" + "---|" * 8]  # fmt: skip
    for r in res["torch_parity"]:
        lines.append(
            f"| {r['arch']} | {r['dtype']} | {r['c0_identical']} | {r['base_vs_cpu_fp32']:.2e} | "
            f"{r['c+1_vs_cpu_fp32']:.2e} | {r['c-1_vs_cpu_fp32']:.2e} | {r['merge+1_vs_hook']:.2e} | "
            f"{r['unmerge_exact']} |"
        )
    rp = res["rust_parity"]
    lines += ["", "Rust engine: " + (rp["error"] if "error" in rp else
              f"yes/no log-odds on {rp['device']} vs CPU, max |Δ| {rp['max_abs_diff_nats']:.2e} nats (c = 1 moves "
              f"them up to {rp['c1_moves_nats']:.2f}); {rp[rp['device'] + '_s']:.2f} s vs {rp['cpu_s']:.2f} s on "
              "the CPU for 3 × 64 rows.")]  # fmt: skip
    t = res["timing"]
    lines += ["", "| shape | blocks | targets, r | build s | attach (SVD) s | train s/step (8 pairs) | sweep point s "
              "(64 prompts) | peak GPU GiB |", "|" + "---|" * 8]  # fmt: skip
    lines.append(
        f"| {t['shape']} | {t['layers']} | {t['targets']}, {t['rank']} | {t['build_s']:.1f} | {t['attach_s']:.1f} | "
        f"{t['step_s']:.2f} | {t['sweep_point_s']:.2f} | {t.get('peak_gpu_gib', float('nan')):.1f} |"
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prepare", type=Path, default=None, help="write the check folder here and stop")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--check-dir", type=Path, default=Path("dist-cuda/check"))
    ap.add_argument("--out", type=Path, default=Path("gpu-check"))
    ap.add_argument("--layers", type=int, default=None, help="blocks of the Qwen3-4B shape to build (default 36)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="tiny timing model (a dry run of this script on CPU)")
    args = ap.parse_args()
    if args.prepare:
        prepare(args.prepare)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: torch sees no CUDA device; run it on the GPU machine (or --device cpu --quick)")
    if not (args.check_dir / "tiny.gguf").is_file():
        sys.exit(f"gpu_check: {args.check_dir}/tiny.gguf missing; run: python benches/gpu_check.py --prepare DIR")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.check_dir / "tokenizer")
    res = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "torch_parity": torch_parity(args.device),
        "rust_parity": rust_parity(args.device, args.check_dir),
    }
    res["timing"] = timing(args.device, tok, args.layers, args.steps, args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(res, indent=1))
    md = markdown(res)
    (args.out / "gpu_check.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
