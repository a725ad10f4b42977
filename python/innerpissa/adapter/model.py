"""Walk a Hugging Face causal LM, pick the residual-writing projections, and steer them (DESIGN.md §2).

The user's model is never changed outside ``with adapter.steer(c):`` (forward hooks, removed on exit, even on
error) or an explicit ``adapter.merge(c)`` / ``adapter.unmerge()``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import AdapterConfig
from .layer import InnerPiSSALayer

FORMAT_VERSION = 1
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"


class UnsupportedArchitectureError(ValueError):
    """The model's decoder blocks or residual writers could not be found by structure."""


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks: the longest ``nn.ModuleList`` whose children all share one class.

    Raises:
        UnsupportedArchitectureError: no such list (or several of equal length).
    """
    best: list[nn.ModuleList] = []
    for mod in model.modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 1 and len({type(m) for m in mod}) == 1:
            if any(isinstance(c, nn.Linear) for c in mod[0].modules()):
                if not best or len(mod) > len(best[0]):
                    best = [mod]
                elif len(mod) == len(best[0]):
                    best.append(mod)
    if len(best) != 1:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__}: expected one list of identical decoder blocks, found {len(best)}; "
            "innerpissa supports decoder-only transformers (Llama, Gemma, Qwen, Mistral families)"
        )
    return best[0]


def hidden_size(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", cfg)
    d = getattr(cfg, "hidden_size", None)
    if d is None:
        raise UnsupportedArchitectureError(f"{type(model).__name__}: config has no hidden_size")
    return int(d)


def residual_writers(block: nn.Module, d_model: int) -> dict[str, tuple[str, nn.Linear]]:
    """The linear layers of one decoder block that write into the residual stream.

    For each direct child of the block that contains linear layers (the attention and the MLP sub-modules),
    the residual writer is its last-registered ``nn.Linear`` with ``out_features == d_model`` (the attention
    output projection, the MLP down projection). The attention child is the one with ≥ 3 linears reading
    d_model (q, k, v); the MLP child has fewer (gate and up, or up alone).

    Returns:
        ``{"attn": (name, linear), "mlp": (name, linear)}`` with names relative to the block.
    Raises:
        UnsupportedArchitectureError: not exactly one attention-like and one MLP-like child.
    """
    found: dict[str, tuple[str, nn.Linear]] = {}
    for child_name, child in block.named_children():
        linears = [(n, m) for n, m in child.named_modules() if isinstance(m, nn.Linear)]
        writers = [(n, m) for n, m in linears if m.out_features == d_model]
        if not writers:
            continue
        name, lin = writers[-1]
        readers = [m for _, m in linears if m.in_features == d_model]
        kind = "attn" if len(readers) >= 3 else "mlp"
        if kind in found:
            raise UnsupportedArchitectureError(
                f"decoder block {type(block).__name__}: two {kind}-like sub-modules ({found[kind][0]}, {child_name})"
            )
        found[kind] = (f"{child_name}.{name}", lin)
    if set(found) != {"attn", "mlp"}:
        raise UnsupportedArchitectureError(
            f"decoder block {type(block).__name__}: could not find both an attention output projection and an "
            f"MLP down projection writing d_model={d_model} (found {sorted(found)})"
        )
    return found


def select_layers(n_layers_total: int, config: AdapterConfig) -> list[int]:
    """Indices of adapted blocks: round(start·L) … (L−3 or round(stop·L)), optionally thinned evenly."""
    start_f, stop_f = config.depth_range
    start = int(round(start_f * n_layers_total))
    stop = n_layers_total - 3 if stop_f is None else int(round(stop_f * n_layers_total))
    stop = min(stop, n_layers_total - 1)
    if stop < start:
        raise ValueError(f"depth_range {config.depth_range} selects no layer of a {n_layers_total}-layer model")
    layers = list(range(start, stop + 1))
    if config.n_layers is not None and config.n_layers < len(layers):
        idx = torch.linspace(0, len(layers) - 1, config.n_layers).round().long().tolist()
        layers = sorted({layers[i] for i in idx})
    return layers


def block_names(model: nn.Module) -> list[str]:
    """Full module names of the decoder blocks, in depth order (e.g. ``model.layers.3``)."""
    blocks = decoder_blocks(model)
    prefix = next(n for n, m in model.named_modules() if m is blocks)
    return [f"{prefix}.{i}" for i in range(len(blocks))]


def find_targets(model: nn.Module, config: AdapterConfig) -> dict[str, nn.Linear]:
    """Map of full module name → linear layer to adapt, in depth order."""
    blocks = decoder_blocks(model)
    names = block_names(model)
    d_model = hidden_size(model)
    targets: dict[str, nn.Linear] = {}
    for i in select_layers(len(blocks), config):
        writers = residual_writers(blocks[i], d_model)
        for kind in ("attn", "mlp"):
            if kind in config.modules:
                rel, lin = writers[kind]
                targets[f"{names[i]}.{rel}"] = lin
    return targets


def fingerprint(weights: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, shapes and fp32 values of the targeted base weights."""
    h = hashlib.sha256()
    for name in sorted(weights):
        w = weights[name].detach().float().contiguous().cpu()
        h.update(f"{name}|{tuple(w.shape)}|".encode())
        h.update(w.numpy().tobytes())
    return h.hexdigest()


class Adapter(nn.Module):
    """An InnerPiSSA adapter bound to one base model.

    Use ``with adapter.steer(c):`` to run the model steered by coefficient c (float, or a tensor of shape
    (batch,) to steer each row of a batch with its own coefficient). c = 0 leaves the model bit-identical.
    """

    def __init__(self, model: nn.Module, config: AdapterConfig, layers: dict[str, InnerPiSSALayer],
                 base_fingerprint: str, meta: dict | None = None):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleDict({k.replace(".", "__"): v for k, v in layers.items()})
        self.target_names = list(layers)
        self.base_fingerprint = base_fingerprint
        self.meta = dict(meta or {})
        self._model = [model]  # not a submodule: the adapter's state_dict holds only its own tensors
        self._coeff: float | torch.Tensor = 0.0
        self._merged: float | None = None

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
        is_zero = (not torch.is_tensor(coeff) and float(coeff) == 0.0)
        if is_zero:
            yield self
            return
        handles = []
        ms: dict[str, torch.Tensor] = {}

        def make_hook(name: str):
            layer = self.layer(name)

            def hook(_mod, args, out):
                m = ms.get(name)
                if m is None:  # M(c) once per forward, not per token
                    m = ms[name] = layer.steer_matrix(coeff)
                return out + layer.delta_output(args[0], m)

            return hook

        try:
            for name, lin in self._targets().items():
                handles.append(lin.register_forward_hook(make_hook(name)))
            # M(c) depends on the parameters, so it is rebuilt for every forward pass
            pre = self.model.register_forward_pre_hook(lambda *_: ms.clear())
            handles.append(pre)
            yield self
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def merge(self, coeff: float) -> None:
        """Fold W(c) = W + U M(c) Vᵀ into the base weights in place. Undo with ``unmerge()``."""
        if self._merged is not None:
            raise RuntimeError(f"adapter already merged at c={self._merged}; unmerge() first")
        for name, lin in self._targets().items():
            lin.weight += self.layer(name).delta_weight(coeff).to(lin.weight.dtype)
        self._merged = float(coeff)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the merged ΔW(c) again (exact up to fp32 rounding, ~1e-7 relative)."""
        if self._merged is None:
            raise RuntimeError("adapter is not merged")
        for name, lin in self._targets().items():
            lin.weight -= self.layer(name).delta_weight(self._merged).to(lin.weight.dtype)
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
        cfg = {
            "format": "innerpissa",
            "format_version": FORMAT_VERSION,
            "adapter": self.config.to_dict(),
            "target_modules": self.target_names,
            "base_fingerprint": self.base_fingerprint,
            "base_model_class": type(self.model).__name__,
            **self.meta,
        }
        atomic_write(out / WEIGHTS_NAME, lambda p: save_file(tensors, str(p)))
        atomic_write(out / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(cfg, indent=2, default=str)))
        return out


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp)`` on a temporary sibling of ``path``, then rename it to ``path`` (removed on error)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_dir(out: Path, fill) -> Path:
    """Fill a temporary sibling directory, then move it to ``out`` (an existing ``out`` is replaced only then)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        fill(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old."))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def attach(model: nn.Module, config: AdapterConfig | None = None, meta: dict | None = None) -> Adapter:
    """Create an InnerPiSSA adapter for ``model``: top-r SVD of each targeted weight (Rust/faer), small init.

    The model is not modified. Shapes: for a target W (d_out, d_in): U (d_out, r), S (r,), V (d_in, r).
    Raises:
        UnsupportedArchitectureError: decoder blocks / residual writers not found.
        ValueError: rank larger than a targeted weight allows.
    """
    from ..svd import top_r_svd

    config = config or AdapterConfig()
    targets = find_targets(model, config)
    rank = config.rank or hidden_size(model) // 8
    for name, lin in targets.items():
        if rank > min(lin.weight.shape):
            raise ValueError(f"rank {rank} exceeds min{tuple(lin.weight.shape)} of {name}")
    config.rank = rank
    weights = {n: lin.weight for n, lin in targets.items()}
    bases = top_r_svd([w.detach().float() for w in weights.values()], rank)
    gen = torch.Generator().manual_seed(config.seed)
    layers = {
        name: InnerPiSSALayer(u, s, v, scale=config.scale, rotate=config.rotate, init_std=config.init_std,
                              generator=gen)
        for name, (u, s, v) in zip(targets, bases)
    }
    device = next(model.parameters()).device
    adapter = Adapter(model, config, layers, fingerprint(weights), meta)
    return adapter.to(device)


def load_adapter(model: nn.Module, directory: str | Path) -> Adapter:
    """Load an adapter saved by ``Adapter.save`` onto ``model``.

    Raises:
        FileNotFoundError: a missing file (named).
        ValueError: a malformed config (field named), or an adapter made for a different base model
            (fingerprint of the targeted weights' names, shapes and values differs).
    """
    d = Path(directory)
    for f in (CONFIG_NAME, WEIGHTS_NAME):
        if not (d / f).exists():
            raise FileNotFoundError(f"{d / f} not found: not an innerpissa adapter directory")
    try:
        cfg = json.loads((d / CONFIG_NAME).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{d / CONFIG_NAME}: invalid JSON ({e})") from e
    for field in ("adapter", "target_modules", "base_fingerprint"):
        if field not in cfg:
            raise ValueError(f"{d / CONFIG_NAME}: missing field {field!r}")
    made_for = cfg.get("base_model_class")
    if made_for is not None and made_for != type(model).__name__:
        raise ValueError(f"{d}: adapter was made for a different base model ({made_for}, not {type(model).__name__})")
    mods = dict(model.named_modules())
    missing = [n for n in cfg["target_modules"] if n not in mods]
    if missing:
        raise ValueError(f"{d / CONFIG_NAME}: adapter targets modules this model lacks ({missing[:3]}…): "
                         "it was made for a different base model")
    weights = {n: mods[n].weight for n in cfg["target_modules"]}
    if fingerprint(weights) != cfg["base_fingerprint"]:
        raise ValueError(f"{d}: adapter was made for a different base model (weight fingerprint differs)")
    config = AdapterConfig.from_dict(cfg["adapter"])
    tensors = load_file(str(d / WEIGHTS_NAME))
    layers = {}
    for name in cfg["target_modules"]:
        try:
            lay = InnerPiSSALayer(tensors[f"{name}.U"], tensors[f"{name}.S"], tensors[f"{name}.V"],
                                  scale=config.scale, rotate=config.rotate)
            lay.theta.data.copy_(tensors[f"{name}.theta"])
            lay.delta.data.copy_(tensors[f"{name}.delta"])
        except KeyError as e:
            raise ValueError(f"{d / WEIGHTS_NAME}: missing tensor {e.args[0]}") from e
        layers[name] = lay
    meta = {k: v for k, v in cfg.items() if k not in
            ("format", "format_version", "adapter", "target_modules", "base_fingerprint", "base_model_class")}
    device = next(model.parameters()).device
    return Adapter(model, config, layers, cfg["base_fingerprint"], meta).to(device)
