"""Training an InnerPiSSA adapter at c = +1 and c = −1 together (docs/design.md §3).

Per step, for a batch of N contrastive pairs (positive, negative prompt sharing an assistant suffix):

1. the c = 0 pass (adapter skipped, exact base model, no grad): hidden states h⁰ at the loss block (last K
   tokens) and the log-probs of the assistant-suffix tokens. The base model never changes, so this pass is
   computed once per training pair the schedule draws, before the first step, and reused (``reference_cache``),
   except for objectives that read whole next-token distributions;
2. one steered pass over [pos; neg] at c = +1 and [pos; neg] at c = −1 (per-row coefficients, 4N rows), and for
   ``anchored`` the persona-free prompts at ±1 (their c = 0 pass is cached with the pair's).

The ruler (basis, preference direction u, σ) is measured once from the base model and frozen, so the adapter
cannot win by rotating it; the sign is fixed by construction: +c moves toward the positive persona. Recipe
options (``TrainConfig``): epochs or steps, cosine or one-cycle schedule, constraint warm-up, weight decay, a
bound on the rotation angle, the ruler's basis (the adapted writer's U, or a base-model PCA basis the adapter
does not control) and, through ``AdapterConfig.depth_range``, adapters only below the loss block.

"Suffix" tokens are those of the unfinished assistant reply the two prompts share (``ContrastivePair.suffix``);
``reprpo-svd`` version 1 also counted the shared end of the persona sentence and the chat-template tokens before
the reply, so its coherence and ordering terms mostly rewarded log p(" person" | persona words).

Modules, in the order a step uses them: ``config`` (``TrainConfig``), ``batches`` (tokenized pairs and the
suffix mask), ``objectives`` (the versioned losses), ``ruler`` (the frozen basis and preference direction),
``passes`` (the forward passes and the c = 0 reference cache), ``guard`` (the opt-in answer-bias guard),
``rundir`` (resume and the run's files) and ``loop`` (``train`` and ``validate``). The names below are this
package's public API; ``innerpissa.train`` at the top level is the ``train`` function itself, so reach a module
as ``innerpissa.train.loop`` through ``importlib`` or ``from innerpissa.train.loop import …``.
"""

from .batches import PairBatch, check_pairs_differ, pairs_sha256, suffix_token_count, tokenize_neutral, tokenize_pairs
from .config import TrainConfig
from .loop import adapter_stats, bound_rotations, constraint_weight, reprpo_loss, scheduled_pairs, train, validate
from .objectives import BASES, LOSSES, OBJECTIVES, Passes, Ruler
from .passes import (
    batch_free_reference,
    batch_reference,
    compute_passes,
    forward_states,
    gap_gradients,
    reference_cache,
    shared_prefix_len,
    steered_forward,
)
from .ruler import loss_block_index, preference_direction
from .rundir import RUN_STATE

__all__ = [
    "BASES",
    "LOSSES",
    "OBJECTIVES",
    "RUN_STATE",
    "PairBatch",
    "Passes",
    "Ruler",
    "TrainConfig",
    "adapter_stats",
    "batch_free_reference",
    "batch_reference",
    "bound_rotations",
    "check_pairs_differ",
    "compute_passes",
    "constraint_weight",
    "forward_states",
    "gap_gradients",
    "loss_block_index",
    "pairs_sha256",
    "preference_direction",
    "reference_cache",
    "reprpo_loss",
    "scheduled_pairs",
    "shared_prefix_len",
    "steered_forward",
    "suffix_token_count",
    "tokenize_neutral",
    "tokenize_pairs",
    "train",
    "validate",
]
