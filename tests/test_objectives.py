"""The three training objectives on a tiny random Llama: each one's sign (+1 raises and −1 lowers the pair
separation along the frozen direction; ``anchored`` also moves persona-free prompts toward the positive side),
the bounded rotation, the cached c = 0 pass, the schedule and warm-up, and saved adapters of every objective."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama, word_tokenizer

from innerpissa import AdapterConfig, attach, load_adapter
from innerpissa.adapter.layer import skew
from innerpissa.adapter.targets import decoder_blocks
from innerpissa.pairs import make_honesty_pairs
from innerpissa.train import (
    TrainConfig,
    batch_free_reference,
    batch_reference,
    constraint_weight,
    forward_states,
    preference_direction,
    reference_cache,
    reprpo_loss,
    tokenize_neutral,
    tokenize_pairs,
    train,
)
from innerpissa.train.objectives import OBJECTIVES


def _setup(seed: int = 0):
    probe = word_tokenizer([])
    split = make_honesty_pairs(probe, n_pairs=48, seed=seed, val_fraction=0.2)
    texts = [t for p in split.train + split.val for t in (p.positive, p.negative, p.neutral)]
    tok = word_tokenizer(texts)
    split = make_honesty_pairs(tok, n_pairs=48, seed=seed, val_fraction=0.2)
    return tiny_llama(vocab_size=len(tok)), tok, split


@torch.no_grad()
def _readings(adapter, tok, pairs, ruler, cfg):
    """Mean pair separation s(c) and persona-free projection a(c) along u at c = −1, 0, +1."""
    block = decoder_blocks(adapter.model)[ruler.block_index]
    batch = tokenize_pairs(tok, pairs, cfg.max_suffix_tokens)
    free = tokenize_neutral(tok, pairs, cfg.max_suffix_tokens)
    s, a = [], []
    for c in (-1.0, 0.0, 1.0):
        with adapter.steer(c):
            h, _, _ = forward_states(adapter.model, batch, block, cfg.last_k)
            hf, _, _ = forward_states(adapter.model, free, block, cfg.last_k)
        s.append(float(ruler.separation(h, batch.n_pairs).mean()) / ruler.sigma)
        a.append(float((hf @ ruler.basis @ ruler.u).mean()) / ruler.sigma)
    return s, a


def _train_tiny(objective: str, run_dir=None, **extra):
    """30 steps of ``objective`` on the tiny Llama → (adapter, tokenizer, split, config, readings (s, a))."""
    model, tok, split = _setup()
    adapter = attach(model, AdapterConfig(rank=8))
    cfg = TrainConfig(
        steps=30, batch_pairs=4, lr=2e-2, val_every=30, checkpoint_every=100, objective=objective, **extra
    )
    train(adapter, tok, list(split.train), list(split.val), cfg, run_dir=run_dir, progress=False)
    ruler = preference_direction(adapter, tok, list(split.train), cfg)  # c = 0 is the base model: same ruler
    return adapter, tok, split, cfg, _readings(adapter, tok, list(split.val), ruler, cfg)


@pytest.mark.parametrize(
    "objective,extra",
    [
        ("reprpo-svd", {}),
        ("antiparallel", {"basis": "pca", "basis_rank": 4}),
        ("anchored", {}),
    ],
)
def test_each_objective_orders_the_separation(tmp_path, objective, extra):
    _, tok, _, _, (s, a) = _train_tiny(objective, tmp_path, **extra)
    assert s[2] > s[1] + 0.05 and s[1] > s[0] + 0.05, s
    if objective == "anchored":  # persona-free prompts move toward the positive side at +1, away at −1
        assert a[2] > a[1] + 0.05 and a[1] > a[0] + 0.05, a
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["loss"] == {"name": objective, "version": OBJECTIVES[objective]}
    load_adapter(tiny_llama(vocab_size=len(tok)), tmp_path / "adapter")  # every objective's adapter loads


@torch.no_grad()
def _even_change(adapter, tok, pairs, cfg):
    """Mean |½(Δ₊₁ + Δ₋₁)| of the suffix token log-probs of the pairs and their persona-free prompts (nats)."""
    block = decoder_blocks(adapter.model)[0]
    out = []
    for batch in (
        tokenize_pairs(tok, pairs, cfg.max_suffix_tokens),
        tokenize_neutral(tok, pairs, cfg.max_suffix_tokens),
    ):
        lp = {}
        for c in (-1.0, 0.0, 1.0):
            with adapter.steer(c):
                lp[c] = forward_states(adapter.model, batch, block, 1)[1]
        even = (0.5 * (lp[1.0] + lp[-1.0]) - lp[0.0]).abs()
        out.append(float(even[batch.suffix_mask].mean()))
    return sum(out) / 2


def test_even_penalty_keeps_the_objective_sign_and_shrinks_the_even_change():
    """even_weight > 0 leaves anchored's ordering and shift intact and cuts the change both poles make alike."""
    even, readings = {}, {}  # the tiny random model changes by ~1e-2 nats, hence the large weight
    for weight in (0.0, 1e4):
        adapter, tok, split, cfg, readings[weight] = _train_tiny("anchored", even_weight=weight)
        even[weight] = _even_change(adapter, tok, list(split.val), cfg)
    s, a = readings[1e4]
    assert s[2] > s[1] + 0.05 and s[1] > s[0] + 0.05, s
    assert a[2] > a[1] + 0.05 and a[1] > a[0] + 0.05, a
    assert even[1e4] < 0.5 * even[0.0], even


def test_rotation_bound_holds_under_a_large_learning_rate():
    model, tok, split = _setup()
    adapter = attach(model, AdapterConfig(rank=8))
    angle = 0.1
    cfg = TrainConfig(steps=12, batch_pairs=4, lr=0.3, val_every=100, checkpoint_every=100, max_angle=angle)
    train(adapter, tok, list(split.train), list(split.val), cfg, progress=False)
    limit = 2 * math.tan(angle / 2)
    norms = [
        float(torch.linalg.matrix_norm(skew(adapter.layer(n).theta.detach()), ord=2)) for n in adapter.target_names
    ]
    assert max(norms) <= limit * (1 + 1e-5) and max(norms) > 0.5 * limit  # bound reached, not exceeded
    with torch.no_grad():
        r = adapter.layer(adapter.target_names[0]).rotation(torch.tensor(1.0))
    angles = torch.angle(torch.linalg.eigvals(r)).abs()
    assert float(angles.max()) <= angle + 1e-5


def _trained_looking(objective: str):
    """A tiny adapter with non-zero offsets, its pairs, a config for ``objective``, the ruler and its block."""
    model, tok, split = _setup()
    adapter = attach(model, AdapterConfig(rank=8))
    with torch.no_grad():
        for n in adapter.target_names:
            adapter.layer(n).delta.normal_(0, 0.05)
    cfg = TrainConfig(batch_pairs=4, objective=objective)
    pairs = list(split.train)
    ruler = preference_direction(adapter, tok, pairs, cfg)
    return adapter, tok, pairs, cfg, ruler, decoder_blocks(model)[ruler.block_index]


def test_cached_reference_gives_the_same_loss():
    adapter, tok, pairs, cfg, ruler, block = _trained_looking("reprpo-svd")
    cache = reference_cache(adapter, tok, pairs, cfg, block)
    idx = [5, 0, 11, 3]  # another composition and padding than the cache's chunks
    batch = tokenize_pairs(tok, [pairs[i] for i in idx], cfg.max_suffix_tokens)
    with torch.no_grad():
        fresh, m1 = reprpo_loss(adapter, batch, ruler, cfg, block)
        cached, m2 = reprpo_loss(adapter, batch, ruler, cfg, block, reference=batch_reference(cache, idx, batch))
    assert float(cached) == pytest.approx(float(fresh), abs=1e-4)
    assert m2["ds_plus"] == pytest.approx(m1["ds_plus"], abs=1e-4)


def test_cached_persona_free_reference_gives_the_same_anchored_loss():
    adapter, tok, pairs, cfg, ruler, block = _trained_looking("anchored")
    cache = reference_cache(adapter, tok, pairs, cfg, block, free=True)
    idx = [7, 2, 10, 1]  # another composition and padding than the cache's chunks
    chosen = [pairs[i] for i in idx]
    batch = tokenize_pairs(tok, chosen, cfg.max_suffix_tokens)
    free = tokenize_neutral(tok, chosen, cfg.max_suffix_tokens)
    with torch.no_grad():
        fresh, m1 = reprpo_loss(adapter, batch, ruler, cfg, block, free)
        cached, m2 = reprpo_loss(
            adapter,
            batch,
            ruler,
            cfg,
            block,
            free,
            reference=batch_reference(cache, idx, batch),
            free_reference=batch_free_reference(cache, idx, free),
        )
    assert float(fresh) != 0.0
    assert float(cached) == pytest.approx(float(fresh), abs=1e-4)
    assert set(m1) == set(m2) and all(m2[k] == pytest.approx(m1[k], abs=1e-4) for k in m1)
    with pytest.raises(RuntimeError, match="persona-free"):
        batch_free_reference(reference_cache(adapter, tok, pairs[:4], cfg, block), [0, 1], free)


def test_epochs_schedule_and_constraint_warmup():
    cfg = TrainConfig(epochs=2.0, batch_pairs=8)
    assert cfg.total_steps(100) == 25 and TrainConfig(steps=7).total_steps(100) == 7
    assert constraint_weight(0, 100, 0.0) == 1.0
    assert constraint_weight(4, 100, 0.1) == pytest.approx(0.5) and constraint_weight(50, 100, 0.1) == 1.0
    model, tok, split = _setup()
    adapter = attach(model, AdapterConfig(rank=8))
    run = TrainConfig(
        epochs=1.0,
        batch_pairs=4,
        lr=1e-2,
        schedule="one-cycle",
        constraint_warmup=0.5,
        val_every=100,
        checkpoint_every=100,
    )
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        train(adapter, tok, list(split.train), list(split.val), run, run_dir=d, progress=False)
        rows = [json.loads(x) for x in Path(d, "metrics.jsonl").read_text().splitlines() if '"lr"' in x]
    assert len(rows) == run.total_steps(len(split.train))
    peak = max(r["lr"] for r in rows)
    assert peak == pytest.approx(1e-2, rel=0.05) and rows[-1]["lr"] == pytest.approx(1e-2 / 25, rel=0.05)
    assert rows[0]["omega"] < 1.0 and rows[-1]["omega"] == 1.0
    assert {"rot_norm_max", "delta_rel", "m_even_odd"} <= set(rows[-1])


def test_bad_objective_and_missing_neutral_prompts_are_refused():
    from innerpissa.errors import ConfigError
    from innerpissa.pairs import ContrastivePair

    with pytest.raises(ConfigError, match="objective"):
        TrainConfig(objective="dpo")
    model, tok, split = _setup()
    bare = [ContrastivePair(p.positive, p.negative, p.suffix) for p in split.train]
    with pytest.raises(ConfigError, match="neutral"):
        train(
            attach(model, AdapterConfig(rank=8)),
            tok,
            bare,
            [],
            TrainConfig(objective="anchored", batch_pairs=4),
            progress=False,
        )


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_shared_prefix_pass_equals_full_rows_in_value_and_gradient(arch):
    """The steered pass that runs the common prompt prefix once per coefficient, and the blocks below the adapter
    once for both coefficients, gives the hidden states, token log-probs and adapter gradients of the plain pass
    over full rows, each sharing alone and both together."""
    from conftest import tiny_gemma3

    from innerpissa.train import shared_prefix_len, steered_forward
    from innerpissa.train.passes import first_adapted_block

    _, tok, split = _setup()
    model = (tiny_llama if arch == "llama" else tiny_gemma3)(vocab_size=len(tok))
    if arch == "gemma3":
        model.config.sliding_window = 64  # longer than the rows, as Gemma 3's 512 is for real pairs
    adapter = attach(model, AdapterConfig(rank=8))
    with torch.no_grad():
        for n in adapter.target_names:
            adapter.layer(n).delta.normal_(0, 0.05)
            adapter.layer(n).theta.normal_(0, 0.05)
    batch = tokenize_pairs(tok, list(split.train[:4]))
    assert shared_prefix_len(batch, 5) >= 4  # the template and the persona instruction's start are shared
    block = decoder_blocks(model)[3]
    assert 0 < first_adapted_block(adapter) <= 3  # blocks below the adapter exist: the branch point is exercised
    outs = []
    # (min_prefix, share_lower): full rows; shared prefix; shared lower blocks; both (the default)
    for min_prefix, lower in ((1 << 30, False), (4, False), (1 << 30, True), (4, True)):
        h, lp, logp = steered_forward(adapter, batch, [1.0, -1.0], block, 3, True, min_prefix, lower)
        loss = h.square().mean() + lp.mean() + logp.exp()[..., :7].sum()
        grads = torch.autograd.grad(loss, [adapter.layer(n).theta for n in adapter.target_names])
        outs.append((h.detach(), lp.detach(), logp.detach(), grads))
    h1, lp1, lg1, g1 = outs[0]
    assert h1.shape[0] == 2 * batch.n_rows and lp1.shape == (2 * batch.n_rows, batch.suffix_mask.shape[1])
    for h2, lp2, lg2, g2 in outs[1:]:
        torch.testing.assert_close(h2, h1, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(lp2, lp1, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(lg2, lg1, atol=1e-4, rtol=1e-4)
        for a, b in zip(g2, g1):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-3)
    assert max(float(g.abs().max()) for g in g1) > 1e-6  # gradients reach the adapter
    assert (h1[: batch.n_rows] - h1[batch.n_rows :]).abs().max() > 1e-4  # the two coefficients differ


def test_short_sliding_window_falls_back_to_full_rows():
    from conftest import tiny_gemma3

    from innerpissa.train import steered_forward

    _, tok, split = _setup()
    model = tiny_gemma3(vocab_size=len(tok))  # sliding window 16 < row length
    adapter = attach(model, AdapterConfig(rank=8))
    batch = tokenize_pairs(tok, list(split.train[:4]))
    assert batch.input_ids.shape[1] > model.config.sliding_window
    block = decoder_blocks(model)[3]
    with torch.no_grad():
        for n in adapter.target_names:
            adapter.layer(n).delta.normal_(0, 0.05)
        a = steered_forward(adapter, batch, [1.0, -1.0], block, 3, False, 4)
        b = steered_forward(adapter, batch, [1.0, -1.0], block, 3, False, 1 << 30)
        c = steered_forward(adapter, batch, [1.0, -1.0], block, 3, False, 1 << 30, False)  # no sharing at all
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])
    torch.testing.assert_close(b[0], c[0], atol=1e-5, rtol=1e-4)  # the lower blocks once, with sliding layers
    torch.testing.assert_close(b[1], c[1], atol=1e-5, rtol=1e-4)


def test_data_aware_selection_picks_components_the_pairs_use(tmp_path):
    from innerpissa.errors import ConfigError
    from innerpissa.eval.methods import last_token_states
    from innerpissa.svd import top_r_svd

    model, tok, split = _setup()
    pairs = list(split.train)
    with pytest.raises(ConfigError, match="pairs"):
        attach(model, AdapterConfig(rank=4, select="data"))
    adapter = attach(model, AdapterConfig(rank=4, select="data"), pairs=pairs, tokenizer=tok)
    x = torch.randint(0, len(tok), (2, 6))
    with torch.no_grad():
        base = model(x).logits
        with adapter.steer(0.0):
            assert torch.equal(model(x).logits, base)
    name = adapter.target_names[-1]
    lay, lin = adapter.layer(name), dict(model.named_modules())[name]
    u, s, _v = top_r_svd([lin.weight.detach().float()], 16)[0]
    assert torch.all(lay.S[:-1] >= lay.S[1:])  # singular-value order kept
    picked = [int(torch.argmin((s - sv).abs())) for sv in lay.S]
    torch.testing.assert_close(lay.U, u[:, picked], atol=1e-5, rtol=1e-4)
    ell = int(name.split(".layers.")[1].split(".")[0])
    hp = last_token_states(model, tok, [p.positive for p in pairs[:128]], [ell])[ell]
    hn = last_token_states(model, tok, [p.negative for p in pairs[:128]], [ell])[ell]
    diff_score = s * ((hp - hn).mean(0) @ u).abs()
    assert int(torch.argmax(diff_score)) in picked  # the component the pair difference uses most is adapted
    adapter.save(tmp_path / "ad")
    from innerpissa import load_adapter

    assert load_adapter(model, tmp_path / "ad").config.select == "data"
