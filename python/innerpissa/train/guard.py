"""The answer-bias guard: a training term that keeps the steering coefficient from acting as a Yes/No knob.

Measured failure it targets (docs/results.md): an adapter trained on persona pairs moved the yes/no log-odds of
every question toward "Yes" at +c, on-target and off-target alike, with almost no label-aligned effect. The
evaluator reports that as *bias*, apart from the balanced effect; this term asks training not to produce it.

Guard questions (``data/bias_guard.json``, written for this package): concept-free statements (mundane facts, true
and false, and everyday tastes) in yes/no templates, rendered with the chat template like the evaluator's yes/no
items (``prompts.render_prompt``). None of them comes from an evaluation set. With s_j(c) the answer log-odds
logsumexp log p(yes-words) − logsumexp log p(no-words) at the answer position of question j (nats, whole-word
"yes"/"no" token sets as in ``eval.engines.answer_token_sets``) and a batch J of questions per step,

    L_bias = w_bias · ω(step) · [ (mean_{j∈J} (s_j(+1) − s_j(0)))² + (mean_{j∈J} (s_j(−1) − s_j(0)))² ]

Only the *mean* shift is penalised (the uniform Yes/No shift the evaluator calls bias); how individual answers
move is left free. s_j(0) is the base model's, computed once. The batch cycles through the questions in a fixed
order by step, so a resumed run sees the same batches.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from ..datafiles import read_data
from ..hooks import on_model_device
from ..prompts import left_pad, render_prompt


@lru_cache(maxsize=1)
def guard_questions() -> tuple[str, ...]:
    """Every template × statement of ``data/bias_guard.json`` (plain text, before the chat template), in a fixed
    order that interleaves templates."""
    data = read_data("bias_guard.json")
    return tuple(t.format(statement=s) for s in data["statements"] for t in data["templates"])


class BiasGuard:
    """The guard's prompts, answer tokens and base log-odds for one model and tokenizer.

    Args:
        model: the base causal LM the adapter is attached to (c = 0 is the base model).
        tokenizer: its tokenizer (needs whole-word yes/no tokens).
        batch: questions per step.
    Raises:
        ValueError: the tokenizer has no whole-word yes/no tokens.
    """

    def __init__(self, model, tokenizer, batch: int):
        from ..eval.engines import answer_token_sets

        self.batch = batch
        self.yes, self.no = answer_token_sets(tokenizer, "yesno")
        prompts = [render_prompt(tokenizer, q) for q in guard_questions()]
        self.ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        self._pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        with torch.no_grad():
            chunks = [list(range(i, min(i + 16, len(self.ids)))) for i in range(0, len(self.ids), 16)]
            self.base = torch.cat([self._log_odds(model, idx) for idx in chunks])

    def indices(self, step: int) -> list[int]:
        """The questions of training step ``step``: the next ``batch`` in cyclic order."""
        n = len(self.ids)
        return [(step * self.batch + k) % n for k in range(self.batch)]

    def _log_odds(self, model, idx: list[int], twice: bool = False) -> torch.Tensor:
        """Answer log-odds of questions ``idx`` (B,), or (2B,) with ``twice`` (rows repeated, for c = +1 and −1)."""
        ids, mask, pos = left_pad([self.ids[i] for i in idx], self._pad)
        if twice:
            ids, mask, pos = ids.repeat(2, 1), mask.repeat(2, 1), pos.repeat(2, 1)
        ids, mask, pos = on_model_device(model, ids, mask, pos)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1).logits[:, -1]
        logp = logits.float().log_softmax(-1)
        return (logp[:, self.yes].logsumexp(-1) - logp[:, self.no].logsumexp(-1)).cpu()

    def term(self, adapter, step: int) -> tuple[torch.Tensor, float, float]:
        """(unweighted guard loss, mean shift at +1, mean shift at −1) for step ``step``; shifts in nats."""
        idx = self.indices(step)
        coeffs = torch.tensor([1.0] * len(idx) + [-1.0] * len(idx))
        with adapter.steer(coeffs):
            s = self._log_odds(adapter.model, idx, twice=True)
        base = self.base[idx]
        plus, minus = (s[: len(idx)] - base).mean(), (s[len(idx) :] - base).mean()
        return plus**2 + minus**2, float(plus.detach()), float(minus.detach())
