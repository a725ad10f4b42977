"""The training loop: ``train`` (resumable, checkpointed) and ``validate``, with the optimiser schedule, the
constraint warm-up, the rotation bound and the per-step diagnostics."""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..adapter import Adapter
from ..adapter.layer import skew
from ..adapter.targets import decoder_blocks
from ..errors import ConfigError, TrainingDivergedError
from ..outputs import atomic_write
from ..pairs import ContrastivePair
from .batches import PairBatch, check_pairs_differ, pairs_sha256, tokenize_neutral, tokenize_pairs
from .config import TrainConfig
from .distributed import Processes, processes
from .objectives import LOSSES, OBJECTIVES, Ruler, needs_full_distribution, needs_neutral
from .passes import batch_free_reference, batch_reference, compute_passes, reference_cache
from .ruler import preference_direction
from .rundir import prepare_run_dir, write_run_state


def reprpo_loss(
    adapter: Adapter,
    batch: PairBatch,
    pref: Ruler,
    cfg: TrainConfig,
    block: torch.nn.Module,
    free: PairBatch | None = None,
    omega: float = 1.0,
    reference: tuple | None = None,
    free_reference: tuple | None = None,
) -> tuple[torch.Tensor, dict]:
    """The configured objective (``cfg.objective``, see ``objectives``) on one batch → (scalar loss, metrics).
    ``reference`` / ``free_reference``: cached c = 0 outputs (``batch_reference`` / ``batch_free_reference``)."""
    passes = compute_passes(adapter, batch, pref, cfg, block, free, reference, free_reference)
    return LOSSES[cfg.objective](passes, pref, cfg, omega)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def scheduled_pairs(n_pairs: int, cfg: TrainConfig, total: int, procs: Processes | None = None) -> list[int]:
    """The training-pair indices the sampler of ``train`` draws over ``total`` steps (sorted, each once); with
    ``procs``, only those of that process's shards."""
    gen, order, used = random.Random(cfg.seed), [], set()
    for _ in range(total):
        idx, order = _next_batch(order, gen, n_pairs, cfg.batch_pairs)
        used.update(procs.shard(idx) if procs is not None else idx)
    return sorted(used)


@torch.no_grad()
def bound_rotations(adapter: Adapter, max_angle: float) -> None:
    """Scale each layer's θ so that ‖A‖₂ ≤ 2·tan(max_angle / 2): every principal angle of the Cayley rotation at
    |c| = 1 is then ≤ max_angle (A's eigenvalues ±iλ rotate by 2·atan(λ/2))."""
    limit = 2.0 * math.tan(max_angle / 2)
    for name in adapter.target_names:
        lay = adapter.layer(name)
        if not lay.rotate:
            continue
        norm = float(torch.linalg.matrix_norm(skew(lay.theta), ord=2))
        if norm > limit:
            lay.theta.mul_(limit / norm)


@torch.no_grad()
def adapter_stats(adapter: Adapter) -> dict:
    """Training diagnostics: the largest ‖A‖₂ and rotation angle at |c| = 1 (radians), the mean ‖δ‖/‖S‖, and the
    mean ratio ‖M_even‖_F / ‖M_odd‖_F of the parts of M(c) even and odd in c at |c| = 1 (0 for a purely odd,
    i.e. exactly reversible-in-sign, adapter)."""
    rot, rel, eo = 0.0, [], []
    for name in adapter.target_names:
        lay = adapter.layer(name)
        if lay.rotate:
            rot = max(rot, float(torch.linalg.matrix_norm(skew(lay.theta), ord=2)))
        rel.append(float(lay.delta.norm() / lay.S.norm()))
        m = lay.steer_matrix(torch.tensor([1.0, -1.0]))
        odd, even = (m[0] - m[1]) / 2, (m[0] + m[1]) / 2
        eo.append(float(even.norm() / odd.norm().clamp_min(1e-12)))
    return {
        "rot_norm_max": rot,
        "rot_angle_max": 2 * math.atan(rot / 2),
        "delta_rel": sum(rel) / len(rel),
        "m_even_odd": sum(eo) / len(eo),
    }


def _scheduler(opt, cfg: TrainConfig, total: int):
    if cfg.schedule == "one-cycle":  # linear lr/25 → lr over 10 % of training, cosine back to lr/25 (Smith 2018)
        w, lo = max(1, round(0.1 * total)), 1 / 25

        def one_cycle(k: int) -> float:
            if k < w:
                return lo + (1 - lo) * k / w
            return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * min(1.0, (k - w) / max(1, total - w))))

        return torch.optim.lr_scheduler.LambdaLR(opt, one_cycle)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: min(1.0, (k + 1) / 10) * 0.5 * (1 + math.cos(math.pi * min(k, total) / total))
    )


def constraint_weight(step: int, total: int, warmup: float) -> float:
    """ω(step): the constraint terms' weight, ramping linearly from 1/W to 1 over the first W = warmup·total steps."""
    if warmup <= 0:
        return 1.0
    return min(1.0, (step + 1) / max(1.0, warmup * total))


def train(
    adapter: Adapter,
    tokenizer,
    train_pairs: list[ContrastivePair],
    val_pairs: list[ContrastivePair],
    cfg: TrainConfig,
    run_dir: str | Path | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Train ``adapter`` in place with ``cfg.objective``; resumes from ``run_dir/checkpoint`` when present.

    Writes to ``run_dir``: ``run_state.json`` (the run's signature: training and adapter config, a sha256 of the
    pairs, the base fingerprint, the objective; step; finished), ``train_config.json`` (resolved),
    ``metrics.jsonl`` (one line per step with the loss terms and ``adapter_stats``, and per validation),
    ``checkpoint/state.pt`` (adapter + optimizer + scheduler + step, loaded with ``weights_only=True``, atomic,
    every ``checkpoint_every`` steps) and the final adapter in ``adapter/``. A rerun resumes only a matching
    unfinished run; anything else is refused unless ``overwrite``, which deletes the run's own files (never
    others) and starts fresh. The c = 0 pass of the training pairs is computed once and reused (objectives that
    read whole distributions recompute it per step). Returns the last validation metrics.

    Raises:
        ValueError: fewer training pairs than one batch.
        ConfigError: pairs whose two prompts tokenize identically; ``anchored`` with pairs lacking a neutral prompt.
        ConfigError: also for ``batch_pairs`` not a multiple of the process count (``accelerate launch``), and for
            a base model with gradient checkpointing on.
        ResumeMismatchError: ``run_dir`` holds a run with another configuration or other pairs.
        OutputExistsError: ``run_dir`` holds a finished run, or files that are not a run.
        TrainingDivergedError: the objective's loss (without the answer-bias term) became non-finite or exceeded
            ``max_loss_factor`` × max(1, first loss), or a parameter became non-finite (the adapter is not saved;
            lower ``lr``).
    """
    cfg.validate()
    procs = processes()  # one, or those of an ``accelerate launch`` (distributed.py)
    procs.check_batch(cfg.batch_pairs)
    if getattr(adapter.model, "is_gradient_checkpointing", False):
        raise ConfigError(
            "the base model has gradient checkpointing on: its backward pass recomputes blocks after the "
            "steering hooks are removed, so the adapter would get wrong gradients; call "
            "model.gradient_checkpointing_disable() (the frozen base model needs no stored gradients)",
            field="gradient_checkpointing",
        )
    if len(train_pairs) < cfg.batch_pairs:
        raise ValueError(f"{len(train_pairs)} training pairs < batch_pairs={cfg.batch_pairs}")
    check_pairs_differ(tokenizer, train_pairs)
    check_pairs_differ(tokenizer, val_pairs, "validation pairs")
    with_free = needs_neutral(cfg.objective)
    if with_free:
        tokenize_neutral(tokenizer, train_pairs[:1] + [p for p in train_pairs if not p.neutral][:1])
    _seed_all(cfg.seed)
    model = adapter.model
    total = cfg.total_steps(len(train_pairs))
    run = Path(run_dir) if run_dir else None
    loss_id = {"name": cfg.objective, "version": OBJECTIVES[cfg.objective]}
    if cfg.basis == "adapter-u" and not isinstance(adapter, Adapter):
        raise ConfigError(
            "basis 'adapter-u' reads the InnerPiSSA adapter's singular vectors; use basis 'pca' for "
            f"a {adapter.meta.get('family', type(adapter).__name__)} adapter",
            field="basis",
        )
    same_result = ("share_prefix",)  # settings that change speed, not the trained adapter
    signature = {
        "train_config": {k: v for k, v in asdict(cfg).items() if k not in same_result},
        "adapter_config": adapter.config.to_dict(),
        "family": adapter.meta.get("family", "innerpissa"),
        "train_pairs_sha256": pairs_sha256(train_pairs),
        "val_pairs_sha256": pairs_sha256(val_pairs),
        "base_fingerprint": adapter.base_fingerprint,
        "loss": loss_id,
    }
    signature = json.loads(json.dumps(signature))  # tuples -> lists, as read back from run_state.json
    start = 0
    if run is not None:
        start = _prepare_run_dir_once(run, signature, overwrite, procs)
    pref = preference_direction(adapter, tokenizer, train_pairs, cfg)
    block = decoder_blocks(model)[pref.block_index]
    cache = (
        None
        if needs_full_distribution(cfg.objective)
        else reference_cache(
            adapter,
            tokenizer,
            train_pairs,
            cfg,
            block,
            only=scheduled_pairs(len(train_pairs), cfg, total, procs),
            free=with_free,
        )
    )
    adapter.meta.update(
        {
            "loss": loss_id,
            "train_config": asdict(cfg),
            "coeff_range": [-1.0, 1.0],
            "preference_direction": pref.to_meta(),
            "train_processes": procs.world,
        }
    )
    params = (
        list(adapter.parameters())
        if not isinstance(adapter, Adapter)
        else [p for p in adapter.parameters() if p.requires_grad]
    )
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = _scheduler(opt, cfg, total)
    if run is not None:
        if procs.main:
            run.mkdir(parents=True, exist_ok=True)
            write_run_state(run, signature, start, False)
            atomic_write(run / "train_config.json", lambda p: Path(p).write_text(json.dumps(asdict(cfg), indent=2)))
        if start:
            state = torch.load(run / "checkpoint" / "state.pt", map_location="cpu", weights_only=True)
            adapter.load_state_dict(state["adapter"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
    guard = None
    if cfg.bias_weight > 0:
        from .guard import BiasGuard

        guard = BiasGuard(model, tokenizer, cfg.bias_batch)
    gen = random.Random(cfg.seed)
    order: list[int] = []
    for _ in range(start):  # replay the sampler so a resumed run sees the same batches
        order = _next_batch(order, gen, len(train_pairs), cfg.batch_pairs)[1]
    last_val: dict = {}
    first_loss: float | None = None
    bar = tqdm(range(start, total), desc="train", disable=not (progress and procs.main), initial=start, total=total)
    for step in bar:
        idx, order = _next_batch(order, gen, len(train_pairs), cfg.batch_pairs)
        idx = procs.shard(idx)  # all of it in one process
        chosen = [train_pairs[i] for i in idx]
        batch = tokenize_pairs(tokenizer, chosen, cfg.max_suffix_tokens)
        free = tokenize_neutral(tokenizer, chosen, cfg.max_suffix_tokens) if with_free else None
        omega = constraint_weight(step, total, cfg.constraint_warmup)
        t0 = time.perf_counter()
        ref = batch_reference(cache, idx, batch) if cache is not None else None
        free_ref = batch_free_reference(cache, idx, free) if cache is not None and free is not None else None
        loss, m = reprpo_loss(adapter, batch, pref, cfg, block, free, omega, ref, free_ref)
        objective_loss = m["loss"]  # the divergence guard's loss: without the answer-bias penalty below
        if guard is not None:  # the answer-bias guard (guard.py)
            g, shift_plus, shift_minus = guard.term(adapter, step)
            loss = loss + cfg.bias_weight * omega * g
            m.update(loss=loss.item(), guard=g.item(), yes_shift_plus=shift_plus, yes_shift_minus=shift_minus)
        m["objective_loss"] = objective_loss
        m = procs.average(m)  # the same numbers, hence the same decisions, in every process
        first_loss = m["objective_loss"] if first_loss is None else first_loss
        _check_divergence(m, first_loss, step + 1, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        procs.average_gradients(params)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if cfg.max_angle > 0 and isinstance(adapter, Adapter):
            bound_rotations(adapter, cfg.max_angle)
        if not all(torch.isfinite(p).all() for p in params):
            raise TrainingDivergedError(
                f"adapter parameters became non-finite at step {step + 1}; lower --lr "
                f"(now {cfg.lr:g}) and rerun with --overwrite",
                field="lr",
            )
        m.update(
            step=step + 1,
            seconds=time.perf_counter() - t0,
            lr=sched.get_last_lr()[0],
            omega=omega,
            **(adapter_stats(adapter) if isinstance(adapter, Adapter) else adapter.stats()),
        )
        bar.set_postfix(
            loss=f"{m['loss']:.3f}", sep=f"+{m['ds_plus']:.2f}/-{m['ds_minus']:.2f}", dnll=f"{m['dnll']:.3f}"
        )
        records = [m]
        if (step + 1) % cfg.val_every == 0 or step + 1 == total:
            last_val = validate(adapter, tokenizer, val_pairs, pref, cfg, block)
            records.append({"step": step + 1, **{f"val_{k}": v for k, v in last_val.items()}})
        if run is not None and procs.main:
            with open(run / "metrics.jsonl", "a") as f:
                for r in records:
                    f.write(json.dumps(r, allow_nan=False) + "\n")
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < total:
                (run / "checkpoint").mkdir(exist_ok=True)
                state = {
                    "adapter": adapter.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "step": step + 1,
                }
                atomic_write(run / "checkpoint" / "state.pt", lambda p, state=state: torch.save(state, p))
                write_run_state(run, signature, step + 1, False)
    if run is not None and procs.main:
        adapter.save(run / "adapter")
        write_run_state(run, signature, total, True)
        shutil.rmtree(run / "checkpoint", ignore_errors=True)  # finished: the adapter is the result
    procs.barrier()
    return last_val


def _prepare_run_dir_once(run: Path, signature: dict, overwrite: bool, procs: Processes) -> int:
    """``prepare_run_dir`` in process 0 only; every process gets its start step (or an error, not a hang)."""
    start, error = 0, None
    if procs.main:
        try:
            start = prepare_run_dir(run, signature, overwrite)
        except Exception as e:  # re-raised below, after the other processes have been told
            start, error = -1, e
    start = procs.broadcast_int(start)
    if error is not None:
        raise error
    if start < 0:
        raise RuntimeError(f"{run}: process 0 refused the run directory (its error names why)")
    return start


def _check_divergence(m: dict, first: float, step: int, cfg: TrainConfig) -> None:
    """Raise TrainingDivergedError when the objective's loss ``m["objective_loss"]`` is non-finite or above
    ``max_loss_factor`` × max(1, ``first``), the first step's.

    The loss read is the objective's, without the answer-bias penalty (``bias_weight`` × ω × guard term, guard.py):
    that term is large by design while it pulls back a Yes/No shift, and on a sound LoRA run it alone carried the
    total loss to 116× the first step's (docs/results.md, Gemma honesty). The error names the step's loss terms,
    since the tripping step is never logged.
    """
    loss = m["objective_loss"]
    limit = cfg.max_loss_factor * max(1.0, first)
    if not math.isfinite(loss) or loss > limit:
        terms = ", ".join(
            f"{k} {m[k]:.3g}" for k in ("sep", "proj", "coh", "coh_free", "tv", "mono", "guard") if k in m
        )
        raise TrainingDivergedError(
            f"training diverged at step {step}: loss {loss:.4g} (first step {first:.4g}, limit {limit:.4g}; "
            f"{terms}); lower --lr (now {cfg.lr:g}) and rerun with --overwrite",
            field="lr",
        )


def _next_batch(order: list[int], gen: random.Random, n: int, k: int) -> tuple[list[int], list[int]]:
    """Draw k indices from a shuffled epoch order, reshuffling when exhausted."""
    if len(order) < k:
        fresh = list(range(n))
        gen.shuffle(fresh)
        order = order + fresh
    return order[:k], order[k:]


@torch.no_grad()
def validate(
    adapter: Adapter, tokenizer, pairs: list[ContrastivePair], pref: Ruler, cfg: TrainConfig, block: torch.nn.Module
) -> dict:
    """Mean loss terms of ``cfg.objective`` on the first ``cfg.val_pairs`` held-out pairs (no grad, ω = 1)."""
    totals: dict[str, float] = {}
    n = 0
    pairs = pairs[: cfg.val_pairs]
    for i in range(0, len(pairs), cfg.batch_pairs):
        chunk = pairs[i : i + cfg.batch_pairs]
        free = tokenize_neutral(tokenizer, chunk, cfg.max_suffix_tokens) if needs_neutral(cfg.objective) else None
        _, m = reprpo_loss(adapter, tokenize_pairs(tokenizer, chunk, cfg.max_suffix_tokens), pref, cfg, block, free)
        for k, v in m.items():
            totals[k] = totals.get(k, 0.0) + v * len(chunk)
        n += len(chunk)
    return {k: v / max(n, 1) for k, v in totals.items()}
