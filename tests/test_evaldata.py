"""Tests for innerpissa.eval.datasets on the real shared data (../shared/data relative to the repo root)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import SHARED_DATA

from innerpissa.eval.datasets import (
    NEUTRAL_TEXTS,
    EvalDataError,
    EvalItem,
    data_dir,
    dataset_url,
    load_dailydilemmas,
    load_mwe,
    split_dev_test,
    subsample,
)

REPO = Path(__file__).resolve().parents[1]
DATA = (REPO / ".." / "shared" / "data").resolve()
PERSONA = DATA / "anthropic_mwe" / "persona"
DD = DATA / "dailydilemmas"
DD_ACTIONS = DD / "dilemmas_with_detail_by_action_test.csv"

PERSONA_FILES = [
    "agreeableness",
    "believes-life-has-no-meaning",
    "conscientiousness",
    "desire-to-persuade-people-to-be-more-honest-to-others",
    "extraversion",
    "interest-in-math",
    "neuroticism",
    "okay-with-deceiving-a-user-to-help-them",
    "openness",
    "politically-liberal",
    "risk-seeking",
    "subscribes-to-virtue-ethics",
]


def test_shared_data_present():
    # A missing data folder must fail loudly, not skip.
    assert PERSONA.is_dir(), f"shared data not found at {PERSONA}"
    assert sorted(p.stem for p in PERSONA.glob("*.jsonl")) == PERSONA_FILES


# ---------------------------------------------------------------------------------------------------------------
# model-written evals
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stem", PERSONA_FILES)
def test_load_persona_file(stem):
    path = PERSONA / f"{stem}.jsonl"
    ds = load_mwe(path)
    assert ds.name == stem and ds.kind == "yesno" and ds.source == str(path)
    raw = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(ds.items) == len(raw) == 1000
    assert {it.label for it in ds.items} == {1, -1}
    assert len({it.id for it in ds.items}) == len(ds.items)
    for it, row in zip(ds.items, raw):
        assert it.question == row["question"]
        assert it.label == (1 if row["answer_matching_behavior"] == " Yes" else -1)


def test_deception_labels_follow_matching_answer():
    path = PERSONA / "okay-with-deceiving-a-user-to-help-them.jsonl"
    ds = load_mwe(path)
    raw = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    yes_questions = {r["question"] for r in raw if r["answer_matching_behavior"] == " Yes"}
    plus_questions = {it.question for it in ds.items if it.label == 1}
    assert plus_questions == yes_questions
    assert 0 < len(plus_questions) < len(raw)
    # first row of the file: "An act of deception can sometimes be beneficial..." -> matching " Yes"
    assert ds.items[0].label == 1 and "deception" in ds.items[0].question


def test_load_ab_file(tmp_path):
    rows = [
        {
            "question": "Q1\n (A) grab power\n (B) decline",
            "answer_matching_behavior": " (A)",
            "answer_not_matching_behavior": " (B)",
        },
        {
            "question": "Q2\n (A) decline\n (B) grab power",
            "answer_matching_behavior": " (B)",
            "answer_not_matching_behavior": " (A)",
        },
        {"question": "Q3", "answer_matching_behavior": "(A)", "answer_not_matching_behavior": "(B)"},
    ]
    f = tmp_path / "power-seeking-inclination.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    ds = load_mwe(f)
    assert ds.kind == "ab" and ds.name == "power-seeking-inclination"
    assert [it.label for it in ds.items] == [1, -1, 1]
    assert [it.id for it in ds.items] == [f"power-seeking-inclination:{i}" for i in (1, 2, 3)]


GOOD = json.dumps({"question": "Q", "answer_matching_behavior": " Yes", "answer_not_matching_behavior": " No"})


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"question": "Q", "answer_matching_behavior": " Yes"', "invalid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"question": "Q", "answer_matching_behavior": " Yes"}', "answer_not_matching_behavior"),
        ('{"question": "", "answer_matching_behavior": " Yes", "answer_not_matching_behavior": " No"}', "question"),
        ('{"question": "Q", "answer_matching_behavior": " Maybe", "answer_not_matching_behavior": " No"}', "Maybe"),
        ('{"question": "Q", "answer_matching_behavior": " Yes", "answer_not_matching_behavior": " Yes"}', "different"),
        (
            '{"question": "Q", "answer_matching_behavior": " (A)", "answer_not_matching_behavior": " (B)"}',
            "earlier rows",
        ),
    ],
)
def test_malformed_mwe_names_file_and_line(tmp_path, bad_line, message):
    f = tmp_path / "broken_mwe.jsonl"
    f.write_text(f"{GOOD}\n{GOOD}\n\n{bad_line}\n{GOOD}\n", encoding="utf-8")
    with pytest.raises(EvalDataError) as info:
        load_mwe(f)
    msg = str(info.value)
    assert msg.startswith(f"{f}:4: "), msg
    assert message in msg


def test_mwe_empty_and_missing(tmp_path):
    f = tmp_path / "empty.jsonl"
    f.write_text("\n", encoding="utf-8")
    with pytest.raises(EvalDataError, match="empty.jsonl: no items"):
        load_mwe(f)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_mwe(tmp_path / "missing.jsonl")


# ---------------------------------------------------------------------------------------------------------------
# DailyDilemmas
# ---------------------------------------------------------------------------------------------------------------


def test_dailydilemmas_situations():
    ds = load_dailydilemmas(DD / "dilemma.csv")
    assert len(ds.items) == 1360
    assert all(it.label == 0 for it in ds.items)
    assert len({it.id for it in ds.items}) == 1360
    first = ds.items[0]
    assert first.id == "dd-55" and first.question.startswith("You're a project manager")
    assert first.question.endswith("Should you take initiative and report this to your superior?")
    with pytest.raises(ValueError, match="no per-action values"):
        load_dailydilemmas(DD / "dilemma.csv", value="honesty")


def _labels(ds) -> dict[str, int]:
    return {it.id: it.label for it in ds.items}


def test_dailydilemmas_actions_unlabelled():
    ds = load_dailydilemmas(DD_ACTIONS)
    assert _labels(ds) == {"dd-55": 0, "dd-107": 0, "dd-176": 0, "dd-257": 0}
    assert ds.items[0].question.startswith("You're a project manager")


def test_dailydilemmas_value_signs():
    # Read off the file's values_names column (to_do / not_to_do):
    # 55:  to_do has honesty, responsibility;             not_to_do has self
    # 107: to_do has responsibility;                       not_to_do has self, responsibility
    # 176: neither side has honesty, self or responsibility
    # 257: to_do has none of them;                         not_to_do has self, responsibility
    assert _labels(load_dailydilemmas(DD_ACTIONS, "honesty")) == {"dd-55": 1}
    assert _labels(load_dailydilemmas(DD_ACTIONS, "Honesty")) == {"dd-55": 1}
    assert _labels(load_dailydilemmas(DD_ACTIONS, "self")) == {"dd-55": -1, "dd-107": -1, "dd-257": -1}
    # 107 has responsibility on both sides -> dropped; the not_to_do side is negated exactly once
    assert _labels(load_dailydilemmas(DD_ACTIONS, "responsibility")) == {"dd-55": 1, "dd-257": -1}
    ds = load_dailydilemmas(DD_ACTIONS, "honesty")
    assert ds.kind == "yesno" and ds.name.endswith("[honesty]")


def test_dailydilemmas_framework_value_from_row_columns():
    # virtue column: 55 to_do has Truthfulness (honesty); 176 to_do has Truthfulness (professional integrity)
    assert _labels(load_dailydilemmas(DD_ACTIONS, "virtue:Truthfulness")) == {"dd-55": 1, "dd-176": 1}
    # virtue Courage: 107 to_do (courage); 257 has it on both sides (survival / responsibility) -> dropped
    assert _labels(load_dailydilemmas(DD_ACTIONS, "virtue:courage")) == {"dd-107": 1}
    # virtue Patience only on 107's not_to_do side
    assert _labels(load_dailydilemmas(DD_ACTIONS, "virtue:Patience")) == {"dd-107": -1}
    with pytest.raises(ValueError, match="unknown value framework"):
        load_dailydilemmas(DD_ACTIONS, "virtues:Truthfulness")
    with pytest.raises(ValueError, match="occurs in no action"):
        load_dailydilemmas(DD_ACTIONS, "honestyy")


def _to_hf_layout(dest: Path) -> Path:
    """Rewrite the test file in the Hugging Face layout: dilemma_idx, values_aggregated, no framework columns."""
    with DD_ACTIONS.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    with dest.open("w", newline="", encoding="utf-8") as fh:
        cols = ["dilemma_idx", "basic_situation", "dilemma_situation", "action_type", "action", "values_aggregated"]
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow(
                {
                    "dilemma_idx": r["idx"],
                    "basic_situation": r["basic_situation"],
                    "dilemma_situation": r["dilemma_situation"],
                    "action_type": r["action_type"],
                    "action": r["action"],
                    "values_aggregated": r["values_names"],
                }
            )
    return dest


def test_dailydilemmas_hf_layout_and_values_table(tmp_path):
    hf = _to_hf_layout(tmp_path / "dilemma_to_action_to_values_aggregated.csv")
    assert _labels(load_dailydilemmas(hf, "honesty")) == {"dd-55": 1}
    assert _labels(load_dailydilemmas(hf, "self")) == {"dd-55": -1, "dd-107": -1, "dd-257": -1}
    # no framework columns and no values.csv next to it -> clear error, then explicit table works
    with pytest.raises(FileNotFoundError, match="values_table"):
        load_dailydilemmas(hf, "virtue:Truthfulness")
    ds = load_dailydilemmas(hf, "virtue:Truthfulness", values_table=DD / "values.csv")
    # values.csv maps honesty (55) and professional integrity (176) to Truthfulness, both on the to_do side
    assert _labels(ds) == {"dd-55": 1, "dd-176": 1}


def test_dailydilemmas_malformed(tmp_path):
    hf = _to_hf_layout(tmp_path / "a.csv")
    text = hf.read_text(encoding="utf-8")
    bad = tmp_path / "bad_action.csv"
    bad.write_text(text.replace(",not_to_do,", ",maybe,", 1), encoding="utf-8")
    with pytest.raises(EvalDataError, match=r"bad_action\.csv:3: action_type"):
        load_dailydilemmas(bad)
    # drop dilemma 55's not_to_do row (line 3) -> error only when labelling
    lines = text.splitlines(keepends=True)
    short = tmp_path / "short.csv"
    short.write_text("".join(lines[:2] + lines[3:]), encoding="utf-8")
    assert len(load_dailydilemmas(short).items) == 4
    with pytest.raises(EvalDataError, match=r"short\.csv:2: dilemma 55 has no not_to_do row"):
        load_dailydilemmas(short, "honesty")
    dup = tmp_path / "dup.csv"
    dup.write_text("".join(lines[:3] + lines[2:3] + lines[3:]), encoding="utf-8")
    with pytest.raises(EvalDataError, match=r"dup\.csv:4: dilemma 55 has a second not_to_do row"):
        load_dailydilemmas(dup)
    nocol = tmp_path / "nocol.csv"
    nocol.write_text("id,text\n1,hello\n", encoding="utf-8")
    with pytest.raises(EvalDataError, match=r"nocol\.csv:1: expected columns"):
        load_dailydilemmas(nocol)


# ---------------------------------------------------------------------------------------------------------------
# splits, data location, neutral texts
# ---------------------------------------------------------------------------------------------------------------


def test_split_dev_test_disjoint_deterministic_and_stratified():
    items = load_mwe(PERSONA / "openness.jsonl").items
    dev, test = split_dev_test(items, seed=0, name="openness")
    assert {it.id for it in dev}.isdisjoint({it.id for it in test})
    assert {it.id for it in dev} | {it.id for it in test} == {it.id for it in items}
    assert split_dev_test(items, seed=0, name="openness") == (dev, test)
    assert split_dev_test(items, seed=1, name="openness")[0] != dev
    assert split_dev_test(items, seed=0, name="other")[0] != dev  # each dataset its own draw
    n_yes = sum(it.label == 1 for it in items)
    assert sum(it.label == 1 for it in dev) == round(n_yes / 2)  # stratified: each class split in half
    dev3, _test3 = split_dev_test(items, seed=0, dev_fraction=0.3)
    assert abs(len(dev3) - 300) <= 1
    with pytest.raises(ValueError):
        split_dev_test(items, seed=0, dev_fraction=1.5)


def test_subsample_is_label_balanced_and_per_dataset():
    items = tuple(EvalItem(id=str(i), question=f"q{i}", label=1 if i % 3 else -1) for i in range(60))
    s = subsample(items, 20, seed=0, name="a")
    assert len(s) == 20 and sum(it.label == 1 for it in s) == 10 and set(s) <= set(items)
    assert subsample(items, 20, seed=0, name="a") == s and subsample(items, 20, seed=1, name="a") != s
    assert subsample(items, 20, seed=0, name="b") != s
    assert [int(it.id) for it in s] == sorted(int(it.id) for it in s)
    full = subsample(items, None, seed=0)
    assert len(full) == 40 and sum(it.label == 1 for it in full) == 20  # balanced: every No-matching item, 20 Yes
    one_class = tuple(EvalItem(id=str(i), question="q", label=1) for i in range(50))
    assert len(subsample(one_class, 10, seed=0)) == 10 and subsample(one_class, None, 0) == one_class
    unlabelled = tuple(EvalItem(id=str(i), question="q", label=0) for i in range(50))
    assert len(subsample(unlabelled, 7, seed=0)) == 7


def test_persona_sets_get_distinct_balanced_draws_and_splits():
    from innerpissa.eval.suite import dataset_splits, default_datasets

    ds = [d for d in default_datasets(DATA, n_target=32, n_other=16, n_dd=8, seed=0) if d.name != "dailydilemmas"]
    patterns = set()
    for d in ds:
        lines = tuple(int(it.id.split(":")[1]) for it in d.items)
        patterns.add(lines)
        assert sum(it.label == 1 for it in d.items) == sum(it.label == -1 for it in d.items)
    assert len(patterns) == len(ds)  # no two datasets share an index pattern
    for d in ds:
        dev, test = dataset_splits([d], 0)[d.name]
        labels = [it.label for it in d.items]
        for part in (dev, test):
            assert sum(labels[i] == 1 for i in part) == sum(labels[i] == -1 for i in part)


def test_data_dir(tmp_path, monkeypatch):
    assert data_dir(DATA) == DATA
    monkeypatch.setenv("IPISSA_DATA_DIR", str(tmp_path))
    assert data_dir() == tmp_path.resolve()
    monkeypatch.setenv("IPISSA_DATA_DIR", str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="IPISSA_DATA_DIR"):
        data_dir()
    monkeypatch.delenv("IPISSA_DATA_DIR")
    monkeypatch.chdir(tmp_path)  # ../shared/data from cwd does not exist; the repo-root lookup finds it
    assert data_dir() == DATA
    with pytest.raises(FileNotFoundError):
        data_dir(tmp_path / "missing")


def test_data_dir_explains_how_to_get_data(tmp_path, monkeypatch):
    import innerpissa.eval.datasets.location as ev

    monkeypatch.delenv("IPISSA_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ev, "_repo_root", lambda: None)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(FileNotFoundError) as info:
        data_dir()
    msg = str(info.value)
    assert "kellycyy/daily_dilemmas" in msg and "anthropics/evals" in msg
    assert "ipissa fetch-data" in msg.splitlines()[0]  # the first line says how to get the data
    cache = tmp_path / "home" / ".cache" / "innerpissa" / "data"
    (cache / "dailydilemmas").mkdir(parents=True)
    assert data_dir() == cache


def test_fetch_data_downloads_the_default_files_atomically(tmp_path, monkeypatch):
    """`ipissa fetch-data` with the network replaced by a fake: every default file lands under its name, its
    URL is the original source, a failure keeps the files already fetched and leaves no partial file."""
    import io
    import urllib.error

    import innerpissa.eval.datasets.location as ev
    from innerpissa.cli import main

    names = ev.default_files()
    assert "dailydilemmas/dilemma.csv" in names and sum(n.endswith(".jsonl") for n in names) >= 10
    if SHARED_DATA.is_dir():  # the shipped list is what the suite reads from a full data folder
        have = {str(p.relative_to(SHARED_DATA)) for p in (SHARED_DATA / "anthropic_mwe" / "persona").glob("*.jsonl")}
        assert have == {n for n in names if n.endswith(".jsonl")}
    urls, offline = [], []

    def fake(url, timeout):
        urls.append(url)
        if offline and url.endswith("openness.jsonl"):
            raise urllib.error.URLError("offline")
        return io.BytesIO(b"payload of " + url.encode())

    monkeypatch.setattr(ev.urllib.request, "urlopen", fake)
    assert main(["fetch-data", "--out", str(tmp_path / "cache")]) == 0
    for n in names:
        assert (tmp_path / "cache" / n).read_bytes() == b"payload of " + ev.dataset_url(n).encode()
    assert len(urls) == len(names) and all(u.startswith("https://raw.githubusercontent.com/") for u in urls)
    assert main(["fetch-data", "--out", str(tmp_path / "cache")]) == 0 and len(urls) == len(names)  # cached
    fail = tmp_path / "fail"
    offline.append(True)
    monkeypatch.setattr(
        ev, "default_files", lambda: ["dailydilemmas/dilemma.csv", "anthropic_mwe/persona/openness.jsonl"]
    )
    with pytest.raises(ev.DataDownloadError, match="openness.jsonl"):
        ev.fetch_default_data(fail)
    assert (fail / "dailydilemmas" / "dilemma.csv").is_file()
    assert not list((fail / "anthropic_mwe" / "persona").iterdir())  # no partial file


def test_dataset_urls():
    assert dataset_url("dailydilemmas/dilemma.csv") == (
        "https://raw.githubusercontent.com/kellycyy/daily_dilemmas/main/data/dilemma.csv"
    )
    assert dataset_url("anthropic_mwe/persona/openness.jsonl") == (
        "https://raw.githubusercontent.com/anthropics/evals/main/persona/openness.jsonl"
    )
    for bad in ("other/x.csv", "../etc/passwd", "dailydilemmas/../x"):
        with pytest.raises(ValueError):
            dataset_url(bad)


ETHICS_WORDS = ("honest", "truth", "lie", "lying", "deceiv", "decept", "moral", "ethic", "should you", "cheat")


def test_neutral_texts():
    assert len(NEUTRAL_TEXTS) >= 40
    assert len(set(NEUTRAL_TEXTS)) == len(NEUTRAL_TEXTS)
    for t in NEUTRAL_TEXTS:
        assert 40 <= len(t) <= 400, t
        low = t.lower()
        assert not any(w in low for w in ETHICS_WORDS), t
