"""`Engine.token_stats`: per-token log-probs and KL(unsteered ‖ steered) against a torch reference.

Tiny Llama (written as GGUF and read back by transformers) and tiny Gemma 3 (written as GGUF; the torch model is the
one written, transformers cannot read a tokenizer-less Gemma 3 GGUF), an adapter with random θ/δ and a control
vector. The torch reference is computed here, per sequence, in float64 log-softmax.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_gguf import randomize_adapter, tiny_gemma3_for_gguf, tiny_llama_for_gguf, write_gemma3_gguf, write_llama_gguf

from innerpissa import AdapterConfig, attach
from innerpissa._rust import Engine


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def tiny(request, tmp_path_factory):
    """(torch model, adapter, Engine with the adapter and one control vector, {block: direction}, vector index)."""
    from transformers import AutoModelForCausalLM

    d = tmp_path_factory.mktemp(f"kl_{request.param}")
    if request.param == "llama":
        path = write_llama_gguf(tiny_llama_for_gguf(), d / "tiny.gguf")
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file="tiny.gguf", dtype=torch.float32).eval()
    else:
        model = tiny_gemma3_for_gguf(300)
        path = write_gemma3_gguf(model, d / "tiny.gguf")
    adapter = randomize_adapter(attach(model, AdapterConfig(rank=8, depth_range=(0.25, None))))
    adapter.save(d / "adapter")
    eng = Engine(str(path))
    eng.load_adapter(str(d / "adapter"))
    g = torch.Generator().manual_seed(4)
    h = model.config.hidden_size
    dirs = {1: torch.randn(h, generator=g) * 0.5, 2: torch.randn(h, generator=g) * 0.5}
    idx = eng.add_control_vector({k: v.numpy() for k, v in dirs.items()})
    return model, adapter, eng, dirs, idx


def _branches(idx):
    return [("base",), ("adapter", 1.0), ("adapter", -2.0), ("vector", 1.5, idx)]


def _torch_logsoftmax(model, adapter, dirs, seq, branch):
    """log p(next token) at every position of `seq` (float64, (len, vocab)) under a branch spec."""
    hooks = []
    c = 0.0
    if branch[0] == "adapter":
        c = branch[1]
    elif branch[0] == "vector":
        coeff = branch[1]

        def add(ell):
            def hook(mod, args, out):
                if isinstance(out, tuple):
                    return (out[0] + coeff * dirs[ell],) + tuple(out[1:])
                return out + coeff * dirs[ell]

            return hook

        hooks = [model.model.layers[ell].register_forward_hook(add(ell)) for ell in dirs]
    try:
        with adapter.steer(c):
            return model(input_ids=torch.tensor([seq])).logits[0].double().log_softmax(-1)
    finally:
        for hk in hooks:
            hk.remove()


def _kl(lp_ref, lp):
    """Σ_v p_ref (log p_ref − log p) per row."""
    return (lp_ref.exp() * (lp_ref - lp)).sum(-1).numpy()


def _seqs(vocab, n=10, seed=0):
    """A shared prefix, shared stems and varied lengths (some longer than Gemma's sliding window of 12)."""
    rs = np.random.RandomState(seed)
    prefix = [int(t) for t in rs.randint(0, vocab, 6)]
    stems = [[int(t) for t in rs.randint(0, vocab, k)] for k in (0, 3)]
    return [prefix + stems[i % 2] + [int(t) for t in rs.randint(0, vocab, rs.randint(2, 20))] for i in range(n)]


def _vocab(model):
    return model.config.vocab_size


def test_logprobs_and_kl_match_torch(tiny):
    model, adapter, eng, dirs, idx = tiny
    seqs = _seqs(_vocab(model))
    starts = [0, 2, 5, 7, 1] * 2
    br = _branches(idx)
    lps, kls = eng.token_stats(seqs, starts, br, batch=4)
    n = len(seqs)
    assert len(lps) == len(kls) == len(br) * n
    # (a) the log-probs are token_logprobs' (same code path: bit-equal)
    for a, b in zip(lps, eng.token_logprobs(seqs, starts, br, batch=4)):
        np.testing.assert_array_equal(a, b)
    ref = [_torch_logsoftmax(model, adapter, dirs, s, br[0]) for s in seqs]
    moved = 0.0
    for b, spec in enumerate(br):
        for i, s in enumerate(seqs):
            lp = ref[i] if b == 0 else _torch_logsoftmax(model, adapter, dirs, s, spec)
            pos = torch.arange(starts[i], len(s) - 1)
            got_lp, got_kl = lps[b * n + i], kls[b * n + i]
            assert got_kl.dtype == np.float32 and got_kl.shape == (len(s) - 1 - starts[i],)
            np.testing.assert_allclose(got_lp, lp[pos, torch.tensor(s[starts[i] + 1 :])].numpy(), atol=2e-4)
            # (b) KL(p0 ‖ pc) within 1e-4 nats per position
            want = _kl(ref[i][pos], lp[pos])
            np.testing.assert_allclose(got_kl, want, rtol=0, atol=1e-4, err_msg=f"{spec} seq {i}")
            assert np.all(got_kl >= 0)
            moved = max(moved, float(want.mean()))
    assert moved > 0.01  # the branches really steer
    # (c) the base branch against itself: 0
    for i in range(n):
        assert np.abs(kls[i]).max(initial=0.0) <= 1e-7


def test_separate_reference_pass_agrees(tiny):
    """Without a base branch (or with ref_seqs given) the reference is a separate base pass: same numbers."""
    model, _, eng, _, idx = tiny
    seqs = _seqs(_vocab(model), n=7, seed=1)
    starts = [1] * 7
    br = _branches(idx)
    _, kls = eng.token_stats(seqs, starts, br, batch=3)
    _, alone = eng.token_stats(seqs, starts, br[1:], batch=3)
    _, explicit = eng.token_stats(seqs, starts, br, batch=3, ref_seqs=[list(s) for s in seqs], ref_starts=starts)
    for k in range(7 * (len(br) - 1)):
        np.testing.assert_allclose(alone[k], kls[7 + k], rtol=0, atol=1e-6)
    for k in range(7 * len(br)):
        np.testing.assert_allclose(explicit[k], kls[k], rtol=0, atol=1e-6)
    for i in range(7):
        assert np.abs(explicit[i]).max(initial=0.0) <= 1e-7


def test_kl_against_another_prompt_head(tiny):
    """(d) Steered sequences with a different head (a prompt) than the references, same body."""
    model, adapter, eng, dirs, idx = tiny
    vocab = _vocab(model)
    rs = np.random.RandomState(2)
    plain = [int(t) for t in rs.randint(0, vocab, 3)]
    prompted = [int(t) for t in rs.randint(0, vocab, 8)]
    bodies = [[int(t) for t in rs.randint(0, vocab, rs.randint(2, 16))] for _ in range(6)]
    seqs = [prompted + b for b in bodies]
    ref_seqs = [plain + b for b in bodies]
    starts, ref_starts = [len(prompted) - 1] * 6, [len(plain) - 1] * 6  # predict every body token
    br = _branches(idx)
    lps, kls = eng.token_stats(seqs, starts, br, batch=4, ref_seqs=ref_seqs, ref_starts=ref_starts)
    for a, b in zip(lps, eng.token_logprobs(seqs, starts, br, batch=4)):
        np.testing.assert_array_equal(a, b)
    n = len(seqs)
    for i in range(n):
        lp0 = _torch_logsoftmax(model, adapter, dirs, ref_seqs[i], br[0])[ref_starts[i] : len(ref_seqs[i]) - 1]
        for b, spec in enumerate(br):
            lp = _torch_logsoftmax(model, adapter, dirs, seqs[i], spec)[starts[i] : len(seqs[i]) - 1]
            want = _kl(lp0, lp)
            np.testing.assert_allclose(kls[b * n + i], want, rtol=0, atol=1e-4, err_msg=f"{spec} seq {i}")
    assert float(np.mean(np.concatenate(kls[:n]))) > 1e-3  # the head matters even unsteered


def _refused(call, *fields):
    try:
        call()
    except Exception as err:  # a PanicException is a BaseException: not caught here, so the test fails
        assert isinstance(err, ValueError), f"{type(err).__name__}: {err}"
        for f in fields:
            assert f in str(err), f"{f!r} not named in: {err}"
        return
    pytest.fail("accepted")


def test_bad_references_raise_value_error(tiny):
    """(e) Mismatched lengths are ValueErrors naming the sequence, never panics."""
    _, _, eng, _, _ = tiny
    seqs = [[1, 2, 3, 4, 5], [1, 2, 6, 7]]
    _refused(lambda: eng.token_stats(seqs, [1, 1], [("base",)], ref_seqs=[[1, 2, 3, 4, 5], [1, 2, 6]]), "sequence 1")
    _refused(lambda: eng.token_stats(seqs, [1, 1], [("base",)], ref_starts=[1, 2]), "sequence 1")
    _refused(lambda: eng.token_stats(seqs, [1, 1], [("base",)], ref_seqs=[[1, 2, 3]]), "reference sequences")
    _refused(lambda: eng.token_stats(seqs, [1, 1], [("base",)], ref_starts=[1]), "reference starts")
    _refused(lambda: eng.token_stats(seqs, [1], [("base",)]), "start positions")
    _refused(
        lambda: eng.token_stats(seqs, [0, 0], [("base",)], ref_seqs=[[], [1, 2, 3, 4]], ref_starts=[0, 0]), "empty"
    )
    _refused(
        lambda: eng.token_stats(
            seqs, [0, 0], [("base",)], ref_seqs=[[1, 2, 3, 4, 9999], [1, 2, 3, 4]], ref_starts=[0, 0]
        ),
        "out of range",
    )
    # ends past the sequence read nothing, as in token_logprobs
    lps, kls = eng.token_stats(seqs, [9, 9], [("base",), ("adapter", 1.0)], ref_seqs=[[1], [2, 3]], ref_starts=[0, 1])
    assert [len(a) for a in lps] == [len(a) for a in kls] == [0, 0, 0, 0]
    assert eng.token_stats(seqs, [1, 1], []) == ([], [])
