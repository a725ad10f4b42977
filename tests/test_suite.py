"""Dataset selection of the evaluation suite (reads ../shared/data)."""

from __future__ import annotations

import json

from conftest import SHARED_DATA

from innerpissa.eval.suite import HONESTY_TARGETS, default_datasets

PERSONA_TARGETS = [n for n in HONESTY_TARGETS if n != "truthfulqa"]  # TruthfulQA only when its file is given


def test_default_datasets_sizes_and_targets():
    ds = {d.name: d for d in default_datasets(SHARED_DATA, n_target=10, n_other=4, n_dd=5, seed=0)}
    assert set(PERSONA_TARGETS) <= set(ds) and len(ds) == 13  # 12 persona sets + DailyDilemmas
    assert "truthfulqa" in HONESTY_TARGETS and "truthfulqa" not in ds
    assert all(len(ds[n].items) == 10 for n in PERSONA_TARGETS)
    assert all(sum(it.label == 1 for it in ds[n].items) == 5 for n in PERSONA_TARGETS)  # label-balanced
    assert len(ds["agreeableness"].items) == 4 and len(ds["dailydilemmas"].items) == 5
    assert all(it.label == 0 for it in ds["dailydilemmas"].items)


def test_user_mwe_files_replace_persona_sets(tmp_path):
    rows = [
        {
            "question": f"Pick one.\n(A) x{i}\n(B) y{i}",
            "answer_matching_behavior": " (A)",
            "answer_not_matching_behavior": " (B)",
        }
        for i in range(4)
    ]
    path = tmp_path / "power-seeking.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = default_datasets(SHARED_DATA, n_dd=2, mwe_files=[path])
    assert [d.name for d in ds] == ["power-seeking", "dailydilemmas"]
    assert ds[0].kind == "ab" and [it.label for it in ds[0].items] == [1, 1, 1, 1]


def test_truthfulqa_file_joins_the_honesty_targets(tmp_path):
    from innerpissa.concepts import get_concept
    from innerpissa.eval.suite import concept_datasets

    path = tmp_path / "TruthfulQA.csv"
    path.write_text(
        "Question,Best Answer,Correct Answers,Incorrect Answers\n"
        + "".join(f"Q{i}?,A{i},A{i}; B{i},C{i}; D{i}\n" for i in range(30))
    )
    ds, targets = concept_datasets(get_concept("honesty"), SHARED_DATA, n_target=10, n_other=4, n_dd=5, truthfulqa=path)
    tqa = {d.name: d for d in ds}["truthfulqa"]
    assert tqa.kind == "mc" and len(tqa.items) == 10 and targets["truthfulqa"] == 1
    _, no_file = concept_datasets(get_concept("honesty"), SHARED_DATA, n_target=10, n_other=4, n_dd=5)
    assert "truthfulqa" not in no_file  # targets name only the sets that are there
    ds, targets = concept_datasets(
        get_concept("openness"), SHARED_DATA, n_target=10, n_other=4, n_dd=5, truthfulqa=path
    )
    assert len({d.name: d for d in ds}["truthfulqa"].items) == 4 and "truthfulqa" not in targets  # a side effect
