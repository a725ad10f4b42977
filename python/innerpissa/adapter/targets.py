"""Find what an adapter can target in a Hugging Face causal LM, by structure (docs/design.md §2).

Decoder blocks, hidden size, the residual writers of a block (attention output, MLP down projection) and every
sublayer by role (q, k, v, o, gate, up, down), the depth range an AdapterConfig selects, and the resulting targets.
No architecture names are listed: the functions look at module shapes and names.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .config import AdapterConfig


class UnsupportedArchitectureError(ConfigError):
    """The model's decoder blocks or residual writers could not be found by structure, or it is not a
    decoder-only causal LM."""


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
