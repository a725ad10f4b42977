"""ONNX export: the merged model at one coefficient, or the steered model with the coefficient as a graph input.

Standard ONNX has no matrix inverse, so the Cayley map cannot be evaluated in-graph for a run-time c. The
coefficient-input graph uses the polynomial basis instead (``poly.fit_adapter``): each adapted linear layer
computes y = x Wᵀ + b + ((x V) M̂(c)ᵀ) Uᵀ with M̂(c) = Σ_k c^k M_k, so its error is the fit's recorded error.
Graph inputs: ``input_ids`` (B, T) int64, ``attention_mask`` (B, T) int64 and, for the live graph,
``coefficient`` () float32; output ``logits`` (B, T, vocab) float32. Exported with ``torch.onnx.export``
(TorchScript tracer, opset 17), run with onnxruntime.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..adapter.model import Adapter
from ..outputs import atomic_dir, check_output
from .hf import provenance
from .poly import PolyFit

ONNX_NAME = "model.onnx"


class _Powers:
    """Holds (c, c², …, c^K) for the forward pass being traced."""

    value: torch.Tensor


class _PolyLinear(nn.Module):
    def __init__(self, base: nn.Linear, u: torch.Tensor, v: torch.Tensor, mats: torch.Tensor, powers: _Powers):
        super().__init__()
        self.base = base
        self.register_buffer("U", u.float().contiguous())
        self.register_buffer("V", v.float().contiguous())
        self.register_buffer("M", mats.float().contiguous())  # (K, r, r)
        self.powers = powers

    def forward(self, x):
        m = torch.einsum("k,kij->ij", self.powers.value, self.M)
        return self.base(x) + ((x @ self.V) @ m.T) @ self.U.T


class _LogitsOnly(nn.Module):
    def __init__(self, model: nn.Module, powers: _Powers | None = None, degree: int = 0):
        super().__init__()
        self.model = model
        self.powers = powers
        self.register_buffer("exponents", torch.arange(1, degree + 1, dtype=torch.float32))

    def forward(self, input_ids, attention_mask, coefficient=None):
        if self.powers is not None:
            self.powers.value = coefficient.reshape(1) ** self.exponents
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def _example(model: nn.Module):
    ids = torch.ones(2, 8, dtype=torch.long)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :3] = 0
    return ids, mask


def _export(module: nn.Module, args: tuple, names: list[str], path: Path) -> None:
    dyn = {
        "input_ids": {0: "batch", 1: "seq"},
        "attention_mask": {0: "batch", 1: "seq"},
        "logits": {0: "batch", 1: "seq"},
    }
    model = module.model
    prev = getattr(model.config, "_attn_implementation", None) or "sdpa"
    model.set_attn_implementation("eager")  # the same maths as sdpa, as plain ops the tracer records
    try:
        with torch.no_grad():
            torch.onnx.export(
                module,
                args,
                str(path),
                input_names=names,
                output_names=["logits"],
                dynamic_axes=dyn,
                opset_version=17,
                dynamo=False,
            )
    finally:
        model.set_attn_implementation(prev)


def export_onnx_merged(adapter: Adapter, coeff: float, out: str | Path, overwrite: bool = False) -> Path:
    """Write ``out/model.onnx`` computing the merged model's logits at ``coeff`` (exact; fp32).

    A non-empty ``out`` needs ``overwrite`` (only the files written here are replaced).
    """
    coeff = adapter.check_coeff(coeff)
    check_output(out, overwrite)

    def fill(tmp: Path):
        adapter.merge(coeff)
        try:
            _export(
                _LogitsOnly(adapter.model), _example(adapter.model), ["input_ids", "attention_mask"], tmp / ONNX_NAME
            )
        finally:
            adapter.unmerge()
        (tmp / "innerpissa_export.json").write_text(json.dumps(provenance(adapter, coeff, "onnx-merged"), indent=2))

    return atomic_dir(Path(out), fill, overwrite)


def export_onnx_live(adapter: Adapter, fits: dict[str, PolyFit], out: str | Path, overwrite: bool = False) -> Path:
    """Write ``out/model.onnx`` with a scalar ``coefficient`` input, using the polynomial fits ``fits``.

    The adapted linear layers are swapped for polynomial side-path modules while tracing and restored after,
    also on error. The recorded error (max relative ‖M̂ − M‖_F over the fit range) goes to
    ``innerpissa_export.json``.
    """
    check_output(out, overwrite)
    model = adapter.model
    powers = _Powers()
    degree = {f.degree for f in fits.values()}
    if len(degree) != 1:
        raise ValueError(f"all layers need one polynomial degree, got {sorted(degree)}")
    degree = degree.pop()
    mods = dict(model.named_modules())
    swapped = []
    for name in adapter.target_names:
        parent_name, _, child = name.rpartition(".")
        parent, lin = mods[parent_name], mods[name]
        lay = adapter.layer(name)
        poly = _PolyLinear(lin, lay.U, lay.V, torch.from_numpy(fits[name].matrices), powers)
        swapped.append((parent, child, lin))
        setattr(parent, child, poly)
    worst = max(fits.values(), key=lambda f: f.max_rel_error)

    def fill(tmp: Path):
        ids, mask = _example(model)
        _export(
            _LogitsOnly(model, powers, degree),
            (ids, mask, torch.tensor(0.5)),
            ["input_ids", "attention_mask", "coefficient"],
            tmp / ONNX_NAME,
        )
        info = provenance(
            adapter,
            None,
            "onnx-live",
            degree=degree,
            c_range=list(worst.c_range),
            max_rel_error=worst.max_rel_error,
            max_abs_error=max(f.max_abs_error for f in fits.values()),
        )
        (tmp / "innerpissa_export.json").write_text(json.dumps(info, indent=2))

    try:
        return atomic_dir(Path(out), fill, overwrite)
    finally:
        for parent, child, lin in swapped:
            setattr(parent, child, lin)


def onnx_logits(
    path: str | Path, input_ids: np.ndarray, attention_mask: np.ndarray, coefficient: float | None = None
) -> np.ndarray:
    """Run an exported graph with onnxruntime on the CPU; returns logits (B, T, vocab) float32."""
    import onnxruntime as ort

    path = Path(path)
    sess = ort.InferenceSession(str(path / ONNX_NAME if path.is_dir() else path), providers=["CPUExecutionProvider"])
    feeds = {
        "input_ids": np.asarray(input_ids, dtype=np.int64),
        "attention_mask": np.asarray(attention_mask, dtype=np.int64),
    }
    if coefficient is not None:
        feeds["coefficient"] = np.asarray(coefficient, dtype=np.float32)
    return sess.run(["logits"], feeds)[0]
