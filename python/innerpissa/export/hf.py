"""Hugging Face formats: a merged transformers checkpoint at a coefficient, and a PEFT LoRA adapter at c.

- Merged: W(c) = W + U M(c) Vᵀ folded into the weights, saved with ``save_pretrained`` (safetensors + config
  + tokenizer). Any transformers / vLLM / llama.cpp-converter pipeline loads it; it has no runtime hooks.
- PEFT LoRA at c: rank r with ``lora_A = Vᵀ`` (r, d_in) and ``lora_B = U·M(c)`` (d_out, r), ``lora_alpha = r``
  so PEFT's scaling alpha/r is 1 and ``PeftModel`` reproduces W(c) exactly (up to fp32 rounding). Format:
  PEFT's ``adapter_config.json`` + ``adapter_model.safetensors`` with keys
  ``base_model.model.<module>.lora_{A,B}.weight``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..adapter.model import Adapter
from ..outputs import atomic_dir, check_output
from .poly import exact_at


def provenance(adapter: Adapter, coeff: float | None, kind: str, **extra) -> dict:
    """What an exported artefact was made from (written next to it as ``innerpissa_export.json``)."""
    from .. import __version__

    return {
        "kind": kind,
        "coefficient": coeff,
        "innerpissa_version": __version__,
        "base_model": adapter.meta.get("base_model"),
        "base_fingerprint": adapter.base_fingerprint,
        "adapter": adapter.config.to_dict(),
        "target_modules": adapter.target_names,
        **extra,
    }


def export_merged_hf(adapter: Adapter, tokenizer, coeff: float, out: str | Path, overwrite: bool = False) -> Path:
    """Save the model with W(c) merged as a transformers checkpoint directory (fp32 safetensors).

    The in-memory model is merged for the save and unmerged afterwards (bit-exact), also on error. A non-empty
    ``out`` is refused unless ``overwrite`` (then only the files written here are replaced; see ``atomic_dir``).
    """
    coeff = adapter.check_coeff(coeff)
    check_output(out, overwrite)
    model = adapter.model

    def fill(tmp: Path):
        adapter.merge(coeff)
        try:
            model.save_pretrained(tmp, safe_serialization=True)
        finally:
            adapter.unmerge()
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "innerpissa_export.json").write_text(json.dumps(provenance(adapter, coeff, "merged-hf"), indent=2))

    return atomic_dir(Path(out), fill, overwrite)


def lora_factors(adapter: Adapter, m_of: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (A = Vᵀ (r, d_in), B = U·M (d_out, r))} for per-module r×r matrices ``m_of``; ΔW = B·A."""
    out = {}
    for name in adapter.target_names:
        lay = adapter.layer(name)
        m = torch.as_tensor(m_of[name], dtype=torch.float64)
        a = lay.V.T.double()
        b = lay.U.double() @ m
        out[name] = (a.float().contiguous().cpu(), b.float().contiguous().cpu())
    return out


def export_peft_lora(adapter: Adapter, coeff: float, out: str | Path, overwrite: bool = False) -> Path:
    """Write a PEFT LoRA adapter (rank r, alpha r) whose weights equal the steered model's at ``coeff``.

    ``out`` must not be the adapter's own directory; a non-empty one needs ``overwrite``.
    """
    coeff = adapter.check_coeff(coeff)
    check_output(out, overwrite)
    factors = lora_factors(adapter, exact_at(adapter, coeff))
    rank = adapter.config.rank
    tensors = {}
    for name, (a, b) in factors.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = a
        tensors[f"base_model.model.{name}.lora_B.weight"] = b
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "target_modules": list(adapter.target_names),
        "base_model_name_or_path": adapter.meta.get("base_model"),
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
    }

    def fill(tmp: Path):
        save_file(tensors, str(tmp / "adapter_model.safetensors"))
        (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
        (tmp / "innerpissa_export.json").write_text(json.dumps(provenance(adapter, coeff, "peft-lora"), indent=2))

    return atomic_dir(Path(out), fill, overwrite)
