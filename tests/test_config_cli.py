"""EvalConfig (the evaluator's one settings object), the CLI's enum choices, and the package data files."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from innerpissa.cli import app
from innerpissa.datafiles import data_path, read_data
from innerpissa.errors import ConfigError
from innerpissa.eval.config import EngineChoice, EvalConfig, WeightsChoice
from innerpissa.pairs import SUFFIXES
from innerpissa.transfer.contrasts import TOUR_GUIDE, ContrastTemplate


def test_eval_config_validates_and_normalises():
    cfg = EvalConfig(methods="innerpissa,pca", engine="rust", weights="q8_0").validate()
    assert cfg.methods == ("innerpissa", "pca")
    assert cfg.engine is EngineChoice.rust and cfg.weights is WeightsChoice.q8_0


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"methods": "innerpissa,pcaa"}, "methods"),
        ({"kl_budget": 0.0}, "kl_budget"),
        ({"engine": "cuda"}, "engine"),
        ({"weights": "q4"}, "weights"),
        ({"batch_size": 0}, "batch_size"),
        ({"n_dd": -1}, "n_dd"),
        ({"n_target": 2.5}, "n_target"),
    ],
)
def test_eval_config_rejects_bad_fields_naming_them(kw, field):
    with pytest.raises(ConfigError) as e:
        EvalConfig(**kw).validate()
    assert e.value.field == field


def test_eval_config_reads_truthfulqa_before_any_model(tmp_path):
    bad = tmp_path / "tqa.csv"
    bad.write_text("not,a,truthfulqa\n1,2,3\n")
    with pytest.raises(Exception, match="tqa.csv"):
        EvalConfig(truthfulqa=bad).validate()


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "--adapter", "nowhere", "--engine", "cuda"],
        ["eval", "--adapter", "nowhere", "--weights", "q4"],
        ["export", "nowhere", "-f", "tflite", "-c", "1", "-o", "x"],
    ],
)
def test_cli_choices_are_enums(argv):
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 2  # click's usage error, before anything is read
    assert "is not one of" in res.output


def test_package_data_files_load():
    suffixes = read_data("suffixes.json")
    flat = [s for g in suffixes["groups"] for s in g["suffixes"]]
    assert tuple(flat) == SUFFIXES and len(SUFFIXES) == len(set(SUFFIXES)) >= 200
    assert all(g["topic"] for g in suffixes["groups"])
    raw = json.loads(data_path("tour_guide_template.json").read_text(encoding="utf-8"))
    assert set(raw["contrasts"]) == set(TOUR_GUIDE.contrasts)
    assert ContrastTemplate.from_file(data_path("tour_guide_template.json")) == TOUR_GUIDE
    with pytest.raises(FileNotFoundError):
        read_data("no_such_file.json")
