"""Export round trips: each artefact is loaded by the consumer it is for and compared with the steered PyTorch model.

Tiny Llama written as GGUF in the test (tests/tiny_gguf.py); llama.cpp via llama-cpp-python; ONNX Runtime;
PEFT; transformers. Tolerances: fp32 paths 1e-4 in logits / log-probs; polynomial ("live") paths are bounded by
the fit's recorded relative error of M(c).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_gemma3
from tiny_gguf import VOCAB_SIZE, randomize_adapter, tiny_llama_for_gguf, write_llama_gguf
from typer.testing import CliRunner

from innerpissa import AdapterConfig, attach
from innerpissa.adapter.layer import InnerPiSSALayer
from innerpissa.adapter.model import Adapter
from innerpissa.adapter.storage import fingerprint
from innerpissa.eval.methods import VectorMethod, mean_difference_control_vector
from innerpissa.export import (
    GGUFExportError,
    export_control_vector,
    export_llama_lora,
    export_llama_lora_live,
    export_merged_gguf,
    export_merged_hf,
    export_onnx_live,
    export_onnx_merged,
    export_peft_lora,
    fit_adapter,
    fit_polynomial,
    onnx_logits,
)
from innerpissa.export.gguf_io import permute_rows
from innerpissa.export.llamacpp import llama_cpp_logprobs

COEFFS = (-2.0, -1.0, 0.5, 1.0, 2.0)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _randomize(adapter: Adapter) -> Adapter:
    """Steering that moves log-probs by nats, not 1e-3 (θ scale 0.05)."""
    return randomize_adapter(adapter, theta=0.05)


def _logprobs(model, adapter, ids, c, mask=None):
    with adapter.steer(c):
        out = model(input_ids=ids, attention_mask=mask).logits
    return out.double().log_softmax(-1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(dir, gguf path, HF model loaded from the GGUF, randomized adapter, token ids)."""
    from transformers import AutoModelForCausalLM

    d = tmp_path_factory.mktemp("tiny")
    path = write_llama_gguf(tiny_llama_for_gguf(), d / "tiny.gguf")
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file="tiny.gguf", dtype=torch.float32).eval()
    adapter = _randomize(attach(model, AdapterConfig(rank=8, depth_range=(0.0, None)), meta={"base_model": str(path)}))
    toks = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB_SIZE, 14)]
    return d, path, model, adapter, toks


def test_gguf_writer_round_trips_through_transformers(tiny):
    _, _, model, _, toks = tiny
    ref = tiny_llama_for_gguf()
    ids = torch.tensor([toks])
    assert torch.equal(model(ids).logits, ref(ids).logits)


def test_qk_row_permutation_is_inverted_by_transformers():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = np.random.RandomState(0).randn(8 * 6, 5)
    back = LlamaTensorProcessor()._reverse_permute_weights(permute_rows(w, 8, 2), 8, 2)
    assert np.array_equal(back, w) and not np.array_equal(permute_rows(w, 8, 2), w)


# ---- polynomial basis ----


def _layer(scale="additive", rotate=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(40, 8, generator=g))
    v, _ = torch.linalg.qr(torch.randn(30, 8, generator=g))
    lay = InnerPiSSALayer(u, torch.rand(8, generator=g) + 1, v, scale=scale, rotate=rotate, init_std=0.1, generator=g)
    lay.delta.data *= 3
    return lay


def test_linear_variant_is_one_exact_term():
    fit = fit_polynomial(_layer(rotate=False), (-2, 2), degree=1)
    assert fit.degree == 1 and fit.max_abs_error < 1e-12


@pytest.mark.parametrize("scale", ["additive", "multiplicative"])
def test_polynomial_error_is_recorded_truthfully_and_shrinks_with_degree(scale):
    lay = _layer(scale)
    fits = [fit_polynomial(lay, (-2, 2), k) for k in (2, 4, 6)]
    assert fits[0].max_rel_error > fits[1].max_rel_error > fits[2].max_rel_error
    exact = lay.double()
    for c in np.random.RandomState(1).uniform(-2, 2, 50):
        m = exact.steer_matrix(float(c)).numpy()
        rel = np.linalg.norm(fits[2].evaluate(c) - m) / np.linalg.norm(m)
        assert rel <= fits[2].max_rel_error * 1.05 + 1e-12


def test_empty_range_is_refused():
    with pytest.raises(ValueError, match="empty"):
        fit_polynomial(_layer(), (1.0, 1.0), 2)


# ---- transformers / PEFT ----


@pytest.mark.parametrize("make", [tiny_llama_for_gguf, tiny_gemma3], ids=["llama", "gemma3"])
def test_merged_hf_and_peft_match_the_steered_model(make, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = make()
    adapter = _randomize(attach(model, AdapterConfig(rank=4, depth_range=(0.0, None))))
    ids = torch.randint(0, 200, (2, 9))
    before = model(ids).logits.clone()
    for c in (-2.0, 1.0):
        want = _logprobs(model, adapter, ids, c)
        export_merged_hf(adapter, None, c, tmp_path / "hf", overwrite=True)  # the second c replaces the first
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()(ids).logits.double().log_softmax(-1)
        assert (got - want).abs().max() < 1e-4
        assert (want - _logprobs(model, adapter, ids, 0.0)).abs().max() > 0.1  # the check can fail
        export_peft_lora(adapter, c, tmp_path / "peft", overwrite=True)
        base = make()
        peft_model = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
        got = peft_model(input_ids=ids).logits.double().log_softmax(-1)
        assert (got - want).abs().max() < 1e-4
    assert torch.equal(model(ids).logits, before)  # merge for the save was undone bit-exactly
    assert json.loads((tmp_path / "hf" / "innerpissa_export.json").read_text())["coefficient"] == 1.0


# ---- ONNX ----


def test_onnx_merged_and_live_coefficient_match(tiny, tmp_path):
    _, _, model, adapter, _ = tiny
    ids = torch.randint(0, 200, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    keep = mask.bool().numpy()
    export_onnx_merged(adapter, 1.0, tmp_path / "m")
    want = _logprobs(model, adapter, ids, 1.0, mask).float().numpy()
    got = onnx_logits(tmp_path / "m", ids.numpy(), mask.numpy())
    got = torch.from_numpy(got).double().log_softmax(-1).numpy()
    assert np.abs(got - want)[keep].max() < 1e-4
    fits = fit_adapter(adapter, (-2, 2), tol=1e-4)
    rel = max(f.max_rel_error for f in fits.values())
    assert rel <= 1e-4
    export_onnx_live(adapter, fits, tmp_path / "live")
    for c in (-2.0, -1.0, 0.0, 0.5, 2.0):
        want = _logprobs(model, adapter, ids, c, mask).numpy()
        got = torch.from_numpy(onnx_logits(tmp_path / "live", ids.numpy(), mask.numpy(), c)).double()
        assert np.abs(got.log_softmax(-1).numpy() - want)[keep].max() < 1e-3
    assert type(dict(model.named_modules())[adapter.target_names[0]]) is torch.nn.Linear  # swap undone


# ---- llama.cpp ----


def test_llama_cpp_base_gguf_matches_pytorch(tiny):
    _, path, model, adapter, toks = tiny
    got = llama_cpp_logprobs(path, tokens=toks)
    assert np.abs(got - _logprobs(model, adapter, torch.tensor([toks]), 0.0)[0].numpy()).max() < 1e-4


@pytest.mark.parametrize("c", COEFFS)
def test_llama_cpp_merged_gguf_and_exact_lora(tiny, c):
    d, path, model, adapter, toks = tiny
    want = _logprobs(model, adapter, torch.tensor([toks]), c)[0].numpy()
    assert np.abs(want - _logprobs(model, adapter, torch.tensor([toks]), 0.0)[0].numpy()).max() > 0.1
    types = export_merged_gguf(adapter, c, d / "merged.gguf", overwrite=True)  # one file per c
    assert set(types.values()) == {"F32"}  # the tiny base is F32, so "same" is exact
    got = llama_cpp_logprobs(d / "merged.gguf", tokens=toks)
    assert np.abs(got - want).max() < 1e-4
    export_llama_lora(adapter, c, d / "lora.gguf", overwrite=True)
    got = llama_cpp_logprobs(path, loras=[(d / "lora.gguf", 1.0)], tokens=toks)
    assert np.abs(got - want).max() < 1e-4


def test_llama_cpp_live_lora_polynomial(tiny):
    d, path, model, adapter, toks = tiny
    live = export_llama_lora_live(adapter, d / "live", (-2, 2), tol=1e-4)
    assert not live.exact and len(live.files) > 1 and live.max_rel_error <= 1e-4
    import gguf

    meta = gguf.GGUFReader(str(live.files[0])).fields
    assert abs(meta["innerpissa.max_rel_error"].contents() - live.max_rel_error) < 1e-6
    assert meta["adapter.lora.alpha"].contents() == float(adapter.config.rank)
    for c in COEFFS:
        want = _logprobs(model, adapter, torch.tensor([toks]), c)[0].numpy()
        got = llama_cpp_logprobs(path, loras=list(zip(live.files, live.scales(c))), tokens=toks)
        assert np.abs(got - want).max() < 1e-3


def test_llama_cpp_linear_variant_one_adapter_exact_at_every_c(tiny, tmp_path):
    _, path, model, _, toks = tiny
    adapter = _randomize(
        attach(model, AdapterConfig(rank=8, depth_range=(0.0, None), rotate=False), meta={"base_model": str(path)})
    )
    live = export_llama_lora_live(adapter, tmp_path / "lin")
    assert live.exact and len(live.files) == 1 and live.max_abs_error < 1e-12
    for c in (-2.0, 0.5, 3.0):  # 3 is outside the fit range: exact anyway
        want = _logprobs(model, adapter, torch.tensor([toks]), c)[0].numpy()
        got = llama_cpp_logprobs(path, loras=[(live.files[0], c)], tokens=toks)
        assert np.abs(got - want).max() < 1e-4


def test_llama_cpp_lora_on_permuted_q_and_k_rows(tiny, tmp_path):
    """Targets q_proj / k_proj, whose rows llama.cpp stores permuted: lora_b must be permuted the same way."""
    from innerpissa.svd import top_r_svd

    _, path, model, _, toks = tiny
    names = ["model.layers.1.self_attn.q_proj", "model.layers.2.self_attn.k_proj"]
    mods = dict(model.named_modules())
    bases = top_r_svd([mods[n].weight for n in names], 4)
    g = torch.Generator().manual_seed(3)
    layers = {n: InnerPiSSALayer(u, s, v, init_std=0.2, generator=g) for n, (u, s, v) in zip(names, bases)}
    for lay in layers.values():
        lay.delta.data = torch.randn(4, generator=g) * lay.S
    adapter = Adapter(
        model, AdapterConfig(rank=4), layers, fingerprint({n: mods[n].weight for n in names}), {"base_model": str(path)}
    )
    want = _logprobs(model, adapter, torch.tensor([toks]), 1.5)[0].numpy()
    assert np.abs(want - _logprobs(model, adapter, torch.tensor([toks]), 0.0)[0].numpy()).max() > 0.05
    export_llama_lora(adapter, 1.5, tmp_path / "qk.gguf")
    got = llama_cpp_logprobs(path, loras=[(tmp_path / "qk.gguf", 1.0)], tokens=toks)
    assert np.abs(got - want).max() < 1e-4


def test_control_vector_gguf_loads_in_llama_cpp(tiny, tmp_path):
    from innerpissa.pairs import ContrastivePair

    _, path, model, _, toks = tiny
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    pairs = [ContrastivePair(positive=f"the story {i} is true", negative=f"a tale {i} was an lie") for i in range(6)]
    dirs = mean_difference_control_vector(model, tok, pairs, [1, 2])
    assert all(v.norm() > 0 for v in dirs.values())
    export_control_vector({k: v.numpy() for k, v in dirs.items()}, tmp_path / "cv.gguf", "llama")
    method = VectorMethod(model, dirs)
    ids = torch.tensor([toks])
    for c in (-3.0, 2.0):
        with method.steer(c):
            want = model(ids).logits[0].double().log_softmax(-1).numpy()
        got = llama_cpp_logprobs(path, control_vector=(tmp_path / "cv.gguf", c), tokens=toks)
        assert np.abs(got - want).max() < 1e-4
    with pytest.raises(GGUFExportError, match="block 0"):
        export_control_vector({0: np.ones(64)}, tmp_path / "bad.gguf", "llama")


def test_cli_export_and_bad_input(tiny, tmp_path, monkeypatch):
    from innerpissa.cli import app

    _d, path, model, adapter, toks = tiny
    monkeypatch.setenv("IPISSA_CACHE", str(tmp_path / "cache"))
    adapter.save(tmp_path / "ad")
    runner = CliRunner()
    res = runner.invoke(
        app, ["export", str(tmp_path / "ad"), "-f", "lora", "-c", "1", "-o", str(tmp_path / "l.gguf"), "--threads", "2"]
    )
    assert res.exit_code == 0, res.output
    res = runner.invoke(
        app,
        [
            "export",
            str(tmp_path / "ad"),
            "-f",
            "lora-live",
            "-o",
            str(tmp_path / "live"),
            "--degree",
            "3",
            "--threads",
            "2",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "--lora-scaled" in res.output and (tmp_path / "live" / "lora.p3.gguf").exists()
    res = runner.invoke(app, ["export", str(tmp_path / "ad"), "-f", "gguf", "-o", str(tmp_path / "m.gguf")])
    assert res.exit_code != 0 and "--coeff" in res.output
    res = runner.invoke(app, ["export", str(tmp_path / "ad"), "-f", "tflite", "-c", "1", "-o", str(tmp_path / "x")])
    assert res.exit_code != 0 and "--format" in res.output
    want = _logprobs(model, adapter, torch.tensor([toks]), 1.0)[0].numpy()
    got = llama_cpp_logprobs(path, loras=[(tmp_path / "l.gguf", 1.0)], tokens=toks)
    assert np.abs(got - want).max() < 1e-4


def test_merged_gguf_needs_a_gguf_base(tmp_path):
    model = tiny_gemma3()
    adapter = attach(model, AdapterConfig(rank=4), meta={"base_model": "some/hub-id"})
    with pytest.raises(GGUFExportError, match="--base-gguf"):
        export_merged_gguf(adapter, 1.0, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
