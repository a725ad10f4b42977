"""ReprPO training mechanics on a tiny random Llama: the loss moves the separation (resume: test_robustness)."""

from __future__ import annotations

import json

import torch
from conftest import tiny_llama, word_tokenizer

from innerpissa import AdapterConfig, attach
from innerpissa.pairs import make_honesty_pairs
from innerpissa.train import TrainConfig, preference_direction, tokenize_pairs, train
from innerpissa.train.objectives import OBJECTIVES


def _setup(seed: int = 0):
    probe = word_tokenizer([])
    split = make_honesty_pairs(probe, n_pairs=48, seed=seed, val_fraction=0.2)
    texts = [p.positive for p in split.train + split.val] + [p.negative for p in split.train + split.val]
    tok = word_tokenizer(texts)
    model = tiny_llama(vocab_size=len(tok))
    return model, tok, split


def test_tokenize_pairs_aligns_shared_suffix():
    _model, tok, split = _setup()
    batch = tokenize_pairs(tok, list(split.train[:4]), max_suffix_tokens=16)
    n = batch.n_pairs
    assert batch.input_ids.shape[0] == 2 * n
    # positive and negative rows end in the same tokens wherever the suffix mask is on
    keep = batch.suffix_mask.shape[1]
    tail = batch.input_ids[:, -keep:]
    assert torch.equal(tail[:n][batch.suffix_mask[:n]], tail[n:][batch.suffix_mask[n:]])
    # and the prompts differ somewhere before that (the persona words)
    assert not torch.equal(batch.input_ids[:n], batch.input_ids[n:])


def test_suffix_mask_covers_only_the_assistant_suffix_with_the_smollm2_tokenizer(tmp_path):
    """The constrained tokens are the unfinished assistant reply, never the persona sentence's tail
    (" person making statements about the world.") or chat-template tokens."""
    from innerpissa.models import load_tokenizer
    from innerpissa.pairs import load_pairs

    tok = load_tokenizer(None)
    pairs = list(make_honesty_pairs(tok, n_pairs=400, seed=0).train[:16])
    batch = tokenize_pairs(tok, pairs)
    k = batch.suffix_mask.shape[1]
    assert k == max(len(tok(p.suffix, add_special_tokens=False)["input_ids"]) for p in pairs) < 16
    for i, p in enumerate(pairs):
        for row in (i, i + len(pairs)):
            covered = tok.decode(batch.input_ids[row, -k:][batch.suffix_mask[row]])
            assert covered == p.suffix and "<|im_" not in covered and "world" not in covered
    # explicit prompts from a file get the same suffix from the template's assistant header
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps({"positive": p.positive, "negative": p.negative}) + "\n" for p in pairs))
    loaded = load_pairs(f, tok, val_fraction=0.0).train
    assert [p.suffix for p in loaded] == [p.suffix for p in pairs]
    assert torch.equal(tokenize_pairs(tok, list(loaded)).suffix_mask, batch.suffix_mask)


def test_training_moves_separation_in_both_directions(tmp_path):
    model, tok, split = _setup()
    adapter = attach(model, AdapterConfig(rank=8))
    cfg = TrainConfig(
        steps=30,
        batch_pairs=4,
        lr=2e-2,
        val_every=30,
        checkpoint_every=100,
        objective="reprpo-svd",
        basis="adapter-u",
        schedule="cosine",
        constraint_warmup=0.0,
        max_angle=0.0,
        weight_decay=0.0,
    )
    val = train(adapter, tok, list(split.train), list(split.val), cfg, run_dir=tmp_path, progress=False)
    # +1 raises and −1 lowers the pos−neg separation along the frozen direction, in units of σ
    assert val["ds_plus"] > 0.1 and val["ds_minus"] > 0.1
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first = [x for x in lines if "loss" in x][0]["loss"]
    assert val["loss"] < first
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["loss"] == {"name": "reprpo-svd", "version": OBJECTIVES["reprpo-svd"]}
    assert len(saved["preference_direction"]["u"]) == 8


def test_preference_direction_sign_points_to_positive():
    model, tok, split = _setup()
    adapter = attach(model, AdapterConfig(rank=8))
    cfg = TrainConfig(basis="adapter-u")
    pref = preference_direction(adapter, tok, list(split.train), cfg)
    assert abs(pref.u.norm().item() - 1) < 1e-5
    assert pref.sigma > 0
    # swapping positive and negative flips the measured direction
    from innerpissa.pairs import ContrastivePair

    swapped = [ContrastivePair(p.negative, p.positive) for p in split.train]
    assert torch.allclose(preference_direction(adapter, tok, swapped, cfg).u, -pref.u, atol=1e-5)
