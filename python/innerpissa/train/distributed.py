"""Data-parallel training across processes, started by ``accelerate launch`` (docs/design.md §3).

Every process holds the whole base model and the adapter, draws the same global batch of ``batch_pairs`` pairs
(same sampler, same seed) and trains on its own shard of it (pairs ``rank, rank + world, …``); after the backward
pass the adapter's gradients are averaged over the processes (all-reduce), so every process takes the same
optimizer step and holds the same adapter. This is DistributedDataParallel's rule: the loss each process
averages over its shard, then the mean over processes. Terms that are means over pairs (separation, ordering,
shift) equal the one-process value exactly; the coherence terms, means over suffix *tokens*, weight each shard's
tokens by its own count, so they differ from one process when the shards hold different numbers of suffix
tokens (tests bound the effect on the trained adapter). Only process 0 writes the run directory.

Launch: ``accelerate launch --multi_gpu --num_processes N -m innerpissa.cli train …`` (``--multi_gpu`` picks
accelerate's torchrun launcher; on a machine without CUDA the processes run on CPU with gloo, on GPUs with nccl),
or ``torchrun --nproc_per_node N -m innerpissa.cli train …``. Not ``accelerate launch --cpu``: without MPI that
starts one process. ``accelerate.PartialState`` initialises the process group; the collectives are
``torch.distributed``'s.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from ..errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Processes:
    """This process's place among the training processes: ``rank`` in 0 … ``world`` − 1, and the device its
    collectives run on (``cuda:N`` under nccl; the model must be there too, which ``ipissa train``'s default
    ``--device`` arranges)."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"

    @property
    def main(self) -> bool:
        """True in the process that writes files and shows progress (rank 0)."""
        return self.rank == 0

    def shard(self, idx: list[int]) -> list[int]:
        """This process's pairs of a global batch ``idx``: every ``world``-th from position ``rank``."""
        return idx[self.rank :: self.world]

    def check_batch(self, batch_pairs: int) -> None:
        """Raises ConfigError unless ``batch_pairs`` splits into equal shards (DDP's mean of means needs them)."""
        if batch_pairs % self.world:
            raise ConfigError(
                f"batch_pairs={batch_pairs} does not split into {self.world} equal shards; use a multiple of "
                f"{self.world} (--batch-pairs) or another number of processes",
                field="batch_pairs",
            )

    def average_gradients(self, params: list[torch.Tensor]) -> None:
        """Replace each parameter's gradient by its mean over the processes (one flattened all-reduce)."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.world
        at = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[at : at + n].view_as(p).to(p.dtype)
            at += n

    def average(self, metrics: dict) -> dict:
        """The numeric entries of ``metrics`` averaged over the processes (others unchanged)."""
        if self.world == 1:
            return metrics
        keys = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        vals = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(vals)
        return {**metrics, **{k: float(v) / self.world for k, v in zip(keys, vals.tolist())}}

    def broadcast_int(self, value: int) -> int:
        """Process 0's ``value``, in every process."""
        if self.world == 1:
            return value
        t = torch.tensor([value if self.main else 0], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(t)
        return int(t.item())

    def barrier(self) -> None:
        """Wait until every process reaches this point."""
        if self.world > 1:
            torch.distributed.barrier()


def processes() -> Processes:
    """The training processes of this launch: one unless ``WORLD_SIZE`` > 1 (``accelerate launch --multi_gpu``,
    ``torchrun``), in which case the process group is initialised through ``accelerate.PartialState`` (gloo on
    CPU, nccl on GPU).

    Raises:
        RuntimeError: ``WORLD_SIZE`` > 1 but the process group has another size (a launcher accelerate does not
            recognise).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Processes()
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    if state.num_processes != world:
        raise RuntimeError(
            f"WORLD_SIZE is {world} but accelerate set up {state.num_processes} process(es); launch with "
            "`accelerate launch --multi_gpu --num_processes N` or `torchrun --nproc_per_node N`"
        )
    return Processes(rank=state.process_index, world=state.num_processes, device=str(state.device))
