"""LoRA with a signed steering coefficient, trained with the same objective as InnerPiSSA: the ablation that
isolates what the SVD parameterisation (frozen singular vectors, Cayley rotation, singular-value offset) buys.

PEFT's LoRA layers (``peft.inject_adapter_in_model`` with ``LoraConfig(r, lora_alpha=r)`` on the same residual
writers the InnerPiSSA adapter would target) replace those linears while training. A forward hook on each layer's
``lora_B`` scales its output per row by the steering coefficient, so a layer computes

    y(c) = W x + c · (α / r) · B A x

c = 0 is the base output exactly (outside ``steer`` the LoRA path is multiplied by 0), and ΔW(c) is linear in c, so
−c mirrors +c. ``to_adapter`` returns the trained LoRA as an InnerPiSSA-format ``Adapter`` with the same ΔW(c)
exactly: per module the SVD (α/r)·B A = U′ diag(s′) V′ᵀ stored as U = U′, V = V′, S = s′, δ = s′ with rotation off,
so M(c) = diag(S + cδ) − diag(S) = c·diag(s′). Every engine, export and evaluator runs it unchanged. ``remove``
puts the original linears back.

Source: Hu et al. 2021 (LoRA); the signed coefficient as in the research notes' "additive delta × c" rule.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch import nn

from .config import AdapterConfig
from .layer import InnerPiSSALayer
from .model import Adapter
from .storage import fingerprint
from .targets import find_targets

ADAPTER_NAME = "steer"


class LoRASteering:
    """A PEFT LoRA on ``model``'s residual writers (selected by ``config`` as for ``attach``), steered by c.

    Shapes: per target W (d_out, d_in): A (r, d_in), B (d_out, r); B starts at 0 (PEFT's default init), A
    Kaiming-uniform from ``config.seed``. The model is modified in place until ``remove()``.

    Raises:
        ConfigError: as ``attach`` for the target selection and rank.
    """

    def __init__(self, model: nn.Module, config: AdapterConfig | None = None, meta: dict | None = None):
        from peft import LoraConfig, inject_adapter_in_model

        config = config or AdapterConfig()
        targets = find_targets(model, config)
        rank = config.rank or model.config.hidden_size // 8
        self.config = dataclasses.replace(config, rank=rank, rotate=False, scale="additive", select="top")
        self.target_names = list(targets)
        self.base_fingerprint = fingerprint({n: lin.weight for n, lin in targets.items()})
        self.meta = dict(meta or {}, family="lora")
        self.model = model
        torch.manual_seed(config.seed)
        peft_cfg = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, bias="none", target_modules=self.target_names)
        inject_adapter_in_model(peft_cfg, model, adapter_name=ADAPTER_NAME)
        mods = dict(model.named_modules())
        self._layers = {n: mods[n] for n in self.target_names}
        self._coeff = torch.tensor(0.0)
        self._hooks = []
        for lay in self._layers.values():
            for p in (lay.lora_A[ADAPTER_NAME].weight, lay.lora_B[ADAPTER_NAME].weight):
                p.requires_grad_(True)
            self._hooks.append(lay.lora_B[ADAPTER_NAME].register_forward_hook(self._scale))

    def _scale(self, _m, _a, out):
        # the LoRA path times c: outside steer c = 0 and W x + 0 is W x exactly (PEFT's enable/disable would
        # also flip requires_grad, and autograd skips leaves whose flag is off by backward time)
        c = self._coeff
        return out * (c.to(out.dtype).view(-1, *([1] * (out.ndim - 1))) if c.ndim == 1 else c.to(out.dtype))

    def parameters(self):
        for lay in self._layers.values():
            yield lay.lora_A[ADAPTER_NAME].weight
            yield lay.lora_B[ADAPTER_NAME].weight

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for n, lay in self._layers.items():
            out[f"{n}.lora_A"] = lay.lora_A[ADAPTER_NAME].weight.detach().clone()
            out[f"{n}.lora_B"] = lay.lora_B[ADAPTER_NAME].weight.detach().clone()
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, lay in self._layers.items():
                lay.lora_A[ADAPTER_NAME].weight.copy_(state[f"{n}.lora_A"])
                lay.lora_B[ADAPTER_NAME].weight.copy_(state[f"{n}.lora_B"])

    @contextlib.contextmanager
    def steer(self, coeff: float | torch.Tensor):
        """Forward passes inside run at coefficient ``coeff`` (a float, or a (B,) tensor: one per batch row)."""
        previous = self._coeff
        self._coeff = torch.as_tensor(coeff, dtype=torch.float32)
        try:
            yield self
        finally:
            self._coeff = previous

    def delta_weight(self, name: str) -> torch.Tensor:
        """(α/r)·B A of target ``name``: ΔW at c = 1, (d_out, d_in) fp32."""
        lay = self._layers[name]
        a = lay.lora_A[ADAPTER_NAME].weight.detach().float()
        b = lay.lora_B[ADAPTER_NAME].weight.detach().float()
        return lay.scaling[ADAPTER_NAME] * (b @ a)

    @torch.no_grad()
    def stats(self) -> dict:
        """Training diagnostics: mean and largest ‖ΔW(1)‖_F / ‖W‖_F over targets."""
        rel = [
            float(self.delta_weight(n).norm() / self._layers[n].base_layer.weight.float().norm())
            for n in self.target_names
        ]
        return {"delta_w_rel": sum(rel) / len(rel), "delta_w_rel_max": max(rel)}

    @torch.no_grad()
    def to_adapter(self) -> Adapter:
        """The trained LoRA as an InnerPiSSA-format ``Adapter`` with the same ΔW(c) (module docstring)."""
        layers = {}
        for n in self.target_names:
            u, s, vh = torch.linalg.svd(self.delta_weight(n), full_matrices=False)
            r = self.config.rank
            lay = InnerPiSSALayer(u[:, :r], s[:r], vh[:r].T, scale="additive", rotate=False)
            lay.delta.copy_(s[:r])
            layers[n] = lay
        return Adapter(self.model, self.config, layers, self.base_fingerprint, self.meta)

    def save(self, directory) -> None:
        """Save as an InnerPiSSA-format adapter directory (``to_adapter().save``)."""
        self.to_adapter().save(directory)

    def remove(self) -> None:
        """Put the original linears back (the model is the base model again, with no PEFT layers)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        mods = dict(self.model.named_modules())
        for n, lay in self._layers.items():
            parent_name, _, child = n.rpartition(".")
            setattr(mods[parent_name], child, lay.base_layer)
        self._layers = {}
        if hasattr(self.model, "peft_config"):  # set by inject_adapter_in_model; a later injection would warn
            del self.model.peft_config
