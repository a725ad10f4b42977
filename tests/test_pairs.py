"""Tests for innerpissa.pairs: generated honesty pairs, prompt rendering, and pair files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from innerpissa.pairs import (
    HONESTY_PERSONAS,
    SUFFIXES,
    ContrastivePair,
    PairFileError,
    PairSplit,
    load_pairs,
    make_honesty_pairs,
    persona_instruction,
)
from innerpissa.prompts import render_prompt

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Like Gemma 2: refuses a system turn.
NO_SYSTEM = (
    "{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "<turn>{{ m['role'] }}\n{{ m['content'] | trim }}<end>\n{% endfor %}"
    "{% if add_generation_prompt %}<turn>assistant\n{% endif %}"
)


def tiny_tokenizer(chat_template: str | None = CHATML) -> PreTrainedTokenizerFast:
    """A download-free byte-level tokenizer (no merges): any two different texts get different ids, which the
    loader checks (pairs must differ in tokens); otherwise only its chat template matters here."""
    vocab = {"[UNK]": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    for ch in pre_tokenizers.ByteLevel.alphabet():
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return tiny_tokenizer()


# ---------------------------------------------------------------------------------------------------------------
# personas, suffixes, rendering
# ---------------------------------------------------------------------------------------------------------------

DOUBLED_ARTICLE = re.compile(r"\b(a|an)\s+(a|an)\b", re.IGNORECASE)
VOWEL_SOUND_EXCEPTIONS = {"honest"}  # silent h
CONSONANT_SOUND_EXCEPTIONS = {"one", "unique", "useful", "user"}


def test_personas_have_one_agreeing_article():
    for pos, neg in HONESTY_PERSONAS:
        for phrase in (pos, neg):
            article, word = phrase.split(" ", 1)
            assert article in ("a", "an"), phrase
            first = word.split()[0].lower()
            vowel_sound = (first[0] in "aeiou" and first not in CONSONANT_SOUND_EXCEPTIONS) or (
                first in VOWEL_SOUND_EXCEPTIONS
            )
            assert article == ("an" if vowel_sound else "a"), f"article does not agree in {phrase!r}"
        for positive in (True, False):
            text = persona_instruction(positive, (pos, neg))
            assert not DOUBLED_ARTICLE.search(text), text
    assert persona_instruction(True) == "Pretend you're an honest person making statements about the world."
    assert persona_instruction(False) == "Pretend you're a dishonest person making statements about the world."


def test_persona_instruction_rejects_doubled_or_missing_article():
    with pytest.raises(ValueError, match="article"):
        persona_instruction(True, ("an an honest", "a dishonest"))
    with pytest.raises(ValueError, match="article"):
        persona_instruction(False, ("an honest", "dishonest"))


BANNED = re.compile(
    r"\b(honest\w*|dishonest\w*|truth\w*|true|lie|lies|lying|liar|deceiv\w*|decept\w*|frank\w*|candid\w*"
    r"|sincer\w*|trust\w*|mislead\w*|fake|pretend\w*)\b",
    re.IGNORECASE,
)


def test_suffixes_are_many_unique_short_and_neutral():
    assert len(SUFFIXES) >= 200
    assert len({s.lower() for s in SUFFIXES}) == len(SUFFIXES), "duplicate suffix"
    for s in SUFFIXES:
        assert s == s.strip() and s, repr(s)
        assert 1 <= len(s.split()) <= 10, s
        assert not BANNED.search(s), f"suffix states honesty/dishonesty itself: {s!r}"


def test_render_prompt_with_and_without_prefix(tok):
    text = render_prompt(tok, "Hi there", "The capital of France is")
    assert text == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nThe capital of France is"
    text = render_prompt(tok, "Hi there", system="Be brief.")
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    )


def test_render_prompt_folds_system_into_user_when_template_refuses_it():
    t = tiny_tokenizer(NO_SYSTEM)
    text = render_prompt(t, "Question?", "Yes", system="Sys.")
    assert text == "<turn>user\nSys.\n\nQuestion?<end>\n<turn>assistant\nYes"


def test_render_prompt_fallback_without_chat_template():
    t = tiny_tokenizer(None)
    assert render_prompt(t, "What is 2+2?", "It is") == "Question: What is 2+2?\nAnswer: It is"
    assert render_prompt(t, "What is 2+2?") == "Question: What is 2+2?\nAnswer:"
    assert render_prompt(t, "Q", "A", system="S") == "S\n\nQuestion: Q\nAnswer: A"
    with pytest.raises(ValueError, match="empty"):
        render_prompt(t, "  ")


# ---------------------------------------------------------------------------------------------------------------
# generated honesty pairs
# ---------------------------------------------------------------------------------------------------------------


def _suffix_of(pair: ContrastivePair) -> str:
    return pair.positive.rsplit("<|im_start|>assistant\n", 1)[1]


def test_honesty_pairs_count_and_shape(tok):
    split = make_honesty_pairs(tok, n_pairs=400, seed=0, val_fraction=0.1)
    assert isinstance(split, PairSplit)
    assert len(split.train) + len(split.val) == 400
    assert len(split.val) == 40
    for pair in split.train + split.val:
        assert pair.positive != pair.negative
        suffix = _suffix_of(pair)
        assert suffix in SUFFIXES
        assert pair.positive.endswith(suffix) and pair.negative.endswith(suffix)
        assert pair.negative.rsplit("<|im_start|>assistant\n", 1)[1] == suffix
        assert "making statements about the world" in pair.positive
        assert not DOUBLED_ARTICLE.search(pair.positive) and not DOUBLED_ARTICLE.search(pair.negative)
        # the two prompts differ only in the persona words
        pos_phrase = re.search(r"you're (.+?) person", pair.positive).group(1)
        neg_phrase = re.search(r"you're (.+?) person", pair.negative).group(1)
        assert (pos_phrase, neg_phrase) in HONESTY_PERSONAS
        assert pair.positive.replace(pos_phrase, "X", 1) == pair.negative.replace(neg_phrase, "X", 1)
    assert len(set(split.train + split.val)) == 400, "pairs must be drawn without replacement"


def test_at_least_300_pairs_and_all_combos_possible(tok):
    n_all = len(HONESTY_PERSONAS) * len(SUFFIXES)
    assert n_all >= 300
    split = make_honesty_pairs(tok, n_pairs=n_all, seed=3)
    assert len(set(split.train + split.val)) == n_all
    with pytest.raises(ValueError, match=str(n_all)):
        make_honesty_pairs(tok, n_pairs=n_all + 1)


def test_honesty_pairs_deterministic_per_seed(tok):
    a = make_honesty_pairs(tok, n_pairs=300, seed=1)
    b = make_honesty_pairs(tok, n_pairs=300, seed=1)
    c = make_honesty_pairs(tok, n_pairs=300, seed=2)
    assert a == b
    assert a.train != c.train
    assert {_suffix_of(p) for p in a.val} != {_suffix_of(p) for p in c.val}


def test_honesty_val_is_disjoint_by_suffix(tok):
    for seed in (0, 1, 7):
        split = make_honesty_pairs(tok, n_pairs=900, seed=seed, val_fraction=0.2)
        train_suffixes = {_suffix_of(p) for p in split.train}
        val_suffixes = {_suffix_of(p) for p in split.val}
        assert val_suffixes and train_suffixes
        assert not train_suffixes & val_suffixes


def test_honesty_pairs_spread_over_suffixes_first(tok):
    split = make_honesty_pairs(tok, n_pairs=200, seed=0, val_fraction=0.1)
    suffixes = [_suffix_of(p) for p in split.train]
    assert len(set(suffixes)) == len(suffixes), "fewer pairs than suffixes: every suffix should appear once"


def test_no_val_split(tok):
    split = make_honesty_pairs(tok, n_pairs=50, seed=0, val_fraction=0.0)
    assert len(split.train) == 50 and split.val == ()
    with pytest.raises(ValueError, match="val_fraction"):
        make_honesty_pairs(tok, n_pairs=50, val_fraction=1.0)


# ---------------------------------------------------------------------------------------------------------------
# pair files
# ---------------------------------------------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def test_load_explicit_pairs_verbatim(tmp_path, tok):
    rows = [{"positive": f"P{i} <raw>", "negative": f"N{i} <raw>", "note": "extra ok"} for i in range(20)]
    f = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    split = load_pairs(f, tok, val_fraction=0.25, seed=0)
    assert len(split.train) == 15 and len(split.val) == 5
    everything = set(split.train + split.val)
    assert everything == {ContrastivePair(f"P{i} <raw>", f"N{i} <raw>") for i in range(20)}
    assert load_pairs(f, tok, val_fraction=0.25, seed=0) == split
    assert load_pairs(f, tok, val_fraction=0.25, seed=1) != split


def test_load_mwe_ab_items_caa_style(tmp_path, tok):
    q = "Would you like more power?\n\nChoices:\n (A) Yes\n (B) No"
    rows = [
        {"question": q, "answer_matching_behavior": " (A)", "answer_not_matching_behavior": " (B)"},
        {"question": "Is the sky green?", "answer_matching_behavior": " No", "answer_not_matching_behavior": " Yes"},
    ]
    f = _write_jsonl(tmp_path / "mwe.jsonl", rows)
    split = load_pairs(f, tok, val_fraction=0.0)
    assert split.val == ()
    first, second = split.train
    assert first.positive == f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n(A"
    assert first.negative == f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n(B"
    assert second.positive.endswith("assistant\nNo") and second.negative.endswith("assistant\nYes")


def test_load_dpo_triples(tmp_path, tok):
    rows = [
        {"prompt": "Tell me about cats.", "chosen": "Cats are small mammals", "rejected": "Cats are robots"},
        {"prompt": "Tell me about cats.", "chosen": "Cats purr", "rejected": "Cats bark"},
        {"prompt": "Tell me about dogs.", "chosen": "Dogs bark", "rejected": "Dogs purr"},
    ]
    f = _write_jsonl(tmp_path / "dpo.jsonl", rows)
    split = load_pairs(f, tok, val_fraction=0.0)
    assert split.train[0] == ContrastivePair(
        render_prompt(tok, "Tell me about cats.", "Cats are small mammals"),
        render_prompt(tok, "Tell me about cats.", "Cats are robots"),
    )
    assert split.train[2].positive.endswith("assistant\nDogs bark")
    # rows sharing a prompt stay in the same split
    for seed in range(10):
        s = load_pairs(f, tok, val_fraction=0.34, seed=seed)
        cats_in_val = [("about cats" in p.positive) for p in s.val]
        assert len(s.val) in (1, 2) and len(s.train) + len(s.val) == 3
        assert all(cats_in_val) or not any(cats_in_val)
        if any(cats_in_val):
            assert len(s.val) == 2


def test_load_mixed_formats_and_blank_lines(tmp_path, tok):
    f = _write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"positive": "a", "negative": "b"},
            "",
            "   ",
            {"prompt": "p", "chosen": "c", "rejected": "r"},
        ],
    )
    split = load_pairs(f, tok, val_fraction=0.0)
    assert len(split.train) == 2


GOOD = json.dumps({"positive": "a", "negative": "b"})


@pytest.mark.parametrize(
    "bad_line, lineno, message",
    [
        ('{"positive": "a", "negative": ', 3, "invalid JSON"),
        ('["positive", "negative"]', 3, "JSON object"),
        ('{"positive": "a"}', 3, "'negative'"),
        ('{"positive": "a", "negative": "  "}', 3, "empty"),
        ('{"positive": "a", "negative": 5}', 3, "must be a string"),
        ('{"text": "hello"}', 3, "unknown row format"),
        ('{"positive": "same", "negative": "same"}', 3, "identical"),
        ('{"prompt": "p", "chosen": "c"}', 3, "'rejected'"),
        ('{"prompt": "p", "chosen": "same", "rejected": "same"}', 3, "identical"),
        ('{"question": "q", "answer_matching_behavior": " (A)", "answer_not_matching_behavior": " (A)"}', 3, "equals"),
        ('{"positive": "a", "negative": "b", "prompt": "p"}', 3, "ambiguous"),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path, tok, bad_line, lineno, message):
    # line 1 good, line 2 blank (still counted), line 3 bad, line 4 good
    f = tmp_path / "broken_pairs.jsonl"
    f.write_text(f"{GOOD}\n\n{bad_line}\n{GOOD}\n", encoding="utf-8")
    with pytest.raises(PairFileError) as info:
        load_pairs(f, tok)
    msg = str(info.value)
    assert msg.startswith(f"{f}:{lineno}: "), msg
    assert "broken_pairs.jsonl" in msg and message in msg
    assert info.value.lineno == lineno


def test_bad_line_deep_in_file(tmp_path, tok):
    f = tmp_path / "long.jsonl"
    lines = [GOOD] * 41 + ["not json at all"] + [GOOD] * 5
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(PairFileError, match=r"long\.jsonl:42: invalid JSON"):
        load_pairs(f, tok)


def test_invalid_utf8_names_line(tmp_path, tok):
    f = tmp_path / "bytes.jsonl"
    f.write_bytes(GOOD.encode() + b"\n" + b'{"positive": "\xff", "negative": "b"}\n')
    with pytest.raises(PairFileError, match=r"bytes\.jsonl:2: not valid UTF-8"):
        load_pairs(f, tok)


def test_empty_and_missing_files(tmp_path, tok):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(PairFileError, match=r"empty\.jsonl: no pairs"):
        load_pairs(empty, tok)
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_pairs(missing, tok)
