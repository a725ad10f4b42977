"""Steerable concepts: persona pairs to train on and the held-out readout that measures them.

Each concept in ``data/concepts.json`` gives an instruction template, (positive, negative) persona phrases (pairs
are built exactly like the honesty pairs: persona instruction as the user turn, a shared unfinished assistant
reply, see ``pairs.make_persona_pairs``), and a readout:

- ``persona-sets``: Anthropic model-written-eval persona files; ``targets`` maps a set's name to the sign a more
  positive-persona model should show on agreement with it (honesty, openness);
- ``words``: judge-free continuation readout written for this package: after each held-out neutral opening
  (``prefixes``, the start of the assistant reply to ``request``) the score is logsumexp log p over tokens that
  decode to a ``positive_words`` entry minus the same over ``negative_words`` (whole words, any case, with or
  without a leading space), in nats; every item's label is +1 (toward the positive persona). There is no answer
  format to be biased toward here, so bias and effect coincide by construction.

``honesty`` is the default concept; ``sentiment`` is the positive control (docs/results.md says how it was chosen).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from .datafiles import read_data
from .errors import ConfigError
from .pairs import HONESTY_PERSONAS, PairSplit, make_persona_pairs, persona_instruction


@dataclass(frozen=True)
class Concept:
    """One steerable concept (fields as in ``data/concepts.json``; see the module docstring)."""

    name: str
    description: str
    template: str
    personas: tuple[tuple[str, str], ...]
    readout: str
    targets: dict[str, int] = field(default_factory=dict)
    request: str = ""
    positive_words: tuple[str, ...] = ()
    negative_words: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()
    neutral: str = ""  # the persona-free instruction (ContrastivePair.neutral)

    def instruction(self, positive: bool, persona: tuple[str, str] | None = None) -> str:
        """The persona sentence for one side, e.g. "Pretend you're a cheerful optimist making statements …"."""
        persona = persona or self.personas[0]
        if self.personas == HONESTY_PERSONAS:  # the honesty wording, with its article check
            return persona_instruction(positive, persona)
        return self.template.format(persona=persona[0] if positive else persona[1])

    def pairs(self, tokenizer: Any, n_pairs: int = 400, seed: int = 0, val_fraction: float = 0.1) -> PairSplit:
        """Training / validation contrastive pairs (``pairs.make_persona_pairs``)."""
        return make_persona_pairs(
            tokenizer,
            self.personas,
            self.instruction,
            n_pairs,
            seed,
            val_fraction,
            concept=self.name,
            neutral_instruction=self.neutral or None,
        )

    def words_dataset(self):
        """The ``words`` readout as an ``EvalDataset`` (kind ``"words:<concept>"``, every label +1).

        Raises:
            ConfigError: the concept has another readout.
        """
        from .eval.datasets import EvalDataset, EvalItem

        if self.readout != "words":
            raise ConfigError(f"concept {self.name!r} is read on persona sets, not words", field="concept")
        items = tuple(
            EvalItem(id=f"{self.name}-words:{i + 1}", question=p, label=1) for i, p in enumerate(self.prefixes)
        )
        return EvalDataset(
            name=f"{self.name}-words", kind=f"words:{self.name}", items=items, source="innerpissa/data/concepts.json"
        )


@functools.lru_cache(maxsize=1)
def load_concepts() -> dict[str, Concept]:
    """All concepts of ``innerpissa/data/concepts.json``, by name."""
    raw = read_data("concepts.json")
    out = {}
    for name, d in raw.items():
        personas = tuple(tuple(p) for p in d["personas"])
        if name == "honesty" and personas != HONESTY_PERSONAS:
            raise ConfigError(
                "data/concepts.json: honesty personas differ from pairs.HONESTY_PERSONAS", field="honesty.personas"
            )
        out[name] = Concept(
            name=name,
            description=d["description"],
            template=d["template"],
            personas=personas,
            readout=d["readout"],
            targets=dict(d.get("targets", {})),
            request=d.get("request", ""),
            positive_words=tuple(d.get("positive_words", ())),
            negative_words=tuple(d.get("negative_words", ())),
            prefixes=tuple(d.get("prefixes", ())),
            neutral=d.get("neutral", ""),
        )
    return out


def get_concept(name: str) -> Concept:
    """The concept called ``name``. Raises ConfigError listing the known ones."""
    concepts = load_concepts()
    if name not in concepts:
        raise ConfigError(f"unknown concept {name!r}; known: {', '.join(concepts)}", field="concept")
    return concepts[name]
