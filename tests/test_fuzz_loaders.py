"""Property-based fuzzing of the loaders a user points at their own files: any bytes in a pair file, a manifest
or an adapter config either load or raise the package's one-line error naming the file — never another
exception type (hypothesis, derandomized so CI is repeatable)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from conftest import word_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from innerpissa.adapter.config import AdapterConfig
from innerpissa.adapter.storage import read_adapter_config
from innerpissa.errors import InnerPiSSAError
from innerpissa.pairs import PairFileError, load_pairs
from innerpissa.transfer.contrasts import ManifestError, load_manifest

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
TOK = word_tokenizer(["I am honest .", "I am dishonest .", "Is it ? Yes No (A) (B)"])

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=10,
)
pair_fields = st.sampled_from(
    [
        "positive",
        "negative",
        "question",
        "answer_matching_behavior",
        "answer_not_matching_behavior",
        "prompt",
        "chosen",
        "rejected",
        "id",
        "split",
    ]
)
rows = st.dictionaries(
    pair_fields, st.one_of(json_scalars, st.sampled_from(["I am honest .", "I am dishonest ."])), max_size=5
)
lines = st.lists(st.one_of(rows.map(json.dumps), json_values.map(json.dumps), st.text(max_size=30)), max_size=6)


def _write(text: str | bytes, suffix: str) -> Path:
    f = Path(tempfile.mkdtemp()) / f"fuzz{suffix}"
    f.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    return f


@FUZZ
@given(lines)
def test_pair_loader_only_raises_its_own_error(ls):
    path = _write("\n".join(ls), ".jsonl")
    try:
        split = load_pairs(path, TOK)
    except PairFileError as e:
        assert str(e).startswith(str(path))
    else:
        assert split.train and all(p.positive != p.negative for p in split.train + split.val)


@FUZZ
@given(st.binary(max_size=200))
def test_pair_loader_survives_raw_bytes(raw):
    path = _write(raw, ".jsonl")
    try:
        load_pairs(path, TOK)
    except PairFileError as e:
        assert str(e).startswith(str(path))


manifest_rows = st.dictionaries(
    st.sampled_from(["id", "name", "place", "split", "region", "x"]), json_scalars, max_size=6
)


@FUZZ
@given(
    st.lists(st.one_of(manifest_rows.map(json.dumps), st.text(max_size=30)), max_size=6),
    st.sampled_from([".jsonl", ".csv"]),
)
def test_manifest_loader_only_raises_its_own_error(ls, suffix):
    path = _write("\n".join(ls), suffix)
    try:
        load_manifest(path)
    except ManifestError as e:
        assert str(path) in str(e)


adapter_fields = st.dictionaries(
    st.sampled_from(["rank", "depth_range", "n_layers", "modules", "scale", "rotate", "init_std", "seed", "zzz"]),
    json_values,
    max_size=6,
)


@FUZZ
@given(adapter_fields)
def test_adapter_config_from_dict_only_raises_config_error(d):
    try:
        cfg = AdapterConfig.from_dict(d, source="cfg.json")
    except InnerPiSSAError as e:
        assert str(e).startswith("cfg.json: ") and e.field
    else:
        assert cfg.rank is None or cfg.rank >= 1


@FUZZ
@given(
    st.one_of(
        json_values,
        st.fixed_dictionaries(
            {
                "format": st.sampled_from(["innerpissa", "peft", 3]),
                "format_version": json_scalars,
                "adapter": st.one_of(adapter_fields, json_scalars),
                "target_modules": json_values,
                "base_fingerprint": st.one_of(json_scalars, st.just("a" * 64)),
            }
        ).map(dict),
    )
)
def test_adapter_config_file_only_raises_adapter_errors(obj):
    d = Path(tempfile.mkdtemp())
    (d / "adapter_config.json").write_text(json.dumps(obj))
    try:
        cfg = read_adapter_config(d)
        AdapterConfig.from_dict(cfg["adapter"], source=str(d / "adapter_config.json"))
    except InnerPiSSAError as e:
        assert "adapter_config.json" in str(e)
