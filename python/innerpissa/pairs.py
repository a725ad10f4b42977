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

from .errors import InnerPiSSAError
from .jsonl import iter_jsonl

__all__ = [
    "HONESTY_PERSONAS",
    "SUFFIXES",
    "ContrastivePair",
    "PairFileError",
    "PairSplit",
    "assistant_suffix",
    "load_pairs",
    "make_honesty_pairs",
    "make_persona_pairs",
    "persona_instruction",
    "render_prompt",
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

#: Short, topic-varied assistant openings (1-12 tokens) that say nothing about honesty themselves. Hand-written
#: for this package. Each is the incomplete start of the assistant turn in both prompts of a pair.
SUFFIXES: tuple[str, ...] = (
    # single words and bare openings
    "I",
    "The",
    "My",
    "When",
    "In",
    "It",
    "We",
    "You",
    "There",
    "Yesterday",
    "Well,",
    "So",
    "Most people",
    "Last summer",
    "Every morning",
    # geography and travel
    "The capital of France is",
    "The longest river in Africa is",
    "Mount Everest is located in",
    "The largest desert in the world is",
    "Australia is home to",
    "If you visit Japan in spring,",
    "The best time to visit Iceland is",
    "The population of Canada is about",
    "Venice is famous for its",
    "The Sahara covers most of",
    "The Amazon rainforest spans",
    "The tallest building in the world",
    "Most of Norway's coastline is",
    "The official language of Brazil is",
    "When I travelled to Morocco, I",
    "The flight from London to New York takes",
    "Our hotel in Lisbon was",
    "The Great Wall of China was built",
    # science and nature
    "Water boils at",
    "The speed of light is",
    "Photosynthesis is the process by which",
    "The human heart has",
    "Dolphins communicate by",
    "The closest star to Earth is",
    "Electrons carry a",
    "A healthy adult needs about",
    "Bees make honey by",
    "The Moon orbits the Earth every",
    "Gravity on Mars is",
    "The chemical symbol for gold is",
    "Most volcanoes form where",
    "A blue whale can weigh",
    "DNA is made of",
    "Octopuses have",
    "Tides are caused by",
    "The boiling point of ethanol is",
    "Lightning happens when",
    "Sharks have been around for",
    "The smallest bone in the body is",
    "Penguins mostly live in",
    "A year on Venus lasts",
    "Antibiotics work against",
    "Plate tectonics explains why",
    "Rainbows appear when sunlight",
    # history
    "The French Revolution began in",
    "The first person to walk on the Moon was",
    "Ancient Egyptians built the pyramids",
    "The printing press was invented by",
    "World War II ended in",
    "The Roman Empire fell",
    "In the Middle Ages, most people",
    "The Industrial Revolution started in",
    "Napoleon was born on",
    "The Berlin Wall came down in",
    "Cleopatra ruled Egypt",
    "The Silk Road connected",
    # food and cooking
    "To make a good omelette, you",
    "My favourite recipe for soup",
    "The secret to fluffy pancakes is",
    "Bread rises because",
    "A good risotto needs",
    "When I bake cookies, I",
    "The best pizza I ever had",
    "To cook rice properly,",
    "Fresh basil goes well with",
    "Coffee was first grown in",
    "For breakfast this morning I had",
    "A traditional Spanish paella contains",
    "The spiciest pepper I've eaten",
    "Sourdough starter needs",
    "Grandma's apple pie always",
    "The trick to crispy roast potatoes is",
    # weather and seasons
    "I think the weather",
    "Tomorrow's forecast says",
    "It has been raining for",
    "In winter, the lake",
    "The hottest day of the year",
    "Snow in April is",
    "Hurricanes usually form",
    "The fog this morning was",
    "Autumn leaves turn red because",
    "A thunderstorm rolled in",
    # personal life and memories
    "When I was young, I",
    "My grandmother used to",
    "The first car I owned",
    "On my tenth birthday,",
    "My best friend and I",
    "Growing up in a small town,",
    "The day I moved to the city,",
    "My first job was",
    "I remember the first time I",
    "Back in college, we",
    "My neighbour has a dog that",
    "Last weekend I went",
    "My sister just started",
    "When my parents met,",
    "The house I grew up in",
    "After I finished school, I",
    "My favourite teacher once",
    "Our family holidays were always",
    "Every Sunday we",
    "I once missed a train because",
    # opinions and preferences
    "My favourite colour is",
    "The best movie of all time is",
    "I prefer tea over coffee because",
    "In my opinion, the most important",
    "The most underrated city in Europe is",
    "My favourite season is",
    "The best book I read this year",
    "Cats make better pets because",
    "The most beautiful place I've seen",
    "I don't really enjoy",
    "What I like most about weekends is",
    "The band I listen to most",
    "If I could live anywhere, I",
    "My least favourite chore is",
    "I have always wanted to",
    # advice and how-to
    "The best way to learn a language is",
    "To fix a flat bicycle tyre,",
    "If you want to sleep better,",
    "The first step in planting tomatoes is",
    "To save money on groceries,",
    "When writing a cover letter,",
    "A good way to start running is",
    "To remove a coffee stain,",
    "If your computer is slow,",
    "Before a job interview, you should",
    "To keep houseplants alive,",
    "The easiest way to fold a shirt is",
    "When you get lost in a forest,",
    "To change a light bulb safely,",
    "A simple way to reduce stress is",
    "If you want to learn guitar,",
    "The key to a good presentation is",
    "To study for an exam,",
    "When packing for a trip,",
    "To make friends in a new city,",
    # technology and work
    "The first computer was",
    "My phone battery",
    "Python is a programming language that",
    "The internet was originally designed",
    "Our team meeting today",
    "The new software update",
    "Electric cars are",
    "Most websites use cookies to",
    "My laptop keeps",
    "The quarterly report shows",
    "A good password should",
    "Solar panels convert",
    "The company was founded in",
    "My manager asked me to",
    "The printer in our office",
    "Smartphones changed the way",
    "Machine learning models are trained",
    "The deadline for the project is",
    # sports and games
    "The World Cup is held every",
    "In basketball, a three-pointer",
    "My favourite football team",
    "A marathon is",
    "Chess was invented in",
    "The fastest sprinter in history",
    "Our local tennis club",
    "To win at Monopoly, you",
    "The Olympic Games started in",
    "Cricket is popular in",
    "Last night's match",
    "I started swimming when",
    # arts and culture
    "Shakespeare wrote",
    "The Mona Lisa hangs in",
    "Jazz originated in",
    "The first novel I loved",
    "Beethoven composed",
    "Most pop songs are",
    "The theatre downtown",
    "Van Gogh painted",
    "A haiku has",
    "The museum's new exhibit",
    "Ballet dancers train",
    "The film festival this year",
    # animals and pets
    "My cat likes to",
    "Elephants can remember",
    "The fastest land animal is",
    "Our dog barks whenever",
    "Owls hunt at",
    "Horses sleep",
    "A group of crows is called",
    "Goldfish can live for",
    "Butterflies start life as",
    "The parrot at the pet shop",
    # money, economy, everyday errands
    "The price of bread",
    "Interest rates are",
    "I paid for the tickets",
    "Rent in this neighbourhood",
    "The bank closes at",
    "Inflation usually means",
    "The bus to the airport",
    "At the supermarket today,",
    "The library opens at",
    "My electricity bill",
    # health and body
    "Drinking enough water helps",
    "A balanced diet includes",
    "Regular exercise can",
    "The common cold is caused by",
    "I went to the dentist because",
    "Most adults need about",
    "Stretching before a run",
    "Vitamin C is found in",
    # mathematics and logic
    "Two plus two equals",
    "The square root of 144 is",
    "A triangle has",
    "Pi is approximately",
    "Prime numbers are",
    "If you double a number,",
    "The area of a circle is",
    "A million seconds is about",
    # family, home, relationships
    "My brother is",
    "Our kitchen needs",
    "The garden behind our house",
    "My parents live",
    "Our wedding was",
    "The kids next door",
    "My roommate always",
    "The couch in our living room",
    # plans and the future
    "Next year I plan to",
    "This evening we will",
    "By the end of the month,",
    "Tomorrow I need to",
    "Our trip next week",
    "In ten years, cities will",
    "After lunch I'm going to",
    "The conference starts on",
    # explanations and conversation starters
    "Here is how it works:",
    "Let me explain.",
    "The answer is",
    "Sure! The main reason is",
    "Great question. The",
    "That depends on",
    "Most experts agree that",
    "To put it simply,",
    "The short version is",
    "One thing to keep in mind is",
    "According to the manual,",
    "A common mistake is",
    "The difference between the two is",
    "There are three main",
    "Historically speaking,",
    "Interestingly, the",
)

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


def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _is_system_role_error(err: Exception) -> bool:
    return "system" in str(err).lower()


def render_prompt(tokenizer: Any, user: str, assistant_prefix: str = "", system: str | None = None) -> str:
    """Render one prompt as text with the tokenizer's chat template.

    With an ``assistant_prefix`` the assistant turn is left open (``continue_final_message=True``) so the model
    continues the prefix; without one a generation prompt is added (``add_generation_prompt=True``). Tokenize the
    result with ``add_special_tokens=False``.

    If the template rejects a system turn (e.g. Gemma 2's raises "System role not supported"), the system text is
    folded into the user turn as ``f"{system}\\n\\n{user}"``.

    Fallback for tokenizers **without** a chat template (base models such as Gemma 3 270M)::

        f"{system}\\n\\n" (only if system)  +  f"Question: {user}\\nAnswer:"  +  (f" {assistant_prefix}" if any)

    i.e. without a prefix the text ends in ``"Answer:"`` with no trailing space, so the next token carries its
    own leading space as in ordinary text.

    Args:
        tokenizer: a Hugging Face tokenizer (duck-typed: ``chat_template`` and ``apply_chat_template``).
        user: the user-turn text.
        assistant_prefix: the incomplete start of the assistant turn; leading/trailing whitespace is stripped
            (templates trim it anyway).
        system: optional system-turn text.

    Returns:
        The prompt text, ending exactly in ``assistant_prefix`` when one is given.

    Raises:
        ValueError: if ``user`` is empty.
    """
    if not user or not user.strip():
        raise ValueError("render_prompt: the user text is empty; pass the question or instruction to render")
    prefix = assistant_prefix.strip()
    if not _has_chat_template(tokenizer):
        head = f"{system}\n\n" if system else ""
        return f"{head}Question: {user}\nAnswer:" + (f" {prefix}" if prefix else "")

    def build(sys_text: str | None, user_text: str) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": sys_text}] if sys_text else []
        msgs.append({"role": "user", "content": user_text})
        if prefix:
            msgs.append({"role": "assistant", "content": prefix})
        return msgs

    kwargs: dict[str, Any] = {"tokenize": False}
    if prefix:
        kwargs["continue_final_message"] = True
    else:
        kwargs["add_generation_prompt"] = True
    try:
        text = tokenizer.apply_chat_template(build(system, user), **kwargs)
    except Exception as err:  # jinja2 TemplateError from templates that reject a system turn
        if not system or not _is_system_role_error(err):
            raise
        text = tokenizer.apply_chat_template(build(None, f"{system}\n\n{user}"), **kwargs)
    if not isinstance(text, str):
        raise TypeError(
            f"tokenizer.apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str; "
            "is this a Hugging Face tokenizer?"
        )
    return text


# ---------------------------------------------------------------------------------------------------------------
# Generated honesty pairs
# ---------------------------------------------------------------------------------------------------------------


_SENTINEL = "zqxjzqxj"


def assistant_suffix(tokenizer: Any, positive: str, negative: str) -> str:
    """The unfinished assistant reply two rendered prompts share: the text after the last assistant header
    (what :func:`render_prompt` writes between the user text and the reply, found by rendering a probe), when both
    prompts have it and the text after it is the same and not empty; else ``""``."""
    probe = render_prompt(tokenizer, _SENTINEL)
    header = probe[probe.rindex(_SENTINEL) + len(_SENTINEL) :]
    if not header.strip():
        return ""
    tails = [t[t.rindex(header) + len(header) :] if header in t else None for t in (positive, negative)]
    if tails[0] is None or tails[0] != tails[1] or not tails[0].strip():
        return ""
    return tails[0]


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
        tokenizer: a Hugging Face tokenizer (see :func:`render_prompt`).
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
      tokenizer's assistant header is used when both prompts share it (:func:`assistant_suffix`).
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
