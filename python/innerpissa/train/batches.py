"""Tokenized contrastive pairs for training: ``PairBatch`` rows [pos; neg], left-padded, with the mask of the
assistant-suffix tokens the objectives constrain and order.

"Suffix" tokens are those of the unfinished assistant reply the two prompts share (``ContrastivePair.suffix``);
``reprpo-svd`` version 1 also counted the shared end of the persona sentence and the chat-template tokens before
the reply, so its coherence and ordering terms mostly rewarded log p(" person" | persona words).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..pairs import ContrastivePair
from ..prompts import left_pad


@dataclass
class PairBatch:
    """Tokenized pairs, rows [pos_0..pos_{N-1}, neg_0..neg_{N-1}], left-padded to a common length T.

    input_ids, attention_mask, position_ids: (2N, T); suffix_mask: (2N, n_keep) marks the trailing tokens that
    positive and negative share (the suffix whose NLL is constrained), aligned to the last n_keep positions.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    suffix_mask: torch.Tensor

    @property
    def n_pairs(self) -> int:
        return self.input_ids.shape[0] // 2

    @property
    def n_rows(self) -> int:
        return self.input_ids.shape[0]

    def repeat(self, k: int) -> PairBatch:
        return PairBatch(
            *(t.repeat(k, 1) for t in (self.input_ids, self.attention_mask, self.position_ids, self.suffix_mask))
        )


def suffix_token_count(tokenizer, text: str, suffix: str) -> int:
    """How many trailing tokens of ``text`` (tokenized without special tokens) spell ``suffix``: the tokens where
    its tokenization departs from that of ``text`` without the suffix. 0 when ``suffix`` is empty or not the end of
    ``text``."""
    if not suffix or not text.endswith(suffix):
        return 0
    full = tokenizer(text, add_special_tokens=False)["input_ids"]
    head = tokenizer(text[: -len(suffix)], add_special_tokens=False)["input_ids"]
    k = 0
    while k < min(len(full), len(head)) and full[k] == head[k]:
        k += 1
    return len(full) - k


def tokenize_pairs(tokenizer, pairs: list[ContrastivePair], max_suffix_tokens: int = 24) -> PairBatch:
    """Tokenize pairs (no special tokens added: prompts are already rendered) into a left-padded PairBatch.

    The suffix mask of a pair covers the trailing tokens both prompts share **and** that spell its assistant
    suffix (``pair.suffix``; for pairs without one, the shared trailing tokens), at most ``max_suffix_tokens`` and
    at least the final token. n_keep (the mask's width, and the number of positions that get logits) is the
    longest suffix in the batch.
    """
    pos = [tokenizer(p.positive, add_special_tokens=False)["input_ids"] for p in pairs]
    neg = [tokenizer(p.negative, add_special_tokens=False)["input_ids"] for p in pairs]
    ids, mask, posids = left_pad(pos + neg, tokenizer.pad_token_id)
    cap = min(max_suffix_tokens, ids.shape[1] - 1)  # every kept token needs a predecessor
    commons = []
    for p, a, b in zip(pairs, pos, neg):
        common = 0
        while common < min(len(a), len(b), cap) and a[-1 - common] == b[-1 - common]:
            common += 1
        if p.suffix:
            common = min(
                common,
                suffix_token_count(tokenizer, p.positive, p.suffix),
                suffix_token_count(tokenizer, p.negative, p.suffix),
            )
        commons.append(max(common, 1))  # pairs with different endings: constrain at least the final token
    n_keep = max(commons)
    suffix = torch.zeros((2 * len(pairs), n_keep), dtype=torch.bool)
    for i, common in enumerate(commons):
        suffix[i, n_keep - common :] = True
        suffix[len(pairs) + i, n_keep - common :] = True
    return PairBatch(ids, mask, posids, suffix)


def tokenize_neutral(tokenizer, pairs: list[ContrastivePair], max_suffix_tokens: int = 24) -> PairBatch:
    """Tokenize the pairs' persona-free prompts (``pair.neutral``) → PairBatch of N rows (suffix mask: the tokens
    that spell ``pair.suffix``, at least the final one).

    Raises:
        ConfigError: a pair without a ``neutral`` prompt.
    """
    missing = [i for i, p in enumerate(pairs) if not p.neutral]
    if missing:
        raise ConfigError(
            f"{len(missing)} pairs have no persona-free prompt (ContrastivePair.neutral; pairs "
            f"{missing[:10]}); the anchored objective (the default) needs the built-in concept "
            "pairs or pairs that carry one; else train with objective='reprpo-svd' "
            "(--objective reprpo-svd)",
            field="objective",
        )
    rows = [tokenizer(p.neutral, add_special_tokens=False)["input_ids"] for p in pairs]
    ids, mask, posids = left_pad(rows, tokenizer.pad_token_id)
    cap = min(max_suffix_tokens, ids.shape[1] - 1)
    counts = [max(1, min(cap, suffix_token_count(tokenizer, p.neutral, p.suffix))) for p in pairs]
    n_keep = max(counts)
    suffix = torch.zeros((len(pairs), n_keep), dtype=torch.bool)
    for i, k in enumerate(counts):
        suffix[i, n_keep - k :] = True
    return PairBatch(ids, mask, posids, suffix)


def check_pairs_differ(tokenizer, pairs: list[ContrastivePair], what: str = "training pairs") -> None:
    """Refuse pairs whose positive and negative prompts tokenize to the same ids (e.g. differ in whitespace only):
    their gradient is float noise.

    Raises:
        ConfigError: naming the offending pairs (0-based indices; pair files are checked per line on load).
    """
    same = [
        i
        for i, p in enumerate(pairs)
        if tokenizer(p.positive, add_special_tokens=False)["input_ids"]
        == tokenizer(p.negative, add_special_tokens=False)["input_ids"]
    ]
    if same:
        raise ConfigError(
            f"{len(same)} of {len(pairs)} {what} tokenize to identical positive and negative prompts "
            f"(pairs {same[:10]}); a pair must differ in tokens, not only in whitespace",
            field=what,
        )


def pairs_sha256(pairs: list[ContrastivePair]) -> str:
    """sha256 over the ordered (positive, negative) texts: identifies the data of a run."""
    h = hashlib.sha256()
    for p in pairs:
        h.update(json.dumps([p.positive, p.negative]).encode())
    return h.hexdigest()
