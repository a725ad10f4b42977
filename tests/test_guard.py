"""The answer-bias guard (innerpissa.train.guard) on a tiny random Llama: zero for an identity adapter, differentiable,
deterministic batches, and training with it logs the yes/no shift it penalises."""

import json

import pytest
import torch
from conftest import tiny_llama, word_tokenizer

from innerpissa import AdapterConfig, attach
from innerpissa.pairs import make_honesty_pairs
from innerpissa.train import TrainConfig, train
from innerpissa.train.guard import BiasGuard, guard_questions


def _setup():
    probe = word_tokenizer([])
    split = make_honesty_pairs(probe, n_pairs=48, seed=0, val_fraction=0.2)
    texts = [t for p in split.train + split.val for t in (p.positive, p.negative, p.neutral)]
    tok = word_tokenizer([*texts, *guard_questions(), "yes no Yes No"])
    split = make_honesty_pairs(tok, n_pairs=48, seed=0, val_fraction=0.2)
    return tiny_llama(vocab_size=len(tok)), tok, split


def test_guard_questions_are_formatted_and_concept_free():
    qs = guard_questions()
    assert len(qs) >= 100 and all("{" not in q for q in qs)
    assert not any(w in q.lower() for q in qs for w in ("honest", "lie", "deceiv", "truthful"))


def test_guard_is_zero_for_an_identity_adapter_and_has_a_gradient():
    model, tok, _ = _setup()
    guard = BiasGuard(model, tok, batch=6)
    assert guard.indices(0) == [0, 1, 2, 3, 4, 5] and guard.indices(1)[0] == 6
    adapter = attach(model, AdapterConfig(rank=4, init_std=0.0))
    g, plus, minus = guard.term(adapter, 0)
    assert abs(float(g.detach())) < 1e-8 and abs(plus) < 1e-4 and abs(minus) < 1e-4
    with torch.no_grad():
        for name in adapter.target_names:
            adapter.layer(name).delta.normal_(0, 0.5)
    g, plus, minus = guard.term(adapter, 3)
    assert float(g) > 0 and plus != pytest.approx(0.0)
    g.backward()
    assert any(
        adapter.layer(n).delta.grad is not None and adapter.layer(n).delta.grad.abs().sum() > 0
        for n in adapter.target_names
    )


def test_training_with_the_guard_logs_its_shifts(tmp_path):
    model, tok, split = _setup()
    adapter = attach(model, AdapterConfig(rank=8))
    cfg = TrainConfig(steps=6, batch_pairs=4, val_every=100, checkpoint_every=100, bias_weight=5.0, bias_batch=4)
    train(adapter, tok, list(split.train), list(split.val), cfg, run_dir=tmp_path, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"guard"' in x]
    assert len(rows) == 6 and all({"yes_shift_plus", "yes_shift_minus"} <= set(r) for r in rows)
