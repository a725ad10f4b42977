"""Near-manifold contrast sets for one task, rendered from a manifest (docs/design.md §9).

Each manifest row is one instance of the task; the worked example is a tour guide describing a place. For every
row the template renders *variants* of one instruction, all sharing the same incomplete assistant suffix (the
planning-state idea of the persona pairs, docs/design.md §4):

- ``N`` gold (vivid, specific, local knowledge, an anecdote, the practical essentials),
- ``S`` bland / generic / rule-breaking,
- ``E`` logistics-heavy and story-light, ``W`` story-heavy and logistics-light,
- trait ablations ``N-<trait>``: N's instruction with exactly one element removed and forbidden.

Contrasts (positive variant, negative variant): ``N−S``, ``E−W`` and ``<trait>`` = (N, N-<trait>). Each
contrast also names a pair of *continuations* (style-typical text for each side, built from the row's fields)
used to measure steering by log-likelihood.

Manifest: JSONL (one object per line) or CSV with a header; every field the template references is required per
row, plus ``id``; an optional ``split`` column holds ``train`` or ``heldout``. A template file (JSON) has the keys
of ``ContrastTemplate``; strings use ``{field}`` placeholders for manifest columns.
"""

from __future__ import annotations

import csv
import json
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..datafiles import data_path
from ..errors import InnerPiSSAError
from ..jsonl import iter_jsonl
from ..prompts import render_prompt


class ManifestError(InnerPiSSAError, ValueError):
    """A malformed manifest or template; the message names the file, line/row and field."""


@dataclass(frozen=True)
class ContrastTemplate:
    """How to render the variants of one manifest row.

    Attributes:
        variants: name → instruction template for the base variants (must include the two sides of each contrast).
        traits: trait name → (clause inside N's list, prohibition appended when it is ablated). N's instruction is
            ``n_head`` + the clauses joined + "." ; ``N-<trait>`` drops that clause and appends its prohibition.
        n_head: start of N's instruction.
        suffixes: shared incomplete assistant starts, e.g. "Welcome to {place}."
        contrasts: contrast name → (positive variant, negative variant, positive continuation, negative continuation).
        neutral: instruction used when measuring steering (no style requested).
    """

    variants: dict[str, str]
    traits: dict[str, tuple[str, str]]
    n_head: str
    suffixes: tuple[str, ...]
    contrasts: dict[str, tuple[str, str, str, str]]
    neutral: str

    def n_instruction(self, drop: str | None = None) -> str:
        clauses = [c for t, (c, _) in self.traits.items() if t != drop]
        if not clauses:
            text = f"{self.n_head}."
        else:
            body = "; ".join(clauses[:-1]) + ("; and " if len(clauses) > 1 else "") + clauses[-1]
            text = f"{self.n_head} {body}."
        return text + (f" {self.traits[drop][1]}" if drop else "")

    def instructions(self) -> dict[str, str]:
        """Every variant's instruction template: the base variants, ``N`` and ``N-<trait>``."""
        out = dict(self.variants)
        out["N"] = self.n_instruction()
        for t in self.traits:
            out[f"N-{t}"] = self.n_instruction(t)
        return out

    def fields(self) -> set[str]:
        """Manifest columns the template references."""
        texts = [*self.instructions().values(), *self.suffixes, self.neutral]
        texts += [x for c in self.contrasts.values() for x in c[2:]]
        return {f for t in texts for _, f, _, _ in string.Formatter().parse(t) if f}

    @classmethod
    def from_file(cls, path: str | Path) -> ContrastTemplate:
        """Read a JSON template. Raises ManifestError naming the missing or malformed key."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ManifestError(f"{path}: cannot read template ({e})") from e
        try:
            tpl = cls(
                variants=dict(raw["variants"]),
                traits={k: tuple(v) for k, v in raw["traits"].items()},
                n_head=str(raw["n_head"]),
                suffixes=tuple(raw["suffixes"]),
                contrasts={k: tuple(v) for k, v in raw["contrasts"].items()},
                neutral=str(raw["neutral"]),
            )
        except KeyError as e:
            raise ManifestError(f"{path}: template lacks key {e.args[0]!r}") from e
        tpl.validate(str(path))
        return tpl

    def validate(self, where: str = "template") -> None:
        names = set(self.instructions())
        for name, c in self.contrasts.items():
            if len(c) != 4:
                raise ManifestError(
                    f"{where}: contrast {name!r} needs [positive, negative, positive continuation, "
                    "negative continuation]"
                )
            for side in c[:2]:
                if side not in names:
                    raise ManifestError(f"{where}: contrast {name!r} uses unknown variant {side!r}")
        for t, v in self.traits.items():
            if len(v) != 2:
                raise ManifestError(f"{where}: trait {t!r} needs [clause, prohibition]")


#: The worked example: a tour guide describing a place (``data/tour_guide_template.json``).
TOUR_GUIDE = ContrastTemplate.from_file(data_path("tour_guide_template.json"))


@dataclass(frozen=True)
class ManifestRow:
    id: str
    fields: dict[str, str]
    split: str = "train"


def builtin_manifest_path() -> Path:
    """The shipped tour-guide manifest: 63 places the project wrote, 15 marked ``heldout``."""
    return data_path("tour_guide.jsonl")


def load_manifest(path: str | Path | None = None, template: ContrastTemplate = TOUR_GUIDE) -> list[ManifestRow]:
    """Read a JSONL or CSV manifest (default: the built-in tour-guide manifest) and check it against ``template``.

    Raises:
        ManifestError: unreadable file, a row without ``id`` or a field the template needs (file and line named),
            a duplicate id, or a ``split`` other than train/heldout.
    """
    path = Path(path) if path is not None else builtin_manifest_path()
    need = template.fields()
    rows: list[ManifestRow] = []
    if path.suffix.lower() == ".csv":
        try:
            with path.open(newline="") as f:
                records = [(i + 2, r) for i, r in enumerate(csv.DictReader(f))]
        except OSError as e:
            raise ManifestError(f"{path}: cannot read manifest ({e})") from e
    else:
        if not path.is_file():
            raise ManifestError(f"{path}: manifest not found")
        records = list(iter_jsonl(path, lambda p, n, m: ManifestError(f"{p}:{n}: {m}")))
    seen: set[str] = set()
    for line, rec in records:
        if not isinstance(rec, dict):
            raise ManifestError(f"{path}:{line}: expected an object with fields {sorted(need | {'id'})}")
        missing = sorted(f for f in need | {"id"} if not str(rec.get(f) or "").strip())
        if missing:
            raise ManifestError(f"{path}:{line}: missing or empty field(s) {missing}")
        rid = str(rec["id"])
        if rid in seen:
            raise ManifestError(f"{path}:{line}: duplicate id {rid!r}")
        seen.add(rid)
        split = str(rec.get("split") or "train")
        if split not in ("train", "heldout"):
            raise ManifestError(f"{path}:{line}: split must be 'train' or 'heldout', not {split!r}")
        rows.append(ManifestRow(rid, {k: str(v) for k, v in rec.items() if v is not None}, split))
    if not rows:
        raise ManifestError(f"{path}: no rows")
    return rows


@dataclass
class ContrastSet:
    """Rendered prompts: ``prompts[variant][i]`` for item i = (row, suffix); ``items[i]`` = (row id, suffix index).

    Each prompt ends in the shared suffix, so the last-token hidden state is read at the same text in every variant.
    """

    template: ContrastTemplate
    rows: list[ManifestRow]
    items: list[tuple[str, int]]
    prompts: dict[str, list[str]]
    split: dict[str, str] = field(default_factory=dict)

    def indices(self, split: str) -> list[int]:
        return [i for i, (rid, _) in enumerate(self.items) if self.split[rid] == split]


def _fill(text: str, row: ManifestRow) -> str:
    return text.format(**row.fields)


def render_contrasts(
    tokenizer: Any, rows: list[ManifestRow], template: ContrastTemplate = TOUR_GUIDE, n_suffixes: int | None = None
) -> ContrastSet:
    """Render every variant of every row with each shared suffix, through the tokenizer's chat template."""
    instr = template.instructions()
    suffixes = template.suffixes[:n_suffixes] if n_suffixes else template.suffixes
    items, prompts = [], {v: [] for v in instr}
    for row in rows:
        for j, suf in enumerate(suffixes):
            items.append((row.id, j))
            s = _fill(suf, row)
            for v, t in instr.items():
                prompts[v].append(render_prompt(tokenizer, _fill(t, row), assistant_prefix=s))
    return ContrastSet(template, rows, items, prompts, {r.id: r.split for r in rows})


def continuation_pairs(
    tokenizer: Any, rows: list[ManifestRow], contrast: str, template: ContrastTemplate = TOUR_GUIDE
) -> list[tuple[str, str, str]]:
    """(neutral prompt, positive continuation, negative continuation) per row for one contrast.

    The prompt asks for the place with no style (``template.neutral``) and ends in the first suffix.
    """
    _, _, pos, neg = template.contrasts[contrast]
    out = []
    for row in rows:
        prompt = render_prompt(
            tokenizer, _fill(template.neutral, row), assistant_prefix=_fill(template.suffixes[0], row)
        )
        out.append((prompt, " " + _fill(pos, row), " " + _fill(neg, row)))
    return out
