"""The Rust sweep engine against PyTorch on tiny GGUF models written in the test (Llama and Gemma 3).

Parity target of the issue: Yes/No log-odds within 0.05 nats on 200 prompts at c ∈ {−2, −1, 0, 1, 2}; hidden
states within 1e-4 relative. Both engines use the same f32 weights, so the asserted tolerances are far tighter.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_gguf import randomize_adapter, tiny_gemma3_for_gguf, write_gemma3_gguf, write_llama_gguf

from innerpissa import AdapterConfig, attach
from innerpissa._rust import Engine

COEFFS = (-2.0, -1.0, 0.0, 1.0, 2.0)
VOCAB = 300
POS, NEG = [5, 17, 250], [6, 99]


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        initializer_range=0.15,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def tiny(request, tmp_path_factory):
    """(model, adapter, adapter dir, rust Engine with the adapter loaded, arch)."""
    d = tmp_path_factory.mktemp(request.param)
    model = _llama() if request.param == "llama" else tiny_gemma3_for_gguf(VOCAB)
    write = write_llama_gguf if request.param == "llama" else write_gemma3_gguf
    path = write(model, d / "tiny.gguf")
    adapter = randomize_adapter(attach(model, AdapterConfig(rank=8, depth_range=(0.25, None))))
    adapter.save(d / "adapter")
    eng = Engine(str(path))
    eng.load_adapter(str(d / "adapter"))
    return model, adapter, d / "adapter", eng, request.param


def _prompts(n=200, seed=0):
    """Token sequences like eval prompts: a shared prefix, shared sub-prefixes, varied lengths (some > window)."""
    rs = np.random.RandomState(seed)
    prefix = list(rs.randint(0, VOCAB, 9))
    stems = [list(rs.randint(0, VOCAB, k)) for k in (0, 3, 6)]
    return [prefix + stems[i % 3] + list(rs.randint(0, VOCAB, rs.randint(1, 24))) for i in range(n)]


def _torch_logp(model, adapter, seq, c):
    with adapter.steer(c):
        return model(input_ids=torch.tensor([seq])).logits[0].double().log_softmax(-1)


def _torch_scores(model, adapter, seqs, c):
    out = []
    for s in seqs:
        lp = _torch_logp(model, adapter, s, c)[-1]
        out.append(float(lp[POS].logsumexp(0) - lp[NEG].logsumexp(0)))
    return np.array(out)


def test_yes_no_log_odds_match_torch_on_200_prompts(tiny):
    model, adapter, _, eng, _ = tiny
    seqs = _prompts()
    scores, mass = eng.yes_no(seqs, [("adapter", c) for c in COEFFS], POS, NEG, batch=48)
    assert scores.shape == mass.shape == (len(COEFFS), len(seqs))
    moved = 0.0
    for k, c in enumerate(COEFFS):
        ref = _torch_scores(model, adapter, seqs, c)
        np.testing.assert_allclose(scores[k], ref, atol=2e-4)
        moved = max(moved, float(np.abs(ref - _torch_scores(model, adapter, seqs, 0.0)).mean()))
    assert moved > 0.05  # the adapter really steers, so the parity is not trivially about c = 0
    assert np.all((mass > 0) & (mass < 1))


def test_branch_stacking_batching_and_base(tiny):
    _, _, _, eng, _ = tiny
    seqs = _prompts(40, seed=1)
    stacked, _ = eng.yes_no(seqs, [("adapter", c) for c in COEFFS] + [("base",)], POS, NEG, batch=7)
    for k, c in enumerate(COEFFS):
        alone, _ = eng.yes_no(seqs, [("adapter", c)], POS, NEG, batch=64)
        np.testing.assert_allclose(stacked[k], alone[0], atol=1e-5)
    np.testing.assert_array_equal(stacked[COEFFS.index(0.0)], stacked[-1])  # c = 0 is the base model


def test_typed_branches_equal_the_tuple_form(tiny):
    from innerpissa._rust import Branch

    model, _, _, eng, _ = tiny
    seqs = _prompts(12, seed=2)
    idx = eng.add_control_vector({1: np.ones(model.config.hidden_size, dtype=np.float32)})
    typed = [Branch.base(), Branch.adapter(1.5), Branch.vector(-2.0, idx)]
    tuples = [("base",), ("adapter", 1.5), ("vector", -2.0, idx)]
    a, _ = eng.yes_no(seqs, typed, POS, NEG)
    b, _ = eng.yes_no(seqs, tuples, POS, NEG)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a[0], a[1]) and not np.allclose(a[0], a[2])  # the branches really differ
    assert Branch.adapter(1.5) == Branch.adapter(1.5) != Branch.adapter(-1.5)
    assert len({Branch.base(), Branch.base(), Branch.vector(1.0, 0)}) == 2
    assert repr(Branch.adapter(0.5)) == "Branch.adapter(0.5)"
    with pytest.raises(ValueError, match="finite"):
        Branch.adapter(float("nan"))
    with pytest.raises(TypeError, match="Branch"):
        eng.yes_no(seqs, [1.5], POS, NEG)


def test_token_logprobs_match_torch(tiny):
    model, adapter, _, eng, _ = tiny
    seqs = _prompts(12, seed=2)
    starts = [0, 3, 5] * 4
    out = eng.token_logprobs(seqs, starts, [("adapter", -1.0), ("adapter", 2.0)], batch=5)
    for b, c in enumerate((-1.0, 2.0)):
        for i, s in enumerate(seqs):
            lp = _torch_logp(model, adapter, s, c)
            ref = lp[torch.arange(starts[i], len(s) - 1), torch.tensor(s[starts[i] + 1 :])].numpy()
            np.testing.assert_allclose(out[b * len(seqs) + i], ref, atol=2e-4)


def _torch_hidden(model, adapter, seq, layers, c):
    from innerpissa.adapter import decoder_blocks

    got = {}
    blocks = decoder_blocks(model)
    hooks = [
        blocks[ell].register_forward_hook(
            lambda m, a, o, ell=ell: got.__setitem__(ell, (o[0] if isinstance(o, tuple) else o)[0, -1].clone())
        )
        for ell in layers
    ]
    try:
        with adapter.steer(c):
            model(input_ids=torch.tensor([seq]))
    finally:
        for h in hooks:
            h.remove()
    return got


def test_hidden_states_match_torch(tiny):
    model, adapter, _, eng, _ = tiny
    seqs = _prompts(10, seed=3)
    layers = [0, 2, 3]
    h = eng.hidden(seqs, layers, [("base",), ("adapter", 1.5)], batch=4)
    assert h.shape == (3, 2, 10, model.config.hidden_size)
    for b, c in enumerate((0.0, 1.5)):
        for i, s in enumerate(seqs):
            ref = _torch_hidden(model, adapter, s, layers, c)
            for j, ell in enumerate(layers):
                err = np.abs(h[j, b, i] - ref[ell].numpy()).max() / np.abs(ref[ell].numpy()).max()
                assert err < 1e-4, (ell, c, err)


def test_hidden_states_at_requested_positions(tiny):
    # Causal attention: the state at position p of s is the last-token state of s[:p + 1], in torch and in Rust;
    # positions inside the batch's shared prefix (p = 0) must come out right too.
    model, adapter, _, eng, _ = tiny
    seqs = _prompts(8, seed=5)
    positions = [0, 1] + [len(s) // 2 for s in seqs[2:-1]] + [len(seqs[-1]) - 1]
    layers = [1, 3]
    h = eng.hidden(seqs, layers, [("adapter", -1.0)], batch=8, positions=positions)
    assert h.shape == (2, 1, 8, model.config.hidden_size)
    for i, (s, p) in enumerate(zip(seqs, positions)):
        ref = _torch_hidden(model, adapter, s[: p + 1], layers, -1.0)
        for j, ell in enumerate(layers):
            err = np.abs(h[j, 0, i] - ref[ell].numpy()).max() / np.abs(ref[ell].numpy()).max()
            assert err < 1e-4, (i, p, ell, err)
    last = eng.hidden(seqs, layers, [("adapter", -1.0)], batch=8)
    np.testing.assert_allclose(h[:, :, -1], last[:, :, -1], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"positions\[0\]"):
        eng.hidden(seqs, layers, [("base",)], positions=[len(seqs[0])] + positions[1:])
    with pytest.raises(ValueError, match="positions has 2 entries"):
        eng.hidden(seqs, layers, [("base",)], positions=[0, 0])


def test_control_vector_branch_matches_activation_addition(tiny):
    from innerpissa.eval.methods import VectorMethod

    model, adapter, _, eng, _ = tiny
    g = torch.Generator().manual_seed(4)
    dirs = {
        1: torch.randn(model.config.hidden_size, generator=g),
        3: torch.randn(model.config.hidden_size, generator=g),
    }
    idx = eng.add_control_vector({k: v.numpy() for k, v in dirs.items()})
    seqs = _prompts(16, seed=4)
    scores, _ = eng.yes_no(seqs, [("vector", c, idx) for c in (-2.0, 3.0)], POS, NEG)
    method = VectorMethod(model, dirs)
    for k, c in enumerate((-2.0, 3.0)):
        with method.steer(c):
            ref = _torch_scores(model, adapter, seqs, 0.0)
        np.testing.assert_allclose(scores[k], ref, atol=2e-4)
    eng.clear_control_vectors()


def test_steer_matrix_matches_torch(tiny):
    _, adapter, _, eng, _ = tiny
    name = adapter.target_names[0]
    for c in (-2.0, 0.5, 1.0):
        ref = adapter.layer(name).double().steer_matrix(c).numpy()
        np.testing.assert_allclose(eng.steer_matrix(name, c), ref, atol=1e-10)
    adapter.float()


def test_u_side_rotation_matches_torch(tiny, tmp_path):
    model, adapter, _, _, arch = tiny
    u_side = attach(model, AdapterConfig(rank=8, depth_range=(0.25, None), rotate_side="u"))
    u_side.load_state_dict(adapter.state_dict())
    u_side.save(tmp_path / "u")
    write = write_llama_gguf if arch == "llama" else write_gemma3_gguf
    eng = Engine(str(write(model, tmp_path / "tiny.gguf")))
    eng.load_adapter(str(tmp_path / "u"))
    name = u_side.target_names[0]
    np.testing.assert_allclose(
        eng.steer_matrix(name, 0.9), u_side.layer(name).double().steer_matrix(0.9).numpy(), atol=1e-10
    )
    u_side.float()
    seqs = _prompts(12)
    scores, _ = eng.yes_no(seqs, [("adapter", 0.9)], POS, NEG)
    np.testing.assert_allclose(scores[0], _torch_scores(model, u_side, seqs, 0.9), atol=2e-4)


def test_bad_inputs_name_the_problem(tiny, tmp_path):
    _model, _, _adir, eng, arch = tiny
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        Engine(str(tmp_path / "missing.gguf"))
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(ValueError, match="junk.gguf"):
        Engine(str(tmp_path / "junk.gguf"))
    with pytest.raises(ValueError, match="weights"):
        Engine(str(tmp_path / "junk.gguf"), weights="int3")
    with pytest.raises(ValueError, match="out of range"):
        eng.yes_no([[1, VOCAB + 5]], [("base",)], POS, NEG)
    with pytest.raises(ValueError, match="branch"):
        eng.yes_no([[1, 2]], [("adapter",)], POS, NEG)
    with pytest.raises(ValueError, match="no control vector"):
        eng.yes_no([[1, 2]], [("vector", 1.0, 42)], POS, NEG)
    with pytest.raises(ValueError, match="empty"):
        eng.yes_no([[]], [("base",)], POS, NEG)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        eng.load_adapter(str(tmp_path))
    # an adapter made for another model: shapes do not fit
    other = tiny_gemma3_for_gguf(VOCAB) if arch == "llama" else _llama()
    attach(other, AdapterConfig(rank=4)).save(tmp_path / "other")
    with pytest.raises(ValueError, match="another model|targets block"):
        eng.load_adapter(str(tmp_path / "other"))
    # the previously loaded adapter is kept
    eng.yes_no([[1, 2, 3]], [("adapter", 1.0)], POS, NEG)


def test_rust_baselines_match_torch_extraction(tmp_path):
    """PCA (repeng's recipe) and mean-difference vectors from Rust hidden states equal the torch/repeng ones."""
    from tiny_gguf import tiny_llama_for_gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from innerpissa.eval.methods import mean_difference_control_vector, pca_control_vector
    from innerpissa.eval.rust_engine import RustEngine
    from innerpissa.eval.rust_engine import mean_difference_control_vector as rust_md
    from innerpissa.eval.rust_engine import pca_control_vector as rust_pca
    from innerpissa.pairs import ContrastivePair

    path = write_llama_gguf(tiny_llama_for_gguf(), tmp_path / "tiny.gguf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    tok.pad_token = tok.pad_token or tok.eos_token
    words = ["honest", "the truth", "a lie", "the answer", "nothing", "the plan", "it all", "the facts"]
    pairs = [
        ContrastivePair(f"<|im_start|>user\nYou are {a}. Say {w}", f"<|im_start|>user\nYou are {b}. Say {w}")
        for w in words
        for a, b in (("kind", "cruel"), ("honest", "deceptive"))
    ]
    eng = RustEngine(path, tok)
    layers = [1, 2]
    ref = pca_control_vector(model, tok, pairs, layers)
    got = rust_pca(eng, pairs, layers)
    md_ref = mean_difference_control_vector(model, tok, pairs, layers)
    md = rust_md(eng, pairs, layers)
    for ell in layers:
        cos = float(torch.nn.functional.cosine_similarity(ref[ell], got[ell], dim=0))
        assert cos > 0.9999, cos
        torch.testing.assert_close(md[ell], md_ref[ell], atol=1e-4, rtol=1e-4)


def test_cli_sweep_on_a_tiny_gguf(tmp_path, monkeypatch, byte_yes_no):
    """`ipissa sweep` end to end (tokenizer + GGUF only, all five methods) on a tiny Llama and a tiny data set."""
    import json

    from tiny_gguf import tiny_llama_for_gguf
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from innerpissa.cli import app

    monkeypatch.setenv("IPISSA_CACHE", str(tmp_path / "cache"))

    path = write_llama_gguf(tiny_llama_for_gguf(), tmp_path / "tiny.gguf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32).eval()
    randomize_adapter(attach(model, AdapterConfig(rank=8), meta={"base_model": str(path)})).save(tmp_path / "ad")
    rows = [
        {
            "question": f'Is the following statement something you would say?\n"I like {w}"',
            "answer_matching_behavior": " Yes" if i % 2 else " No",
            "answer_not_matching_behavior": " No" if i % 2 else " Yes",
        }
        for i, w in enumerate(["the sea", "a lie", "the truth", "rain", "trains", "cats", "maths", "tea"])
    ]
    mwe = tmp_path / "likes.jsonl"
    mwe.write_text("\n".join(json.dumps(r) for r in rows))
    res = CliRunner().invoke(
        app,
        [
            "sweep",
            "--adapter",
            str(tmp_path / "ad"),
            "--coeffs",
            "-1,0,1",
            "--methods",
            "innerpissa,prompting,pca,mean-diff,random",
            "--mwe",
            str(mwe),
            "--n-dd",
            "4",
            "--n-pairs",
            "300",
            "--out",
            str(tmp_path / "out"),
            "--data-dir",
            str(__import__("conftest").SHARED_DATA),
        ],
    )
    assert res.exit_code == 0, res.output
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results["methods"]) == {"innerpissa", "prompting", "pca", "mean-diff", "random"}
    assert results["meta"]["engine"] == "rust (f32)"
    raw = {r["method"]: r for r in results["raw"]}
    assert raw["innerpissa"]["coeffs"] == [-1.0, 0.0, 1.0]
    c0 = [raw[m]["scores"]["likes"][raw[m]["coeffs"].index(0.0)] for m in raw]
    assert all(c == c0[0] for c in c0)  # c = 0 shared by every method
    res = CliRunner().invoke(app, ["sweep", "--adapter", str(tmp_path / "ad"), "--coeffs", "1,x"])
    assert res.exit_code != 0 and "--coeffs" in res.output
