"""Two evaluation engines behind one interface, and the one sweep loop both use (docs/design.md §5, §8).

Every method (``methods.py``) runs at each coefficient c of its sweep; an engine returns, per c, the answer
log-odds and answer mass of every dataset item and two coherence numbers on the neutral texts:

- ``score(c) = logsumexp(log p over first-option tokens) − logsumexp(log p over second-option tokens)`` [nats] at
  the answer position: "yes"/"no" (any case, with or without a leading space; whole words only, so "non", "uno",
  "yesterday" are not matched) or "A"/"B" after an assistant prefix "(". The two options' total probability is
  the answer mass; an answer is invalid when the mass is below ``MIN_MASS``.
- ``nll(c)``: mean per-token NLL of the neutral texts as the reply to a fixed neutral request [nats/token];
- ``kl(c)``: mean per-token KL(p₀ ‖ p_c) of the next-token distributions over the same reply tokens, p₀ the
  unsteered model with the unmodified request [nats/token]. KL(0) = 0.

Engines:

- ``TorchEngine``: transformers on any model (HF id, directory or GGUF); one forward pass per coefficient.
- ``RustEngine``: a GGUF file (Llama family or Gemma 3) read by candle; every coefficient of an adapter or vector
  method runs as a branch of one packed pass (see ``rust/core/src/engine``). Tokenization stays in Python, so
  both engines see identical token ids and produce the same ``Sweep`` (tested to ~1e-4 nats).

Multiple-choice items (kind ``"mc"``, TruthfulQA) are scored instead by ``mc_score``: the mean length-normalised
log-likelihood of the true answers minus that of the false answers [nats/token], each answer scored as the
assistant reply to the question (docs/design.md §5); their answer mass is 1 (there is no answer format to miss).

Methods are told apart by ``method.kind``: ``"adapter"`` (an InnerPiSSA adapter), ``"vector"`` (activation
addition at block outputs), ``"prompt"`` (the persona sentence prepended to the user turn at c ≠ 0), or
``"hook"`` (any torch context manager ``method.steer(c)``; torch engine only).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError, finite_coeff
from ..hooks import logit_positions, on_model_device
from ..prompts import left_pad, render_prompt
from .datasets import EvalDataset

MIN_MASS = 0.05
ANSWER_INSTRUCTION = {"yesno": "\nAnswer with Yes or No.", "ab": "\nAnswer with (A) or (B)."}
NEUTRAL_REQUEST = "Write a short paragraph."


@dataclass
class Sweep:
    """Raw results of one method on all datasets: per coefficient, per dataset, arrays over items."""

    method: str
    coeffs: list[float]
    scores: dict[str, list[list[float]]]  # dataset -> [coeff index][item], nats
    mass: dict[str, list[list[float]]]
    neutral_nll: list[float]  # per coefficient, nats/token
    neutral_kl: list[float]  # per coefficient, mean KL(p0 || pc), nats/token
    kind: str = ""  # the method's kind ("prompt" has one dose, |c| = 1)
    kl_coeff: float | None = None  # budget-first sweeps: C_b, found on the neutral texts before any item is scored
    budget_reached: bool | None = None
    calibration: dict | None = None  # budget-first sweeps: {"c": [...], "kl": [...]}, the neutral-text KL points


#: A budget-first sweep scores items at these multiples of C_b (both signs, and 0).
BUDGET_POINTS = (0.5, 1.0)


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
        raise ConfigError(
            f"{name}: {', '.join(f'{c:g}' for c in lonely)} swept without the opposite sign; the "
            f"metrics compare +C with -C: use e.g. {mirrored}",
            field=name,
        )
    if len(cs) < 3:
        raise ConfigError(f"{name}: need at least one non-zero coefficient pair ±C, got {coeffs!r}", field=name)
    return tuple(cs)


# --- prompts and answer tokens (shared by both engines) --------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _answer_tokens_cached(
    tokenizer, first: tuple[str, ...], second: tuple[str, ...]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    first_set, second_set = {w.lower() for w in first}, {w.lower() for w in second}
    pos, neg = [], []
    for tid in range(len(tokenizer)):
        w = tokenizer.decode([tid]).strip().lower()
        if w in first_set:
            pos.append(tid)
        elif w in second_set:
            neg.append(tid)
    return tuple(pos), tuple(neg)


def _concept(kind: str):
    from ..concepts import get_concept

    return get_concept(kind.split(":", 1)[1])


def answer_token_sets(tokenizer, kind: str = "yesno") -> tuple[list[int], list[int]]:
    """Token ids that decode to the first / second answer option as a whole word.

    kind ``"yesno"``: "yes"/"no" in any case, with or without leading whitespace. kind ``"ab"``: "A"/"B" (read
    after an assistant prefix "("). kind ``"words:<concept>"``: the concept's positive / negative word lists.
    Raises ValueError when either set is empty.
    """
    if kind.startswith("words:"):
        c = _concept(kind)
        words = (tuple(c.positive_words), tuple(c.negative_words))
    else:
        words = {"yesno": (("yes",), ("no",)), "ab": (("a",), ("b",))}[kind]
    pos, neg = _answer_tokens_cached(tokenizer, *words)
    if not pos or not neg:
        raise ValueError(f"tokenizer has no whole-word tokens for {words}: cannot score {kind} questions")
    return list(pos), list(neg)


def _with_prefix(user: str, user_prefix: str | None) -> str:
    return f"{user_prefix}\n\n{user}" if user_prefix else user


def eval_prompt(tokenizer, question: str, kind: str, user_prefix: str | None = None) -> str:
    """The rendered prompt whose next token is the answer. ``user_prefix`` (prompting baseline) goes at the start
    of the user turn — where the training pairs put the persona — and the template's default system prompt is
    kept. For ``"words:<concept>"`` items the question is the start of the assistant reply to the concept's
    request."""
    if kind.startswith("words:"):  # the item is the opening of the reply; the next token is read
        return render_prompt(tokenizer, _with_prefix(_concept(kind).request, user_prefix), assistant_prefix=question)
    prefix = "(" if kind == "ab" else ""
    return render_prompt(
        tokenizer, _with_prefix(question + ANSWER_INSTRUCTION[kind], user_prefix), assistant_prefix=prefix
    )


def mc_texts(tokenizer, item, user_prefix: str | None = None) -> tuple[str, list[str]]:
    """(prompt head, answers) of a multiple-choice item: the question as the user turn (``user_prefix`` before it,
    as in ``eval_prompt``), then each answer, true ones first, as the reply. A head that does not end in
    whitespace (the plain-text fallback ends in "Answer:") gets each answer with a leading space."""
    head = render_prompt(tokenizer, _with_prefix(item.question, user_prefix))
    sep = "" if head[-1:].isspace() else " "
    return head, [sep + a for a in (*item.true_answers, *item.false_answers)]


def mc_score(logprob_sums, n_tokens, n_true: int) -> float:
    """Length-normalised log-likelihood gap of one multiple-choice item, nats/token (docs/design.md §5, TruthfulQA MC):
    mean over true answers of Σ log p / n_tokens minus the same over false answers. ``logprob_sums`` and
    ``n_tokens`` list the true answers first (``n_true`` of them), then the false ones."""
    norm = np.asarray(logprob_sums, dtype=np.float64) / np.maximum(np.asarray(n_tokens, dtype=np.float64), 1.0)
    return float(norm[:n_true].mean() - norm[n_true:].mean())


def neutral_head(tokenizer, user_prefix: str | None = None) -> str:
    """The fixed neutral request whose reply the coherence texts are scored as (both engines)."""
    return render_prompt(tokenizer, _with_prefix(NEUTRAL_REQUEST, user_prefix))


def token_ids(tokenizer, text: str, special: bool = False) -> list[int]:
    """Token ids of ``text`` (rendered prompts already carry their special tokens, so none are added by default)."""
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def find_budget_coeff(
    engine, method, neutral_texts: list[str], kl_budget: float, refine: int = 1
) -> tuple[float, bool, dict]:
    """C_b of ``method`` from the neutral texts alone: KL(p₀ ‖ p_c) at the method's swept coefficients, C_b by
    ``metrics.kl_matched_coeff`` (√KL interpolation), then ``refine`` rounds that measure KL at ±C_b and
    interpolate again among all points. No dataset item is scored.

    Returns: (C_b, reached, {"c": coefficients, "kl": KL at each, nats/token}); not reached: (largest |c|,
    False, …).
    """
    from .metrics import kl_matched_coeff

    points = {0.0: 0.0}
    todo = [float(c) for c in method.coeffs if c != 0]
    for _ in range(refine + 1):
        for c, res in zip(todo, engine.evaluate(method, todo, [], neutral_texts)):
            points[c] = float(res["__kl__"])
        cs = sorted(points)
        cb, reached = kl_matched_coeff(cs, [points[c] for c in cs], kl_budget)
        todo = [c for c in (cb, -cb) if c not in points]
        if not reached or not todo:
            break
    cs = sorted(points)
    return cb, reached, {"c": cs, "kl": [points[c] for c in cs]}


def run_sweep(
    engine,
    method,
    datasets: list[EvalDataset],
    neutral_texts: list[str],
    base_cache: dict | None = None,
    progress=None,
    kl_budget: float | None = None,
) -> Sweep:
    """Evaluate ``method`` on every dataset and on the neutral texts over a sweep of coefficients.

    Without ``kl_budget`` (or for prompting, which has one dose) the sweep is ``method.coeffs``. With it the sweep
    is **budget-first**: C_b is found on the neutral texts (``find_budget_coeff``), then items are scored only at
    c ∈ {0, ±C_b/2, ±C_b} (``BUDGET_POINTS``), so every method is read exactly at its budget (no interpolation
    between grid points) and the costly item passes drop from len(coeffs) − 1 to four per method.

    c = 0 is the unsteered model with the plain prompt for every method, so ``base_cache`` (a dict shared across
    methods) computes it once. Returns a ``Sweep``.
    """
    cache = base_cache if base_cache is not None else {}
    cb = reached = calib = None
    if kl_budget is not None and method.kind != "prompt":
        cb, reached, calib = find_budget_coeff(engine, method, neutral_texts, kl_budget)
        coeffs = sorted({0.0} | {s * t * cb for t in BUDGET_POINTS for s in (1.0, -1.0)})
    else:
        coeffs = [float(c) for c in method.coeffs]
    todo = [k for k, c in enumerate(coeffs) if not (c == 0 and "base" in cache)]
    points: list[dict | None] = [cache["base"] if c == 0 and "base" in cache else None for c in coeffs]
    for k, res in zip(todo, engine.evaluate(method, [coeffs[k] for k in todo], datasets, neutral_texts)):
        points[k] = res
        if coeffs[k] == 0:
            cache["base"] = res
    if progress is not None:
        for c in coeffs:
            progress(method.name, c)
    return Sweep(
        method.name,
        coeffs,
        {d.name: [np.asarray(p[d.name][0]).tolist() for p in points] for d in datasets},
        {d.name: [np.asarray(p[d.name][1]).tolist() for p in points] for d in datasets},
        [float(p["__nll__"]) for p in points],
        [float(p["__kl__"]) for p in points],
        method.kind,
        cb,
        reached,
        calib,
    )


# --- torch -----------------------------------------------------------------------------------------------------


@dataclass
class TorchEngine:
    """transformers forward passes; ``model`` in eval mode, any architecture the adapter supports."""

    model: torch.nn.Module
    tokenizer: object
    batch_size: int = 32
    name: str = "torch"

    @torch.no_grad()
    def answer_scores(self, prompts: list[str], kind: str = "yesno") -> tuple[np.ndarray, np.ndarray]:
        """Score prompts → (log-odds (n,) in nats, answer mass (n,) in [0, 1]); batches sorted by length."""
        return answer_scores(self.model, self.tokenizer, prompts, kind, self.batch_size)

    @torch.no_grad()
    def mc_scores(self, items, user_prefix: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Multiple-choice items → (``mc_score`` per item (n,) in nats/token, answer mass (n,) of ones)."""
        heads, bodies, sizes = [], [], []
        for it in items:
            head, answers = mc_texts(self.tokenizer, it, user_prefix)
            heads += [head] * len(answers)
            bodies += answers
            sizes.append(len(answers))
        rows = continuation_logprobs(self.model, self.tokenizer, heads, bodies, max(self.batch_size // 2, 1))
        scores, k = np.zeros(len(items)), 0
        for i, (it, n) in enumerate(zip(items, sizes)):
            part = rows[k : k + n]
            scores[i] = mc_score([s for s, _ in part], [m for _, m in part], len(it.true_answers))
            k += n
        return scores, np.ones(len(items))

    @torch.no_grad()
    def text_stats(self, texts: list[str], steer, user_prefix: str | None, batch_size: int = 8) -> tuple[float, float]:
        """(mean NLL, mean KL(p₀‖p_c)) per reply token of ``texts``, nats/token; ``steer`` is a context-manager
        factory for the steered pass (None: unsteered, KL = 0 without a second pass)."""
        tok, model = self.tokenizer, self.model
        h0 = token_ids(tok, neutral_head(tok))
        hc = token_ids(tok, neutral_head(tok, user_prefix))
        nll = kl = 0.0
        n = 0
        for i in range(0, len(texts), batch_size):
            bodies = [token_ids(tok, t) for t in texts[i : i + batch_size]]
            keep = max(len(b) for b in bodies)
            mask = torch.zeros(len(bodies), keep, dtype=torch.bool)
            for r, b in enumerate(bodies):
                mask[r, keep - len(b) :] = True
            targets = torch.tensor([[0] * (keep - len(b)) + b for b in bodies])
            targets, mask = on_model_device(model, targets, mask)

            def logp(head, ctx, bodies=bodies, keep=keep):
                ids, am, pos = on_model_device(model, *left_pad([head + b for b in bodies], tok.pad_token_id))
                t = ids.shape[1]
                with ctx():
                    out = model(
                        input_ids=ids,
                        attention_mask=am,
                        position_ids=pos,
                        logits_to_keep=logit_positions(model, t - keep - 1, t - 1),
                        use_cache=False,
                    ).logits
                return out.float().log_softmax(-1)  # (B, keep, V)

            lpc = logp(hc, steer) if steer is not None else logp(h0, _null)
            nll -= float(lpc.gather(-1, targets.unsqueeze(-1)).squeeze(-1)[mask].sum())
            if steer is not None or user_prefix:
                lp0 = logp(h0, _null)
                kl += float((lp0.exp() * (lp0 - lpc)).sum(-1)[mask].sum())
            n += int(mask.sum())
        return nll / max(n, 1), kl / max(n, 1)

    def evaluate(
        self, method, coeffs: list[float], datasets: list[EvalDataset], neutral_texts: list[str]
    ) -> list[dict]:
        """One result per coefficient: {dataset: (scores, mass), "__nll__": float, "__kl__": float}."""
        out = []
        for c in coeffs:
            prefix = method.user_prefix(c)
            steer = None if c == 0 else (lambda c=c: method.steer(c))
            with torch.inference_mode(), method.steer(c) if c != 0 else _null():
                res = {
                    d.name: self.mc_scores(d.items, prefix)
                    if d.kind == "mc"
                    else self.answer_scores(
                        [eval_prompt(self.tokenizer, it.question, d.kind, prefix) for it in d.items], d.kind
                    )
                    for d in datasets
                }
            with torch.inference_mode():
                res["__nll__"], res["__kl__"] = self.text_stats(neutral_texts, steer, prefix)
            out.append(res)
        return out


def _null():
    import contextlib

    return contextlib.nullcontext()


@torch.no_grad()
def answer_scores(
    model, tokenizer, prompts: list[str], kind: str = "yesno", batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """Score prompts → (log-odds (n,) in nats, answer mass (n,) in [0, 1]); batches sorted by length."""
    pos_ids, neg_ids = answer_token_sets(tokenizer, kind)
    toks = [token_ids(tokenizer, p) for p in prompts]
    order = np.argsort([len(t) for t in toks])
    scores = np.zeros(len(prompts))
    mass = np.zeros(len(prompts))
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        ids, mask, pos = on_model_device(model, *left_pad([toks[j] for j in idx], tokenizer.pad_token_id))
        logits = (
            model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1, use_cache=False)
            .logits[:, -1]
            .float()
        )
        logp = logits.log_softmax(-1)  # (B, V)
        lp_pos = logp[:, pos_ids].logsumexp(-1)
        lp_neg = logp[:, neg_ids].logsumexp(-1)
        scores[idx] = (lp_pos - lp_neg).cpu().numpy()
        mass[idx] = (lp_pos.exp() + lp_neg.exp()).cpu().numpy()
    return scores, mass


@torch.no_grad()
def continuation_logprobs(
    model, tokenizer, heads: list[str], bodies: list[str], batch_size: int = 16
) -> list[tuple[float, int]]:
    """(sum of log p in nats, number of tokens) of each ``bodies[i]`` following ``heads[i]``.

    Texts are tokenized separately (no special tokens) and concatenated, left-padded, batched.
    """
    out: list[tuple[float, int]] = []
    for i in range(0, len(heads), batch_size):
        hs = [token_ids(tokenizer, h) for h in heads[i : i + batch_size]]
        bs = [token_ids(tokenizer, b) for b in bodies[i : i + batch_size]]
        ids, mask, pos = on_model_device(model, *left_pad([h + b for h, b in zip(hs, bs)], tokenizer.pad_token_id))
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits.float()
        logp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # (B, T-1)
        for r, b in enumerate(bs):
            out.append((float(logp[r, ids.shape[1] - 1 - len(b) :].sum()), len(b)))
    return out


def text_nll(model, tokenizer, texts: list[str], user_prefix: str | None = None, batch_size: int = 16) -> float:
    """Mean per-token NLL (nats/token) of ``texts`` as the assistant's reply to the fixed neutral request."""
    head = neutral_head(tokenizer, user_prefix)
    rows = continuation_logprobs(model, tokenizer, [head] * len(texts), texts, batch_size)
    return -sum(s for s, _ in rows) / max(sum(n for _, n in rows), 1)
