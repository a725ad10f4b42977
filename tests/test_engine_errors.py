"""Malformed GGUF files and adapter directories: the Rust engine refuses them with a Python exception that names
the field at fault, never a ``PanicException`` (which derives from BaseException and escapes ``except Exception``).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from tiny_gguf import tiny_llama_for_gguf, write_gemma3_gguf, write_llama_gguf

from innerpissa import AdapterConfig, attach, load_adapter
from innerpissa._rust import Engine


def _refused(call, *fields: str, kind: type[BaseException] = ValueError) -> str:
    """Run ``call``; assert it raises ``kind`` (an ``Exception``, not a panic) whose message holds every field."""
    try:
        call()
    except Exception as err:  # a PanicException is a BaseException: it is not caught here and fails the test
        assert type(err).__name__ != "PanicException", err
        assert isinstance(err, kind), f"{type(err).__name__}: {err}"
        for f in fields:
            assert f in str(err), f"{f!r} not named in: {err}"
        return str(err)
    pytest.fail(f"accepted; expected {kind.__name__} naming {fields}")


def _load_and_run(path) -> None:
    """Load the GGUF and run a tiny pass, so a file that loads but breaks later fails here too."""
    eng = Engine(str(path))
    eng.yes_no([[1, 2, 3, 4]], [("base",)], [5], [6])
    eng.hidden([[1, 2, 3]], [0], [("base",)])


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(the tiny Llama, a directory holding its GGUF, a valid adapter directory for it)."""
    d = tmp_path_factory.mktemp("errors")
    model = tiny_llama_for_gguf()
    write_llama_gguf(model, d / "tiny.gguf")
    attach(model, AdapterConfig(rank=8, depth_range=(0.25, None))).save(d / "adapter")
    return model, d, d / "adapter"


@pytest.mark.parametrize(
    "overrides, fields",
    [
        ({"attention.head_count": 0, "rope.dimension_count": None}, ["llama.attention.head_count", "is 0"]),
        ({"attention.head_count": 0}, ["llama.attention.head_count", "is 0"]),
        ({"attention.head_count_kv": 3}, ["llama.attention.head_count_kv", "does not divide"]),
        ({"attention.head_count_kv": 0}, ["llama.attention.head_count_kv", "is 0"]),
        (
            {"attention.head_count": 3, "attention.head_count_kv": 3, "rope.dimension_count": None},
            ["llama.embedding_length", "not a multiple"],
        ),
        ({"embedding_length": 48}, ["token_embd.weight", "llama.embedding_length = 48"]),
        ({"embedding_length": 80}, ["token_embd.weight", "llama.embedding_length = 80"]),
        ({"embedding_length": 0}, ["llama.embedding_length", "is 0"]),
        ({"embedding_length": None}, ["llama.embedding_length", "missing"]),
        ({"block_count": 6}, ["llama.block_count = 6", "block 4"]),
        ({"block_count": 0}, ["llama.block_count", "is 0"]),
        ({"feed_forward_length": 100}, ["ffn_gate.weight", "llama.feed_forward_length = 100"]),
        ({"rope.dimension_count": 12}, ["attn_q.weight", "llama.attention.head_count"]),
        ({"rope.dimension_count": 15}, ["llama.rope.dimension_count", "odd"]),
        ({"rope.freq_base": -1.0}, ["llama.rope.freq_base"]),
    ],
)
def test_malformed_llama_header_is_refused(llama, tmp_path, overrides, fields):
    path = write_llama_gguf(llama[0], tmp_path / "bad.gguf", overrides=overrides)
    _refused(lambda: _load_and_run(path), "bad.gguf", *fields)


@pytest.mark.parametrize(
    "overrides, fields",
    [
        ({"attention.key_length": 0}, ["gemma3.attention.key_length", "is 0"]),
        ({"attention.key_length": 6, "attention.value_length": 6}, ["attn_q.weight", "gemma3.attention.head_count"]),
        ({"attention.value_length": 4}, ["gemma3.attention.value_length"]),
        ({"attention.sliding_window": 0}, ["gemma3.attention.sliding_window", "is 0"]),
    ],
)
def test_malformed_gemma3_header_is_refused(tmp_path, overrides, fields):
    from conftest import tiny_gemma3

    model = tiny_gemma3(vocab_size=64, layers=2)
    write_gemma3_gguf(model, tmp_path / "good.gguf")
    _load_and_run(tmp_path / "good.gguf")  # the unmodified file is fine
    path = write_gemma3_gguf(model, tmp_path / "bad.gguf", overrides=overrides)
    _refused(lambda: _load_and_run(path), "bad.gguf", *fields)


def _adapter_copy(src, dst, config=None, tensors=None):
    """A copy of adapter directory ``src`` at ``dst``, with ``config(cfg dict)`` and ``tensors(dict of arrays)``
    applied to adapter_config.json and adapter_model.safetensors."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    if config is not None:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        config(cfg)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        t = load_file(str(dst / "adapter_model.safetensors"))
        tensors(t)
        save_file(t, str(dst / "adapter_model.safetensors"))
    return dst


def test_valid_adapter_loads(llama):
    _, d, adir = llama
    eng = Engine(str(d / "tiny.gguf"))
    names = eng.load_adapter(str(adir))
    assert names
    eng.yes_no([[1, 2, 3]], [("adapter", 1.0)], [5], [6])


def _set(key, value):
    return lambda cfg: cfg.__setitem__(key, value)


@pytest.mark.parametrize(
    "edit, fields",
    [
        (lambda cfg: cfg.pop("base_fingerprint"), ["adapter_config.json: missing field 'base_fingerprint'"]),
        (_set("base_fingerprint", "é" * 64), ["adapter_config.json: base_fingerprint", "64 lowercase hex"]),
        (_set("base_fingerprint", "0" + "é" * 63), ["adapter_config.json: base_fingerprint", "64 lowercase hex"]),
        (_set("base_fingerprint", 123), ["adapter_config.json: base_fingerprint", "must be a string"]),
        (_set("base_fingerprint", None), ["adapter_config.json: base_fingerprint", "must be a string"]),
        (_set("base_fingerprint", "0" * 64), ["another model", "fingerprint"]),
    ],
)
def test_adapter_fingerprint_is_checked_as_python_does(llama, tmp_path, edit, fields):
    model, d, adir = llama
    bad = _adapter_copy(adir, tmp_path / "ad", config=edit)
    eng = Engine(str(d / "tiny.gguf"))
    _refused(lambda: eng.load_adapter(str(bad)), *fields)
    with pytest.raises(ValueError):  # Python refuses the same directory
        load_adapter(model, bad)
    eng.load_adapter(str(adir))  # the engine is still usable


def _first(t, key):
    return next(k for k in sorted(t) if k.endswith(f".{key}"))


def _reshape(key, fn):
    def edit(t):
        k = _first(t, key)
        t[k] = np.ascontiguousarray(fn(t[k]))

    return edit


@pytest.mark.parametrize(
    "edit, fields",
    [
        (_reshape("theta", lambda a: a.reshape(-1)), ["theta", "expected [8, 8]"]),
        (_reshape("delta", lambda a: np.concatenate([a, a[:1]])), ["delta", "expected [8]"]),
        (_reshape("S", lambda a: a.reshape(-1, 1)), [".S", "expected [r]"]),
        (_reshape("U", lambda a: a[:, :5]), [".U", ".V"]),
        (_reshape("U", lambda a: a[1:]), ["U give", "another model"]),
        (_reshape("S", lambda a: np.where(np.arange(a.size) == 2, np.nan, a).astype(a.dtype)), [".S", "non-finite"]),
        (_reshape("theta", lambda a: np.full_like(a, np.inf)), ["theta", "non-finite"]),
    ],
)
def test_malformed_adapter_tensors_are_refused(llama, tmp_path, edit, fields):
    _, d, adir = llama
    bad = _adapter_copy(adir, tmp_path / "ad", tensors=edit)
    eng = Engine(str(d / "tiny.gguf"))
    _refused(lambda: eng.load_adapter(str(bad)), *fields)


def test_adapter_naming_a_writer_twice_is_refused(llama, tmp_path):
    _, d, adir = llama

    def twice(cfg):
        cfg["target_modules"] = cfg["target_modules"] + cfg["target_modules"][:1]

    bad = _adapter_copy(adir, tmp_path / "ad", config=twice)
    _refused(lambda: Engine(str(d / "tiny.gguf")).load_adapter(str(bad)), "adapter_config.json", "twice")


def test_no_panic_escapes_on_odd_calls(llama):
    """Odd but well-typed arguments on a valid engine: Python exceptions, never a panic."""
    _, d, adir = llama
    eng = Engine(str(d / "tiny.gguf"))
    with torch.no_grad():
        _refused(lambda: eng.hidden([[1, 2]], [99], [("base",)]), "capture layer 99")
        _refused(lambda: eng.token_logprobs([[1, 2]], [0, 1], [("base",)]), "start positions")
        _refused(lambda: eng.steer_matrix("x", 1.0), "no adapter")
        _refused(lambda: eng.yes_no([[1, 2]], [("adapter", 1.0)], [5], [6]), "adapter")
        _refused(lambda: eng.add_control_vector({0: np.ones(3, np.float32)}), "width")
    eng.load_adapter(str(adir))
    assert eng.token_logprobs([[1]], [0], [("base",)])[0].shape == (0,)
    assert eng.yes_no([], [("base",)], [5], [6])[0].shape == (1, 0)
