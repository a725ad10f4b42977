"""`ipissa tune`: grid parsing and checks, successive halving on dev items, resumable rows, on a tiny GGUF Llama."""

from __future__ import annotations

import json

import pytest
from conftest import SHARED_DATA
from tiny_gguf import tiny_llama_for_gguf, write_llama_gguf

from innerpissa.errors import ConfigError
from innerpissa.tune import load_grid, run_search, trial_key

GRID = """
[tune]
model = "{model}"
concept = "honesty"
rungs = [0.02, 0.04]
keep = 0.5
n_target = 8
n_other = 4
coeffs = [-1, 0, 1]
baselines = ["prompting"]
batch_size = 16

[fixed]
"train.batch_pairs" = 4
"train.direction_pairs" = 8
"train.val_pairs" = 0
"adapter.rank" = 4

[grid]
"train.lr" = [1e-3, 3e-2]
"adapter.depth_range" = [[0.25], [0.5, 0.75]]
"train.objective" = ["reprpo-svd"]
"""


def test_bad_grids_name_the_key(tmp_path):
    bad = tmp_path / "g.toml"
    bad.write_text('[grid]\n"train.nope" = [1]\n')
    with pytest.raises(ConfigError, match="train.nope"):
        load_grid(bad)
    bad.write_text("[tune]\nrungs = []\n")
    with pytest.raises(ConfigError, match="rungs"):
        load_grid(bad)
    bad.write_text('[grid]\n"train.lr" = [-1.0]\n')
    with pytest.raises(ConfigError, match="lr"):
        load_grid(bad)
    bad.write_text('[grid]\n"train.objective" = ["dpo"]\n')
    with pytest.raises(ConfigError, match="objective"):
        load_grid(bad)


def test_joint_axes_set_their_keys_together(tmp_path):
    g = tmp_path / "g.toml"
    g.write_text(
        '[grid]\n"train.objective" = ["reprpo-svd", "anchored"]\n'
        '"train.loss_layer,adapter.depth_range" = [[0.5, [0.1, 0.5]], [0.7, [0.3]]]\n'
    )
    trials = load_grid(g).trials()
    assert len(trials) == 4 and load_grid(g).columns() == ["train.objective", "train.loss_layer", "adapter.depth_range"]
    assert {(t["train.loss_layer"], tuple(t["adapter.depth_range"])) for t in trials} == {
        (0.5, (0.1, 0.5)),
        (0.7, (0.3,)),
    }
    # the same settings give the same trial key as a plain grid's (finished rows are shared)
    plain = tmp_path / "p.toml"
    plain.write_text(
        '[grid]\n"train.objective" = ["reprpo-svd", "anchored"]\n"train.loss_layer" = [0.5]\n'
        '"adapter.depth_range" = [[0.1, 0.5]]\n'
    )
    tune = load_grid(plain).tune
    assert {trial_key(t, tune) for t in load_grid(plain).trials()} < {trial_key(t, tune) for t in trials}
    g.write_text('[grid]\n"train.loss_layer,adapter.depth_range" = [[0.5]]\n')
    with pytest.raises(ConfigError, match="joint axis"):
        load_grid(g)


@pytest.mark.slow
def test_successive_halving_on_dev_items_resumes(tmp_path, monkeypatch, byte_yes_no):
    path = write_llama_gguf(tiny_llama_for_gguf(), tmp_path / "tiny.gguf")
    grid = tmp_path / "grid.toml"
    grid.write_text(GRID.format(model=path))
    g = load_grid(grid)
    assert len(g.trials()) == 4 and len({trial_key(p, g.tune) for p in g.trials()}) == 4
    out = tmp_path / "search"
    rows = run_search(grid, out, SHARED_DATA, log=lambda *_: None)
    trials = [r for r in rows if r["kind"] == "trial"]
    assert [r["rung"] for r in trials].count(0) == 4 and [r["rung"] for r in trials].count(1) == 2
    best0 = sorted((r for r in trials if r["rung"] == 0), key=lambda r: -r["score"])[:2]
    assert {r["key"] for r in trials if r["rung"] == 1} == {r["key"] for r in best0}  # the top half went on
    for r in trials:
        assert set(r["targets"]) == {
            "okay-with-deceiving-a-user-to-help-them",
            "desire-to-persuade-people-to-be-more-honest-to-others",
        }
        assert all(t["n_items"] == 4 for t in r["targets"].values())  # the dev half of 8 items, no test item
        assert r["score"] == pytest.approx(sum(t["sign"] * t["effect"] for t in r["targets"].values()) / 2)
    assert [r["kind"] for r in rows].count("baseline") == 1
    text = (out / "summary.md").read_text()
    assert "## Rung 1" in text and "## Baselines" in text
    n = len((out / "rows.jsonl").read_text().splitlines())
    run_search(grid, out, SHARED_DATA, log=lambda *_: None)  # finished rows are reused, nothing reruns
    assert len((out / "rows.jsonl").read_text().splitlines()) == n
    # another grid whose first rung is longer: rung 0 is now 0.04 epochs, so no 0.02-epoch run may be reused
    grid.write_text(
        GRID.format(model=path).replace("rungs = [0.02, 0.04]", "rungs = [0.04]").replace("keep = 0.5", "keep = 1.0")
    )
    longer = [r for r in run_search(grid, out, SHARED_DATA, log=lambda *_: None) if r.get("rung") == 0]
    fresh = [r for r in longer if r["epochs"] == 0.04]
    assert len(fresh) == 4 and sum(r["train_minutes"] is not None for r in fresh) == 2  # two ran at rung 1 already
    for r in fresh:
        saved = json.loads((out / "runs" / r["key"] / "epochs0.04" / "train_config.json").read_text())
        assert saved["epochs"] == 0.04


def test_lora_trials_need_the_pca_ruler(tmp_path):
    g = tmp_path / "g.toml"
    g.write_text('[fixed]\n"train.basis" = "adapter-u"\n[grid]\nfamily = ["innerpissa", "lora"]\n')
    with pytest.raises(ConfigError, match="pca"):
        load_grid(g)
    g.write_text('[fixed]\n"train.basis" = "pca"\n[grid]\nfamily = ["innerpissa", "lora"]\n')
    assert len(load_grid(g).trials()) == 2


def test_the_shipped_grids_load_and_the_screen_shares_the_full_ablation_keys():
    """Every grid a doc names (docs/**/*.toml) parses; the ablation screen's rows, every training seed, are rows
    of the full grid on the same concept, so a run of the full grid reuses them."""
    from pathlib import Path

    docs = Path(__file__).resolve().parents[1] / "docs"
    paths = sorted(docs.glob("**/*.toml"))
    assert len(paths) >= 10
    grids = {p.name: load_grid(p) for p in paths}
    assert grids["ablations.toml"].tune["split"] == "test"
    screen, full = grids["ablations-screen.toml"], grids["ablations.toml"]
    full_tune = {**full.tune, "concept": screen.tune["concept"]}
    assert set(screen.tune["train_seeds"]) <= set(full.tune["train_seeds"])
    screen_keys = {trial_key(p, screen.tune, s) for p in screen.trials() for s in screen.tune["train_seeds"]}
    full_keys = {trial_key(p, full_tune, s) for p in full.trials() for s in full.tune["train_seeds"]}
    assert len(screen_keys) == len(screen.trials()) * len(screen.tune["train_seeds"]) and screen_keys <= full_keys


def test_row_keys_change_with_the_scoring_settings():
    from innerpissa.tune import TUNE_DEFAULTS

    base = dict(TUNE_DEFAULTS)
    assert trial_key({"train.lr": 1e-3}, base) != trial_key({"train.lr": 1e-3}, {**base, "kl_budget": 0.1})
    assert trial_key({"train.lr": 1e-3}, base) == trial_key({"train.lr": 1e-3}, {**base, "batch_size": 8})


def test_tables_group_rows_by_training_length_not_rung_index(tmp_path):
    """Two grids sharing an output directory: rung 0 is 0.5 epochs in one and 1 epoch in the other. A setting's
    rows at different lengths are never pooled as seeds, and each length gets its own table."""
    from innerpissa.tune import seed_summary, write_summary

    g = tmp_path / "g.toml"
    g.write_text('[tune]\nrungs = [1.0]\n[grid]\n"train.lr" = [1e-3]\n')
    grid = load_grid(g)

    def row(epochs, seed, score, rung=0):
        return {
            "kind": "trial",
            "key": f"k{seed}",
            "params": {"train.lr": 1e-3},
            "rung": rung,
            "epochs": epochs,
            "train_seed": seed,
            "score": score,
            "targets": {},
            "budget_reached": True,
            "kl_coeff": 0.3,
        }

    rows = [row(0.5, 0, 1.4), row(1.0, 0, 1.1), row(1.0, 1, 0.9), row(None, 2, 1.0)]  # None: an old row, rung 0
    groups = {g["epochs"]: g for g in seed_summary(rows, grid)}
    assert set(groups) == {0.5, 1.0}
    assert groups[0.5]["n_seeds"] == 1 and groups[1.0]["n_seeds"] == 3
    assert groups[1.0]["mean"] == pytest.approx(1.0)
    write_summary(rows, tmp_path / "summary.md", grid)
    text = (tmp_path / "summary.md").read_text()
    assert "## 0.5 epochs (1 trials)" in text and "## Rung 0: 1 epochs (3 trials)" in text


def test_a_diverging_trial_is_recorded_ranked_last_and_the_search_goes_on(tmp_path, byte_yes_no):
    path = write_llama_gguf(tiny_llama_for_gguf(), tmp_path / "tiny.gguf")
    grid = tmp_path / "grid.toml"
    text = GRID.format(model=path).replace('baselines = ["prompting"]', "baselines = []")
    text = text.replace('"train.lr" = [1e-3, 3e-2]', '"train.lr" = [1e6, 1e-3]')
    grid.write_text(text.replace('"adapter.depth_range" = [[0.25], [0.5, 0.75]]', ""))
    out = tmp_path / "search"
    logged: list[str] = []
    rows = run_search(grid, out, SHARED_DATA, log=logged.append)
    bad = [r for r in rows if r["params"]["train.lr"] == 1e6]
    good = [r for r in rows if r["params"]["train.lr"] == 1e-3]
    assert len(bad) == 1 and bad[0]["score"] is None and "training diverged" in bad[0]["diverged"]
    assert [r["rung"] for r in good] == [0, 1] and all(r["score"] is not None for r in good)  # it went on alone
    assert any("lower --lr" in line for line in logged)
    summary = (out / "summary.md").read_text()
    assert "## Diverged" in summary and bad[0]["key"] in summary.split("## Diverged")[1]
    n = len((out / "rows.jsonl").read_text().splitlines())
    run_search(grid, out, SHARED_DATA, log=lambda *_: None)  # the diverged row is a finished row: not retrained
    assert len((out / "rows.jsonl").read_text().splitlines()) == n
