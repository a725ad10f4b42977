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


def logit_positions(model: nn.Module, start: int, stop: int) -> torch.Tensor:
    """``logits_to_keep`` for positions ``start`` … ``stop`` − 1 of every row: an index tensor on ``model``'s
    device, not the int ``stop − start``.

    For an int n, transformers projects the view ``hidden[:, -n:]``; for n > 1 that view is not contiguous, and the
    output head on it runs as a batched matmul that reads the (V, d) head weight once per row. The indexed copy is
    contiguous and runs as one matmul: for SmolLM2's 49,152-token vocabulary at 32 rows × 8 positions, 167 against
    421 ms forward and 370 against 1038 ms forward + backward on 2 cores (docs/benchmarks.md, training step).
    """
    device = next(model.parameters()).device
    return torch.arange(start, stop, device=device)


class _StopForward(Exception):
    """Raised by ``run_until``'s hook to end a forward pass after the module it watches."""


def run_until(model: nn.Module, module: nn.Module, **inputs) -> None:
    """Run ``model(**inputs)`` only as far as ``module``: the pass stops right after ``module``'s forward, so the
    blocks above it and the output head are never computed. For passes that only read hidden states through hooks
    registered *before* this call (``capture_outputs``); no output is returned. No-grad use only."""

    def stop(_module, _args, _out):
        raise _StopForward

    with forward_hooks([(module, stop)]), contextlib.suppress(_StopForward):
        model(**inputs)


@contextlib.contextmanager
def branch_rows(blocks: nn.ModuleList, start: int, groups: int) -> Iterator[None]:
    """Forward passes in the ``with`` block run blocks below ``start`` on the batch's B rows once and blocks from
    ``start`` up on ``groups``·B rows, group-major (the B rows repeated ``groups`` times): a forward pre-hook on
    every block from ``start`` repeats the batch-sized tensors it receives (the hidden states of block ``start``,
    and for every such block the attention mask, rotary tables and positions the model hands it).

    For passes whose blocks below ``start`` are the same in every group, e.g. steering coefficients whose
    adapter starts at block ``start``: the output and any key/value cache then hold B rows for the lower blocks
    and ``groups``·B for the rest, and a later ``batch_repeat_interleave`` keeps that layout. Same outputs as
    running the repeated batch (tests compare both) for ``groups``·B rows' work above ``start`` and B rows' below.
    A tensor whose first dimension is not B (a broadcast mask of batch 1, a cache) is left as it is.
    """

    def repeat(x, b: int):
        if torch.is_tensor(x) and x.dim() > 0 and x.shape[0] == b:
            return x.repeat(groups, *([1] * (x.dim() - 1)))
        if isinstance(x, tuple):
            return tuple(repeat(v, b) for v in x)
        return x

    def pre_hook(index: int):
        def hook(_module, args, kwargs):
            b = (hidden_of(args[0]) if args else kwargs["hidden_states"]).shape[0]
            if index > start:  # its hidden states are already repeated: the model's per-pass tensors have B rows
                b //= groups
            kwargs = {k: (v if k == "past_key_values" else repeat(v, b)) for k, v in kwargs.items()}
            if index == start:
                args = tuple(repeat(a, b) for a in args)
            return args, kwargs

        return hook

    if groups == 1:
        yield
        return
    handles = [blocks[i].register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i in range(start, len(blocks))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


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
