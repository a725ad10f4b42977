"""Bad input, as a new user gives it: outputs never destroy user files, checkpoints never run code, resumes
honour the config, NaN/inf never becomes a result, adapter files are checked, sweeps and training validate
their arguments before compute, and the CLI answers in one line (issue 11; one test per reported case)."""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_llama, word_tokenizer
from safetensors.torch import load_file, save_file
from tiny_gguf import tiny_llama_for_gguf, write_llama_gguf

from innerpissa import AdapterConfig, attach, load_adapter
from innerpissa.adapter.model import SteeringRangeWarning
from innerpissa.adapter.storage import CONFIG_NAME, WEIGHTS_NAME, tensor_checksum
from innerpissa.cli import main
from innerpissa.errors import (
    AdapterFileError,
    ConfigError,
    NonFiniteError,
    OutputExistsError,
    ResumeMismatchError,
    TrainingDivergedError,
)
from innerpissa.outputs import atomic_dir, check_output
from innerpissa.pairs import ContrastivePair, make_honesty_pairs
from innerpissa.train import TrainConfig, train


def _pairs_and_tok(n_pairs: int = 24):
    split = make_honesty_pairs(word_tokenizer([]), n_pairs=n_pairs, seed=0, val_fraction=0.2)
    texts = [p.positive for p in split.train + split.val] + [p.negative for p in split.train + split.val]
    return split, word_tokenizer(texts)


def _randomized(model, rank: int = 4):
    adapter = attach(model, AdapterConfig(rank=rank, depth_range=(0.0, None)))
    g = torch.Generator().manual_seed(0)
    for name in adapter.target_names:
        lay = adapter.layer(name)
        lay.theta.data = torch.randn(lay.theta.shape, generator=g) * 0.05
        lay.delta.data = torch.randn(lay.delta.shape, generator=g) * 0.3 * lay.S
    return adapter


@pytest.fixture(scope="module")
def gguf_run(tmp_path_factory):
    """A tiny GGUF model on disk and a trained-looking run directory RUN = {adapter/, metrics.jsonl, notes.txt}."""
    from transformers import AutoModelForCausalLM

    d = tmp_path_factory.mktemp("gguf")
    path = write_llama_gguf(tiny_llama_for_gguf(), d / "tiny.gguf")
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file="tiny.gguf", dtype=torch.float32).eval()
    run = d / "RUN"
    adapter = attach(model, AdapterConfig(rank=4), meta={"base_model": str(path)})
    adapter.save(run / "adapter")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "notes.txt").write_text("my notes")
    return path, run, model


def _cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    cap = capsys.readouterr()
    return code, cap.out + cap.err


# --- 1. outputs never delete or overwrite what the package did not write ------------------------------------


def test_export_into_run_dir_refuses_then_keeps_unrelated_files(gguf_run, capsys, monkeypatch, tmp_path):
    _path, run, _ = gguf_run
    monkeypatch.setenv("IPISSA_CACHE", str(tmp_path / "cache"))
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    code, out = _cli(
        ["export", str(run / "adapter"), "-f", "peft", "-c", "1", "-o", str(run), "--threads", "2"], capsys
    )
    assert code == 1 and "not empty" in out and "--overwrite" in out and "Traceback" not in out
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    code, out = _cli(
        ["export", str(run / "adapter"), "-f", "peft", "-c", "1", "-o", str(run), "--overwrite", "--threads", "2"],
        capsys,
    )
    assert code == 0, out
    assert (run / "notes.txt").read_text() == "my notes" and (run / "metrics.jsonl").exists()
    assert (run / "adapter" / WEIGHTS_NAME).exists()  # the source adapter is untouched
    assert json.loads((run / "adapter_config.json").read_text())["peft_type"] == "LORA"
    for f in ("adapter_model.safetensors", "adapter_config.json", "innerpissa_export.json"):
        (run / f).unlink()


def test_export_into_the_adapter_itself_is_refused_even_with_overwrite(gguf_run, capsys):
    _, run, _ = gguf_run
    code, out = _cli(
        ["export", str(run / "adapter"), "-f", "peft", "-c", "1", "-o", str(run / "adapter"), "--overwrite"], capsys
    )
    assert code == 1 and "input directory" in out


def test_hf_export_keeps_unrelated_file(tmp_path):
    model = tiny_llama()
    adapter = _randomized(model)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    from innerpissa.export import export_merged_hf

    with pytest.raises(OutputExistsError, match="not empty"):
        export_merged_hf(adapter, None, 1.0, out)
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    export_merged_hf(adapter, None, 1.0, out, overwrite=True)
    assert (out / "mine.txt").read_text() == "keep me" and (out / "config.json").exists()


def test_atomic_dir_never_deletes(tmp_path):
    home = tmp_path / "home"
    (home / "docs").mkdir(parents=True)
    (home / "docs" / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputExistsError):
        atomic_dir(home, lambda t: (t / "a.txt").write_text("x"))
    atomic_dir(home, lambda t: (t / "a.txt").write_text("x"), overwrite=True)
    assert (home / "docs" / "thesis.tex").read_text() == "years of work" and (home / "a.txt").read_text() == "x"
    with pytest.raises(OutputExistsError, match="exists"):
        check_output(home / "a.txt", kind="file")
    # a failing fill leaves nothing behind
    with pytest.raises(RuntimeError):
        atomic_dir(tmp_path / "new", lambda t: (_ for _ in ()).throw(RuntimeError("boom")))
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob(".new.*"))


def test_single_file_exports_refuse_existing_files(tmp_path):
    from innerpissa.export import export_control_vector

    out = tmp_path / "cv.gguf"
    out.write_text("user file")
    with pytest.raises(OutputExistsError):
        export_control_vector({1: np.ones(8, dtype=np.float32)}, out, "llama")
    assert out.read_text() == "user file"


# --- 2 + 3. checkpoints load with weights_only, resumes honour their config ------------------------------------


class _Planted:
    def __reduce__(self):
        return (Path.write_text, (Path(_Planted.target), "pwned"))


def _interrupted_run(run: Path, cfg: TrainConfig, monkeypatch, stop_at: int):
    """Train until step ``stop_at`` then raise KeyboardInterrupt, as a user pressing ^C would."""
    import importlib

    tr = importlib.import_module("innerpissa.train.loop")  # the loop module (innerpissa.train is the train function)

    split, tok = _pairs_and_tok()
    real = tr._check_divergence

    def stop(loss, first, step, c):
        if step == stop_at:
            raise KeyboardInterrupt
        real(loss, first, step, c)

    monkeypatch.setattr(tr, "_check_divergence", stop)
    adapter = attach(tiny_llama(vocab_size=len(tok)), AdapterConfig(rank=4))
    with pytest.raises(KeyboardInterrupt):
        train(adapter, tok, list(split.train), list(split.val), cfg, run_dir=run, progress=False)
    monkeypatch.setattr(tr, "_check_divergence", real)
    return split, tok


def test_planted_pickle_never_runs(tmp_path, monkeypatch):
    cfg = TrainConfig(steps=4, batch_pairs=4, val_every=100, checkpoint_every=2)
    run = tmp_path / "run"
    split, tok = _interrupted_run(run, cfg, monkeypatch, stop_at=3)
    assert (run / "checkpoint" / "state.pt").exists()
    _Planted.target = str(tmp_path / "pwned.txt")
    with open(run / "checkpoint" / "state.pt", "wb") as f:
        pickle.dump({"step": _Planted()}, f)
    adapter = attach(tiny_llama(vocab_size=len(tok)), AdapterConfig(rank=4))
    with pytest.raises(pickle.UnpicklingError):
        train(adapter, tok, list(split.train), list(split.val), cfg, run_dir=run, progress=False)
    assert not (tmp_path / "pwned.txt").exists()
    # and a planted pickle in a directory that is not a run is not even opened
    other = tmp_path / "other"
    (other / "checkpoint").mkdir(parents=True)
    shutil.copy(run / "checkpoint" / "state.pt", other / "checkpoint" / "state.pt")
    with pytest.raises(OutputExistsError, match="no innerpissa run"):
        train(
            attach(tiny_llama(vocab_size=len(tok)), AdapterConfig(rank=4)),
            tok,
            list(split.train),
            list(split.val),
            cfg,
            run_dir=other,
            progress=False,
        )
    assert not (tmp_path / "pwned.txt").exists()


def test_no_unsafe_unpickling_in_package():
    src = Path(__file__).resolve().parents[1] / "python"
    out = subprocess.run(["grep", "-rn", r"weights_only=False\|pickle", str(src)], capture_output=True, text=True)
    assert out.stdout == "", out.stdout


def test_resume_refuses_other_config_and_data(tmp_path, monkeypatch):
    cfg = TrainConfig(steps=4, batch_pairs=4, val_every=100, checkpoint_every=2)
    run = tmp_path / "run"
    split, tok = _interrupted_run(run, cfg, monkeypatch, stop_at=3)
    model = tiny_llama(vocab_size=len(tok))
    swapped = [dataclasses.replace(p, positive=p.negative, negative=p.positive) for p in split.train]
    with pytest.raises(ResumeMismatchError, match="train_pairs_sha256"):
        train(attach(model, AdapterConfig(rank=4)), tok, swapped, list(split.val), cfg, run_dir=run, progress=False)
    with pytest.raises(ResumeMismatchError, match=r"steps: 4 -> 1"):
        train(
            attach(model, AdapterConfig(rank=4)),
            tok,
            list(split.train),
            list(split.val),
            TrainConfig(steps=1, batch_pairs=4, val_every=100, checkpoint_every=2),
            run_dir=run,
            progress=False,
        )
    with pytest.raises(ResumeMismatchError, match=r"rank: 4 -> 8"):
        train(
            attach(model, AdapterConfig(rank=8)),
            tok,
            list(split.train),
            list(split.val),
            cfg,
            run_dir=run,
            progress=False,
        )
    with pytest.raises(ResumeMismatchError, match=r"seed: 0 -> 1"):
        train(
            attach(model, AdapterConfig(rank=4)),
            tok,
            list(split.train),
            list(split.val),
            TrainConfig(steps=4, batch_pairs=4, val_every=100, checkpoint_every=2, seed=1),
            run_dir=run,
            progress=False,
        )
    # the matching config resumes; metrics hold each step once; the finished run is not resumed silently
    train(
        attach(model, AdapterConfig(rank=4)), tok, list(split.train), list(split.val), cfg, run_dir=run, progress=False
    )
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(x)]
    assert steps == [1, 2, 3, 4]
    with pytest.raises(OutputExistsError, match="finished run"):
        train(
            attach(model, AdapterConfig(rank=4)),
            tok,
            list(split.train),
            list(split.val),
            cfg,
            run_dir=run,
            progress=False,
        )
    (run / "notes.txt").write_text("mine")
    train(
        attach(model, AdapterConfig(rank=8)),
        tok,
        list(split.train),
        list(split.val),
        cfg,
        run_dir=run,
        progress=False,
        overwrite=True,
    )
    assert (run / "notes.txt").read_text() == "mine"
    assert json.loads((run / "adapter" / CONFIG_NAME).read_text())["adapter"]["rank"] == 8
    assert len([x for x in (run / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(x)]) == 4


def test_interrupted_resume_is_exact(tmp_path, monkeypatch):
    cfg = TrainConfig(steps=4, batch_pairs=4, lr=1e-2, val_every=100, checkpoint_every=2)
    split, tok = _interrupted_run(tmp_path / "a", cfg, monkeypatch, stop_at=4)
    model = tiny_llama(vocab_size=len(tok))
    resumed = attach(model, AdapterConfig(rank=4))
    train(resumed, tok, list(split.train), list(split.val), cfg, run_dir=tmp_path / "a", progress=False)
    full = attach(model, AdapterConfig(rank=4))
    train(full, tok, list(split.train), list(split.val), cfg, run_dir=tmp_path / "b", progress=False)
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), n


# --- 5. NaN and inf never pass ----------------------------------------------------------------------------


def test_non_finite_coefficients_are_refused():
    model = tiny_llama()
    adapter = _randomized(model)
    before = {n: p.clone() for n, p in model.named_parameters()}
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(NonFiniteError):
            with adapter.steer(bad):
                pass
        with pytest.raises(NonFiniteError):
            adapter.merge(bad)
        with pytest.raises(NonFiniteError):
            with adapter.steer(torch.tensor([0.0, bad])):
                pass
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_merge_unmerge_is_bit_exact_and_warns_far_out_of_range():
    model = tiny_llama()
    adapter = _randomized(model)
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.warns(SteeringRangeWarning, match="outside the trained range"):
        adapter.merge(1e6)
    assert not all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    adapter.unmerge()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapter.merge(2.0)  # inside 2x the trained range: no warning
        adapter.unmerge()
    with pytest.raises(NonFiniteError, match="non-finite"), pytest.warns(SteeringRangeWarning):
        adapter.merge(1e300)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_nan_adapter_is_an_error_not_a_result(tmp_path):
    from innerpissa.eval import AdapterMethod, TorchEngine, run_suite
    from innerpissa.eval.datasets import EvalDataset, EvalItem

    tok = word_tokenizer(["Is the sky blue ? Answer yes or no", "The cat sat on the mat ."])
    model = tiny_llama(vocab_size=len(tok))
    adapter = _randomized(model)
    adapter.layer(adapter.target_names[0]).delta.data[0] = float("nan")
    with pytest.raises(NonFiniteError, match="lower the learning rate"):
        adapter.save(tmp_path / "nan")
    items = tuple(EvalItem(id=f"q{i}", question="Is the sky blue ?", label=1 if i % 2 else -1) for i in range(8))
    ds = EvalDataset(name="toy", kind="yesno", items=items, source="test")
    with pytest.raises(NonFiniteError, match="innerpissa"):
        run_suite(TorchEngine(model, tok), [AdapterMethod(adapter, coeffs=(-1.0, 0.0, 1.0))], [ds], progress=False)


def test_nan_tensor_in_adapter_file_is_refused(tmp_path):
    model = tiny_llama()
    adapter = _randomized(model)
    adapter.save(tmp_path / "ad")
    tensors = load_file(str(tmp_path / "ad" / WEIGHTS_NAME))
    name = next(k for k in tensors if k.endswith(".delta"))
    tensors[name][0] = float("nan")
    save_file(tensors, str(tmp_path / "ad" / WEIGHTS_NAME))
    cfg = json.loads((tmp_path / "ad" / CONFIG_NAME).read_text())
    cfg["tensor_sha256"] = tensor_checksum(tensors)  # a consistent file, just with NaN inside
    (tmp_path / "ad" / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(NonFiniteError, match=name):
        load_adapter(model, tmp_path / "ad")


def test_results_json_is_strict(tmp_path):
    from innerpissa.eval.report import strict_json

    text = json.dumps(strict_json({"a": [1.0, float("nan")], "b": {"c": float("inf")}}), allow_nan=False)
    assert json.loads(text) == {"a": [1.0, None], "b": {"c": None}}


def test_cli_refuses_nan_coefficients_before_loading(capsys, tmp_path):
    for args in (
        ["generate", "hi", "--coeff", "nan"],
        ["generate", "hi", "--coeff", "inf"],
        ["export", str(tmp_path), "-f", "peft", "-c", "nan", "-o", str(tmp_path / "o")],
        ["sweep", "--adapter", str(tmp_path), "--coeffs", "-1,0,1,nan"],
    ):
        code, out = _cli(args, capsys)
        assert code == 1 and "finite" in out and "Traceback" not in out, (args, out)


# --- 6. adapter files are checked ---------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    model = tiny_llama()
    _randomized(model).save(tmp_path / "ad")
    return model, tmp_path / "ad"


def _edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / CONFIG_NAME).read_text())
    for k, v in changes.items():
        if "." in k:
            outer, inner = k.split(".")
            cfg[outer][inner] = v
        else:
            cfg[k] = v
    (d / CONFIG_NAME).write_text(json.dumps(cfg))


def test_bit_flip_is_caught_by_the_checksum(saved):
    model, d = saved
    raw = bytearray((d / WEIGHTS_NAME).read_bytes())
    raw[-3] ^= 0x40  # a flipped exponent bit in the last tensor's data
    (d / WEIGHTS_NAME).write_bytes(bytes(raw))
    with pytest.raises(AdapterFileError, match="checksum"):
        load_adapter(model, d)


@pytest.mark.parametrize("size", [0, 7, 100])
def test_empty_or_truncated_weights_name_the_file(saved, size):
    model, d = saved
    raw = (d / WEIGHTS_NAME).read_bytes()
    (d / WEIGHTS_NAME).write_bytes(raw[:size])
    with pytest.raises(AdapterFileError, match=WEIGHTS_NAME):
        load_adapter(model, d)


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"format_version": 99}, "format_version"),
        ({"format_version": "1"}, "format_version"),
        ({"format": "peft"}, "format"),
        ({"loss": {"name": "reprpo-svd", "version": 99}}, "loss"),
        ({"adapter.rank": "4"}, "rank"),
        ({"adapter.rotate": "false"}, "rotate"),
        ({"adapter.depth_range": [0.5]}, "depth_range"),
        ({"adapter.scale": "quadratic"}, "scale"),
        ({"adapter.bogus": 1}, "bogus"),
        ({"target_modules": "model.layers.1.mlp.down_proj"}, "target_modules"),
        ({"base_fingerprint": "é" * 64}, "base_fingerprint"),
    ],
)
def test_malformed_config_names_file_and_field(saved, changes, field):
    model, d = saved
    _edit_config(d, **changes)
    with pytest.raises((AdapterFileError, ConfigError)) as err:
        load_adapter(model, d)
    assert CONFIG_NAME in str(err.value) and field in str(err.value)


def test_broken_json_and_wrong_shapes(saved):
    model, d = saved
    good = (d / CONFIG_NAME).read_text()
    (d / CONFIG_NAME).write_text(good[:-10])
    with pytest.raises(AdapterFileError, match=f"{CONFIG_NAME}.*not valid JSON"):
        load_adapter(model, d)
    (d / CONFIG_NAME).write_text(good)
    tensors = load_file(str(d / WEIGHTS_NAME))
    name = next(k for k in tensors if k.endswith(".theta"))
    tensors[name] = torch.zeros(3, 3)
    save_file(tensors, str(d / WEIGHTS_NAME))
    _edit_config(d, tensor_sha256=tensor_checksum(tensors))
    with pytest.raises(AdapterFileError, match=r"theta has shape \(3, 3\)"):
        load_adapter(model, d)


def test_attach_does_not_mutate_config_and_rejects_bad_types():
    cfg = AdapterConfig()
    attach(tiny_llama(), cfg)
    assert cfg.rank is None
    for bad in (
        {"rank": 0},
        {"rank": 2.5},
        {"rotate": 1},
        {"modules": "attn"},
        {"depth_range": (0.9, 0.1)},
        {"init_std": float("nan")},
    ):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            AdapterConfig(**bad)


# --- 7. sweeps validate before compute ----------------------------------------------------------------------


def test_sweep_arguments_are_checked_first(capsys, tmp_path):
    from innerpissa.eval import check_sweep_coeffs

    assert check_sweep_coeffs([1, -1]) == (-1.0, 0.0, 1.0)
    for coeffs in ("1,2", "0,1,2"):
        code, out = _cli(["sweep", "--adapter", str(tmp_path), "--coeffs", coeffs], capsys)
        assert code == 1 and "opposite sign" in out, out
    code, out = _cli(["sweep", "--adapter", str(tmp_path), "--methods", "innerpisa"], capsys)
    assert code == 1 and "unknown method" in out and "innerpisa" in out
    code, out = _cli(["eval", "--adapter", str(tmp_path), "--methods", "innerpissa,pcaa"], capsys)
    assert code == 1 and "pcaa" in out


# --- 8. training configs, numerics and inputs ---------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        {"steps": 0},
        {"steps": -5},
        {"batch_pairs": 0},
        {"lr": 0.0},
        {"lr": float("nan")},
        {"loss_layer": 1.5},
        {"steps": 2.5},
    ],
)
def test_train_config_ranges(kw):
    with pytest.raises(ConfigError, match=next(iter(kw))):
        TrainConfig(**kw)


def test_diverging_training_stops_without_saving(tmp_path):
    split, tok = _pairs_and_tok()
    adapter = attach(tiny_llama(vocab_size=len(tok)), AdapterConfig(rank=4))
    cfg = TrainConfig(steps=20, batch_pairs=4, lr=1e6, val_every=100, checkpoint_every=100)
    with pytest.raises(TrainingDivergedError, match="lower --lr"):
        train(adapter, tok, list(split.train), list(split.val), cfg, run_dir=tmp_path, progress=False)
    assert not (tmp_path / "adapter").exists()


def test_divergence_guard_reads_the_objective_without_the_answer_bias_term():
    from innerpissa.train.loop import _check_divergence

    cfg = TrainConfig()  # max_loss_factor 100
    # the answer-bias penalty (in "loss", not in "objective_loss") may be large while the objective is sane
    _check_divergence({"loss": 279.0, "objective_loss": 1.2, "guard": 27.8}, 2.4, 26, cfg)
    with pytest.raises(TrainingDivergedError, match=r"loss 300 \(first step 2.4, limit 240; sep 0.5, coh 62\)"):
        _check_divergence({"loss": 300.0, "objective_loss": 300.0, "sep": 0.5, "coh": 62.0}, 2.4, 5, cfg)
    with pytest.raises(TrainingDivergedError, match="loss nan"):
        _check_divergence({"objective_loss": float("nan")}, 2.4, 5, cfg)
    _check_divergence({"objective_loss": 300.0}, 2.4, 5, TrainConfig(max_loss_factor=1000.0))


def test_whitespace_only_pairs_are_rejected_with_line_numbers(tmp_path):
    from innerpissa.pairs import PairFileError, load_pairs

    tok = word_tokenizer(["I am honest .", "I am dishonest ."])
    f = tmp_path / "p.jsonl"
    f.write_text(
        json.dumps({"positive": "I am honest .", "negative": "I am dishonest ."})
        + "\n"
        + json.dumps({"positive": "I am  honest .", "negative": "I am honest ."})
        + "\n"
    )
    with pytest.raises(PairFileError, match=r"p\.jsonl:2: .*tokenize identically"):
        load_pairs(f, tok)
    from innerpissa.train import check_pairs_differ

    with pytest.raises(ConfigError, match=r"pairs \[1\]"):
        check_pairs_differ(
            tok,
            [ContrastivePair("I am honest .", "I am dishonest ."), ContrastivePair("I am honest .", " I am honest .")],
        )


def test_encoder_configured_as_decoder_is_refused():
    from transformers import BertConfig, BertLMHeadModel

    from innerpissa import UnsupportedArchitectureError

    bert = BertLMHeadModel(
        BertConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=64,
            is_decoder=True,
        )
    )
    with pytest.raises(UnsupportedArchitectureError, match="is_decoder"):
        attach(bert)


def test_gguf_cache_is_keyed_on_content(tmp_path, monkeypatch):
    import os

    from innerpissa.models import _gguf_cache_dir

    monkeypatch.setenv("IPISSA_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"A" * 1000)
    st = f.stat()
    first = _gguf_cache_dir(f)
    f.write_bytes(b"B" * 1000)  # same size, same (restored) mtime: a stale key before
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert _gguf_cache_dir(f) != first


# --- 9. the CLI answers in one line --------------------------------------------------------------------------


def test_cli_errors_are_one_line_and_debug_shows_traceback(tmp_path):
    bad = tmp_path / "missing-adapter"
    cmd = [sys.executable, "-m", "innerpissa.cli", "eval", "--adapter", str(bad)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(bad) in lines[0], res.stderr
    res = subprocess.run(cmd + ["--debug"], capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "Traceback" in res.stderr


def test_cli_run_dir_checks_come_before_compute(tmp_path, capsys):
    (tmp_path / "x.txt").write_text("mine")
    code, out = _cli(["train", "--out", str(tmp_path), "--steps", "2"], capsys)
    assert code == 1 and "no innerpissa run" not in out and "not empty" in out
    code, out = _cli(["train", "--out", str(tmp_path / "new"), "--steps", "0"], capsys)
    assert code == 1 and "steps" in out


@pytest.mark.parametrize(
    "cmd, item, words",
    [
        ("train", "nope=1", "expected FIELD=VALUE"),
        ("train", "even_weight", "expected FIELD=VALUE"),
        ("train", "steps=x", "not of type int"),
        ("run", "even_weight=-1", "even_weight must be >= 0"),
        ("run", "share_prefix=maybe", "not of type bool"),
    ],
)
def test_cli_set_errors_name_the_item_before_compute(tmp_path, capsys, cmd, item, words):
    code, out = _cli([cmd, "--out", str(tmp_path / "new"), "--set", item], capsys)
    assert code == 1 and words in out and len(out.strip().splitlines()) == 1, out
    assert not (tmp_path / "new").exists()  # nothing was written


def test_cli_set_reaches_the_training_config(tmp_path, capsys):
    from test_distributed import _tiny_model_dir

    model = _tiny_model_dir(tmp_path / "tiny")
    argv = ["train", "--model", str(model), "--steps", "1", "--batch-pairs", "4", "--n-pairs", "40", "--threads", "1"]
    sets = ["--set", "even_weight=3", "--set", "lr=0.02"]
    code, out = _cli([*argv, "--lr", "1e-2", *sets, "--out", str(tmp_path / "r")], capsys)
    assert code == 0, out
    saved = json.loads((tmp_path / "r" / "train_config.json").read_text())
    assert saved["even_weight"] == 3.0 and saved["lr"] == 0.02  # --set wins over the named --lr
