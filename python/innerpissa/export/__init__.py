"""Export a steered model for other runtimes (docs/design.md §7); ``ipissa export`` is the CLI.

- ``export_merged_hf``: transformers directory at c (transformers, vLLM, convert_hf_to_gguf); exact.
- ``export_merged_gguf``: GGUF at c, same architecture as the input GGUF (llama.cpp); exact up to re-quantization.
- ``export_onnx_merged``: ONNX at c (onnxruntime); exact.
- ``export_onnx_live``: ONNX with a ``coefficient`` input (onnxruntime); polynomial fit error.
- ``export_llama_lora``: llama.cpp LoRA GGUF at c (``--lora-scaled F 1``); exact.
- ``export_llama_lora_live``: one (linear variant, exact) or K LoRA GGUFs (``--lora-scaled F_k c^k``).
- ``export_peft_lora``: PEFT LoRA at c (PEFT, vLLM); exact.
- ``export_control_vector``: control-vector GGUF (``--control-vector-scaled``) for PCA / mean-difference vectors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..adapter.model import Adapter
from ..outputs import atomic_write, check_output
from .gguf_io import (
    GGUFExportError,
    architecture,
    read_field,
    write_control_vector_gguf,
    write_lora_gguf,
    write_merged_gguf,
)
from .hf import export_merged_hf, export_peft_lora, lora_factors, provenance
from .onnx_export import export_onnx_live, export_onnx_merged, onnx_logits
from .poly import PolyFit, exact_at, fit_adapter, fit_polynomial, is_linear

__all__ = [
    "GGUFExportError",
    "LiveLoRA",
    "PolyFit",
    "exact_at",
    "export_control_vector",
    "export_llama_lora",
    "export_llama_lora_live",
    "export_merged_gguf",
    "export_merged_hf",
    "export_onnx_live",
    "export_onnx_merged",
    "export_peft_lora",
    "fit_adapter",
    "fit_polynomial",
    "gguf_architecture",
    "onnx_logits",
    "resolve_base_gguf",
]

# transformers model_type → llama.cpp general.architecture, for LoRA files made without a base GGUF at hand
_ARCH_BY_MODEL_TYPE = {
    "llama": "llama",
    "mistral": "llama",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
    "gemma2": "gemma2",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "phi3": "phi3",
}


def resolve_base_gguf(adapter: Adapter, base_gguf: str | Path | None = None) -> Path:
    """The GGUF the adapter's base model came from: ``base_gguf``, else the adapter's recorded ``base_model``.

    Raises:
        GGUFExportError: the base model was not a GGUF and none was given (says what to do instead).
        FileNotFoundError: the recorded GGUF or embedded package is missing.
    """
    if base_gguf is not None:
        p = Path(base_gguf)
        if not p.is_file():
            raise GGUFExportError(f"base GGUF not found: {p}")
        return p
    from ..models import find_gguf

    spec = adapter.meta.get("base_model")
    path = find_gguf(str(spec)) if spec else None  # FileNotFoundError: a recorded GGUF that is gone
    if path is not None:
        return path
    raise GGUFExportError(
        f"the adapter's base model {spec!r} is not a GGUF file: pass --base-gguf PATH (the GGUF of the same "
        "weights), or export the merged HF directory and convert it with llama.cpp's convert_hf_to_gguf.py"
    )


def gguf_architecture(adapter: Adapter, base_gguf: str | Path | None = None) -> tuple[str, int]:
    """(llama.cpp architecture name, block count) from the base GGUF if there is one, else from the HF config."""
    try:
        import gguf

        path = resolve_base_gguf(adapter, base_gguf)
        reader = gguf.GGUFReader(str(path))
        arch = architecture(reader, path)
        return arch, int(read_field(reader, f"{arch}.block_count", 0))
    except GGUFExportError:
        cfg = adapter.model.config
        cfg = getattr(cfg, "text_config", cfg)
        arch = _ARCH_BY_MODEL_TYPE.get(cfg.model_type)
        if arch is None:
            raise GGUFExportError(
                f"no llama.cpp architecture known for model_type {cfg.model_type!r}; pass --base-gguf"
            ) from None
        return arch, int(cfg.num_hidden_layers)


def export_merged_gguf(
    adapter: Adapter,
    coeff: float,
    out: str | Path,
    base_gguf: str | Path | None = None,
    tensor_type: str = "same",
    overwrite: bool = False,
) -> dict[str, str]:
    """GGUF of the base model with W(c) written into the adapted tensors (see ``gguf_io.write_merged_gguf``).

    Returns {GGUF tensor name: type written}; with ``tensor_type="same"`` a K-quant input (e.g. Q4_K) cannot be
    re-quantized by gguf and is written as F32. An existing ``out`` needs ``overwrite``.
    """
    coeff = adapter.check_coeff(coeff)
    check_output(out, overwrite, kind="file")
    base = resolve_base_gguf(adapter, base_gguf)
    deltas = {n: adapter.layer(n).delta_weight(coeff).detach().cpu().numpy() for n in adapter.target_names}
    return write_merged_gguf(
        base,
        out,
        deltas,
        adapter.model.config,
        tensor_type=tensor_type,
        metadata={"coefficient": float(coeff), "base_fingerprint": adapter.base_fingerprint, "kind": "merged"},
    )


def export_llama_lora(
    adapter: Adapter, coeff: float, out: str | Path, base_gguf: str | Path | None = None, overwrite: bool = False
) -> Path:
    """llama.cpp LoRA GGUF exact at ``coeff``: lora_a = Vᵀ, lora_b = U·M(c), alpha = r; load with scale 1.

    An existing ``out`` needs ``overwrite``."""
    coeff = adapter.check_coeff(coeff)
    check_output(out, overwrite, kind="file")
    arch, n_blocks = gguf_architecture(adapter, base_gguf)
    factors = {n: (a.numpy(), b.numpy()) for n, (a, b) in lora_factors(adapter, exact_at(adapter, coeff)).items()}
    return write_lora_gguf(
        out,
        arch,
        n_blocks,
        factors,
        adapter.model.config,
        metadata={"coefficient": float(coeff), "kind": "lora-exact", "base_fingerprint": adapter.base_fingerprint},
    )


@dataclass
class LiveLoRA:
    """A run-time-coefficient LoRA export: apply ``files[k]`` with scale c**(k+1).

    Attributes:
        files: the K adapter GGUFs (K = 1 and exact for the additive, no-rotation variant).
        exact: True when M(c) is exactly linear in c (one file, no fit error).
        c_range: the range the fit covers; outside it the error is not bounded.
        max_rel_error: worst over layers and the range of ‖M̂(c) − M(c)‖_F / ‖M(c)‖_F.
    """

    files: list[Path]
    exact: bool
    c_range: tuple[float, float]
    max_rel_error: float
    max_abs_error: float
    fits: dict[str, PolyFit] = field(repr=False, default_factory=dict)

    def scales(self, c: float) -> list[float]:
        return [c ** (k + 1) for k in range(len(self.files))]

    def llama_cli_args(self, c: float) -> str:
        """The ``--lora-scaled`` arguments that steer llama.cpp at coefficient c."""
        return " ".join(f"--lora-scaled {f} {s:.6g}" for f, s in zip(self.files, self.scales(c)))


def export_llama_lora_live(
    adapter: Adapter,
    out_dir: str | Path,
    c_range: tuple[float, float] = (-2.0, 2.0),
    degree: int | None = None,
    tol: float = 1e-3,
    base_gguf: str | Path | None = None,
    fits: dict[str, PolyFit] | None = None,
    overwrite: bool = False,
) -> LiveLoRA:
    """LoRA GGUFs whose sum, applied with scales c, c², …, c^K, gives M̂(c) ≈ M(c) over ``c_range``.

    The degree is the smallest K ≤ 8 whose worst relative error is ≤ ``tol`` unless given; ``fits`` from
    ``fit_adapter`` over the same range skips the fit. The error is written
    into each file's metadata (``innerpissa.max_rel_error``) and into ``out_dir/live_lora.json``. A non-empty
    ``out_dir`` needs ``overwrite`` (the files written here replace their namesakes; others are kept).
    """
    out_dir = check_output(out_dir, overwrite)
    arch, n_blocks = gguf_architecture(adapter, base_gguf)
    fits = fits or fit_adapter(adapter, c_range, degree=degree, tol=tol)
    k_deg = next(iter(fits.values())).degree
    exact = all(is_linear(adapter.layer(n)) for n in adapter.target_names)
    rel = max(f.max_rel_error for f in fits.values())
    absm = max(f.max_abs_error for f in fits.values())
    files = []
    for k in range(k_deg):
        ms = {n: f.matrices[k] for n, f in fits.items()}
        factors = {n: (a.numpy(), b.numpy()) for n, (a, b) in lora_factors(adapter, ms).items()}
        name = "lora.gguf" if k_deg == 1 else f"lora.p{k + 1}.gguf"
        files.append(
            write_lora_gguf(
                out_dir / name,
                arch,
                n_blocks,
                factors,
                adapter.model.config,
                metadata={
                    "kind": "lora-live",
                    "power": k + 1,
                    "degree": k_deg,
                    "c_min": float(c_range[0]),
                    "c_max": float(c_range[1]),
                    "max_rel_error": rel,
                    "exact": exact,
                    "base_fingerprint": adapter.base_fingerprint,
                },
            )
        )
    live = LiveLoRA(
        files=files,
        exact=exact,
        c_range=(float(c_range[0]), float(c_range[1])),
        max_rel_error=rel,
        max_abs_error=absm,
        fits=fits,
    )
    info = provenance(
        adapter,
        None,
        "lora-live",
        files=[f.name for f in files],
        scales="c**k for file k",
        degree=k_deg,
        exact=exact,
        c_range=list(live.c_range),
        max_rel_error=rel,
        max_abs_error=absm,
        example=f"llama-cli -m BASE.gguf {live.llama_cli_args(1.0)}",
    )
    atomic_write(out_dir / "live_lora.json", lambda p: Path(p).write_text(json.dumps(info, indent=2)))
    return live


def export_control_vector(
    directions: dict[int, np.ndarray], out: str | Path, model_hint: str, overwrite: bool = False
) -> Path:
    """Control-vector GGUF for activation-addition baselines (PCA, mean difference); see ``gguf_io``.

    An existing ``out`` needs ``overwrite``."""
    check_output(out, overwrite, kind="file")
    return write_control_vector_gguf(
        out, {k: np.asarray(v, dtype=np.float32) for k, v in directions.items()}, model_hint
    )
