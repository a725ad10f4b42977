"""Walk a Hugging Face causal LM, pick the residual-writing projections, and steer them (docs/design.md §2).

The user's model is never changed outside ``with adapter.steer(c):`` (forward hooks, removed on exit, even on
error) or an explicit ``adapter.merge(c)`` / ``adapter.unmerge()``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import AdapterFileError, ConfigError, MissingFileError, NonFiniteError, finite_coeff
from ..hooks import forward_hooks
from ..outputs import atomic_write
from .config import AdapterConfig
from .layer import InnerPiSSALayer
from .storage import (
    CONFIG_NAME,
    FORMAT_VERSION,
    WEIGHTS_NAME,
    fingerprint,
    read_adapter_config,
    read_adapter_tensors,
    tensor_checksum,
)
from .targets import block_names, check_causal_decoder, find_targets, hidden_size

# |c| beyond this multiple of the largest trained |c| triggers a SteeringRangeWarning.
RANGE_WARN_FACTOR = 2.0


class SteeringRangeWarning(UserWarning):
    """A steering coefficient far outside the range the adapter was trained at (text may degrade)."""


class Adapter(nn.Module):
    """An InnerPiSSA adapter bound to one base model.

    Use ``with adapter.steer(c):`` to run the model steered by coefficient c (float, or a tensor of shape
    (batch,) to steer each row of a batch with its own coefficient). c = 0 leaves the model bit-identical.
    """

    def __init__(
        self,
        model: nn.Module,
        config: AdapterConfig,
        layers: dict[str, InnerPiSSALayer],
        base_fingerprint: str,
        meta: dict | None = None,
    ):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleDict({k.replace(".", "__"): v for k, v in layers.items()})
        self.target_names = list(layers)
        self.base_fingerprint = base_fingerprint
        self.meta = dict(meta or {})
        self._model = [model]  # not a submodule: the adapter's state_dict holds only its own tensors
        self._coeff: float | torch.Tensor = 0.0
        self._merged: float | None = None
        self._saved: dict[str, torch.Tensor] = {}

    @property
    def model(self) -> nn.Module:
        return self._model[0]

    def layer(self, name: str) -> InnerPiSSALayer:
        return self.layers[name.replace(".", "__")]

    def _targets(self) -> dict[str, nn.Linear]:
        mods = dict(self.model.named_modules())
        return {n: mods[n] for n in self.target_names}

    @contextlib.contextmanager
    def steer(self, coeff: float | torch.Tensor):
        """Context manager: forward passes inside run at steering coefficient ``coeff``.

        Args:
            coeff: a float, or a 1-D tensor (B,) giving each batch row its own coefficient.
        Raises:
            RuntimeError: the adapter is merged (unmerge first).
        """
        if self._merged is not None:
            raise RuntimeError("adapter is merged into the weights; call adapter.unmerge() before steer()")
        coeff = self.check_coeff(coeff)
        is_zero = not torch.is_tensor(coeff) and coeff == 0.0
        if is_zero:
            yield self
            return
        ms: dict[str, torch.Tensor] = {}

        def make_hook(name: str):
            layer = self.layer(name)

            def hook(_mod, args, out):
                m = ms.get(name)
                if m is None:  # M(c) once per forward, not per token
                    m = ms[name] = layer.steer_matrix(coeff)
                return out + layer.delta_output(args[0], m)

            return hook

        hooks = [(lin, make_hook(name)) for name, lin in self._targets().items()]
        # M(c) depends on the parameters, so it is rebuilt for every forward pass
        with forward_hooks(hooks, pre_hooks=[(self.model, lambda *_: ms.clear())]):
            yield self

    @property
    def coeff_range(self) -> tuple[float, float]:
        """The coefficients the adapter was trained at (``meta["coeff_range"]``; default (−1, +1))."""
        lo, hi = self.meta.get("coeff_range", (-1.0, 1.0))
        return float(lo), float(hi)

    def check_coeff(self, coeff: float | torch.Tensor) -> float | torch.Tensor:
        """Validate a steering coefficient (float or (B,) tensor): finite, and a warning when
        |c| > RANGE_WARN_FACTOR × the largest trained |c|.

        Returns: the float (or the tensor unchanged).
        Raises:
            NonFiniteError: NaN or ±inf anywhere in ``coeff``.
        """
        if torch.is_tensor(coeff):
            if not torch.isfinite(coeff).all():
                raise NonFiniteError(f"steering coefficients must be finite, got {coeff.tolist()}", field="coeff")
            biggest = float(coeff.abs().max()) if coeff.numel() else 0.0
        else:
            coeff = finite_coeff(coeff, "steering coefficient")
            biggest = abs(coeff)
        limit = RANGE_WARN_FACTOR * max(abs(x) for x in self.coeff_range)
        if biggest > limit:
            warnings.warn(
                f"steering coefficient {biggest:g} is far outside the trained range {self.coeff_range} "
                f"(warning above |c| = {limit:g}): expect incoherent text",
                SteeringRangeWarning,
                stacklevel=3,
            )
        return coeff

    @torch.no_grad()
    def merge(self, coeff: float) -> None:
        """Fold W(c) = W + U M(c) Vᵀ into the base weights in place. Undo with ``unmerge()``.

        The touched base weights are copied first, so ``unmerge()`` restores them bit-exactly.
        Raises:
            RuntimeError: already merged.
            NonFiniteError: c is not finite, or W(c) overflows (the weights are left untouched).
        """
        if self._merged is not None:
            raise RuntimeError(f"adapter already merged at c={self._merged}; unmerge() first")
        coeff = self.check_coeff(coeff)
        targets = self._targets()
        new = {}
        for name, lin in targets.items():
            w = lin.weight + self.layer(name).delta_weight(coeff).to(lin.weight.dtype)
            if not torch.isfinite(w).all():
                raise NonFiniteError(
                    f"merging at c={coeff:g} makes {name}.weight non-finite; use a smaller |c|", field="coeff"
                )
            new[name] = w
        self._saved = {name: lin.weight.detach().clone() for name, lin in targets.items()}
        for name, lin in targets.items():
            lin.weight.copy_(new[name])
        self._merged = coeff

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weights saved by ``merge`` (bit-exact)."""
        if self._merged is None:
            raise RuntimeError("adapter is not merged")
        for name, lin in self._targets().items():
            lin.weight.copy_(self._saved[name])
        self._saved = {}
        self._merged = None

    def save(self, directory: str | Path) -> Path:
        """Write ``adapter_model.safetensors`` (θ, δ and the U, S, V bases) and ``adapter_config.json``.

        Files are written to temporary names and renamed, so an interrupted save never leaves a torn adapter.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for name in self.target_names:
            lay = self.layer(name)
            for key in ("U", "S", "V", "theta", "delta"):
                tensors[f"{name}.{key}"] = getattr(lay, key).detach().float().contiguous().cpu()
        bad = [k for k, t in tensors.items() if not torch.isfinite(t).all()]
        if bad:
            raise NonFiniteError(
                f"refusing to save an adapter with non-finite tensors ({', '.join(bad[:3])}); "
                "training diverged: lower the learning rate",
                path=out,
            )
        cfg = {
            "format": "innerpissa",
            "format_version": FORMAT_VERSION,
            "adapter": self.config.to_dict(),
            "target_modules": self.target_names,
            "base_fingerprint": self.base_fingerprint,
            "base_model_class": type(self.model).__name__,
            "tensor_sha256": tensor_checksum(tensors),
            **self.meta,
        }
        atomic_write(out / WEIGHTS_NAME, lambda p: save_file(tensors, str(p)))
        atomic_write(out / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(cfg, indent=2, default=str)))
        return out


def attach(
    model: nn.Module, config: AdapterConfig | None = None, meta: dict | None = None, pairs=None, tokenizer=None
) -> Adapter:
    """Create an InnerPiSSA adapter for ``model``: top-r SVD of each targeted weight (Rust/faer), small init.

    The model is not modified. Shapes: for a target W (d_out, d_in): U (d_out, r), S (r,), V (d_in, r). With
    ``config.select == "data"`` the r components come from the top 4r, chosen with ``pairs`` (contrastive
    pairs) and ``tokenizer`` by ``data_aware_components``.

    Raises:
        UnsupportedArchitectureError: decoder blocks / residual writers not found.
        ValueError: rank larger than a targeted weight allows.
        ConfigError: ``select="data"`` without pairs and tokenizer.
    """
    from ..svd import top_r_svd

    check_causal_decoder(model)
    config = config or AdapterConfig()
    targets = find_targets(model, config)
    rank = config.rank or hidden_size(model) // 8
    for name, lin in targets.items():
        if rank > min(lin.weight.shape):
            raise ConfigError(f"rank {rank} exceeds min{tuple(lin.weight.shape)} of {name}", field="rank")
    config = dataclasses.replace(config, rank=rank)  # the caller's config is not changed
    weights = {n: lin.weight for n, lin in targets.items()}
    if config.select == "data":
        if pairs is None or tokenizer is None:
            raise ConfigError(
                "select='data' chooses singular components from the training pairs: pass "
                "attach(..., pairs=..., tokenizer=...)",
                field="select",
            )
        bases = data_aware_components(model, targets, rank, pairs, tokenizer)
    else:
        bases = top_r_svd([w.detach().float() for w in weights.values()], rank)
    gen = torch.Generator().manual_seed(config.seed)
    layers = {
        name: InnerPiSSALayer(
            u,
            s,
            v,
            scale=config.scale,
            rotate=config.rotate,
            rotate_side=config.rotate_side,
            init_std=config.init_std,
            generator=gen,
        )
        for name, (u, s, v) in zip(targets, bases)
    }
    device = next(model.parameters()).device
    adapter = Adapter(model, config, layers, fingerprint(weights), meta)
    return adapter.to(device)


@torch.no_grad()
def data_aware_components(
    model: nn.Module, targets: dict[str, nn.Linear], rank: int, pairs, tokenizer, n_pairs: int = 128
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per target, r singular components chosen among the top min(4r, rank(W)) by the training pairs.

    For a residual writer W = U diag(S) Vᵀ in block ℓ, with H₊, H₋ (n, d) the last-token outputs of block ℓ on the
    positive / negative prompts of the first ``n_pairs`` pairs, three scores per component j:
    S_j·mean|H₊ U_j|, S_j·mean|H₋ U_j| (how much either side's residual uses it) and S_j·|mean(H₊ − H₋) U_j| (how
    much the pair difference does). The top ⌈r/3⌉ of each score are kept, then the rest is filled by the largest
    of the three scores each divided by its maximum. Chosen components keep singular-value order. After
    AntiPaSTO's data-aware selection (arXiv 2601.07473), our formulation.

    Returns: one (U (d_out, r), S (r,), V (d_in, r)) per target, in order.
    """
    from ..eval.methods import last_token_states
    from ..svd import top_r_svd

    names = block_names(model)
    block_of = {n: next(i for i, b in enumerate(names) if n.startswith(b + ".")) for n in targets}
    layers = sorted(set(block_of.values()))
    use = list(pairs)[:n_pairs]
    hp = last_token_states(model, tokenizer, [p.positive for p in use], layers)
    hn = last_token_states(model, tokenizer, [p.negative for p in use], layers)
    out = []
    for (name, _lin), (u, s, v) in zip(
        targets.items(),
        top_r_svd(
            [lin.weight.detach().float() for lin in targets.values()],
            min(4 * rank, *[min(lin.weight.shape) for lin in targets.values()]),
        ),
    ):
        ell = block_of[name]
        scores = torch.stack(
            [
                s * (hp[ell] @ u).abs().mean(0),
                s * (hn[ell] @ u).abs().mean(0),
                s * ((hp[ell] - hn[ell]).mean(0) @ u).abs(),
            ]
        )  # (3, R)
        k = math.ceil(rank / 3)
        chosen: list[int] = []
        for row in scores:  # the union of each score's top k
            chosen += [j for j in torch.argsort(row, descending=True)[:k].tolist() if j not in chosen]
        fill = (scores / scores.amax(1, keepdim=True).clamp_min(1e-12)).amax(0)
        for j in torch.argsort(fill, descending=True).tolist():
            if len(chosen) >= rank:
                break
            if j not in chosen:
                chosen.append(j)
        idx = torch.tensor(sorted(chosen[:rank]))
        out.append((u[:, idx].contiguous(), s[idx].contiguous(), v[:, idx].contiguous()))
    return out


def load_adapter(model: nn.Module, directory: str | Path) -> Adapter:
    """Load an adapter saved by ``Adapter.save`` onto ``model``.

    Checks, each failing with a one-line message naming the file and field: both files exist and parse; the
    format and its version, the loss name and version, the field types (``AdapterConfig.from_dict``); the tensor
    checksum (format ≥ 2), finite values and shapes against the model; and the base-model fingerprint.

    Raises:
        AdapterFileError: a missing, truncated, corrupted or malformed file (file and field named).
        ConfigError: an ``adapter`` field of the wrong type or range.
        NonFiniteError: a tensor holds NaN or inf.
        ValueError: an adapter made for a different base model (fingerprint of the targeted weights' names,
            shapes and values differs).
    """
    d = Path(directory)
    if not (d / CONFIG_NAME).is_file() and (d / "steering_config.json").is_file():
        raise MissingFileError(
            "holds an adapter of another family (steering_config.json): load it with "
            "innerpissa.adapter.families.load_steering",
            path=d,
        )
    for f in (CONFIG_NAME, WEIGHTS_NAME):
        if not (d / f).is_file():
            raise MissingFileError(f"{f} not found: not an innerpissa adapter directory", path=d)
    cfg = read_adapter_config(d)
    config = AdapterConfig.from_dict(cfg["adapter"], source=str(d / CONFIG_NAME))
    made_for = cfg.get("base_model_class")
    if made_for is not None and made_for != type(model).__name__:
        raise ValueError(f"{d}: adapter was made for a different base model ({made_for}, not {type(model).__name__})")
    mods = dict(model.named_modules())
    missing = [n for n in cfg["target_modules"] if not isinstance(mods.get(n), nn.Linear)]
    if missing:
        raise ValueError(
            f"{d / CONFIG_NAME}: adapter targets modules this model lacks ({missing[:3]}…): "
            "it was made for a different base model"
        )
    weights = {n: mods[n].weight for n in cfg["target_modules"]}
    if fingerprint(weights) != cfg["base_fingerprint"]:
        raise ValueError(f"{d}: adapter was made for a different base model (weight fingerprint differs)")
    tensors = read_adapter_tensors(d, cfg)
    layers = {}
    for name in cfg["target_modules"]:
        try:
            u, s, v = tensors[f"{name}.U"], tensors[f"{name}.S"], tensors[f"{name}.V"]
            theta, delta = tensors[f"{name}.theta"], tensors[f"{name}.delta"]
        except KeyError as e:
            raise AdapterFileError(f"missing tensor {e.args[0]}", path=d / WEIGHTS_NAME) from None
        d_out, d_in = weights[name].shape
        r = config.rank or s.shape[0]
        expect = {"U": (d_out, r), "S": (r,), "V": (d_in, r), "theta": (r, r), "delta": (r,)}
        for key, t in zip(expect, (u, s, v, theta, delta)):
            if tuple(t.shape) != expect[key]:
                raise AdapterFileError(
                    f"tensor {name}.{key} has shape {tuple(t.shape)}, expected {expect[key]} "
                    f"(rank {r}, weight {d_out}x{d_in})",
                    path=d / WEIGHTS_NAME,
                    field=f"{name}.{key}",
                )
        lay = InnerPiSSALayer(u, s, v, scale=config.scale, rotate=config.rotate, rotate_side=config.rotate_side)
        lay.theta.data.copy_(theta)
        lay.delta.data.copy_(delta)
        layers[name] = lay
    meta = {
        k: v
        for k, v in cfg.items()
        if k
        not in (
            "format",
            "format_version",
            "adapter",
            "target_modules",
            "base_fingerprint",
            "base_model_class",
            "tensor_sha256",
        )
    }
    device = next(model.parameters()).device
    return Adapter(model, config, layers, cfg["base_fingerprint"], meta).to(device)
