"""scripts/results.py end to end on a tiny GGUF Llama: seeds pool, units resume, the doc and README table are built."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from conftest import SHARED_DATA
from tiny_gguf import tiny_llama_for_gguf, write_llama_gguf

pytestmark = pytest.mark.slow  # the real-model / end-to-end tier (README's second test command)

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "results.py"


def _load():
    spec = importlib.util.spec_from_file_location("results_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_results_pools_training_seeds_and_reuses_finished_units(tmp_path, monkeypatch, byte_yes_no):
    model = write_llama_gguf(tiny_llama_for_gguf(), tmp_path / "tiny.gguf")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "README.md").write_text("x\n<!-- results-table -->\nold\n<!-- /results-table -->\ny\n")
    argv = [
        "results.py",
        "--models",
        str(model),
        "--concepts",
        "honesty",
        "--methods",
        "innerpissa,lora,prompting",
        "--seeds",
        "0",
        "1",
        "--steps",
        "1",
        "--n-target",
        "8",
        "--n-other",
        "4",
        "--n-dd",
        "4",
        "--batch-size",
        "16",
        "--data-dir",
        str(SHARED_DATA),
        "--out",
        "out",
        "--doc",
        "results.md",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    _load().main()
    runs = sorted(p.parent.name for p in (tmp_path / "out").rglob("summary.json"))
    assert runs == ["baselines", "innerpissa-seed0", "innerpissa-seed1", "lora-seed0", "lora-seed1"]
    units = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "out").rglob("summary.json")}
    target = "okay-with-deceiving-a-user-to-help-them"
    e0 = units["innerpissa-seed0"]["methods"]["innerpissa"]["datasets"][target]["effect"]
    e1 = units["innerpissa-seed1"]["methods"]["innerpissa"]["datasets"][target]["effect"]
    assert e0 != e1  # two seeds trained two adapters
    doc = (tmp_path / "results.md").read_text()
    assert "| innerpissa |" in doc and "| lora |" in doc and "| prompting |" in doc
    assert f"{e0:+.2f} / {e1:+.2f}" in doc  # each seed's effect is listed beside the pooled one
    pooled = (e0 + e1) / 2  # equal items in both seeds: the pooled effect is the mean of the seeds' effects
    row = next(x for x in (tmp_path / "README.md").read_text().splitlines() if f"| {target} |" in x)
    cell = row.split("|")[4].strip()  # model | concept | target | innerpissa | ...
    assert cell.startswith(f"{-pooled:+.2f} [")  # the set's expected sign is −: the README shows − × effect
    stamp = {n: (tmp_path / "out").rglob(f"{n}/summary.json").__next__().stat().st_mtime_ns for n in units}
    _load().main()  # every unit finished: nothing retrains or re-evaluates
    assert {n: next((tmp_path / "out").rglob(f"{n}/summary.json")).stat().st_mtime_ns for n in units} == stamp
