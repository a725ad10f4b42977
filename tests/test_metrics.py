"""Evaluation arithmetic: slopes, usable range, signed effects, scoring against a manual computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_llama, word_tokenizer
from innerpissa.evaldata import EvalDataset, EvalItem
from innerpissa.evaluate import Sweep, answer_scores, answer_token_sets, eval_prompt
from innerpissa.metrics import bootstrap_ci, dataset_metrics, item_slopes, pooled_effect, usable_range


def test_item_slopes_exact():
    t = np.array([-1.0, 0.0, 1.0])
    a = np.stack([2 * t + 1, -0.5 * t, np.zeros(3)], axis=1)  # (n_coeffs, n_items)
    assert np.allclose(item_slopes(a, t), [2.0, -0.5, 0.0])


def test_bootstrap_ci_brackets_mean():
    x = np.random.default_rng(0).normal(1.0, 1.0, 400)
    lo, hi = bootstrap_ci(x)
    assert lo < x.mean() < hi and hi - lo < 0.4


def _sweep(coeffs, nll, mass_fn, score_fn, n=6):
    scores = [[score_fn(c, i) for i in range(n)] for c in coeffs]
    mass = [[mass_fn(c) for _ in range(n)] for c in coeffs]
    return Sweep("m", list(coeffs), {"d": scores}, {"d": mass}, list(nll))


def test_usable_range_stops_at_first_incoherent_coefficient():
    coeffs = [-4, -2, -1, 0, 1, 2, 4]
    nll = [3.9, 3.15, 3.05, 3.0, 3.05, 3.1, 3.5]  # ΔNLL 0.9 at −4 and 0.5 at +4
    sw = _sweep(coeffs, nll, lambda c: 0.9, lambda c, i: c)
    cmax, ok = usable_range(sw, {"d": np.arange(6)})
    assert (cmax, ok) == (2.0, True)
    # invalid answers (tiny Yes+No mass) also end the range
    sw = _sweep(coeffs, [3.0] * 7, lambda c: 0.9 if abs(c) < 2 else 0.01, lambda c, i: c)
    assert usable_range(sw, {"d": np.arange(6)}) == (1.0, True)
    # nothing usable → smallest |c|, flagged
    sw = _sweep(coeffs, [5.0, 5.0, 5.0, 3.0, 5.0, 5.0, 5.0], lambda c: 0.9, lambda c, i: c)
    assert usable_range(sw, {"d": np.arange(6)}) == (1.0, False)


def test_effect_is_signed_by_label():
    coeffs = [-2, -1, 0, 1, 2]
    labels = np.array([1, 1, -1, -1, 0, 0])
    # the model says "Yes" more as c grows: items whose target is Yes move toward it, the others away
    sw = _sweep(coeffs, [3.0] * 5, lambda c: 0.9, lambda c, i: 0.5 * c)
    r = dataset_metrics(sw, "d", labels, np.arange(6), cmax=2.0)
    # labelled items: +1,+1 (slope +1 in t units) and −1,−1 (slope −1) → mean 0
    assert r["effect"] == pytest.approx(0.0)
    r_yes = dataset_metrics(sw, "d", labels, np.array([0, 1]), cmax=2.0)
    assert r_yes["effect"] == pytest.approx(1.0) and r_yes["spearman"] == pytest.approx(1.0)
    r_no = dataset_metrics(sw, "d", labels, np.array([2, 3]), cmax=1.0)
    assert r_no["effect"] == pytest.approx(-0.5)
    assert r["flip_rate"] == 1.0 and r["mean_abs_shift"] == pytest.approx(1.0)


def test_pooled_effect_over_seeds():
    eff, lo, hi, per = pooled_effect([[1.0, 1.0, 1.0, 1.0], [3.0, 3.0, 3.0, 3.0]])
    assert eff == pytest.approx(2.0) and per == [1.0, 3.0] and lo == pytest.approx(2.0)


@torch.no_grad()
def test_answer_scores_match_manual_logsumexp():
    ds = EvalDataset("d", "yesno", (EvalItem("a", "Is the sky green ?", 1), EvalItem("b", "Do fish swim ?", -1)), "mem")
    prompts = [eval_prompt(word_tokenizer([]), it.question, "yesno", None) for it in ds.items]
    tok = word_tokenizer(prompts)
    model = tiny_llama(vocab_size=len(tok))
    scores, mass = answer_scores(model, tok, prompts, "yesno", batch_size=2)
    yes, no = answer_token_sets(tok)
    assert sorted(tok.convert_ids_to_tokens(yes)) == ["Yes", "yes"]
    for i, p in enumerate(prompts):
        ids = tok(p, add_special_tokens=False, return_tensors="pt")["input_ids"]
        logp = model(ids).logits[0, -1].log_softmax(-1)
        expect = (logp[yes].logsumexp(0) - logp[no].logsumexp(0)).item()
        assert scores[i] == pytest.approx(expect, abs=1e-4)  # left padding does not change the answer
        assert mass[i] == pytest.approx((logp[yes].exp().sum() + logp[no].exp().sum()).item(), abs=1e-5)
