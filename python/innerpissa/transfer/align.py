"""Cross-model steering: read contrast directions in a teacher and a student, align them, steer the student.

Pipeline (docs/design.md §9; ``ipissa align`` runs all of it):

1. ``contrasts.render_contrasts`` → the same manifest items rendered with each model's own chat template.
2. ``last_token_states`` at one block per model (default: 60 % of depth) for every variant.
3. Directions per contrast on the *train* rows: mean(positive − negative) (N−S, E−W, trait = N − N-without-trait).
4. ``procrustes.fit_alignment`` on the stacked train differences of all contrasts, weighted per contrast.
5. Held-out evaluation: cosine of mapped teacher directions to the student's own, AUROC of each direction on the
   student's held-out activations; steering by adding c·v at the student's block (mapped teacher vs the student's
   own vs a random direction of equal norm), scored as the shift in per-token log-likelihood of style-typical
   continuations, with ΔNLL on neutral text.
6. ``edits.fold_addition`` / ``edits.fold_projection``: the same edits as weights, so the student runs with no hooks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from ..adapter.targets import decoder_blocks
from ..eval.datasets import NEUTRAL_TEXTS
from ..eval.engines import continuation_logprobs, text_nll
from ..eval.methods import VectorMethod, last_token_states
from ..eval.metrics import bootstrap_ci, item_slopes
from ..prompts import left_pad
from .contrasts import TOUR_GUIDE, ContrastTemplate, ManifestRow, continuation_pairs, render_contrasts
from .edits import fold_projection, project_out
from .procrustes import AlignmentMap, cosine, fit_alignment


@torch.no_grad()
def continuation_logprob(
    model: nn.Module, tokenizer, prompts: list[str], continuations: list[str], batch_size: int = 16
) -> np.ndarray:
    """Mean per-token log-probability (nats/token) of each continuation after its prompt, (n,)."""
    rows = continuation_logprobs(model, tokenizer, prompts, continuations, batch_size)
    return np.array([total / max(n, 1) for total, n in rows])


def _contrast_score(model, tokenizer, triples, batch_size: int = 16) -> np.ndarray:
    """Per row: mean log p(positive continuation) − mean log p(negative continuation), nats/token."""
    prompts = [t[0] for t in triples]
    return continuation_logprob(model, tokenizer, prompts, [t[1] for t in triples], batch_size) - continuation_logprob(
        model, tokenizer, prompts, [t[2] for t in triples], batch_size
    )


@dataclass
class TransferConfig:
    """Settings of ``align``.

    Attributes:
        teacher_depth, student_depth: block read in each model, as a fraction of its depth.
        k: task-subspace size (≤ number of train differences; 32–128 on big models).
        weights: Procrustes row weight per contrast (others: ``default_weight``).
        n_suffixes: shared suffixes per row (more items, more compute).
        coeffs: steering sweep, in units of the student's own direction norm.
        seed: random-direction seed.
    """

    teacher_depth: float = 0.6
    student_depth: float = 0.6
    k: int = 32
    weights: dict[str, float] = field(default_factory=lambda: {"N-S": 4.0, "E-W": 1.0})
    default_weight: float = 2.0
    n_suffixes: int = 4
    coeffs: tuple[float, ...] = (-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0)
    batch_size: int = 16
    seed: int = 0


def _layer(model: nn.Module, depth: float) -> int:
    n = len(decoder_blocks(model))
    return min(n - 1, max(1, int(round(depth * n))))


def _auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg]))


@dataclass
class AlignResult:
    """Everything ``align`` measured; ``transfer_report`` renders it. Vectors are (d_S,) or (d_T,) float32."""

    config: TransferConfig
    teacher_layer: int
    student_layer: int
    map: AlignmentMap
    teacher_dirs: dict[str, torch.Tensor]
    student_dirs: dict[str, torch.Tensor]
    mapped_dirs: dict[str, torch.Tensor]
    random_dirs: dict[str, torch.Tensor]
    separation: dict[str, dict[str, float]]
    steering: dict[str, dict[str, dict]] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "config": asdict(self.config),
            "teacher_layer": self.teacher_layer,
            "student_layer": self.student_layer,
            "k": self.map.k,
            "residual": self.map.residual,
            "separation": self.separation,
            "steering": self.steering,
            **self.meta,
        }


def align(
    teacher,
    student,
    rows: list[ManifestRow],
    template: ContrastTemplate = TOUR_GUIDE,
    cfg: TransferConfig | None = None,
    progress=print,
) -> AlignResult:
    """Read contrasts in both models, fit the weighted Procrustes map, and measure separation on held-out rows.

    Args:
        teacher, student: ``LoadedModel`` (model + tokenizer).
        rows: manifest rows; rows with ``split == "heldout"`` are never used to fit anything.
    Raises:
        ValueError: no train or no held-out rows, or k larger than the number of train differences.
    """
    cfg = cfg or TransferConfig()
    lt, ls = _layer(teacher.model, cfg.teacher_depth), _layer(student.model, cfg.student_depth)
    cs_t = render_contrasts(teacher.tokenizer, rows, template, cfg.n_suffixes)
    cs_s = render_contrasts(student.tokenizer, rows, template, cfg.n_suffixes)
    train, held = cs_s.indices("train"), cs_s.indices("heldout")
    if not train or not held:
        raise ValueError(f"need train and heldout rows (got {len(train)} train, {len(held)} held-out items)")
    states_t, states_s = {}, {}
    for v in cs_s.prompts:
        progress(f"reading variant {v}: teacher block {lt}, student block {ls}")
        states_t[v] = last_token_states(teacher.model, teacher.tokenizer, cs_t.prompts[v], [lt], cfg.batch_size)[lt]
        states_s[v] = last_token_states(student.model, student.tokenizer, cs_s.prompts[v], [ls], cfg.batch_size)[ls]
    dt, ds, w = [], [], []
    teacher_dirs, student_dirs = {}, {}
    for name, (pos, neg, _, _) in template.contrasts.items():
        d_t = states_t[pos][train] - states_t[neg][train]
        d_s = states_s[pos][train] - states_s[neg][train]
        teacher_dirs[name], student_dirs[name] = d_t.mean(0), d_s.mean(0)
        dt.append(d_t)
        ds.append(d_s)
        w += [cfg.weights.get(name, cfg.default_weight)] * len(train)
    amap = fit_alignment(torch.cat(dt), torch.cat(ds), cfg.k, torch.tensor(w))
    names = list(template.contrasts)
    loco = {}  # leave-one-contrast-out maps: does the map carry a contrast it was never fitted on?
    if len(names) > 1:
        for i, name in enumerate(names):
            keep = [j for j in range(len(names)) if j != i]
            k_loco = min(cfg.k, len(train) * len(keep))
            wts = torch.tensor([x for j in keep for x in [cfg.weights.get(names[j], cfg.default_weight)] * len(train)])
            loco[name] = fit_alignment(torch.cat([dt[j] for j in keep]), torch.cat([ds[j] for j in keep]), k_loco, wts)
    gen = torch.Generator().manual_seed(cfg.seed)
    mapped, rand, sep = {}, {}, {}
    for name, (pos, neg, _, _) in template.contrasts.items():
        own = student_dirs[name]
        mapped[name] = amap.map(teacher_dirs[name])
        r = torch.randn(own.shape, generator=gen)
        rand[name] = r / r.norm() * own.norm()
        held_t = (states_t[pos][held] - states_t[neg][held]).mean(0)
        held_s = (states_s[pos][held] - states_s[neg][held]).mean(0)
        s_pos, s_neg = states_s[pos][held], states_s[neg][held]
        sep[name] = {
            "cos_mapped_vs_own": cosine(mapped[name], own),
            "cos_heldout_mapped_vs_own": cosine(amap.map(held_t), held_s),
            "cos_teacher_train_vs_heldout": cosine(teacher_dirs[name], held_t),
            "cos_student_train_vs_heldout": cosine(own, held_s),
            "cos_random_vs_own": cosine(rand[name], own),
        }
        if name in loco:
            sep[name]["cos_heldout_loco_vs_own"] = cosine(loco[name].map(held_t), held_s)
            sep[name]["auroc_loco"] = _auroc(
                (s_pos @ loco[name].map(teacher_dirs[name])).numpy(),
                (s_neg @ loco[name].map(teacher_dirs[name])).numpy(),
            )
        for label, vec in (("mapped", mapped[name]), ("own", own), ("random", rand[name])):
            sep[name][f"auroc_{label}"] = _auroc((s_pos @ vec).numpy(), (s_neg @ vec).numpy())
    meta = {"n_train_items": len(train), "n_heldout_items": len(held), "contrasts": list(template.contrasts)}
    return AlignResult(cfg, lt, ls, amap, teacher_dirs, student_dirs, mapped, rand, sep, meta=meta)


def steering_effects(
    result: AlignResult, student, rows: list[ManifestRow], template: ContrastTemplate = TOUR_GUIDE, progress=print
) -> dict:
    """Steer the student at its block with mapped / own / random directions (equal norm = ‖own‖) over the sweep.

    Score per held-out row: mean log p(positive continuation) − mean log p(negative continuation), nats/token,
    after a neutral request. Reported per method: the score shift at each c relative to c = 0, the slope
    (nats/token per unit c) with a 95 % bootstrap CI over rows, and neutral-text ΔNLL at each c.
    """
    cfg = result.config
    held_rows = [r for r in rows if r.split == "heldout"]
    coeffs = np.array(cfg.coeffs)
    i0 = int(np.flatnonzero(coeffs == 0)[0])
    neutral = list(NEUTRAL_TEXTS[:24])
    nll_base = text_nll(student.model, student.tokenizer, neutral)
    out: dict = {}
    for name in template.contrasts:
        triples = continuation_pairs(student.tokenizer, held_rows, name, template)
        own = result.student_dirs[name]
        vectors = {
            "mapped": result.mapped_dirs[name] / result.mapped_dirs[name].norm() * own.norm(),
            "own": own,
            "random": result.random_dirs[name],
        }
        out[name] = {}
        base = _contrast_score(student.model, student.tokenizer, triples, cfg.batch_size)  # c = 0, all methods
        for method, vec in vectors.items():
            progress(f"steering {name} with the {method} direction")
            scores, dnll = [], []
            for c in coeffs:
                if c == 0:
                    scores.append(base)
                    dnll.append(0.0)
                    continue
                with VectorMethod(student.model, {result.student_layer: vec}).steer(float(c)):
                    scores.append(_contrast_score(student.model, student.tokenizer, triples, cfg.batch_size))
                    dnll.append(text_nll(student.model, student.tokenizer, neutral) - nll_base)
            a = np.stack(scores)  # (n_coeffs, n_rows)
            slopes = item_slopes(a, coeffs)
            lo, hi = bootstrap_ci(slopes, seed=cfg.seed)
            out[name][method] = {
                "slope": float(slopes.mean()),
                "ci": [lo, hi],
                "shift": {float(c): float((a[i] - a[i0]).mean()) for i, c in enumerate(coeffs)},
                "dnll": {float(c): float(x) for c, x in zip(coeffs, dnll)},
                "norm": float(vec.norm()),
            }
    result.steering = out
    return out


def projection_effects(
    result: AlignResult, student, rows: list[ManifestRow], template: ContrastTemplate = TOUR_GUIDE, progress=print
) -> dict:
    """Project each trait direction out of the student (``project_out``: every residual write) and measure it.

    For each contrast other than N−S and E−W (the traits), with the mapped teacher direction, the student's own
    direction and the random one: the change in the contrast's continuation score on held-out rows (nats/token,
    mean and 95 % bootstrap CI over rows; negative = the trait's text became less likely relative to generic
    text) and neutral-text ΔNLL. Also folds the mapped projection into a copy of the student once and records
    max |Δ logit| against the hook form.
    """
    import copy

    held_rows = [r for r in rows if r.split == "heldout"]
    neutral = list(NEUTRAL_TEXTS[:24])
    nll_base = text_nll(student.model, student.tokenizer, neutral)
    out: dict = {}
    traits = [n for n in template.contrasts if n not in ("N-S", "E-W")]
    for name in traits:
        triples = continuation_pairs(student.tokenizer, held_rows, name, template)
        base = _contrast_score(student.model, student.tokenizer, triples)
        out[name] = {}
        for method, vec in (
            ("mapped", result.mapped_dirs[name]),
            ("own", result.student_dirs[name]),
            ("random", result.random_dirs[name]),
        ):
            progress(f"projecting out {name} ({method} direction)")
            with project_out(student.model, [vec]):
                delta = _contrast_score(student.model, student.tokenizer, triples) - base
                dnll = text_nll(student.model, student.tokenizer, neutral) - nll_base
            lo, hi = bootstrap_ci(delta, seed=result.config.seed)
            out[name][method] = {"delta": float(delta.mean()), "ci": [lo, hi], "dnll": float(dnll)}
    if traits:
        name = traits[0]
        text = [p + c for p, c, _ in continuation_pairs(student.tokenizer, held_rows[:4], name, template)]
        ids, mask, posid = left_pad(
            [student.tokenizer(t, add_special_tokens=False)["input_ids"] for t in text], student.tokenizer.pad_token_id
        )

        def logits(m):
            return m(input_ids=ids, attention_mask=mask, position_ids=posid, use_cache=False).logits[mask.bool()]

        with torch.no_grad():
            with project_out(student.model, [result.mapped_dirs[name]]):
                want = logits(student.model).float()
            folded = copy.deepcopy(student.model)
            fold_projection(folded, [result.mapped_dirs[name]])
            out["_fold_check"] = {
                "contrast": name,
                "max_abs_logit_diff": float((logits(folded).float() - want).abs().max()),
            }
    result.meta["projection"] = out
    return out


def transfer_report(result: AlignResult) -> str:
    """Markdown report of ``align`` (+ ``steering_effects`` and ``fold_check`` when they ran)."""
    m = result.meta
    lines = [
        "# Cross-model transfer report",
        "",
        f"Teacher `{m.get('teacher', '?')}` block {result.teacher_layer}; student `{m.get('student', '?')}` block "
        f"{result.student_layer}. Manifest `{m.get('manifest', '?')}`: {m['n_train_items']} train items, "
        f"{m['n_heldout_items']} held-out items (rows × suffixes). Task subspace k = {result.map.k}; weighted "
        f"Procrustes residual on the train differences {result.map.residual:.3f} (0 = perfect, ~2 = unrelated).",
        "",
        "## Separation on held-out rows (student activations)",
        "",
        "cos(mapped, own): mapped teacher direction vs the student's own, from train rows and from held-out rows "
        "only. LOCO: the map refitted without that contrast's rows (leave one contrast out), applied to it.",
        "",
        "| contrast | cos(mapped, own) train | cos held-out | cos held-out, LOCO map | AUROC mapped | AUROC LOCO "
        "| AUROC own | AUROC random |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in result.separation.items():
        lines.append(
            f"| {name} | {s['cos_mapped_vs_own']:+.3f} | {s['cos_heldout_mapped_vs_own']:+.3f} | "
            f"{s.get('cos_heldout_loco_vs_own', float('nan')):+.3f} | {s['auroc_mapped']:.3f} | "
            f"{s.get('auroc_loco', float('nan')):.3f} | {s['auroc_own']:.3f} | {s['auroc_random']:.3f} |"
        )
    if result.steering:
        cs = result.config.coeffs
        lines += [
            "",
            "## Steering the student (held-out rows)",
            "",
            "Score = mean log p(positive continuation) − mean log p(negative continuation), nats/token. "
            "Slope per unit c (c in units of the student's own direction norm) with 95 % bootstrap CI over "
            f"rows; ΔNLL on neutral text at c = {min(cs):+g} / {max(cs):+g}.",
            "",
            "| contrast | direction | slope [95 % CI] | shift at c = "
            + " / ".join(f"{c:+g}" for c in cs)
            + " | ΔNLL |",
            "|---|---|---|---|---|",
        ]
        for name, per in result.steering.items():
            for method, r in per.items():
                shifts = " / ".join(f"{r['shift'][float(c)]:+.3f}" for c in cs)
                lines.append(
                    f"| {name} | {method} | {r['slope']:+.3f} [{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}] | "
                    f"{shifts} | {r['dnll'][float(min(cs))]:+.3f} / {r['dnll'][float(max(cs))]:+.3f} |"
                )
    if "projection" in m:
        pr = m["projection"]
        lines += [
            "",
            "## Projecting trait directions out of the student (held-out rows)",
            "",
            "Δ score (nats/token) when the direction is removed from every residual write; negative = the "
            "trait's sentence became less likely relative to generic text. 95 % bootstrap CI over rows.",
            "",
            "| trait | mapped teacher: Δ [CI], ΔNLL | own: Δ [CI], ΔNLL | random: Δ [CI], ΔNLL |",
            "|---|---|---|---|",
        ]
        for name, per in pr.items():
            if name.startswith("_"):
                continue
            cells = [
                f"{r['delta']:+.3f} [{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}], {r['dnll']:+.3f}"
                for r in (per["mapped"], per["own"], per["random"])
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        if "_fold_check" in pr:
            fc = pr["_fold_check"]
            lines += [
                "",
                f"Folded projection ({fc['contrast']}, mapped direction, all writers + embeddings) vs hook: "
                f"max |Δ logit| {fc['max_abs_logit_diff']:.2e}.",
            ]
    if "fold" in m:
        f = m["fold"]
        lines += [
            "",
            "## Folded weight edit",
            "",
            f"{f['contrast']} at c = {f['coeff']:g} folded into block {result.student_layer}'s MLP bias and "
            f"saved to `{f['path']}`: max |Δ logit| vs hook steering {f['max_abs_logit_diff_folded']:.2e} "
            f"(in memory), {f['max_abs_logit_diff_reloaded']:.2e} (reloaded); logits reach "
            f"{f['logit_scale']:.1f}.",
        ]
    if "command" in m:
        lines += ["", f"Command: `{m['command']}` ({m.get('minutes', '?')} min)."]
    return "\n".join(lines) + "\n"
