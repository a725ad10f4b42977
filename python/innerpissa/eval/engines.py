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
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, finite_coeff
from ..pairs import ContrastivePair
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


def _tok(tokenizer, text: str, special: bool = False) -> list[int]:
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
        h0 = _tok(tok, neutral_head(tok))
        hc = _tok(tok, neutral_head(tok, user_prefix))
        nll = kl = 0.0
        n = 0
        for i in range(0, len(texts), batch_size):
            bodies = [_tok(tok, t) for t in texts[i : i + batch_size]]
            keep = max(len(b) for b in bodies)
            mask = torch.zeros(len(bodies), keep, dtype=torch.bool)
            for r, b in enumerate(bodies):
                mask[r, keep - len(b) :] = True
            targets = torch.tensor([[0] * (keep - len(b)) + b for b in bodies])

            def logp(head, ctx, bodies=bodies, keep=keep):
                ids, am, pos = left_pad([head + b for b in bodies], tok.pad_token_id)
                with ctx():
                    out = model(
                        input_ids=ids, attention_mask=am, position_ids=pos, logits_to_keep=keep + 1, use_cache=False
                    ).logits[:, :-1]
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
    toks = [_tok(tokenizer, p) for p in prompts]
    order = np.argsort([len(t) for t in toks])
    scores = np.zeros(len(prompts))
    mass = np.zeros(len(prompts))
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        ids, mask, pos = left_pad([toks[j] for j in idx], tokenizer.pad_token_id)
        logits = (
            model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1, use_cache=False)
            .logits[:, -1]
            .float()
        )
        logp = logits.log_softmax(-1)  # (B, V)
        lp_pos = logp[:, pos_ids].logsumexp(-1)
        lp_neg = logp[:, neg_ids].logsumexp(-1)
        scores[idx] = (lp_pos - lp_neg).numpy()
        mass[idx] = (lp_pos.exp() + lp_neg.exp()).numpy()
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
        hs = [_tok(tokenizer, h) for h in heads[i : i + batch_size]]
        bs = [_tok(tokenizer, b) for b in bodies[i : i + batch_size]]
        ids, mask, pos = left_pad([h + b for h, b in zip(hs, bs)], tokenizer.pad_token_id)
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


# --- Rust ------------------------------------------------------------------------------------------------------


@dataclass
class RustEngine:
    """A GGUF model in the Rust engine plus the tokenizer that feeds it.

    Args:
        gguf: path of the GGUF file (the same file the torch model was de-quantized from, for parity).
        tokenizer: the model's Hugging Face tokenizer.
        weights: ``"f32"`` (de-quantized, parity reference), ``"native"`` (the file's quantized blocks) or
            ``"q8_0"`` (int8 blocks); see docs/benchmarks.md for their speed and error.
        batch_size: prompts per packed pass (memory grows with batch × coefficients).
    """

    gguf: Path
    tokenizer: object
    weights: str = "f32"
    batch_size: int = 64
    name: str = "rust"
    engine: object = field(init=False, repr=False)
    _adapter_key: object = field(default=None, init=False, repr=False)
    _vectors: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        from .. import _rust

        self.gguf = Path(self.gguf)
        self.engine = _rust.Engine(str(self.gguf), self.weights)
        self.Branch = _rust.Branch  # what one set of rows runs: Branch.base(), .adapter(c), .vector(c, index)
        self.name = f"rust ({self.weights})"

    @property
    def config(self) -> dict:
        return self.engine.config

    def load_adapter(self, directory: str | Path) -> list[str]:
        """Load a saved adapter directory (U, S, V, θ, δ as saved; nothing is re-decomposed)."""
        names = self.engine.load_adapter(str(directory))
        self._adapter_key = ("dir", str(Path(directory).resolve()))
        return names

    def set_adapter(self, adapter) -> None:
        """Load an in-memory ``Adapter``: saved to a temporary directory and loaded, unless the engine already
        holds these exact parameters (keyed on their content, so further training is never missed)."""
        from ..adapter.model import tensor_checksum

        key = ("mem", tensor_checksum({k: v.detach().cpu() for k, v in adapter.state_dict().items()}))
        if self._adapter_key == key:
            return
        with tempfile.TemporaryDirectory() as tmp:
            adapter.save(tmp)
            self.engine.load_adapter(tmp)
        self._adapter_key = key

    def add_control_vector(self, directions: dict[int, torch.Tensor]) -> int:
        """Register block-output directions {block ℓ: (d,)}; returns the index for ``Branch.vector(c, index)``."""
        return self.engine.add_control_vector(
            {int(k): np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for k, v in directions.items()}
        )

    def answer_scores(self, prompts: list[str], kind: str, branches: list) -> tuple[np.ndarray, np.ndarray]:
        """Answer log-odds and mass, each (len(branches), len(prompts)); as ``TorchEngine.answer_scores``."""
        pos, neg = answer_token_sets(self.tokenizer, kind)
        seqs = [_tok(self.tokenizer, p) for p in prompts]
        return self.engine.yes_no(seqs, branches, pos, neg, self.batch_size)

    def mc_scores(self, items, branches: list, user_prefix: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Multiple-choice items → (``mc_score``, mass of ones), each (len(branches), len(items)); as
        ``TorchEngine.mc_scores``."""
        seqs, starts, spans = [], [], []
        for it in items:
            head, answers = mc_texts(self.tokenizer, it, user_prefix)
            h = _tok(self.tokenizer, head)
            spans.append((len(seqs), len(answers), len(it.true_answers)))
            for a in answers:
                seqs.append(h + _tok(self.tokenizer, a))
                starts.append(len(h) - 1)
        lps = self.engine.token_logprobs(seqs, starts, branches, max(self.batch_size // 4, 1))
        n = len(seqs)
        scores = np.zeros((len(branches), len(items)))
        for b in range(len(branches)):
            for i, (k, m, n_true) in enumerate(spans):
                rows = [lps[b * n + j] for j in range(k, k + m)]
                scores[b, i] = mc_score([np.sum(r, dtype=np.float64) for r in rows], [len(r) for r in rows], n_true)
        return scores, np.ones_like(scores)

    def text_stats(self, texts: list[str], branches: list, user_prefix: str | None = None) -> list[tuple[float, float]]:
        """Per branch, (mean NLL, mean KL(p₀‖p_branch)) per reply token of ``texts``, nats/token; p₀ is the base
        model on the unprefixed request (as ``TorchEngine.text_stats``)."""
        tok = self.tokenizer
        h0 = _tok(tok, neutral_head(tok))
        hc = _tok(tok, neutral_head(tok, user_prefix))
        bodies = [_tok(tok, t) for t in texts]
        seqs = [hc + b for b in bodies]
        refs = [h0 + b for b in bodies]
        lps, kls = self.engine.token_stats(
            seqs, [len(hc) - 1] * len(seqs), branches, max(self.batch_size // 4, 1), refs, [len(h0) - 1] * len(refs)
        )
        n, total = len(seqs), sum(len(b) for b in bodies)
        return [
            (
                -float(sum(np.sum(lps[b * n + i], dtype=np.float64) for i in range(n))) / total,
                float(sum(np.sum(kls[b * n + i], dtype=np.float64) for i in range(n))) / total,
            )
            for b in range(len(branches))
        ]

    def last_token_states(
        self, texts: list[str], layers: list[int], special_tokens: bool = False, branches: list | None = None
    ) -> dict[int, np.ndarray]:
        """Decoder-block outputs at each text's last token: {ℓ: (n, d) float32} (first branch; default the base
        model)."""
        seqs = [_tok(self.tokenizer, t, special_tokens) for t in texts]
        branches = list(branches) if branches is not None else [self.Branch.base()]
        h = self.engine.hidden(seqs, list(layers), branches, self.batch_size)  # (L, B, n, d)
        return {ell: h[i, 0] for i, ell in enumerate(layers)}

    def _branches(self, method, coeffs: list[float]) -> list:
        if method.kind == "adapter":
            if isinstance(method.adapter, (str, Path)):  # a directory: `ipissa sweep` never builds a torch model
                if self._adapter_key != ("dir", str(Path(method.adapter).resolve())):
                    self.load_adapter(method.adapter)
            else:
                self.set_adapter(method.adapter)
            return [self.Branch.adapter(float(c)) if c != 0 else self.Branch.base() for c in coeffs]
        if method.kind == "vector":
            idx = self._vectors.get(id(method.directions))
            if idx is None:
                idx = self._vectors[id(method.directions)] = self.add_control_vector(method.directions)
            return [self.Branch.vector(float(c), idx) if c != 0 else self.Branch.base() for c in coeffs]
        raise ConfigError(
            f"the rust engine cannot run method {method.name!r} (kind {method.kind!r}); use the torch engine",
            field="engine",
        )

    def _points(self, branches: list, datasets, neutral_texts, user_prefix: str | None) -> list[dict]:
        res: list[dict] = [dict() for _ in branches]
        for d in datasets:
            if d.kind == "mc":
                s, m = self.mc_scores(d.items, branches, user_prefix)
            else:
                prompts = [eval_prompt(self.tokenizer, it.question, d.kind, user_prefix) for it in d.items]
                s, m = self.answer_scores(prompts, d.kind, branches)
            for b in range(len(branches)):
                res[b][d.name] = (s[b], m[b])
        for b, (nll, kl) in enumerate(self.text_stats(neutral_texts, branches, user_prefix)):
            res[b]["__nll__"], res[b]["__kl__"] = nll, kl
        return res

    def evaluate(
        self, method, coeffs: list[float], datasets: list[EvalDataset], neutral_texts: list[str]
    ) -> list[dict]:
        """As ``TorchEngine.evaluate``; adapter and vector coefficients share one packed pass per dataset,
        prompting runs one pass per coefficient."""
        if method.kind == "prompt":
            return [
                self._points([self.Branch.base()], datasets, neutral_texts, method.user_prefix(c))[0] for c in coeffs
            ]
        return self._points(self._branches(method, coeffs), datasets, neutral_texts, None)


def mean_difference_control_vector(
    engine: RustEngine, pairs: list[ContrastivePair], layers: list[int]
) -> dict[int, torch.Tensor]:
    """``methods.mean_difference_control_vector`` with hidden states from the Rust engine."""
    pos = engine.last_token_states([p.positive for p in pairs], layers)
    neg = engine.last_token_states([p.negative for p in pairs], layers)
    return {ell: torch.from_numpy((pos[ell] - neg[ell]).mean(0)) for ell in layers}


def pca_control_vector(engine: RustEngine, pairs: list[ContrastivePair], layers: list[int]) -> dict[int, torch.Tensor]:
    """repeng's ``pca_diff`` control vector (``ControlVector.train``) with hidden states from the Rust engine.

    Same recipe as repeng 0.4.0 ``read_representations``: texts tokenized with special tokens, the output of
    block ℓ at the last token, first principal component (scikit-learn PCA) of positive − negative differences,
    signed so that positives project higher on most pairs. Returns unit directions {ℓ: (d,) float32}.
    """
    from sklearn.decomposition import PCA

    texts = [s for p in pairs for s in (p.positive, p.negative)]
    hs = engine.last_token_states(texts, layers, special_tokens=True)
    out = {}
    for ell in layers:
        h = hs[ell]
        d = PCA(n_components=1, whiten=False).fit(h[::2] - h[1::2]).components_.astype(np.float32)[0]
        proj = h @ d / np.linalg.norm(d)
        smaller = np.mean(proj[::2] < proj[1::2])
        larger = np.mean(proj[::2] > proj[1::2])
        out[ell] = torch.from_numpy(-d if smaller > larger else d)
    return out
