"""Cross-model transfer: manifests, weighted Procrustes, folded edits = hooks, and the align pipeline on tiny models."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_gemma3, tiny_llama, word_tokenizer

from innerpissa.eval.methods import VectorMethod
from innerpissa.models import LoadedModel
from innerpissa.transfer.align import TransferConfig, align, projection_effects, steering_effects, transfer_report
from innerpissa.transfer.contrasts import (
    TOUR_GUIDE,
    ContrastTemplate,
    ManifestError,
    continuation_pairs,
    load_manifest,
    render_contrasts,
)
from innerpissa.transfer.edits import fold_addition, fold_projection, project_out
from innerpissa.transfer.procrustes import cosine, fit_alignment, weighted_procrustes


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _orthogonal(k: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(k, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def test_procrustes_recovers_a_known_rotation_exactly():
    r_true = _orthogonal(6, 0)
    a = torch.randn(40, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    r = weighted_procrustes(a, a @ r_true, torch.rand(40, dtype=torch.float64) + 0.1)
    assert torch.allclose(r, r_true, atol=1e-10)
    assert torch.allclose(r.T @ r, torch.eye(6, dtype=torch.float64), atol=1e-10)


def test_weights_downweight_corrupted_rows():
    g = torch.Generator().manual_seed(2)
    r_true = _orthogonal(5, 3)
    a = torch.randn(60, 5, dtype=torch.float64, generator=g)
    b = a @ r_true
    b[30:] = torch.randn(30, 5, dtype=torch.float64, generator=g) * 3  # rows 30+ are unrelated
    w = torch.cat([torch.full((30,), 10.0), torch.full((30,), 0.01)]).double()
    err_w = (weighted_procrustes(a, b, w) - r_true).norm()
    err_u = (weighted_procrustes(a, b) - r_true).norm()
    assert err_w < 0.05 and err_u > 4 * err_w


def test_alignment_maps_directions_between_spaces_of_different_size():
    g = torch.Generator().manual_seed(4)
    z = torch.randn(80, 6, generator=g, dtype=torch.float64) + torch.tensor([2.0, 0, 0, 0, 0, 0]).double()
    qt, _ = torch.linalg.qr(torch.randn(24, 6, generator=g, dtype=torch.float64))
    qs, _ = torch.linalg.qr(torch.randn(20, 6, generator=g, dtype=torch.float64))
    r0 = _orthogonal(6, 5)
    teacher, student = 3.0 * z @ qt.T, 0.5 * (z @ r0) @ qs.T
    amap = fit_alignment(teacher[:60], student[:60], k=6)
    assert amap.residual < 1e-12
    mapped = amap.map(teacher[60:].mean(0))
    assert cosine(mapped, student[60:].mean(0)) > 0.9999
    assert abs(mapped.norm() / student[60:].mean(0).norm() - 1) < 1e-6  # scales carried over
    with pytest.raises(ValueError, match="same paired differences"):
        fit_alignment(teacher[:10], student[:9], k=3)


def test_folded_addition_equals_the_hook_and_saves_as_a_standard_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llama()
    ids = torch.randint(0, 200, (2, 7))
    v = torch.randn(32) * 2
    with VectorMethod(model, {3: v}).steer(1.0):
        want = model(ids).logits
    assert (want - model(ids).logits).abs().max() > 1e-3
    fold_addition(model, 3, v)
    assert (model(ids).logits - want).abs().max() < 1e-5
    model.save_pretrained(tmp_path / "folded")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "folded").eval()
    assert (again(ids).logits - want).abs().max() < 1e-5
    with pytest.raises(ValueError, match="mlp_bias"):
        fold_addition(tiny_gemma3(), 3, torch.randn(32))


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3], ids=["llama", "gemma3"])
def test_folded_projection_equals_the_hook(make, tmp_path):
    model = make()
    ids = torch.randint(0, 200, (2, 7))
    dirs = [torch.randn(32), torch.randn(32)]
    with project_out(model, dirs):
        want = model(ids).logits
    assert (want - model(ids).logits).abs().max() > 1e-4
    fold_projection(model, dirs)
    assert (model(ids).logits - want).abs().max() < 1e-4


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_builtin_manifest_and_rendering():
    rows = load_manifest()
    assert len(rows) >= 60 and sum(r.split == "heldout" for r in rows) >= 12
    tok = word_tokenizer(["x"])
    cs = render_contrasts(tok, rows[:2], n_suffixes=2)
    assert set(cs.prompts) == {"N", "S", "E", "W", "N-sensory", "N-local", "N-anecdote", "N-logistics"}
    for i, (rid, j) in enumerate(cs.items):
        row = next(r for r in rows if r.id == rid)
        suffix = TOUR_GUIDE.suffixes[j].format(**row.fields)
        assert all(p[i].endswith(suffix) for p in cs.prompts.values())
    n, ablated = TOUR_GUIDE.n_instruction(), TOUR_GUIDE.n_instruction("anecdote")
    assert "anecdote" in n and "a short personal anecdote" not in ablated and "Do not tell any anecdote" in ablated
    (_p, pos, neg), *_ = continuation_pairs(tok, rows[:1], "E-W")
    assert pos.strip() == rows[0].fields["logistics"] and neg.strip() == rows[0].fields["anecdote"]


@pytest.mark.parametrize(
    "bad, msg",
    [
        (
            {"id": "a", "place": "X", "region": "Y", "sensory": "s", "local": "l", "anecdote": "a"},
            r"bad\.jsonl:2: .*logistics",
        ),
        (
            {
                "id": "b",
                "place": "X",
                "region": "Y",
                "sensory": "s",
                "local": "l",
                "anecdote": "a",
                "logistics": "g",
                "split": "test",
            },
            "split",
        ),
        (
            {"id": "ok", "place": "X", "region": "Y", "sensory": "s", "local": "l", "anecdote": "a", "logistics": "g"},
            "duplicate id",
        ),
    ],
)
def test_malformed_manifest_is_refused_with_line_and_field(tmp_path, bad, msg):
    good = {"id": "ok", "place": "X", "region": "Y", "sensory": "s", "local": "l", "anecdote": "a", "logistics": "g"}
    with pytest.raises(ManifestError, match=msg):
        load_manifest(_write(tmp_path / "bad.jsonl", [good, bad]))


def test_malformed_manifest_files(tmp_path):
    (tmp_path / "broken.jsonl").write_text('{"id": "a"\n')
    with pytest.raises(ManifestError, match="broken.jsonl:1: invalid JSON"):
        load_manifest(tmp_path / "broken.jsonl")
    (tmp_path / "m.csv").write_text("id,place,region\nx,Here,There\n")
    with pytest.raises(ManifestError, match=r"m\.csv:2: .*anecdote"):
        load_manifest(tmp_path / "m.csv")
    with pytest.raises(ManifestError, match="not found"):
        load_manifest(tmp_path / "missing.jsonl")
    (tmp_path / "t.json").write_text(
        json.dumps(
            {
                "variants": {},
                "traits": {},
                "n_head": "h",
                "suffixes": ["s"],
                "contrasts": {"x": ["N", "Q", "a", "b"]},
                "neutral": "n",
            }
        )
    )
    with pytest.raises(ManifestError, match="unknown variant 'Q'"):
        ContrastTemplate.from_file(tmp_path / "t.json")


def test_align_pipeline_on_tiny_models():
    rows = load_manifest()[:8]
    rows = [type(r)(r.id, r.fields, "heldout" if i >= 6 else "train") for i, r in enumerate(rows)]
    texts = []
    probe = word_tokenizer(["x"])
    cs = render_contrasts(probe, rows, n_suffixes=1)
    texts += [t for ps in cs.prompts.values() for t in ps]
    for name in TOUR_GUIDE.contrasts:
        texts += [x for trip in continuation_pairs(probe, rows, name) for x in trip]
    tok = word_tokenizer(texts)
    vocab = len(tok)
    teacher = LoadedModel(tiny_gemma3(vocab_size=vocab, seed=1), tok, "tiny-gemma3")
    student = LoadedModel(tiny_llama(vocab_size=vocab, seed=2), tok, "tiny-llama")
    cfg = TransferConfig(k=4, n_suffixes=1, coeffs=(-1.0, 0.0, 1.0), batch_size=8)
    res = align(teacher, student, rows, cfg=cfg, progress=lambda *_: None)
    assert res.map.k == 4 and res.meta["n_train_items"] == 6 and res.meta["n_heldout_items"] == 2
    for name, sep in res.separation.items():
        assert 0.0 <= sep["auroc_own"] <= 1.0 and -1.0 <= sep["cos_mapped_vs_own"] <= 1.0
        assert -1.0 <= sep["cos_heldout_loco_vs_own"] <= 1.0 and 0.0 <= sep["auroc_loco"] <= 1.0
        assert res.mapped_dirs[name].shape == (32,)
    eff = steering_effects(res, student, rows, progress=lambda *_: None)
    assert set(eff) == set(TOUR_GUIDE.contrasts)
    for per in eff.values():
        assert per["own"]["shift"][0.0] == 0.0 and per["own"]["dnll"][0.0] == 0.0
        assert abs(per["mapped"]["norm"] - per["own"]["norm"]) < 1e-4
    proj = projection_effects(res, student, rows, progress=lambda *_: None)
    assert set(proj) == {"sensory", "local", "anecdote", "_fold_check"}
    assert proj["_fold_check"]["max_abs_logit_diff"] < 1e-4
    assert "Projecting trait directions" in transfer_report(res)
    json.dumps(res.to_json())


def test_fold_check_and_report(tmp_path):
    from innerpissa.transfer.edits import fold_check

    rows = load_manifest()[:6]
    rows = [type(r)(r.id, r.fields, "heldout" if i >= 4 else "train") for i, r in enumerate(rows)]
    probe = word_tokenizer(["x"])
    texts = [t for ps in render_contrasts(probe, rows, n_suffixes=1).prompts.values() for t in ps]
    for name in TOUR_GUIDE.contrasts:
        texts += [x for trip in continuation_pairs(probe, rows, name) for x in trip]
    tok = word_tokenizer(texts)
    teacher = LoadedModel(tiny_gemma3(vocab_size=len(tok), seed=1), tok, "t")
    student = LoadedModel(tiny_llama(vocab_size=len(tok), seed=2), tok, "s")
    res = align(teacher, student, rows, cfg=TransferConfig(k=3, n_suffixes=1), progress=lambda *_: None)
    res.meta.update({"teacher": "t", "student": "s"})
    res.meta["fold"] = f = fold_check(res, student, "N-S", 2.0, tmp_path / "folded", rows)
    assert f["max_abs_logit_diff_folded"] < 1e-4 and f["max_abs_logit_diff_reloaded"] < 1e-4
    assert (tmp_path / "folded" / "config.json").exists()
    assert student.model.model.layers[0].mlp.down_proj.bias is None  # the student itself is untouched
    md = transfer_report(res)
    assert "| N-S |" in md and "Folded weight edit" in md
