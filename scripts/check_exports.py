"""Round-trip check of every export on SmolLM2: load each artefact in its consumer, compare with PyTorch.

    python scripts/check_exports.py --adapter RUN/adapter [--out docs/export_check.json]

For each coefficient c ∈ {−2, −1, 0.5, 1, 2} and 8 held-out Yes/No questions, compares the consumer's next-token
log-probs at the answer position with the steered PyTorch model's: the worst |Δ log p| over PyTorch's 20 most
likely tokens, and the worst |Δ| of the Yes/No log-odds (the quantity the evaluator scores). llama.cpp runs both
the shipped Q4_1 GGUF (quantized matmuls: not the same arithmetic as PyTorch's de-quantized fp32) and an F32
copy of it (the same weights as PyTorch), so export error and llama.cpp's own quantization error are told apart.
Also prints the polynomial-basis degree and recorded error of the trained adapter's live exports.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np
import torch

from innerpissa import AdapterConfig, attach, load_adapter
from innerpissa.eval.engines import answer_token_sets, eval_prompt
from innerpissa.eval.methods import VectorMethod, mean_difference_control_vector, pca_control_vector
from innerpissa.export import (
    export_control_vector,
    export_llama_lora,
    export_llama_lora_live,
    export_merged_gguf,
    export_merged_hf,
    export_onnx_live,
    export_onnx_merged,
    export_peft_lora,
    fit_adapter,
    onnx_logits,
    resolve_base_gguf,
)
from innerpissa.export.gguf_io import dequantize_gguf
from innerpissa.export.llamacpp import LlamaCppRunner
from innerpissa.models import load_model
from innerpissa.pairs import make_honesty_pairs

COEFFS = (-2.0, -1.0, 0.5, 1.0, 2.0)
QUESTIONS = [
    "Is it acceptable to lie to protect a friend's feelings?",
    "Would you tell your manager about a mistake that nobody else noticed?",
    "Should a salesperson hide a product's known defect to close a sale?",
    "Is it fine to take credit for a colleague's idea if they never find out?",
    "Would you return extra change a cashier gave you by mistake?",
    "Is exaggerating on a CV acceptable when everyone else does it?",
    "Should you admit to breaking a neighbour's window if no one saw you?",
    "Is it okay to copy answers in an exam if the teacher is not looking?",
]


def compare(got: np.ndarray, want: np.ndarray, yes: list[int], no: list[int]) -> dict:
    """got, want: (N, vocab) log-probs at the answer position."""
    top = np.argsort(-want, axis=-1)[:, :20]
    d = np.abs(np.take_along_axis(got, top, -1) - np.take_along_axis(want, top, -1)).max()

    def odds(lp):
        return np.logaddexp.reduce(lp[:, yes], axis=-1) - np.logaddexp.reduce(lp[:, no], axis=-1)

    return {"top20_max_abs": float(d), "yes_no_logodds_max_abs": float(np.abs(odds(got) - odds(want)).max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--adapter",
        type=Path,
        default=None,
        help="trained adapter (default: an untrained adapter on "
        "--model with random θ ~ 0.02, δ ~ 0.1·S, seed 0: enough to check the formats)",
    )
    ap.add_argument("--model", default=None, help="model spec when no --adapter (default: embedded SmolLM2)")
    ap.add_argument("--only-gguf", action="store_true", help="only the llama.cpp checks")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    t_start = time.perf_counter()
    if args.adapter is not None:
        lm = load_model(json.loads((args.adapter / "adapter_config.json").read_text()).get("base_model"))
        adapter = load_adapter(lm.model, args.adapter)
    else:
        lm = load_model(args.model)
        adapter = attach(lm.model, AdapterConfig(seed=0), meta={"base_model": lm.spec})
        g = torch.Generator().manual_seed(0)
        for name in adapter.target_names:
            lay = adapter.layer(name)
            lay.theta.data = torch.randn(lay.theta.shape, generator=g) * 0.02
            lay.delta.data = torch.randn(lay.rank, generator=g) * 0.1 * lay.S
    model, tok = lm.model, lm.tokenizer
    yes, no = answer_token_sets(tok)
    prompts = [tok(eval_prompt(tok, q, "yesno", None), add_special_tokens=False).input_ids for q in QUESTIONS]

    def torch_lp(c, m=model, steer=True):
        rows = []
        for p in prompts:
            ctx = adapter.steer(c) if steer else torch.no_grad()
            with ctx:
                rows.append(m(torch.tensor([p])).logits[0, -1].double().log_softmax(-1).numpy())
        return np.stack(rows)

    def llama_lp(gguf, loras=(), cv=None):
        with LlamaCppRunner(gguf, loras=loras, control_vector=cv, n_threads=args.threads) as r:
            return np.stack([r.logprobs(p)[-1] for p in prompts])

    res: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {args.threads} threads",
        "date": time.strftime("%Y-%m-%d"),
        "adapter": str(args.adapter or "random"),
        "model": lm.spec,
        "coefficients": COEFFS,
        "rows": [],
    }

    def row(artefact, consumer, c, got, want):
        r = {"artefact": artefact, "consumer": consumer, "c": c, **compare(got, want, yes, no)}
        res["rows"].append(r)
        print(
            f"{artefact:28s} {consumer:22s} c={c:+.1f}  top20 {r['top20_max_abs']:.2e}  "
            f"yes/no {r['yes_no_logodds_max_abs']:.2e}",
            flush=True,
        )

    want = {c: torch_lp(c) for c in (0.0, *COEFFS)}
    res["steering_effect_yes_no"] = {c: compare(want[c], want[0.0], yes, no)["yes_no_logodds_max_abs"] for c in COEFFS}
    for rng in ((-1.0, 1.0), (-2.0, 2.0)):
        for tol in (1e-2, 1e-3):
            fits = fit_adapter(adapter, rng, tol=tol)
            k = next(iter(fits.values())).degree
            rel = max(f.max_rel_error for f in fits.values())
            res.setdefault("poly", []).append({"c_range": rng, "tol": tol, "degree": k, "max_rel_error": rel})
            print(f"polynomial fit over {rng}, tol {tol}: degree {k}, worst relative error {rel:.2e}")

    base_gguf = resolve_base_gguf(adapter)
    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        f32 = dequantize_gguf(base_gguf, tmp / "base-f32.gguf")
        qname = sorted(
            {t.tensor_type.name for t in gguf.GGUFReader(str(base_gguf)).tensors if t.name.endswith("ffn_down.weight")}
        )[0]
        row("base (no export)", f"llama.cpp {qname}", 0.0, llama_lp(base_gguf), want[0.0])
        row("base (no export)", "llama.cpp F32", 0.0, llama_lp(f32), want[0.0])
        for c in COEFFS:
            export_llama_lora(adapter, c, tmp / "lora.gguf")
            row("LoRA exact at c", "llama.cpp F32 base", c, llama_lp(f32, [(tmp / "lora.gguf", 1.0)]), want[c])
            row(
                "LoRA exact at c",
                f"llama.cpp {qname} base",
                c,
                llama_lp(base_gguf, [(tmp / "lora.gguf", 1.0)]),
                want[c],
            )
            export_merged_gguf(adapter, c, tmp / "m.gguf", base_gguf=f32)
            row("merged GGUF (F32)", "llama.cpp", c, llama_lp(tmp / "m.gguf"), want[c])
            types = export_merged_gguf(adapter, c, tmp / "m.gguf", tensor_type="same")
            row(
                f"merged GGUF (same: {'/'.join(sorted(set(types.values())))})",
                "llama.cpp",
                c,
                llama_lp(tmp / "m.gguf"),
                want[c],
            )
            export_merged_gguf(adapter, c, tmp / "m.gguf", tensor_type="q8_0")
            row("merged GGUF (Q8_0 edited)", "llama.cpp", c, llama_lp(tmp / "m.gguf"), want[c])
        for rng in ((-2.0, 2.0),):
            live = export_llama_lora_live(adapter, tmp / "live", rng, tol=1e-3)
            res["live_lora"] = {"files": len(live.files), "max_rel_error": live.max_rel_error, "c_range": rng}
            for c in COEFFS:
                row(
                    f"live LoRA K={len(live.files)}",
                    "llama.cpp F32 base",
                    c,
                    llama_lp(f32, list(zip(live.files, live.scales(c)))),
                    want[c],
                )
        if not args.only_gguf:
            other_consumers(args, adapter, lm, tmp, prompts, want, torch_lp, llama_lp, f32, row)
    res["seconds"] = round(time.perf_counter() - t_start, 1)
    res["command"] = "python " + " ".join(sys.argv)
    if args.out:
        args.out.write_text(json.dumps(res, indent=2))
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}, indent=2))


def other_consumers(args, adapter, lm, tmp, prompts, want, torch_lp, llama_lp, f32, row) -> None:
    """Control vectors in llama.cpp; merged HF in transformers; PEFT; ONNX (merged and live) in onnxruntime."""
    model, tok = lm.model, lm.tokenizer
    pairs = list(make_honesty_pairs(tok, n_pairs=300, seed=0).train)[:64]
    layers = [10, 14, 18]
    for name, make in (("PCA", pca_control_vector), ("mean-diff", mean_difference_control_vector)):
        dirs = make(model, tok, pairs, layers)
        export_control_vector({k: v.numpy() for k, v in dirs.items()}, tmp / "cv.gguf", model.config.model_type)
        vm = VectorMethod(model, dirs)
        for c in (-4.0, 4.0) if name == "PCA" else (-1.0, 1.0):
            with vm.steer(c):
                ref = torch_lp(0.0, steer=False)
            row(f"control vector {name}", "llama.cpp F32", c, llama_lp(f32, cv=(tmp / "cv.gguf", c)), ref)
    export_merged_hf(adapter, tok, 1.0, tmp / "hf")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp / "hf").eval()
    row("merged HF", "transformers", 1.0, torch_lp(0.0, hf, steer=False), want[1.0])
    del hf
    from peft import PeftModel

    export_peft_lora(adapter, 1.0, tmp / "peft")
    base2 = load_model(lm.spec).model
    pm = PeftModel.from_pretrained(base2, tmp / "peft").eval()
    row("PEFT LoRA", "peft", 1.0, torch_lp(0.0, pm, steer=False), want[1.0])
    del pm, base2

    def ort_lp(path, c=None):
        rows = []
        for p in prompts:
            ids = np.array([p])
            rows.append(onnx_logits(path, ids, np.ones_like(ids), c)[0, -1].astype(np.float64))
        lg = np.stack(rows)
        return lg - np.logaddexp.reduce(lg, axis=-1, keepdims=True)

    export_onnx_merged(adapter, 1.0, tmp / "onnx")
    row("ONNX merged", "onnxruntime", 1.0, ort_lp(tmp / "onnx"), want[1.0])
    fits = fit_adapter(adapter, (-2.0, 2.0), tol=1e-3)
    export_onnx_live(adapter, fits, tmp / "onnx-live")
    for c in COEFFS:
        row(f"ONNX live K={next(iter(fits.values())).degree}", "onnxruntime", c, ort_lp(tmp / "onnx-live", c), want[c])


if __name__ == "__main__":
    main()
