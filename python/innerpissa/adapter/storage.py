"""The adapter's on-disk format: file names, format version, checksums and the checked readers (docs/design.md §2).

A saved adapter is a directory with ``adapter_model.safetensors`` (U, S, V, θ, δ per target, fp32) and
``adapter_config.json`` (format, version, AdapterConfig, target names, base-model fingerprint, tensor sha256,
training metadata). ``Adapter.save`` writes it and ``load_adapter`` reads it through the checks here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import AdapterFileError, NonFiniteError

# 1: tensors + config; 2: adds ``tensor_sha256`` (checked on load). Version-1 directories still load.
FORMAT_VERSION = 2


WEIGHTS_NAME = "adapter_model.safetensors"


CONFIG_NAME = "adapter_config.json"


def fingerprint(weights: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, shapes and fp32 values of the targeted base weights."""
    h = hashlib.sha256()
    for name in sorted(weights):
        w = weights[name].detach().float().contiguous().cpu()
        h.update(f"{name}|{tuple(w.shape)}|".encode())
        h.update(w.numpy().tobytes())
    return h.hexdigest()


def tensor_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the sorted names, dtypes, shapes and bytes of ``tensors`` (stored as ``tensor_sha256``)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def read_adapter_config(d: Path) -> dict:
    """adapter_config.json of directory ``d``, with every field the loader uses type-checked."""
    cfg_path = d / CONFIG_NAME
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFileError(f"not valid JSON ({e}); re-save the adapter", path=cfg_path) from None
    if not isinstance(cfg, dict):
        raise AdapterFileError(f"expected a JSON object, got {type(cfg).__name__}", path=cfg_path)
    if cfg.get("format", "innerpissa") != "innerpissa":
        raise AdapterFileError(
            f"field 'format' is {cfg['format']!r}, not 'innerpissa': not an innerpissa adapter "
            "(a PEFT export loads with peft, not load_adapter)",
            path=cfg_path,
            field="format",
        )
    version = cfg.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise AdapterFileError(
            f"field 'format_version' is {version!r}; this innerpissa reads versions 1.."
            f"{FORMAT_VERSION} (upgrade innerpissa for newer adapters)",
            path=cfg_path,
            field="format_version",
        )
    for field in ("adapter", "target_modules", "base_fingerprint"):
        if field not in cfg:
            raise AdapterFileError(f"missing field {field!r}; re-save the adapter", path=cfg_path, field=field)
    names = cfg["target_modules"]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise AdapterFileError(
            f"field 'target_modules' must be a non-empty list of module names, got {names!r:.80}",
            path=cfg_path,
            field="target_modules",
        )
    fp = cfg["base_fingerprint"]
    if not isinstance(fp, str) or len(fp) != 64 or any(ch not in "0123456789abcdef" for ch in fp):
        raise AdapterFileError(
            "field 'base_fingerprint' must be a sha256 hex digest (64 characters 0-9a-f)",
            path=cfg_path,
            field="base_fingerprint",
        )
    loss = cfg.get("loss")
    if loss is not None:
        from ..train.objectives import OBJECTIVES

        if (
            not isinstance(loss, dict)
            or loss.get("name") not in OBJECTIVES
            or isinstance(loss.get("version"), bool)
            or not isinstance(loss.get("version"), int)
            or not 1 <= loss["version"] <= OBJECTIVES[loss["name"]]
        ):
            known = ", ".join(f"{k} versions 1..{v}" for k, v in OBJECTIVES.items())
            raise AdapterFileError(
                f"field 'loss' is {loss!r}; this innerpissa knows {known} (upgrade innerpissa)",
                path=cfg_path,
                field="loss",
            )
    if version >= 2 and not isinstance(cfg.get("tensor_sha256"), str):
        raise AdapterFileError(
            "missing field 'tensor_sha256' (format version 2 stores a checksum of the tensors)",
            path=cfg_path,
            field="tensor_sha256",
        )
    return cfg


def read_adapter_tensors(d: Path, cfg: dict) -> dict[str, torch.Tensor]:
    """adapter_model.safetensors, checked against the config's checksum and for finite values."""
    path = d / WEIGHTS_NAME
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error type for truncated / garbled headers
        raise AdapterFileError(
            f"unreadable safetensors file ({type(e).__name__}: {e}); the file is truncated or "
            "corrupted: re-save or re-export the adapter",
            path=path,
        ) from None
    want = cfg.get("tensor_sha256")
    if want is not None and tensor_checksum(tensors) != want:
        raise AdapterFileError(
            "tensor checksum differs from adapter_config.json's tensor_sha256: the file is "
            "corrupted (or was edited); re-save the adapter",
            path=path,
            field="tensor_sha256",
        )
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise NonFiniteError(
                f"tensor {name!r} holds NaN or inf: the training diverged; retrain with a lower learning rate",
                path=path,
                field=name,
            )
    return tensors
