"""Other adapter families with a signed steering coefficient, from PEFT, for the ablation bench.

Each family is a PEFT tuner injected on the same residual writers the InnerPiSSA adapter would target
(``find_targets``). The steering coefficient c enters through the layer's trainable parameters, by one of three
rules per parameter (``Family.rules``), evaluated on the trained value p:

- ``"scale"``  p(c) = c·p. For the parameter that an additive delta is linear in (LoRA's B, DoRA's B, DeLoRA's
  norm bound λ, so ΔW(c) = c·ΔW), and for the generator of a Cayley rotation (OFT, BOFT, PSOFT: R(c) =
  Cayley(c·Q), with R(−c) = R(c)ᵀ), and RoAd's angle θ.
- ``"ratio"``  p(c) = 1 + c·(p − 1). For multiplicative scales whose identity value is 1 (IA3's l, BOFT's s,
  PSOFT's a and b, RoAd's α): the ratio p maps to 1 ± c(p − 1) around 1.
- ``"magnitude"`` p(c) = n + c·(p − n), n = the row norms of the base weight (DoRA's magnitude vector, whose
  identity value is ‖W‖ per output row).

Parameters with no rule (LoRA's A, DeLoRA's A and B) are used as trained: the delta is zero at c = 0 through the
ruled ones. At c = 0 a layer runs its base layer alone, so the model is the base model exactly, in every family.
Whether −c undoes +c exactly is a property of the family (``Family.exact_inverse``): additive deltas independent
of W (LoRA, DeLoRA) and pure Cayley rotations (OFT; the Cayley map solved exactly, not by PEFT's Neumann series)
are exact, i.e. F₋c(F_c(W)) = W for the weight map F_c that the layer applies; the others are not, and
``inverse_error`` measures by how much. Rules: the research notes' "additive delta × c; multiplicative as a ratio
around 1; rotations scale the generator"; PEFT (Mangrulkar et al. 2022) for the layers: LoRA (Hu et al. 2021),
DoRA (Liu et al. 2024), DeLoRA (Bini et al. 2025), OFT (Qiu et al. 2023), BOFT (Liu et al. 2024), RoAd (Liao et
al. 2024), IA3 (Liu et al. 2022), PSOFT (PEFT's principal-subspace orthogonal fine-tuning).

Per-row coefficients (training runs c = +1 and c = −1 in one batch): rows are grouped by coefficient and each
group runs the layer with its own parameter values (``torch.func.functional_call``), so the result is the same as
running each coefficient alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import AdapterFileError, ConfigError, MissingFileError, NonFiniteError
from ..outputs import atomic_write
from .config import AdapterConfig
from .storage import fingerprint
from .targets import find_targets, hidden_size

ADAPTER_NAME = "steer"
CONFIG_NAME = "steering_config.json"
WEIGHTS_NAME = "steering_model.safetensors"
RULES = ("scale", "ratio", "magnitude")


def _divisor_at_most(n: int, limit: int) -> int:
    """The largest divisor of ``n`` that is ≤ ``limit`` (≥ 1)."""
    return max(d for d in range(1, max(1, min(n, limit)) + 1) if n % d == 0)


def _lora(rank, names, ins, outs, dora=False):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=names, use_dora=dora)


def _delora(rank, names, ins, outs):
    from peft import DeloraConfig

    return DeloraConfig(r=rank, target_modules=names)


def _oft(rank, names, ins, outs):
    from peft import OFTConfig

    block = _divisor_at_most(math.gcd(*ins), rank)
    return OFTConfig(r=0, oft_block_size=block, target_modules=names, use_cayley_neumann=False, module_dropout=0.0)


def _boft(rank, names, ins, outs):
    """One butterfly factor: PEFT builds more only with its CUDA extension (without it, it drops to one), so on a
    CPU BOFT is OFT's block rotation times BOFT's learned output scale s."""
    from peft import BOFTConfig

    block = _divisor_at_most(math.gcd(*ins), rank)
    return BOFTConfig(boft_block_size=block, boft_n_butterfly_factor=1, target_modules=names, boft_dropout=0.0)


def _psoft(rank, names, ins, outs):
    from peft import PsoftConfig

    return PsoftConfig(r=rank, target_modules=names, psoft_dropout=0.0)


def _road(rank, names, ins, outs):
    from peft import RoadConfig

    group = _divisor_at_most(math.gcd(*outs), 64)
    group -= group % 2  # RoAd pairs element i with i + group/2
    return RoadConfig(variant="road_1", group_size=max(2, group), target_modules=names)


def _ia3(rank, names, ins, outs):
    from peft import IA3Config

    return IA3Config(target_modules=names, feedforward_modules=[])


@dataclass(frozen=True)
class Family:
    """One adapter family: how to build its PEFT config and how c enters its parameters.

    Attributes:
        name: the family's name in grids and tables.
        build: (rank, target names, their in_features, their out_features) → a PEFT config.
        rules: (regular expression on the PEFT layer's parameter name, rule) pairs; the first match applies.
        exact_inverse: whether F₋c ∘ F_c is the identity on the weight (module docstring).
        kind: "additive", "multiplicative" or "rotation", for tables.
    """

    name: str
    build: Callable
    rules: tuple[tuple[str, str], ...]
    exact_inverse: bool
    kind: str

    def rule(self, param_name: str) -> str | None:
        for pattern, rule in self.rules:
            if re.search(pattern, param_name):
                return rule
        return None


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("lora", _lora, ((r"^lora_B\.", "scale"),), True, "additive"),
        Family(
            "dora",
            lambda *a: _lora(*a, dora=True),
            ((r"^lora_B\.", "scale"), (r"^lora_magnitude_vector\.", "magnitude")),
            False,
            "additive",
        ),
        Family("delora", _delora, ((r"^delora_lambda\.", "scale"),), True, "additive"),
        Family("oft", _oft, ((r"^oft_R\..*weight$", "scale"),), True, "rotation"),
        Family("boft", _boft, ((r"^boft_R\.", "scale"), (r"^boft_s\.", "ratio")), False, "rotation"),
        Family(
            "psoft",
            _psoft,
            ((r"^psoft_R\..*\.weight$", "scale"), (r"^psoft_R\..*\.vector_[ab]$", "ratio")),
            False,
            "rotation",
        ),
        Family("road", _road, ((r"^road_theta\.", "scale"), (r"^road_alpha\.", "ratio")), False, "rotation"),
        Family("ia3", _ia3, ((r"^ia3_l\.", "ratio"),), False, "multiplicative"),
    )
}


def _at(rule: str, p: torch.Tensor, c: float, ref: torch.Tensor | None) -> torch.Tensor:
    if rule == "scale":
        return p * c
    if rule == "ratio":
        return 1 + c * (p - 1)
    return ref.view_as(p) + c * (p - ref.view_as(p))


class SignedLayer(nn.Module):
    """A PEFT layer run at its owner's steering coefficient (module docstring); replaces the layer in the model.

    Input (rows, …, d_in) → output (rows, …, d_out). The coefficient is a float, or a (rows,) tensor with one
    coefficient per row of the input.

    Raises:
        ValueError: a per-row coefficient whose length is not the input's row count.
    """

    def __init__(self, inner: nn.Module, family: Family, owner: PeftSteering):
        super().__init__()
        self.inner = inner
        self._owner = [owner]  # a list, so the owner is not registered as a submodule
        self.ruled = {}
        for name, _ in inner.named_parameters():
            if name.startswith("base_layer."):
                continue
            rule = family.rule(name)
            if rule is not None:
                self.ruled[name] = rule
        if not self.ruled:
            raise ConfigError(f"no parameter of the {family.name} layer takes the coefficient", field="family")
        if "magnitude" in self.ruled.values():
            w = inner.base_layer.weight.detach().float()
            self.register_buffer("base_norm", w.norm(dim=1), persistent=False)
        else:
            self.base_norm = None

    def _params_at(self, c: float) -> dict[str, torch.Tensor]:
        named = dict(self.inner.named_parameters())
        return {n: _at(rule, named[n], c, self.base_norm) for n, rule in self.ruled.items()}

    def run_at(self, x: torch.Tensor, c: float, *args, **kwargs) -> torch.Tensor:
        """The layer at one coefficient c (the base layer alone at c = 0)."""
        if c == 0.0:
            return self.inner.base_layer(x, *args, **kwargs)
        return torch.func.functional_call(self.inner, self._params_at(c), (x, *args), kwargs, strict=False)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        c = self._owner[0].coeff
        if c.ndim == 0:
            return self.run_at(x, float(c), *args, **kwargs)
        if c.shape[0] != x.shape[0]:
            raise ValueError(f"{c.shape[0]} per-row coefficients for an input of {x.shape[0]} rows")
        values = c.tolist()
        if len(set(values)) == 1:
            return self.run_at(x, values[0], *args, **kwargs)
        out = None
        for v in dict.fromkeys(values):
            rows = torch.tensor([i for i, w in enumerate(values) if w == v])
            y = self.run_at(x[rows], v, *args, **kwargs)
            if out is None:
                out = y.new_empty((x.shape[0], *y.shape[1:]))
            out = out.index_copy(0, rows, y)
        return out


class PeftSteering:
    """A PEFT adapter of family ``family`` on ``model``'s residual writers, steered by a signed coefficient c.

    The same interface as ``LoRASteering`` (``steer``, ``parameters``, ``state_dict``, ``load_state_dict``,
    ``stats``, ``remove``), so ``train`` and the torch evaluation engine run it unchanged. The model is modified in
    place until ``remove()``. Trainable parameters are the family's own, initialised by PEFT (identity at init for
    every family here) with ``torch.manual_seed(config.seed)``.

    Raises:
        ConfigError: unknown family, or the target selection / rank as for ``attach``.
    """

    def __init__(self, model: nn.Module, family: str, config: AdapterConfig | None = None, meta: dict | None = None):
        from peft import inject_adapter_in_model

        if family not in FAMILIES:
            raise ConfigError(f"unknown adapter family {family!r}; known: {', '.join(FAMILIES)}", field="family")
        self.family = FAMILIES[family]
        config = config or AdapterConfig()
        targets = find_targets(model, config)
        rank = config.rank or hidden_size(model) // 8
        self.config = dataclasses.replace(config, rank=rank)
        self.target_names = list(targets)
        self.base_fingerprint = fingerprint({n: lin.weight for n, lin in targets.items()})
        self.meta = dict(meta or {}, family=family)
        self.model = model
        self.coeff = torch.tensor(0.0)
        ins = [lin.in_features for lin in targets.values()]
        outs = [lin.out_features for lin in targets.values()]
        peft_cfg = self.family.build(rank, self.target_names, ins, outs)
        torch.manual_seed(config.seed)
        try:
            inject_adapter_in_model(peft_cfg, model, adapter_name=ADAPTER_NAME)
        except ValueError as e:
            raise ConfigError(f"PEFT cannot build a {family} adapter on these targets: {e}", field="family") from None
        if hasattr(model, "peft_config"):
            del model.peft_config  # injection bookkeeping; a later injection would warn about it
        mods = dict(model.named_modules())
        self._layers: dict[str, SignedLayer] = {}
        for n in self.target_names:
            layer = SignedLayer(mods[n], self.family, self)
            parent, _, child = n.rpartition(".")
            setattr(mods[parent], child, layer)
            self._layers[n] = layer
        for _, p in self._trainable():  # PEFT leaves them trainable; the base layers stay frozen
            p.requires_grad_(True)

    def _trainable(self):
        """(``<target>.<PEFT parameter name>``, parameter) of every adapter parameter (not the base layer's), in
        a fixed order."""
        for n, lay in self._layers.items():
            for pname, p in lay.inner.named_parameters():
                if not pname.startswith("base_layer."):
                    yield f"{n}.{pname}", p

    def parameters(self):
        """The trainable parameters of every target, in a fixed order."""
        return (p for _, p in self._trainable())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """{``<target>.<PEFT parameter name>``: tensor} of the trainable parameters."""
        return {key: p.detach().clone() for key, p in self._trainable()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load what ``state_dict`` returned. Raises KeyError naming a missing parameter."""
        with torch.no_grad():
            for key, p in self._trainable():
                p.copy_(state[key])

    @contextlib.contextmanager
    def steer(self, coeff: float | torch.Tensor):
        """Forward passes inside run at coefficient ``coeff`` (a float, or a (B,) tensor: one per batch row)."""
        previous = self.coeff
        self.coeff = torch.as_tensor(coeff, dtype=torch.float32)
        try:
            yield self
        finally:
            self.coeff = previous

    @torch.no_grad()
    def weight_at(self, name: str, c: float, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """The effective weight (d_out, d_in) of target ``name`` at coefficient c, read by passing the identity
        through the layer (the targets have no bias); ``base_weight`` replaces the base layer's weight (to compose
        two coefficients)."""
        lay = self._layers[name]
        w = lay.inner.base_layer.weight
        eye = torch.eye(w.shape[1], dtype=w.dtype)
        if base_weight is None:
            return lay.run_at(eye, c).T
        if c == 0.0:
            return torch.func.functional_call(lay.inner.base_layer, {"weight": base_weight}, (eye,)).T
        params = lay._params_at(c) | {"base_layer.weight": base_weight}
        return torch.func.functional_call(lay.inner, params, (eye,), strict=False).T

    @torch.no_grad()
    def inverse_error(self, c: float = 1.0) -> float:
        """max over targets of ‖F₋c(F_c(W)) − W‖_F / ‖W‖_F: 0 (to float rounding) for a family whose −c undoes +c."""
        worst = 0.0
        for n, lay in self._layers.items():
            w = lay.inner.base_layer.weight.detach()
            back = self.weight_at(n, -c, self.weight_at(n, c))
            worst = max(worst, float((back - w).norm() / w.norm()))
        return worst

    @torch.no_grad()
    def stats(self) -> dict:
        """Training diagnostics: mean and largest ‖W(1) − W‖_F / ‖W‖_F over targets."""
        rel = []
        for n, lay in self._layers.items():
            w = lay.inner.base_layer.weight.detach()
            rel.append(float((self.weight_at(n, 1.0) - w).norm() / w.norm()))
        return {"delta_w_rel": sum(rel) / len(rel), "delta_w_rel_max": max(rel)}

    def save(self, directory: str | Path) -> Path:
        """Write ``steering_model.safetensors`` (the trainable parameters, ``state_dict``) and
        ``steering_config.json`` (family, adapter config, targets, base fingerprint, ``meta``), each by an atomic
        rename. Raises NonFiniteError for NaN or inf parameters (nothing is written)."""
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: t.float().contiguous().cpu() for k, t in self.state_dict().items()}
        bad = [k for k, t in tensors.items() if not torch.isfinite(t).all()]
        if bad:
            raise NonFiniteError(f"refusing to save non-finite parameters ({', '.join(bad[:3])})", path=out)
        cfg = {
            "format": "innerpissa-peft-family",
            "family": self.family.name,
            "adapter": self.config.to_dict(),
            "target_modules": self.target_names,
            "base_fingerprint": self.base_fingerprint,
            "meta": self.meta,
        }
        atomic_write(out / WEIGHTS_NAME, lambda p: save_file(tensors, p))
        atomic_write(out / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(cfg, indent=1, default=list)))
        return out

    def remove(self) -> None:
        """Put the original linears back (the model is the base model again, with no PEFT layers)."""
        mods = dict(self.model.named_modules())
        for n, lay in self._layers.items():
            parent, _, child = n.rpartition(".")
            setattr(mods[parent], child, lay.inner.base_layer)
        self._layers = {}


def load_steering(model: nn.Module, directory: str | Path) -> PeftSteering:
    """Attach the family adapter saved by ``PeftSteering.save`` in ``directory`` to ``model``.

    Raises:
        MissingFileError: a file is missing.
        AdapterFileError: a malformed config, or a parameter missing from the weights file.
        ValueError: an adapter made for another base model (fingerprint of the targeted weights differs).
    """
    from safetensors.torch import load_file

    d = Path(directory)
    for f in (CONFIG_NAME, WEIGHTS_NAME):
        if not (d / f).is_file():
            raise MissingFileError(f"{f} not found: not an adapter-family directory", path=d)
    try:
        cfg = json.loads((d / CONFIG_NAME).read_text())
        family, adapter_cfg = cfg["family"], AdapterConfig.from_dict(cfg["adapter"], source=str(d / CONFIG_NAME))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise AdapterFileError(f"malformed adapter-family config ({e})", path=d / CONFIG_NAME) from None
    steering = PeftSteering(model, family, adapter_cfg, cfg.get("meta"))
    if steering.base_fingerprint != cfg.get("base_fingerprint"):
        steering.remove()
        raise ValueError(f"{d}: adapter was made for a different base model (weight fingerprint differs)")
    try:
        steering.load_state_dict(load_file(str(d / WEIGHTS_NAME)))
    except KeyError as e:
        steering.remove()
        raise AdapterFileError(f"missing tensor {e.args[0]}", path=d / WEIGHTS_NAME) from None
    return steering
