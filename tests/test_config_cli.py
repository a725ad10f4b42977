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


def test_device_option_resolves_and_refuses_missing_cuda(monkeypatch):
    import torch
    import typer

    from innerpissa.cli.common import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == "cpu" and resolve_device("cpu") == "cpu"
    with pytest.raises(typer.BadParameter, match="no CUDA device"):
        resolve_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")  # accelerate/torchrun: each process its own GPU
    assert resolve_device(None) == "cuda:3"
    res = CliRunner().invoke(app, ["train", "--help"])
    assert res.exit_code == 0 and "--device" in res.output


def test_inputs_follow_the_model_and_shifts_follow_the_hidden_states():
    import torch

    from innerpissa.hooks import on_model_device, shift_output

    model = torch.nn.Linear(2, 2).to(torch.bfloat16)
    (ids,) = on_model_device(model, torch.ones(3, dtype=torch.long))
    assert ids.device == next(model.parameters()).device
    hook = shift_output(lambda h: torch.ones(2, dtype=torch.float64))  # another dtype: cast to h's
    out = hook(None, (), torch.zeros(1, 2, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.equal(out, torch.ones(1, 2, dtype=torch.bfloat16))


def test_train_config_overrides_are_typed():
    from innerpissa.train.config import parse_overrides

    got = parse_overrides(["even_weight=10", "steps=5", "share_prefix=false", " objective = anchored"])
    assert got == {"even_weight": 10.0, "steps": 5, "share_prefix": False, "objective": "anchored"}
    assert type(got["even_weight"]) is float and type(got["steps"]) is int
    assert parse_overrides([]) == {}
