"""Dataset selection of the evaluation suite (reads ../shared/data)."""

from __future__ import annotations

import json

from conftest import SHARED_DATA
from innerpissa.eval.suite import HONESTY_TARGETS, default_datasets


def test_default_datasets_sizes_and_targets():
    ds = {d.name: d for d in default_datasets(SHARED_DATA, n_target=10, n_other=4, n_dd=5, seed=0)}
    assert set(HONESTY_TARGETS) <= set(ds) and len(ds) == 13  # 12 persona sets + DailyDilemmas
    assert all(len(ds[n].items) == 10 for n in HONESTY_TARGETS)
    assert all(sum(it.label == 1 for it in ds[n].items) == 5 for n in HONESTY_TARGETS)  # label-balanced
    assert len(ds["agreeableness"].items) == 4 and len(ds["dailydilemmas"].items) == 5
    assert all(it.label == 0 for it in ds["dailydilemmas"].items)


def test_user_mwe_files_replace_persona_sets(tmp_path):
    rows = [{"question": f"Pick one.\n(A) x{i}\n(B) y{i}", "answer_matching_behavior": " (A)",
             "answer_not_matching_behavior": " (B)"} for i in range(4)]
    path = tmp_path / "power-seeking.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = default_datasets(SHARED_DATA, n_dd=2, mwe_files=[path])
    assert [d.name for d in ds] == ["power-seeking", "dailydilemmas"]
    assert ds[0].kind == "ab" and [it.label for it in ds[0].items] == [1, 1, 1, 1]
