"""`ipissa ablate`: an ablation grid over adapter families, sublayers and directions with several training seeds,
on test items, resumable; on a tiny GGUF Llama."""

from __future__ import annotations

import json

import pytest
from conftest import SHARED_DATA
from tiny_gguf import tiny_llama_for_gguf, write_llama_gguf

from innerpissa.ablate import run_ablation
from innerpissa.errors import ConfigError
from innerpissa.tune import load_grid, trial_key

GRID = """
[tune]
model = "{model}"
concept = "honesty"
split = "{split}"
rungs = [0.02]
keep = 1.0
train_seeds = [0, 1]
n_target = 8
n_other = 4
coeffs = [-1, 0, 1]
baselines = []
batch_size = 16

[fixed]
"train.batch_pairs" = 4
"train.direction_pairs" = 8
"train.val_pairs" = 0
"train.basis" = "pca"
"adapter.rank" = 4

[grid]
"family,adapter.modules,train.direction" = [
  ["innerpissa", ["writers"], "mean-diff"],
  ["oft", ["writers"], "mean-diff"],
  ["lora", ["q", "up"], "fisher"],
]
"""


def _grid(tmp_path, split="test"):
    path = tmp_path / "tiny.gguf"
    if not path.is_file():
        write_llama_gguf(tiny_llama_for_gguf(), path)
    g = tmp_path / f"grid-{split}.toml"
    g.write_text(GRID.format(model=path, split=split))
    return g


@pytest.mark.slow
def test_ablation_rows_per_seed_on_test_items_and_resume(tmp_path, monkeypatch, byte_yes_no):
    grid = _grid(tmp_path)
    out, doc = tmp_path / "ablate", tmp_path / "ablations.md"
    rows = run_ablation(grid, out, SHARED_DATA, doc=doc, log=lambda *_: None)
    assert len(rows) == 6 and {(r["params"]["family"], r["train_seed"]) for r in rows} == {
        (f, s) for f in ("innerpissa", "oft", "lora") for s in (0, 1)
    }
    for r in rows:
        assert all(t["n_items"] == 4 for t in r["targets"].values())  # the test half of 8 items
        assert r["trainable_params"] > 0
    by = {(r["params"]["family"], r["train_seed"]): r for r in rows}
    assert by[("oft", 0)]["score"] != by[("oft", 1)]["score"]  # the seeds train different adapters
    summary = json.loads((out / "ablation_rows.json").read_text())
    assert len(summary) == 3 and all(g["n_seeds"] == 2 and g["ci"] is not None for g in summary)
    assert "## Over training seeds" in doc.read_text() and (out / "ablations.png").stat().st_size > 0
    g = load_grid(grid)
    assert len({trial_key(p, g.tune, s) for p in g.trials() for s in (0, 1)}) == 6
    n = len((out / "rows.jsonl").read_text().splitlines())
    run_ablation(grid, out, SHARED_DATA, log=lambda *_: None)  # finished rows are reused
    assert len((out / "rows.jsonl").read_text().splitlines()) == n


def test_ablation_needs_the_test_split_and_known_families(tmp_path):
    with pytest.raises(ConfigError, match="test items"):
        run_ablation(_grid(tmp_path, split="dev"), tmp_path / "o", SHARED_DATA)
    bad = tmp_path / "bad.toml"
    bad.write_text('[tune]\nsplit = "test"\n[fixed]\n"train.basis" = "pca"\n[grid]\nfamily = ["vera"]\n')
    with pytest.raises(ConfigError, match="family must be one of"):
        load_grid(bad)
    bad.write_text("[tune]\ntrain_seeds = []\n")
    with pytest.raises(ConfigError, match="train_seeds"):
        load_grid(bad)
