"""Contrastive prompt pairs for training a steering adapter (docs/design.md §4).

A :class:`ContrastivePair` is two complete prompts that differ only in the concept being steered (by default the
persona words "an honest" / "a dishonest") and share the same incomplete assistant turn (the *suffix*), so that
the shared suffix tokens line up when the batch is padded on the left.

Prompts are rendered with the tokenizer's chat template here, once, and must later be tokenized **without**
adding special tokens (the template already wrote them).

Sources of pairs:

* :func:`make_honesty_pairs` builds the default honesty pairs offline from :data:`HONESTY_PERSONAS` and the
  hand-written :data:`SUFFIXES` (no download, no sampling from the model), deterministically for a seed.
* :func:`load_pairs` reads user pairs from JSONL in three formats: explicit ``{"positive", "negative"}`` prompts,
  Anthropic model-written-eval / CAA A/B items, and DPO ``{"prompt", "chosen", "rejected"}`` triples.

This module imports nothing heavy; the tokenizer is duck-typed (anything with ``apply_chat_template`` and a
``chat_template`` attribute, e.g. a ``transformers.PreTrainedTokenizerBase``).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .datafiles import read_data
from .errors import InnerPiSSAError
from .jsonl import iter_jsonl
from .prompts import assistant_suffix, render_prompt

__all__ = [
    "HONESTY_PERSONAS",
    "SUFFIXES",
    "ContrastivePair",
    "PairFileError",
    "PairSplit",
    "load_pairs",
    "make_honesty_pairs",
    "make_persona_pairs",
    "persona_instruction",
]


@dataclass(frozen=True)
class ContrastivePair:
    """Two full prompts that differ only in the steered concept.

    Both strings are already rendered with the chat template (special tokens written as text); tokenize them with
    ``add_special_tokens=False``. ``positive`` is the side that coefficient ``c = +1`` moves towards.

    ``suffix`` is the unfinished assistant reply both prompts end with (``"The capital of France is"``), or ``""``
    when the two prompts do not share one (A/B items, DPO triples). Training constrains and orders only the
    tokens of this suffix, never the persona sentence or the chat-template tokens before it.

    ``neutral`` is the same suffix after a persona-free instruction (``"Pretend you're a person making statements
    about the world."``), or ``""``; the ``anchored`` objective moves it toward the positive side at +c.
    """

    positive: str
    negative: str
    suffix: str = ""
    neutral: str = ""


@dataclass(frozen=True)
class PairSplit:
    """Training and validation pairs; the two tuples never share a suffix (generated pairs) or a prompt (files)."""

    train: tuple[ContrastivePair, ...]
    val: tuple[ContrastivePair, ...]


class PairFileError(InnerPiSSAError, ValueError):
    """A pair file has a malformed row.

    ``str(err)`` starts with ``f"{path}:{lineno}: "`` (1-based line number), or ``f"{path}: "`` for problems that
    concern the whole file (e.g. no rows). ``path`` and ``lineno`` are also kept as attributes.
    """

    def __init__(self, path: str | Path, lineno: int | None, message: str) -> None:
        self.reason = message
        super().__init__(message, path=path, lineno=lineno)


# ---------------------------------------------------------------------------------------------------------------
# Personas and suffixes
# ---------------------------------------------------------------------------------------------------------------

#: (positive, negative) persona phrases, each with its own agreeing indefinite article.
HONESTY_PERSONAS: tuple[tuple[str, str], ...] = (
    ("an honest", "a dishonest"),
    ("a truthful", "a deceptive"),
    ("a candid", "a lying"),
    ("a sincere", "an insincere"),
    ("a trustworthy", "an untrustworthy"),
    ("a forthright", "a deceitful"),
)

#: Short, topic-varied assistant openings (1-12 tokens) that say nothing about honesty themselves, in topic groups
#: (``data/suffixes.json``). Each is the incomplete start of the assistant turn in both prompts of a pair; their
#: order is part of the seeded pair recipe.
SUFFIXES: tuple[str, ...] = tuple(s for group in read_data("suffixes.json")["groups"] for s in group["suffixes"])

_ARTICLE = re.compile(r"^(a|an) \S")


def persona_instruction(positive: bool, persona: tuple[str, str] = HONESTY_PERSONAS[0]) -> str:
    """The persona instruction sentence for one side of a pair.

    Args:
        positive: True for the positive persona (``persona[0]``), False for the negative one (``persona[1]``).
        persona: (positive phrase, negative phrase), each beginning with its own article ("an honest").

    Returns:
        e.g. ``"Pretend you're an honest person making statements about the world."``

    Raises:
        ValueError: if the chosen phrase does not start with "a " or "an " (the article is part of the phrase so
            that it agrees with the adjective; the research code wrote "an an honest").
    """
    phrase = persona[0] if positive else persona[1]
    if not _ARTICLE.match(phrase) or re.match(r"^(a|an) (a|an)\b", phrase):
        raise ValueError(
            f"persona phrase {phrase!r} must start with exactly one article, 'a ' or 'an ' (e.g. 'an honest')"
        )
    return f"Pretend you're {phrase} person making statements about the world."


# ---------------------------------------------------------------------------------------------------------------
# Generated honesty pairs
# ---------------------------------------------------------------------------------------------------------------


def _take_spread(suffixes: Sequence[str], n: int, n_personas: int, rng: random.Random) -> list[tuple[int, str]]:
    """Pick ``n`` distinct (persona index, suffix) combos, using every suffix once before any suffix twice."""
    order = list(suffixes)
    rng.shuffle(order)
    persona_orders = {s: rng.sample(range(n_personas), n_personas) for s in order}
    combos = [(persona_orders[s][r], s) for r in range(n_personas) for s in order]
    return combos[:n]


#: The persona-free instruction of the honesty pairs (``ContrastivePair.neutral``).
NEUTRAL_INSTRUCTION = "Pretend you're a person making statements about the world."


def make_honesty_pairs(tokenizer: Any, n_pairs: int = 400, seed: int = 0, val_fraction: float = 0.1) -> PairSplit:
    """Honesty pairs (see :func:`make_persona_pairs`): :data:`HONESTY_PERSONAS` × :data:`SUFFIXES` with
    :func:`persona_instruction`."""
    return make_persona_pairs(
        tokenizer,
        HONESTY_PERSONAS,
        persona_instruction,
        n_pairs,
        seed,
        val_fraction,
        concept="honesty",
        neutral_instruction=NEUTRAL_INSTRUCTION,
    )


def make_persona_pairs(
    tokenizer: Any,
    personas: Sequence[tuple[str, str]],
    instruction,
    n_pairs: int = 400,
    seed: int = 0,
    val_fraction: float = 0.1,
    concept: str = "persona",
    neutral_instruction: str | None = None,
) -> PairSplit:
    """Build contrastive pairs from ``personas`` × :data:`SUFFIXES` (honesty: :func:`make_honesty_pairs`).

    Each pair is ``render_prompt(tok, instruction(True, p), suffix)`` vs the same with ``instruction(False, p)``
    for a persona pair p = (positive phrase, negative phrase): identical suffix, only the persona words differ.
    Combos are drawn without replacement, spreading over suffixes first (every suffix once before any suffix with a
    second persona). The suffixes are split first, so validation pairs use suffixes never seen in training.
    Deterministic given ``seed`` (Python's ``random.Random``), independent of global random state.

    Args:
        tokenizer: a Hugging Face tokenizer (see :func:`innerpissa.prompts.render_prompt`).
        personas: (positive, negative) phrase pairs; instruction(positive: bool, persona) -> the user turn.
        n_pairs: total number of pairs (train + val), at most ``len(personas) * len(SUFFIXES)``.
        seed: random seed for the suffix split and the combo sampling.
        val_fraction: fraction of suffixes and of pairs held out for validation, in [0, 1).
        neutral_instruction: a persona-free user turn; when given each pair's ``neutral`` prompt is it followed by
            the same suffix.

    Returns:
        :class:`PairSplit` with about ``n_pairs * (1 - val_fraction)`` training pairs (shuffled).

    Raises:
        ValueError: if ``n_pairs`` < 1 or exceeds the number of combos, or ``val_fraction`` is outside [0, 1).
    """
    n_personas, n_suffixes = len(personas), len(SUFFIXES)
    n_combos = n_personas * n_suffixes
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if n_pairs < 1 or n_pairs > n_combos:
        raise ValueError(
            f"n_pairs={n_pairs} but only {n_combos} distinct {concept} pairs exist "
            f"({n_personas} personas x {n_suffixes} suffixes); ask for 1..{n_combos} pairs, "
            "or bring your own pairs with load_pairs()"
        )
    rng = random.Random(seed)
    shuffled = list(SUFFIXES)
    rng.shuffle(shuffled)
    k_val = round(n_suffixes * val_fraction) if val_fraction > 0 else 0
    k_val = min(max(k_val, 1 if val_fraction > 0 else 0), n_suffixes - 1)
    val_suffixes, train_suffixes = shuffled[:k_val], shuffled[k_val:]
    train_cap, val_cap = n_personas * len(train_suffixes), n_personas * len(val_suffixes)
    n_val = min(round(n_pairs * val_fraction), val_cap)
    n_train = n_pairs - n_val
    if n_train > train_cap:  # rounding left the training side short; move the excess to validation
        n_train, n_val = train_cap, n_pairs - train_cap

    def render(combos: list[tuple[int, str]]) -> tuple[ContrastivePair, ...]:
        out = []
        for p, suffix in combos:
            persona = personas[p]
            out.append(
                ContrastivePair(
                    positive=render_prompt(tokenizer, instruction(True, persona), suffix),
                    negative=render_prompt(tokenizer, instruction(False, persona), suffix),
                    suffix=suffix.strip(),
                    neutral=render_prompt(tokenizer, neutral_instruction, suffix) if neutral_instruction else "",
                )
            )
        return tuple(out)

    train = _take_spread(train_suffixes, n_train, n_personas, rng)
    val = _take_spread(val_suffixes, n_val, n_personas, rng)
    rng.shuffle(train)
    rng.shuffle(val)
    return PairSplit(train=render(train), val=render(val))


# ---------------------------------------------------------------------------------------------------------------
# Pair files
# ---------------------------------------------------------------------------------------------------------------

_FORMATS: dict[str, tuple[str, ...]] = {
    "pair": ("positive", "negative"),
    "ab": ("question", "answer_matching_behavior", "answer_not_matching_behavior"),
    "dpo": ("prompt", "chosen", "rejected"),
}
_FORMAT_HELP = (
    'expected one of {"positive", "negative"} (full prompts), '
    '{"question", "answer_matching_behavior", "answer_not_matching_behavior"} (model-written-eval / CAA item), '
    'or {"prompt", "chosen", "rejected"} (DPO triple)'
)
_LETTER_ANSWER = re.compile(r"^\(([A-Za-z])\)$")


def _answer_prefix(answer: str) -> str:
    """The assistant prefix for an A/B or Yes/No answer: " (A)" -> "(A" (CAA style), " Yes" -> "Yes"."""
    a = answer.strip()
    m = _LETTER_ANSWER.match(a)
    return f"({m.group(1)}" if m else a


def _string_fields(row: dict, fields: Sequence[str], path: Path, lineno: int) -> list[str]:
    values = []
    for f in fields:
        if f not in row:
            raise PairFileError(path, lineno, f"missing field {f!r}; {_FORMAT_HELP}")
        v = row[f]
        if not isinstance(v, str):
            raise PairFileError(path, lineno, f"field {f!r} must be a string, got {type(v).__name__}")
        if not v.strip():
            raise PairFileError(path, lineno, f"field {f!r} is empty")
        values.append(v)
    return values


def _parse_pair_row(row: Any, path: Path, lineno: int, tokenizer: Any) -> tuple[ContrastivePair, str]:
    """One JSONL row -> (pair, group key). Rows with the same group key stay in the same split."""
    if not isinstance(row, dict):
        raise PairFileError(path, lineno, f"expected a JSON object, got {type(row).__name__}")
    kinds = [k for k, fields in _FORMATS.items() if any(f in row for f in fields)]
    if not kinds:
        raise PairFileError(path, lineno, f"unknown row format with fields {sorted(row)}; {_FORMAT_HELP}")
    if len(kinds) > 1:
        raise PairFileError(
            path, lineno, f"ambiguous row: it has fields of several formats ({', '.join(kinds)}); {_FORMAT_HELP}"
        )
    kind = kinds[0]
    values = _string_fields(row, _FORMATS[kind], path, lineno)
    if kind == "pair":
        if "suffix" in row:
            (suffix,) = _string_fields(row, ("suffix",), path, lineno)
            if not (values[0].endswith(suffix) and values[1].endswith(suffix)):
                raise PairFileError(
                    path,
                    lineno,
                    f"field 'suffix' ({suffix!r}) must be the text both prompts end "
                    "with (the shared unfinished assistant reply)",
                )
        else:
            suffix = assistant_suffix(tokenizer, values[0], values[1])
        pair, group = ContrastivePair(values[0], values[1], suffix), f"line:{lineno}"
    elif kind == "ab":
        question, matching, not_matching = values
        if matching.strip() == not_matching.strip():
            raise PairFileError(path, lineno, "answer_matching_behavior equals answer_not_matching_behavior")
        pair = ContrastivePair(
            render_prompt(tokenizer, question, _answer_prefix(matching)),
            render_prompt(tokenizer, question, _answer_prefix(not_matching)),
        )
        group = f"q:{question}"
    else:
        prompt, chosen, rejected = values
        pair = ContrastivePair(render_prompt(tokenizer, prompt, chosen), render_prompt(tokenizer, prompt, rejected))
        group = f"p:{prompt}"
    if pair.positive == pair.negative:
        raise PairFileError(
            path, lineno, "positive and negative prompts are identical (after rendering); a pair must differ"
        )
    if (
        tokenizer(pair.positive, add_special_tokens=False)["input_ids"]
        == tokenizer(pair.negative, add_special_tokens=False)["input_ids"]
    ):
        raise PairFileError(
            path,
            lineno,
            "positive and negative prompts tokenize identically (they differ only in "
            "whitespace or characters the tokenizer drops); a pair must differ in tokens",
        )
    return pair, group


def _split_groups(rows: list[tuple[ContrastivePair, str]], val_fraction: float, seed: int) -> PairSplit:
    groups: dict[str, list[int]] = {}
    for i, (_, g) in enumerate(rows):
        groups.setdefault(g, []).append(i)
    keys = list(groups)
    random.Random(seed).shuffle(keys)
    target = round(len(rows) * val_fraction)
    val_idx: set[int] = set()
    for k in keys:
        if len(val_idx) >= target:
            break
        if len(val_idx) + len(groups[k]) >= len(rows):  # always keep at least one training pair
            continue
        val_idx.update(groups[k])
    train = tuple(p for i, (p, _) in enumerate(rows) if i not in val_idx)
    val = tuple(p for i, (p, _) in enumerate(rows) if i in val_idx)
    return PairSplit(train=train, val=val)


def load_pairs(path: str | Path, tokenizer: Any, val_fraction: float = 0.1, seed: int = 0) -> PairSplit:
    """Load contrastive pairs from a JSONL file (one JSON object per line; blank lines skipped).

    The format is detected per line from its fields (extra fields are ignored):

    * ``{"positive": str, "negative": str}`` — full prompts used **verbatim** (no template is applied; the user
      is responsible for rendering them, including any special tokens). An optional ``"suffix"`` names the
      unfinished assistant reply both end with (the tokens training constrains); without it the text after the
      tokenizer's assistant header is used when both prompts share it (:func:`innerpissa.prompts.assistant_suffix`).
    * Model-written-eval / CAA item ``{"question", "answer_matching_behavior", "answer_not_matching_behavior"}``
      — positive = ``render_prompt(tok, question, prefix(matching))``, negative likewise with the other answer,
      where the prefix is the stripped answer with a letter answer's closing parenthesis dropped as in CAA
      (``" (A)"`` -> ``"(A"``, ``" Yes"`` -> ``"Yes"``).
    * DPO triple ``{"prompt", "chosen", "rejected"}`` — ``render_prompt(tok, prompt, chosen)`` vs
      ``render_prompt(tok, prompt, rejected)``.

    Validation rows: about ``val_fraction`` of the rows, chosen by seeded shuffle of *groups* (all rows sharing a
    question or prompt stay in the same split; explicit pairs are their own group); at least one row is kept for
    training. Within each split rows keep file order.

    Args:
        path: the JSONL file (UTF-8).
        tokenizer: a Hugging Face tokenizer (see :func:`render_prompt`).
        val_fraction: fraction of rows for validation, in [0, 1).
        seed: seed for the validation split.

    Returns:
        :class:`PairSplit`.

    Raises:
        FileNotFoundError: the file does not exist (message names the path).
        PairFileError: a row is not valid UTF-8 or JSON, not an object, of unknown or ambiguous format, has a
            missing, non-string or empty field, or renders to identical positive and negative prompts (message
            ``"{path}:{line}: ..."``); or the file has no rows (``"{path}: ..."``).
        ValueError: ``val_fraction`` outside [0, 1).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pair file not found: {path}")
    rows: list[tuple[ContrastivePair, str]] = []
    for lineno, obj in iter_jsonl(path, PairFileError):
        rows.append(_parse_pair_row(obj, path, lineno, tokenizer))
    if not rows:
        raise PairFileError(path, None, f"no pairs found (the file is empty or blank); {_FORMAT_HELP}")
    return _split_groups(rows, val_fraction, seed)
