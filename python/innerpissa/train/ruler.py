"""The frozen ruler of the loss (``objectives.Ruler``): which block the loss reads, in which basis, along which
preference direction u, measured once from the unsteered model so the adapter cannot win by rotating it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..adapter import Adapter
from ..adapter.targets import block_names, decoder_blocks
from ..directions import fisher_direction, mean_difference, pca_direction
from ..pairs import ContrastivePair
from .batches import tokenize_pairs
from .objectives import Ruler
from .passes import block_states, gap_gradients

if TYPE_CHECKING:
    from .config import TrainConfig


def _basis_for_block(adapter: Adapter, block_index: int) -> str:
    """Name of the adapted residual writer whose U basis measures the loss-layer residual."""
    names = block_names(adapter.model)
    for i in range(block_index, -1, -1):
        prefix = names[i] + "."
        cands = [t for t in adapter.target_names if t.startswith(prefix)]
        if cands:
            return cands[-1]  # the later writer of the block (MLP down projection)
    return adapter.target_names[0]


def loss_block_index(n_blocks: int, loss_layer: float) -> int:
    """The decoder block read by the loss: round(loss_layer · n_blocks), at most the last block."""
    return min(n_blocks - 1, int(round(loss_layer * n_blocks)))


@torch.no_grad()
def preference_direction(
    adapter: Adapter, tokenizer, pairs: list[ContrastivePair], cfg: TrainConfig, batch_pairs: int = 16
) -> Ruler:
    """Measure the frozen ruler (``objectives.Ruler``) from the unsteered model on the first
    ``cfg.direction_pairs`` training pairs: last-token differences h_pos − h_neg at the loss block, the basis
    (``cfg.basis``), the unit direction u in that basis (``cfg.direction``: the mean difference, the first principal
    component of the differences, or the natural-gradient direction of ``gap_gradients``; see ``directions``),
    σ and the per-dimension spread.

    Raises:
        ValueError: positive and negative prompts give identical hidden states.
    """
    blocks = decoder_blocks(adapter.model)
    idx = loss_block_index(len(blocks), cfg.loss_layer)
    diffs = []
    pairs = pairs[: cfg.direction_pairs]
    for i in range(0, len(pairs), batch_pairs):
        b = tokenize_pairs(tokenizer, pairs[i : i + batch_pairs], cfg.max_suffix_tokens)
        h = block_states(adapter.model, b, blocks[idx], 1)
        n = b.n_pairs
        diffs.append(h[:n, -1] - h[n:, -1])  # (N, d)
    diffs_t = torch.cat(diffs)  # (n, d)
    mean_diff = diffs_t.mean(0)
    if cfg.basis == "pca":
        rows = diffs_t / diffs_t.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        k = min(cfg.basis_rank, rows.shape[0], rows.shape[1])
        basis = torch.linalg.svd(rows, full_matrices=False).Vh[:k].T.contiguous()  # (d, k)
        name = "pca"
    else:
        name = _basis_for_block(adapter, idx)
        basis = adapter.layer(name).U.detach().cpu().clone()  # (d, r), on the CPU with the loss
    proj = diffs_t @ basis  # (n, k)
    coords = basis.T @ mean_diff
    if coords.norm() == 0:
        raise ValueError("positive and negative prompts give identical hidden states: pairs do not differ")
    if cfg.direction == "pca":
        u = pca_direction(proj)
    elif cfg.direction == "fisher":
        chunks = [pairs[i : i + batch_pairs] for i in range(0, len(pairs), batch_pairs)]
        grads = torch.cat(
            [
                gap_gradients(adapter.model, tokenize_pairs(tokenizer, c, cfg.max_suffix_tokens), blocks[idx], basis)
                for c in chunks
            ]
        )
        u = fisher_direction(grads, proj, cfg.fisher_damping)
    else:  # the mean difference, projected first: coords / ‖coords‖ exactly, as before this option existed
        u = mean_difference(coords[None])
    spread = proj.std(0) if proj.shape[0] > 1 else proj.abs()[0]
    spread = spread.clamp_min(max(0.1 * float(spread.median()), 1e-6))
    sigma = abs(float((proj @ u).mean()))
    return Ruler(idx, name, basis, u, sigma, spread)
