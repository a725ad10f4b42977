"""Evaluation arithmetic: a Yes/No bias cannot pass for an effect; the KL-matched coefficient; scoring and KL
against manual computations; the prompting baseline's rendered text."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import CHATML, tiny_llama, word_tokenizer, yes_bias

from innerpissa.eval import HookMethod, PromptMethod, TorchEngine, VectorMethod, run_suite
from innerpissa.eval.datasets import EvalDataset, EvalItem
from innerpissa.eval.engines import Sweep, answer_scores, answer_token_sets, eval_prompt, neutral_head
from innerpissa.eval.metrics import (
    balanced_ci,
    bootstrap_ci,
    dataset_metrics,
    item_slopes,
    kl_matched_coeff,
    pool_seeds,
    pooled_effect,
    summarize,
)


def test_item_slopes_exact():
    t = np.array([-1.0, 0.0, 1.0])
    a = np.stack([2 * t + 1, -0.5 * t, np.zeros(3)], axis=1)  # (n_coeffs, n_items)
    assert np.allclose(item_slopes(a, t), [2.0, -0.5, 0.0])


def test_bootstrap_ci_brackets_mean():
    x = np.random.default_rng(0).normal(1.0, 1.0, 400)
    lo, hi = bootstrap_ci(x)
    assert lo < x.mean() < hi and hi - lo < 0.4
    y = np.array([1] * 200 + [-1] * 200)
    lo, hi = balanced_ci(np.where(y > 0, 1.0, 3.0) + 0 * x, y)
    assert lo == pytest.approx(2.0) and hi == pytest.approx(2.0)


def test_kl_matched_coeff_interpolates_the_worse_side():
    coeffs = [-2, -1, 0, 1, 2]
    kl = [0.2, 0.04, 0.0, 0.02, 0.08]
    c, ok = kl_matched_coeff(coeffs, kl, 0.05)
    assert ok and c == pytest.approx(1 + (0.05**0.5 - 0.2) / (0.2**0.5 - 0.2))  # √KL: 0.2 at 1, √0.2 at 2
    assert kl_matched_coeff(coeffs, kl, 0.01) == (pytest.approx(0.5), True)  # √KL from (0, 0) to (1, 0.2)
    assert kl_matched_coeff(coeffs, kl, 0.5) == (2.0, False)


def test_kl_matched_coeff_is_exact_for_a_quadratic_kl_below_the_grid():
    coeffs = [-2, -1, -0.5, 0, 0.5, 1, 2]
    kl = [0.8 * c * c for c in coeffs]  # KL = 0.8 c²: the budget 0.05 is reached at c = 0.25, below the grid
    c, ok = kl_matched_coeff(coeffs, kl, 0.05)
    assert ok and c == pytest.approx(0.25)


LABELS = np.array([1, 1, 1, -1, -1, -1])


def _sweep(score_fn, coeffs=(-2, -1, 0, 1, 2), kl_fn=lambda c: 0.01 * c * c, n=6, mass=0.9):
    scores = [[score_fn(c, i) for i in range(n)] for c in coeffs]
    return Sweep(
        "m",
        [float(c) for c in coeffs],
        {"d": scores},
        {"d": [[mass] * n for _ in coeffs]},
        [3.0] * len(coeffs),
        [kl_fn(c) for c in coeffs],
    )


def test_pure_answer_bias_gives_zero_balanced_effect():
    base = [0.3, -1.0, 2.0, 0.5, -0.2, 1.1]
    sw = _sweep(lambda c, i: base[i] + 0.7 * c)  # every item shifted toward "Yes" by 0.7 per unit c
    r = dataset_metrics(sw, "d", LABELS, np.arange(6), cb=1.5)
    assert r["effect"] == pytest.approx(0.0, abs=1e-12) and r["ci"][0] <= 0 <= r["ci"][1]
    assert r["bias"] == pytest.approx(0.7 * 1.5) and r["bias_slope"] == pytest.approx(0.7)
    assert r["effect_slope"] == pytest.approx(0.0, abs=1e-12) and r["flip_score"] == 0.0
    assert r["decision_shift_net"] == pytest.approx(0.0) and r["mean_abs_shift"] == pytest.approx(0.7 * 1.5)


def test_label_aligned_effect_is_signed_and_bias_free():
    sw = _sweep(lambda c, i: 0.5 * c * LABELS[i] - 0.3 * LABELS[i])  # toward each item's matching answer
    r = dataset_metrics(sw, "d", LABELS, np.arange(6), cb=2.0)
    assert r["effect"] == pytest.approx(1.0) and r["bias"] == pytest.approx(0.0, abs=1e-12)
    assert r["spearman"] == pytest.approx(1.0) and r["effect_slope"] == pytest.approx(0.5)
    assert r["effect_neg_side"] == pytest.approx(1.0) and r["effect_pos_side"] == pytest.approx(1.0)
    assert r["flip_score"] == pytest.approx(1.0)  # all six start on the wrong side (−0.3) and cross at +C_b
    away = _sweep(lambda c, i: -0.5 * c * LABELS[i])
    assert dataset_metrics(away, "d", LABELS, np.arange(6), cb=2.0)["effect"] == pytest.approx(-1.0)


def test_summarize_reads_each_method_at_its_budget():
    sw = _sweep(lambda c, i: 0.5 * c * LABELS[i], kl_fn=lambda c: 0.05 * abs(c))
    ds = [EvalDataset("d", "yesno", tuple(EvalItem(str(i), "q", int(LABELS[i])) for i in range(6)), "mem")]
    res = summarize([sw], ds, {"d": (np.arange(6), np.arange(6))}, kl_budget=0.05)["m"]
    assert res["kl_coeff"] == pytest.approx(1.0) and res["budget_reached"]
    assert res["datasets"]["d"]["effect"] == pytest.approx(0.5)


def test_pooled_effect_over_seeds():
    eff, lo, _hi, per = pooled_effect([[1.0, 1.0, 1.0, 1.0], [3.0, 3.0, 3.0, 3.0]], [1, 1, -1, -1])
    assert eff == pytest.approx(2.0) and per == [1.0, 3.0] and lo == pytest.approx(2.0)


def test_pool_seeds_averages_items_and_keeps_each_seeds_rho():
    sw1 = _sweep(lambda c, i: 0.5 * c * LABELS[i] + 0.1 * c, kl_fn=lambda c: 0.05 * abs(c))
    sw2 = _sweep(lambda c, i: 1.5 * c * LABELS[i] - 0.3 * c, kl_fn=lambda c: 0.05 * abs(c))
    ds = [EvalDataset("d", "yesno", tuple(EvalItem(str(i), "q", int(LABELS[i])) for i in range(6)), "mem")]
    per = [
        summarize([sw], ds, {"d": (np.arange(6), np.arange(6))}, kl_budget=0.05)["m"]["datasets"]["d"]
        for sw in (sw1, sw2)
    ]
    pooled = pool_seeds(per)
    assert pooled["effect"] == pytest.approx(1.0) and pooled["effect_seeds"] == pytest.approx([0.5, 1.5])
    assert pooled["bias"] == pytest.approx((0.1 - 0.3) / 2) and pooled["bias_seeds"] == pytest.approx([0.1, -0.3])
    assert pooled["ci"][0] <= 1.0 <= pooled["ci"][1] and pooled["n_seeds"] == 2
    assert pooled["spearman_seeds"] == pytest.approx([1.0, 1.0])
    with pytest.raises(ValueError, match="different items"):
        pool_seeds([per[0], {**per[1], "item_labels": per[1]["item_labels"][::-1]}])


@torch.no_grad()
def test_answer_scores_match_manual_logsumexp():
    ds = EvalDataset("d", "yesno", (EvalItem("a", "Is the sky green ?", 1), EvalItem("b", "Do fish swim ?", -1)), "mem")
    prompts = [eval_prompt(word_tokenizer([]), it.question, "yesno") for it in ds.items]
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


TEXTS = ["The river runs to the sea .", "Bread needs flour , water and salt .", "It rained all day ."]


@torch.no_grad()
def test_text_stats_kl_against_manual():
    tok = word_tokenizer(TEXTS + [neutral_head(word_tokenizer([]))])
    model = tiny_llama(vocab_size=len(tok))
    eng = TorchEngine(model, tok)
    nll0, kl0 = eng.text_stats(TEXTS, None, None)
    assert kl0 == 0.0 and nll0 > 0
    vec = VectorMethod(model, {2: torch.randn(32) * 2.0})
    _nll, kl = eng.text_stats(TEXTS, lambda: vec.steer(1.0), None, batch_size=2)
    head = tok(neutral_head(tok), add_special_tokens=False)["input_ids"]
    total = n = 0.0
    for t in TEXTS:
        body = tok(t, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([head + body])
        lp0 = model(ids).logits[0, len(head) - 1 : -1].log_softmax(-1)
        with vec.steer(1.0):
            lpc = model(ids).logits[0, len(head) - 1 : -1].log_softmax(-1)
        total += float((lp0.exp() * (lp0 - lpc)).sum())
        n += len(body)
    assert kl == pytest.approx(total / n, rel=1e-4) and kl > 1e-3


DEFAULT_SYSTEM = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nDEFAULT SYSTEM<|im_end|>\n{% endif %}" + CHATML
)


def test_prompting_keeps_default_system_prompt_and_uses_the_user_turn():
    tok = word_tokenizer([])
    tok.chat_template = DEFAULT_SYSTEM
    m = PromptMethod()
    plain = eval_prompt(tok, "Is it red ?", "yesno", m.user_prefix(0.0))
    for c in (-1.0, 1.0):
        text = eval_prompt(tok, "Is it red ?", "yesno", m.user_prefix(c))
        persona = m.user_prefix(c)
        assert "DEFAULT SYSTEM" in text and text.count("<|im_start|>system") == 1
        user_turn = text.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
        assert user_turn.startswith(persona) and user_turn.endswith("Is it red ?\nAnswer with Yes or No.")
        assert text.replace(persona + "\n\n", "") == plain
    assert ("honest" in m.user_prefix(1.0)) and ("dishonest" in m.user_prefix(-1.0)) and m.user_prefix(0) is None


@torch.no_grad()
def test_a_constant_yes_logit_method_is_all_bias_no_effect():
    questions = [f"Is item {i} good ?" for i in range(24)]
    items = tuple(EvalItem(f"q{i}", q, 1 if i % 2 else -1) for i, q in enumerate(questions))
    ds = EvalDataset("toy", "yesno", items, "mem")
    tok = word_tokenizer(
        questions + TEXTS + [eval_prompt(word_tokenizer([]), "x", "yesno"), "Write a short paragraph ."]
    )
    model = tiny_llama(vocab_size=len(tok))
    yes, _ = answer_token_sets(tok)

    method = HookMethod(yes_bias(model, yes, 2.0), coeffs=(-1.0, -0.5, 0.0, 0.5, 1.0), name="yes-bias")
    res = run_suite(TorchEngine(model, tok), [method], [ds], kl_budget=1e-3, progress=False, neutral_texts=TEXTS)
    r = res["methods"]["yes-bias"]["datasets"]["toy"]
    cb = res["methods"]["yes-bias"]["kl_coeff"]
    assert res["methods"]["yes-bias"]["budget_reached"]
    assert r["effect"] == pytest.approx(0.0, abs=1e-4) and r["ci"][0] <= 1e-4 and r["ci"][1] >= -1e-4
    assert r["bias"] == pytest.approx(2.0 * cb, rel=1e-3) and r["bias"] > 10 * abs(r["effect"])


def test_vector_baselines_share_the_mean_difference_scale():
    """PCA and random directions are scaled to the mean-difference vector's norm per layer, so c means the same
    push for all three on any model, and all three sweep the same grid."""
    from test_objectives import _setup

    from innerpissa.eval.methods import build_methods

    model, tok, split = _setup()
    ms = {
        m.name: m
        for m in build_methods(
            model, tok, None, list(split.train[:12]), 0, ("pca", "mean-diff", "random"), layers=[2, 3]
        )
    }
    for ell in (2, 3):
        md = float(ms["mean-diff"].directions[ell].norm())
        assert md > 0
        assert float(ms["pca"].directions[ell].norm()) == pytest.approx(md, rel=1e-4)
        assert float(ms["random"].directions[ell].norm()) == pytest.approx(md, rel=1e-4)
    assert ms["pca"].coeffs == ms["mean-diff"].coeffs == ms["random"].coeffs and max(ms["pca"].coeffs) == 2.0


class _QuadraticEngine:
    """KL = k c² on the neutral texts; item i scores c·(0.7·y_i + 0.2): effect 0.7·c, bias 0.2·c."""

    name = "quadratic"

    def __init__(self, k: float):
        self.k, self.calls = k, []

    def evaluate(self, method, coeffs, datasets, neutral_texts):
        self.calls.append(([float(c) for c in coeffs], [d.name for d in datasets]))
        return [
            {
                **{
                    d.name: (np.array([c * (0.7 * it.label + 0.2) for it in d.items]), np.ones(len(d.items)))
                    for d in datasets
                },
                "__nll__": 3.0 + c * c,
                "__kl__": self.k * c * c,
            }
            for c in coeffs
        ]


def test_budget_first_sweep_scores_items_only_at_the_budget():
    from types import SimpleNamespace

    from innerpissa.eval.suite import run_suite

    ds = EvalDataset("d", "yesno", tuple(EvalItem(str(i), "q", int(LABELS[i])) for i in range(6)), "mem")
    grid = (-2.0, -1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0, 2.0)
    method = SimpleNamespace(name="m", kind="vector", coeffs=grid)
    eng = _QuadraticEngine(2.0)
    res = run_suite(
        eng,
        [method],
        [ds],
        kl_budget=0.05,
        progress=False,
        neutral_texts=["x"],
        splits={"d": (np.arange(6), np.arange(6))},
        budget_first=True,
    )
    m = res["methods"]["m"]
    cb = (0.05 / 2.0) ** 0.5  # 0.158: below the grid's smallest |c|
    assert m["kl_coeff"] == pytest.approx(cb) and m["budget_reached"]
    item_calls = [cs for cs, names in eng.calls if names]
    assert len(item_calls) == 1 and sorted(item_calls[0]) == pytest.approx([-cb, -cb / 2, 0, cb / 2, cb])
    assert all(not names for _, names in eng.calls[:-1])  # the calibration scored no item
    assert m["kl_at_coeff"] == pytest.approx(0.05) and m["calibration"]["c"][0] == -2.0
    assert m["datasets"]["d"]["effect"] == pytest.approx(0.7 * cb) and m["datasets"]["d"]["bias"] == pytest.approx(
        0.2 * cb
    )
    eng = _QuadraticEngine(2.0)
    res = run_suite(
        eng,
        [method],
        [ds],
        kl_budget=0.05,
        progress=False,
        neutral_texts=["x"],
        splits={"d": (np.arange(6), np.arange(6))},
        budget_first=False,
    )
    assert eng.calls == [(list(grid), ["d"])] and res["methods"]["m"]["calibration"] is None
    eng = _QuadraticEngine(1e-4)  # never reaches the budget: read at the largest |c|, flagged
    m = run_suite(
        eng,
        [method],
        [ds],
        kl_budget=0.05,
        progress=False,
        neutral_texts=["x"],
        splits={"d": (np.arange(6), np.arange(6))},
        budget_first=True,
    )["methods"]["m"]
    assert m["kl_coeff"] == 2.0 and not m["budget_reached"]


class _ItemEngine(_QuadraticEngine):
    """As ``_QuadraticEngine``, but each item's score has its own slope (from its id), and every scored item is
    counted."""

    def __init__(self, k: float):
        super().__init__(k)
        self.n_scored = 0

    def evaluate(self, method, coeffs, datasets, neutral_texts):
        self.n_scored += len(coeffs) * sum(len(d.items) for d in datasets)
        out = super().evaluate(method, coeffs, datasets, neutral_texts)
        for res, c in zip(out, coeffs):
            for d in datasets:
                res[d.name] = (
                    res[d.name][0] + c * np.array([np.sin(7.0 * int(it.id)) for it in d.items]),
                    res[d.name][1],
                )
        return out


def test_scoring_only_the_test_items_gives_the_same_test_numbers_with_half_the_item_passes():
    from types import SimpleNamespace

    from innerpissa.eval.suite import run_suite

    labels = [1, -1] * 10
    datasets = [
        EvalDataset(name, "yesno", tuple(EvalItem(str(i), "q", y) for i, y in enumerate(labels)), "mem")
        for name in ("a", "b")
    ]
    method = SimpleNamespace(name="m", kind="vector", coeffs=(-2.0, -1.0, 0.0, 1.0, 2.0))
    runs = {}
    for both in (True, False):
        eng = _ItemEngine(2.0)
        kw = dict(kl_budget=0.05, progress=False, neutral_texts=["x"], budget_first=True, seed=3)
        runs[both] = (run_suite(eng, [method], datasets, score_other_split=both, **kw), eng.n_scored)
    (full, n_full), (test_only, n_test) = runs[True], runs[False]
    assert n_test * 2 == n_full  # the dev half is not scored
    for name in ("a", "b"):
        f, t = full["methods"]["m"]["datasets"][name], test_only["methods"]["m"]["datasets"][name]
        assert "dev" in f and "dev" not in t
        assert {k: v for k, v in f.items() if k != "dev"} == t  # the same items in the same order: equal numbers
        assert f["effect"] != 0 and len(test_only["item_ids"][name]) == 10
        assert test_only["datasets"][name] | {"n_scored": 20} == full["datasets"][name]
