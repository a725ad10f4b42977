"""Built-in concepts: pairs built like the honesty pairs, and the word readout of the positive control."""

from __future__ import annotations

import pytest
from conftest import word_tokenizer

from innerpissa.concepts import get_concept, load_concepts
from innerpissa.errors import ConfigError
from innerpissa.eval.engines import answer_token_sets, eval_prompt
from innerpissa.pairs import HONESTY_PERSONAS, make_honesty_pairs


def test_concepts_load_and_honesty_matches_the_code():
    cs = load_concepts()
    assert {"honesty", "sentiment", "openness"} <= set(cs)
    assert cs["honesty"].personas == HONESTY_PERSONAS
    tok = word_tokenizer([])
    assert cs["honesty"].pairs(tok, n_pairs=60, seed=3) == make_honesty_pairs(tok, n_pairs=60, seed=3)
    with pytest.raises(ConfigError, match="unknown concept 'bogus'"):
        get_concept("bogus")


def test_sentiment_pairs_differ_only_in_the_persona():
    c = get_concept("sentiment")
    tok = word_tokenizer([])
    split = c.pairs(tok, n_pairs=50, seed=0)
    assert len(split.train) + len(split.val) == 50
    for p in split.train:
        pos_user = p.positive.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
        neg_user = p.negative.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
        assert pos_user in {c.instruction(True, q) for q in c.personas}
        assert neg_user in {c.instruction(False, q) for q in c.personas}
        assert p.positive.split("<|im_start|>assistant\n")[1] == p.negative.split("<|im_start|>assistant\n")[1]
    assert "loves everything" in c.instruction(True) and "hates everything" in c.instruction(False)


def test_words_readout_dataset_tokens_and_prompt():
    c = get_concept("sentiment")
    ds = c.words_dataset()
    assert ds.kind == "words:sentiment" and len(ds.items) == len(c.prefixes) >= 48
    assert all(it.label == 1 for it in ds.items) and len({it.question for it in ds.items}) == len(ds.items)
    assert not set(c.positive_words) & set(c.negative_words)
    tok = word_tokenizer(list(c.positive_words[:3]) + list(c.negative_words[:2]) + ["Good", " bad"])
    pos, neg = answer_token_sets(tok, ds.kind)
    assert {tok.decode([i]).lower() for i in pos} == {w.lower() for w in c.positive_words[:3]} | {"good"}
    assert {tok.decode([i]).lower() for i in neg} == set(c.negative_words[:2])
    text = eval_prompt(tok, ds.items[0].question, ds.kind, "PERSONA")
    assert text.endswith(f"<|im_start|>assistant\n{ds.items[0].question}")
    assert f"<|im_start|>user\nPERSONA\n\n{c.request}<|im_end|>" in text


def test_cli_rejects_unknown_concept_before_loading(tmp_path, capsys):
    from innerpissa.cli import main

    for args in (
        ["train", "--concept", "bogus", "--out", str(tmp_path / "a")],
        ["run", "--control", "bogus", "--out", str(tmp_path / "b"), "--data-dir", str(tmp_path)],
    ):
        assert main(args) == 1
        out = capsys.readouterr()
        assert "unknown concept 'bogus'" in out.err and "Traceback" not in out.err
