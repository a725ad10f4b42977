"""Walk a Hugging Face causal LM, pick the residual-writing projections, and steer them (docs/design.md §2).

The user's model is never changed outside ``with adapter.steer(c):`` (forward hooks, removed on exit, even on
error) or an explicit ``adapter.merge(c)`` / ``adapter.unmerge()``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import AdapterFileError, ConfigError, MissingFileError, NonFiniteError, OutputExistsError, finite_coeff
from ..hooks import forward_hooks
from .config import AdapterConfig
from .layer import InnerPiSSALayer

# 1: tensors + config; 2: adds ``tensor_sha256`` (checked on load). Version-1 directories still load.
FORMAT_VERSION = 2
# |c| beyond this multiple of the largest trained |c| triggers a SteeringRangeWarning.
RANGE_WARN_FACTOR = 2.0
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"


class UnsupportedArchitectureError(ConfigError):
    """The model's decoder blocks or residual writers could not be found by structure, or it is not a
    decoder-only causal LM."""


class SteeringRangeWarning(UserWarning):
    """A steering coefficient far outside the range the adapter was trained at (text may degrade)."""


def check_causal_decoder(model: nn.Module) -> None:
    """Refuse encoder-decoder models and encoder architectures configured as decoders (BERT with
    ``is_decoder=True``): InnerPiSSA steers the residual stream of a decoder-only causal LM.

    Raises:
        UnsupportedArchitectureError: naming the config flag that gave it away.
    """
    cfg = getattr(model, "config", None)
    name = type(model).__name__
    for flag in ("is_encoder_decoder", "is_decoder", "add_cross_attention"):
        if getattr(cfg, flag, False) is True:
            raise UnsupportedArchitectureError(
                f"{name}: config.{flag} is True; innerpissa needs a decoder-only causal LM (Llama, Gemma, Qwen, "
                "Mistral families), not an encoder or encoder-decoder model"
            )


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks: the longest ``nn.ModuleList`` whose children all share one class.

    Raises:
        UnsupportedArchitectureError: no such list (or several of equal length).
    """
    best: list[nn.ModuleList] = []
    for mod in model.modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 1 and len({type(m) for m in mod}) == 1:  # noqa: SIM102
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


#: sublayer groups of ``AdapterConfig.modules``, and the aliases of the two residual writers
ROLE_GROUPS = {
    "writers": ("o", "down"),
    "readers": ("q", "k", "v", "gate", "up"),
    "attn": ("o",),
    "mlp": ("down",),
}
ROLES = ("q", "k", "v", "o", "gate", "up", "down")


def sublayers(block: nn.Module, d_model: int) -> dict[str, tuple[str, nn.Linear]]:
    """Every linear layer of one decoder block by role, found by structure (``residual_writers`` first).

    Roles: ``o`` and ``down``, the residual writers; ``q``, ``k``, ``v``, the attention child's linears that read
    d_model, in registration order (transformers registers q, k, v, o in that order); ``gate`` and ``up``, the MLP
    child's linears that read d_model (``gate`` only when there are two; a gateless MLP has ``up`` alone).

    Returns:
        ``{role: (name relative to the block, linear)}``.
    Raises:
        UnsupportedArchitectureError: as ``residual_writers``, or an attention child without exactly three readers
            (fused q/k/v projections are not split).
    """
    writers = residual_writers(block, d_model)
    out = {"o": writers["attn"], "down": writers["mlp"]}
    for kind, roles in (("attn", ("q", "k", "v")), ("mlp", ("gate", "up"))):
        child_name = writers[kind][0].split(".")[0]
        child = getattr(block, child_name)
        readers = [
            (f"{child_name}.{n}", m)
            for n, m in child.named_modules()
            if isinstance(m, nn.Linear) and m.in_features == d_model and f"{child_name}.{n}" != writers[kind][0]
        ]
        if kind == "attn" and len(readers) != 3:
            raise UnsupportedArchitectureError(
                f"decoder block {type(block).__name__}: {len(readers)} attention input projections, expected "
                "separate q, k and v"
            )
        if kind == "mlp" and len(readers) not in (1, 2):
            raise UnsupportedArchitectureError(
                f"decoder block {type(block).__name__}: {len(readers)} MLP input projections, expected gate and up"
            )
        out.update(zip(roles[-len(readers) :], readers))
    return out


def expand_modules(modules) -> list[str]:
    """``AdapterConfig.modules`` → sublayer roles in block order (q, k, v, o, gate, up, down), groups expanded."""
    want = {r for m in modules for r in ROLE_GROUPS.get(m, (m,))}
    return [r for r in ROLES if r in want]


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
    """Map of full module name → linear layer to adapt (``config.modules`` roles of the selected blocks), in depth
    order and, within a block, in the order q, k, v, o, gate, up, down.

    Raises:
        UnsupportedArchitectureError: a requested role that the blocks do not have (e.g. ``gate`` in a gateless
            MLP).
    """
    blocks = decoder_blocks(model)
    names = block_names(model)
    d_model = hidden_size(model)
    targets: dict[str, nn.Linear] = {}
    roles = expand_modules(config.modules)
    for i in select_layers(len(blocks), config):
        if set(roles) <= {"o", "down"}:  # the default: no need to find (or require) the readers
            writers = residual_writers(blocks[i], d_model)
            found = {"o": writers["attn"], "down": writers["mlp"]}
        else:
            found = sublayers(blocks[i], d_model)
        for role in roles:
            if role not in found:
                raise UnsupportedArchitectureError(f"decoder block {i} has no {role!r} projection")
            rel, lin = found[role]
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


def tensor_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the sorted names, dtypes, shapes and bytes of ``tensors`` (stored as ``tensor_sha256``)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def check_output(
    path: str | Path, overwrite: bool = False, *, kind: str = "dir", protect: tuple[str | Path, ...] = ()
) -> Path:
    """Check an output path before any compute: nothing the caller did not ask to replace gets replaced.

    Args:
        path: output directory (``kind="dir"``) or file (``kind="file"``).
        overwrite: allow a non-empty directory (only the files the export writes are replaced; others are
            kept) or an existing file.
        protect: directories the output must not be or contain (e.g. the adapter being exported).
    Raises:
        OutputExistsError: the path exists (non-empty) without ``overwrite``, has the wrong kind, or is a
            protected input directory.
    """
    p = Path(path).expanduser()
    for q in protect:
        q = Path(q).expanduser().resolve()
        if p.resolve() == q:
            raise OutputExistsError(
                f"output is the input directory {q} (or holds it); choose another output path", path=p
            )
    if kind == "dir":
        if p.exists() and not p.is_dir():
            raise OutputExistsError("exists and is not a directory; choose another output path", path=p)
        if p.is_dir() and any(p.iterdir()) and not overwrite:
            raise OutputExistsError(
                "exists and is not empty; pass --overwrite (overwrite=True) to replace the "
                "files this command writes (other files are kept), or choose another path",
                path=p,
            )
    else:
        if p.is_dir():
            raise OutputExistsError("is a directory; the output of this format is a file", path=p)
        if p.exists() and not overwrite:
            raise OutputExistsError(
                "exists; pass --overwrite (overwrite=True) to replace it, or choose another path", path=p
            )
    return p


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


def atomic_dir(out: Path, fill, overwrite: bool = False) -> Path:
    """Fill a temporary sibling directory, then publish it as ``out``.

    A new or empty ``out`` receives the whole directory by rename. A non-empty ``out`` is refused unless
    ``overwrite``; then each written file replaces its namesake by an atomic rename and every other file in
    ``out`` is kept. Nothing is ever deleted that ``fill`` did not write.

    Raises:
        OutputExistsError: ``out`` is non-empty without ``overwrite``, or a written file would replace a
            directory (or a directory a file).
    """
    out = check_output(out, overwrite).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        fill(tmp)
        if not out.exists():
            os.replace(tmp, out)
            return out
        for src in sorted(tmp.rglob("*")):
            dst = out / src.relative_to(tmp)
            if src.is_dir():
                if dst.exists() and not dst.is_dir():
                    raise OutputExistsError("is a file where the export writes a directory", path=dst)
                dst.mkdir(exist_ok=True)
            else:
                if dst.is_dir():
                    raise OutputExistsError("is a directory where the export writes a file", path=dst)
                os.replace(src, dst)
        shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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


def _read_adapter_config(d: Path) -> dict:
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


def _read_adapter_tensors(d: Path, cfg: dict) -> dict[str, torch.Tensor]:
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
    cfg = _read_adapter_config(d)
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
    tensors = _read_adapter_tensors(d, cfg)
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
