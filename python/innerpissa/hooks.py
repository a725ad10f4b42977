"""Forward hooks on decoder blocks and linear layers, written once: read a module's output, add to it, and
register a set of hooks for the length of a ``with`` block.

A decoder block returns its hidden states (B, T, d) either as a tensor or as the first element of a tuple
(older transformers, or with attention weights); ``hidden_of`` and ``replace_hidden`` hide that difference.
Hooks are removed when the ``with`` block exits, also on an exception, so a failed pass never leaves a model
steered. The steering-vector and directional-ablation arithmetic follows Turner et al. 2023 (activation
addition) and Arditi et al. 2024 (projection); the module only supplies the plumbing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping

import torch
from torch import nn

#: A forward hook: (module, positional args, output) → a replacement output, or None to keep it.
Hook = Callable[[nn.Module, tuple, object], object]


def hidden_of(out) -> torch.Tensor:
    """The hidden states (B, T, d) of a module output: ``out`` itself, or its first element when it is a tuple."""
    return out[0] if isinstance(out, tuple) else out


def replace_hidden(out, hidden: torch.Tensor):
    """``out`` with its hidden states replaced by ``hidden``, keeping the tuple structure (and its other items)."""
    return (hidden, *out[1:]) if isinstance(out, tuple) else hidden


@contextlib.contextmanager
def forward_hooks(
    hooks: Iterable[tuple[nn.Module, Hook]], pre_hooks: Iterable[tuple[nn.Module, Callable]] = ()
) -> Iterator[None]:
    """Register forward hooks (and forward pre-hooks) on modules for the body of the ``with`` block; all are
    removed on exit, also when the body raises."""
    handles = []
    try:
        for module, fn in hooks:
            handles.append(module.register_forward_hook(fn))
        for module, fn in pre_hooks:
            handles.append(module.register_forward_pre_hook(fn))
        yield
    finally:
        for h in handles:
            h.remove()


def on_model_device(model: nn.Module, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tensors`` moved to the device of ``model``'s first parameter (its input embedding, also under a
    ``device_map``): token ids, masks and positions are built on the CPU and moved here before a forward pass."""
    device = next(model.parameters()).device
    return tuple(t.to(device) for t in tensors)


def shift_output(delta: Callable[[torch.Tensor], torch.Tensor]) -> Hook:
    """A hook that adds ``delta(h)`` to a module's hidden states h (B, T, d); ``delta`` may return any shape that
    broadcasts to h, in any dtype and on any device (it is moved and cast to h's). Example:
    ``shift_output(lambda h: c * v)`` adds c·v at every position (a steering vector)."""

    def hook(_module, _args, out):
        h = hidden_of(out)
        return replace_hidden(out, h + delta(h).to(h.device, h.dtype))

    return hook


@contextlib.contextmanager
def capture_outputs(
    modules: Mapping[Hashable, nn.Module], select: Callable[[torch.Tensor], torch.Tensor] = lambda h: h
) -> Iterator[dict]:
    """Record ``select(hidden)`` of each module's output during the ``with`` block: yields a dict that maps each
    key of ``modules`` to what its module last produced (filled as forward passes run; a later pass overwrites)."""
    store: dict = {}

    def recorder(key):
        def hook(_module, _args, out):
            store[key] = select(hidden_of(out))

        return hook

    with forward_hooks((m, recorder(k)) for k, m in modules.items()):
        yield store
