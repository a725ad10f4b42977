"""Judge-free evaluation: Yes/No (or A/B) log-odds of held-out questions over a coefficient sweep (DESIGN.md §5).

For each method and coefficient c, one forward pass per question reads, at the answer position,

    score(c) = logsumexp(log p over "yes" tokens) − logsumexp(log p over "no" tokens)      [nats]

where the token sets hold every token that decodes to the whole word "yes"/"no" in any case, with or without
a leading space ("non", "uno", "yesterday" are not matched). The Yes+No probability mass is kept; an answer is
invalid when that mass is below ``MIN_MASS``. Coherence is the mean per-token NLL of a fixed neutral text set
(nats/token). ``metrics.py`` turns these raw sweeps into effects, CIs and usable ranges.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from .errors import ConfigError, finite_coeff
from .evaldata import EvalDataset
from .pairs import render_prompt
from .train import left_pad

MIN_MASS = 0.05
ANSWER_INSTRUCTION = {"yesno": "\nAnswer with Yes or No.", "ab": "\nAnswer with (A) or (B)."}


@functools.lru_cache(maxsize=8)
def _answer_tokens_cached(tokenizer, words: tuple[str, str]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    pos, neg = [], []
    for tid in range(len(tokenizer)):
        w = tokenizer.decode([tid]).strip().lower()
        if w == words[0]:
            pos.append(tid)
        elif w == words[1]:
            neg.append(tid)
    return tuple(pos), tuple(neg)


def answer_token_sets(tokenizer, kind: str = "yesno") -> tuple[list[int], list[int]]:
    """Token ids that decode to the positive / negative answer as a whole word.

    kind ``"yesno"``: "yes"/"no" in any case, with or without leading whitespace. kind ``"ab"``: "A"/"B" (read
    after an assistant prefix "("). Raises ValueError when either set is empty.
    """
    words = {"yesno": ("yes", "no"), "ab": ("a", "b")}[kind]
    pos, neg = _answer_tokens_cached(tokenizer, words)
    if not pos or not neg:
        raise ValueError(f"tokenizer has no whole-word tokens for {words}: cannot score {kind} questions")
    return list(pos), list(neg)


def eval_prompt(tokenizer, question: str, kind: str, system: str | None) -> str:
    """The rendered prompt whose next token is the answer."""
    prefix = "(" if kind == "ab" else ""
    return render_prompt(tokenizer, question + ANSWER_INSTRUCTION[kind], assistant_prefix=prefix, system=system)


@torch.no_grad()
def answer_scores(model, tokenizer, prompts: list[str], kind: str = "yesno", batch_size: int = 32
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Score prompts → (log-odds (n,) in nats, answer mass (n,) in [0, 1]); batches sorted by length."""
    pos_ids, neg_ids = answer_token_sets(tokenizer, kind)
    toks = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = np.argsort([len(t) for t in toks])
    scores = np.zeros(len(prompts))
    mass = np.zeros(len(prompts))
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        ids, mask, pos = left_pad([toks[j] for j in idx], tokenizer.pad_token_id)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1,
                       use_cache=False).logits[:, -1].float()
        logp = logits.log_softmax(-1)  # (B, V)
        lp_pos = logp[:, pos_ids].logsumexp(-1)
        lp_neg = logp[:, neg_ids].logsumexp(-1)
        scores[idx] = (lp_pos - lp_neg).numpy()
        mass[idx] = (lp_pos.exp() + lp_neg.exp()).numpy()
    return scores, mass


@torch.no_grad()
def continuation_logprobs(model, tokenizer, heads: list[str], bodies: list[str],
                          batch_size: int = 16) -> list[tuple[float, int]]:
    """(sum of log p in nats, number of tokens) of each ``bodies[i]`` following ``heads[i]``.

    Texts are tokenized separately (no special tokens) and concatenated, left-padded, batched.
    """
    out: list[tuple[float, int]] = []
    for i in range(0, len(heads), batch_size):
        hs = [tokenizer(h, add_special_tokens=False)["input_ids"] for h in heads[i:i + batch_size]]
        bs = [tokenizer(b, add_special_tokens=False)["input_ids"] for b in bodies[i:i + batch_size]]
        ids, mask, pos = left_pad([h + b for h, b in zip(hs, bs)], tokenizer.pad_token_id)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits.float()
        logp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # (B, T-1)
        for r, b in enumerate(bs):
            out.append((float(logp[r, ids.shape[1] - 1 - len(b):].sum()), len(b)))
    return out


def neutral_head(tokenizer, system: str | None = None) -> str:
    """The fixed neutral request whose reply the coherence texts are scored as (both engines)."""
    return render_prompt(tokenizer, "Write a short paragraph.", system=system)


def text_nll(model, tokenizer, texts: list[str], system: str | None = None, batch_size: int = 16) -> float:
    """Mean per-token NLL (nats/token) of ``texts`` as the assistant's reply to a fixed neutral request."""
    head = neutral_head(tokenizer, system)
    rows = continuation_logprobs(model, tokenizer, [head] * len(texts), texts, batch_size)
    return -sum(s for s, _ in rows) / max(sum(n for _, n in rows), 1)


@dataclass
class Sweep:
    """Raw results of one method on all datasets: per coefficient, per dataset, arrays over items."""

    method: str
    coeffs: list[float]
    scores: dict[str, list[list[float]]]  # dataset -> [coeff index][item]
    mass: dict[str, list[list[float]]]
    neutral_nll: list[float]  # per coefficient, nats/token


def check_sweep_coeffs(coeffs, name: str = "coeffs") -> tuple[float, ...]:
    """Validate a sweep's coefficients before any compute: finite numbers, 0 added when missing, sorted, and
    symmetric (every |c| > 0 swept with both signs, since effects, ρ and symmetry compare +C with −C).

    Returns: the sorted tuple, with 0.0 included.
    Raises:
        NonFiniteError: NaN or inf.  ConfigError: not numbers, or a |c| without its mirror (names the fix).
    """
    if isinstance(coeffs, (str, bytes)) or not hasattr(coeffs, "__iter__"):
        raise ConfigError(f"{name} must be a list of numbers, got {coeffs!r}", field=name)
    cs = sorted({finite_coeff(c, f"{name} entry") for c in coeffs} | {0.0})
    lonely = [c for c in cs if c != 0 and -c not in cs]
    if lonely:
        mirrored = ",".join(f"{c:g}" for c in sorted(set(cs) | {-c for c in cs}))
        raise ConfigError(f"{name}: {', '.join(f'{c:g}' for c in lonely)} swept without the opposite sign; the "
                          f"metrics compare +C with -C: use e.g. {mirrored}", field=name)
    if len(cs) < 3:
        raise ConfigError(f"{name}: need at least one non-zero coefficient pair ±C, got {coeffs!r}", field=name)
    return tuple(cs)


def run_sweep(model, tokenizer, method, datasets: list[EvalDataset], neutral_texts: list[str],
              batch_size: int = 32, base_cache: dict | None = None, progress=None) -> Sweep:
    """Evaluate ``method`` at each of its coefficients on every dataset and on the neutral texts.

    ``base_cache`` (dict) shares the c = 0 results across methods: c = 0 is the unsteered model for all of them.
    """
    scores: dict[str, list] = {d.name: [] for d in datasets}
    mass: dict[str, list] = {d.name: [] for d in datasets}
    nll: list[float] = []
    for c in method.coeffs:
        system = method.system(c)
        key = ("base", system)
        if c == 0 and base_cache is not None and key in base_cache:
            cached = base_cache[key]
        else:
            with method.steer(c):
                cached = {
                    d.name: answer_scores(model, tokenizer,
                                          [eval_prompt(tokenizer, it.question, d.kind, system) for it in d.items],
                                          d.kind, batch_size)
                    for d in datasets
                }
                cached["__nll__"] = text_nll(model, tokenizer, neutral_texts, system)
            if c == 0 and base_cache is not None:
                base_cache[key] = cached
        for d in datasets:
            s, m = cached[d.name]
            scores[d.name].append(s.tolist())
            mass[d.name].append(m.tolist())
        nll.append(cached["__nll__"])
        if progress is not None:
            progress(method.name, c)
    return Sweep(method.name, list(method.coeffs), scores, mass, nll)
