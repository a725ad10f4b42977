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
    first = next((tmp_path / "out").rglob("lora-seed0/summary.json")).parent.parent  # the first recipe's dir
    assert runs[1:] == ["innerpissa-seed0", "innerpissa-seed1", "lora-seed0", "lora-seed1"]
    assert runs[0].startswith("baselines-")  # beside the recipe directories, shared by every recipe
    units = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "out").rglob("summary.json")}
    target = "okay-with-deceiving-a-user-to-help-them"
    e0 = units["innerpissa-seed0"]["methods"]["innerpissa"]["datasets"][target]["effect"]
    e1 = units["innerpissa-seed1"]["methods"]["innerpissa"]["datasets"][target]["effect"]
    assert e0 != e1  # two seeds trained two adapters
    doc = (tmp_path / "results.md").read_text()
    assert "| innerpissa |" in doc and "| lora |" in doc and "| prompting |" in doc
    assert f"{e0:+.2f} / {e1:+.2f}" in doc  # each seed's effect is listed beside the pooled one
    rho = [units[f"innerpissa-seed{k}"]["methods"]["innerpissa"]["datasets"][target]["spearman"] for k in (0, 1)]
    assert (
        "ρ per seed" in doc and " / ".join("–" if x != x else f"{x:+.2f}" for x in rho) in doc
    )  # each seed's ρ, signed
    assert "pooled over seeds (innerpissa 0, 1; lora 0, 1)" in doc  # each trained method names its own seeds
    cmd = f"Command: `python scripts/results.py --models {model} --concepts honesty --methods innerpissa,lora,prompting"
    assert f"{cmd} --seeds 0 1 --steps 1`" in doc  # the table names the command that reproduces it
    pooled = (e0 + e1) / 2  # equal items in both seeds: the pooled effect is the mean of the seeds' effects
    row = next(x for x in (tmp_path / "README.md").read_text().splitlines() if f"| {target} |" in x)
    cell = row.split("|")[5].strip()  # model | concept | recipe | target | innerpissa | ...
    assert cell.startswith(f"{-pooled:+.2f} [")  # the set's expected sign is −: the README shows − × effect
    stamp = {n: (tmp_path / "out").rglob(f"{n}/summary.json").__next__().stat().st_mtime_ns for n in units}
    _load().main()  # every unit finished: nothing retrains or re-evaluates
    assert {n: next((tmp_path / "out").rglob(f"{n}/summary.json")).stat().st_mtime_ns for n in units} == stamp

    # another recipe (--set) trains its own units, reuses the baselines, and adds its section and README rows
    # beside the first recipe's instead of replacing them
    seeds = argv.index("--seeds")
    other = [*argv[: seeds + 1], "0", *argv[seeds + 3 :], "--set", "mono_weight=2"]
    monkeypatch.setattr(sys, "argv", other)
    _load().main()
    assert next((tmp_path / "out").rglob(f"{runs[0]}/summary.json")).stat().st_mtime_ns == stamp[runs[0]]
    assert len(list((tmp_path / "out").rglob("innerpissa-seed0/summary.json"))) == 2
    doc = (tmp_path / "results.md").read_text()
    assert doc.count(f"### {model} — honesty") == 2 and "--set mono_weight=2" in doc
    assert f"{e0:+.2f} / {e1:+.2f}" in doc  # the first recipe's section is kept
    rows = [x for x in (tmp_path / "README.md").read_text().splitlines() if f"| {target} |" in x]
    assert len(rows) == 2 and row in rows

    # LoRA-only overrides (--lora-set) train LoRA units of their own beside the first ones and reuse InnerPiSSA's
    # units and the baselines; the table pools the new LoRA units only and names the override in its command
    before = {p: p.stat().st_mtime_ns for p in first.glob("*/summary.json")}
    monkeypatch.setattr(sys, "argv", [*argv, "--lora-set", "lr=0.01"])
    _load().main()
    assert {p: p.stat().st_mtime_ns for p in before} == before
    new = sorted(first.glob("lora-lr0.01-seed*/train_config.json"))
    assert len(new) == 2 and all(json.loads(p.read_text())["lr"] == 0.01 for p in new)
    assert json.loads((first / "innerpissa-seed0" / "train_config.json").read_text())["lr"] != 0.01
    doc = (tmp_path / "results.md").read_text()
    assert f"{cmd} --seeds 0 1 --steps 1 --lora-set lr=0.01`" in doc and "LoRA with lr 0.01" in doc
    lora = [json.loads((p.parent / "summary.json").read_text()) for p in new]
    e = [u["methods"]["lora"]["datasets"][target]["effect"] for u in lora]
    assert f"| lora | {target} | {e[0]:+.2f} / {e[1]:+.2f} |" in doc  # the new LoRA seeds, not the first ones


def test_set_overrides_are_typed_and_bad_ones_name_the_item():
    mod = _load()
    assert mod.parse_sets(["even_weight=10", "steps=5", "share_prefix=false"]) == {
        "even_weight": 10.0,
        "steps": 5,
        "share_prefix": False,
    }
    for bad, words in (("even_weight", "FIELD=VALUE"), ("nope=1", "FIELD=VALUE"), ("steps=x", "not of type int")):
        with pytest.raises(SystemExit, match=words):
            mod.parse_sets([bad])
