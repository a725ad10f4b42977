"""ReprPO training of an InnerPiSSA adapter at c = +1 and c = −1 together (DESIGN.md §3).

Per step, for a batch of N contrastive pairs (positive, negative prompt sharing an assistant suffix):

1. reference pass at c = 0 (adapter skipped, exact base model, no grad): hidden states h⁰ at the loss layer
   (last K tokens) and per-token NLL⁰ of the shared suffix;
2. one steered pass over [pos; neg] at c = +1 and [pos; neg] at c = −1 (per-row coefficients, 4N rows).

Loss (name ``reprpo-svd``, version 2), averaged over pairs:

    s_i(c)  = mean over the last K tokens of ⟨Pᵀ(h_pos(c) − h_neg(c)), u⟩      (P: d×r singular basis, u frozen)
    L_sep   = softplus(−β (s(+1) − s(0)) / σ) + softplus(−β (s(0) − s(−1)) / σ)   (= −log σ(·), bounded)
    L_coh   = w_coh · mean_t ReLU(NLL_c(t) − NLL_0(t) − τ)²             (per assistant-suffix token, both c)
    g(c)    = [log p_c(suffix|pos) − log p_c(suffix|neg)] − [same at c = 0]
    L_mono  = w_mono · (ReLU(m − g(+1)) + ReLU(m + g(−1)))
    L       = L_sep + L_coh + L_mono

The preference direction u is measured once before training from the unsteered model on the training pairs
(mean last-token h_pos − h_neg, in the U basis of the adapted residual writer at the loss layer, unit norm) and
frozen, so the adapter cannot win by rotating the ruler; σ is the mean unsteered separation, fixing the scale.
The sign is fixed by construction: +c moves toward the positive persona.

"Suffix" tokens are those of the unfinished assistant reply the two prompts share (``ContrastivePair.suffix``);
version 1 also counted the shared end of the persona sentence and the chat-template tokens before the reply, so
its coherence and ordering terms mostly rewarded log p(" person" | persona words).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .adapter import Adapter
from .adapter.model import CONFIG_NAME, WEIGHTS_NAME, atomic_write, block_names, decoder_blocks
from .errors import ConfigError, OutputExistsError, ResumeMismatchError, TrainingDivergedError
from .pairs import ContrastivePair

LOSS_NAME = "reprpo-svd"
LOSS_VERSION = 2


@dataclass
class TrainConfig:
    """ReprPO hyperparameters. Defaults marked (validate) in DESIGN.md were checked only on SmolLM2 dev pairs."""

    steps: int = 80
    batch_pairs: int = 8
    direction_pairs: int = 128  # training pairs used to measure the preference direction
    val_pairs: int = 24  # validation pairs scored every val_every steps
    lr: float = 3e-3
    weight_decay: float = 0.0
    loss_layer: float = 0.7  # fraction of depth whose block output is read
    last_k: int = 4  # tokens at the end of each sequence used for the separation
    beta: float = 1.0
    coherence_tau: float = 0.5  # nats per token of free ΔNLL
    coherence_weight: float = 1.0
    mono_margin: float = 0.1  # nats
    mono_weight: float = 1.0
    max_suffix_tokens: int = 24
    val_every: int = 25
    checkpoint_every: int = 25
    max_loss_factor: float = 100.0  # stop when the loss exceeds this × max(1, first loss): diverging
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check types and ranges of every field.

        Raises:
            ConfigError: naming the field and the allowed range.
        """
        positive_int = ("steps", "batch_pairs", "direction_pairs", "last_k", "max_suffix_tokens", "val_every",
                        "checkpoint_every")
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type in ("int", int) or f.name in positive_int or f.name in ("val_pairs", "seed"):
                if isinstance(v, bool) or not isinstance(v, int):
                    raise ConfigError(f"TrainConfig.{f.name} must be an integer, got {v!r}", field=f.name)
            elif isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"TrainConfig.{f.name} must be a finite number, got {v!r}", field=f.name)
        for name in positive_int:
            if getattr(self, name) < 1:
                raise ConfigError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}", field=name)
        rules = {"val_pairs": (0, None), "lr": (0, None), "weight_decay": (0, None), "beta": (0, None),
                 "coherence_tau": (0, None), "coherence_weight": (0, None), "mono_weight": (0, None),
                 "loss_layer": (0, 1), "max_loss_factor": (1, None)}
        for name, (lo, hi) in rules.items():
            v = getattr(self, name)
            strict = name in ("lr", "beta", "loss_layer")
            if (v <= lo if strict else v < lo) or (hi is not None and v > hi):
                rng = f"{'>' if strict else '>='} {lo}" + (f" and <= {hi}" if hi is not None else "")
                raise ConfigError(f"TrainConfig.{name} must be {rng}, got {v}", field=name)


@dataclass
class PairBatch:
    """Tokenized pairs, rows [pos_0..pos_{N-1}, neg_0..neg_{N-1}], left-padded to a common length T.

    input_ids, attention_mask, position_ids: (2N, T); suffix_mask: (2N, n_keep) marks the trailing tokens that
    positive and negative share (the suffix whose NLL is constrained), aligned to the last n_keep positions.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    suffix_mask: torch.Tensor

    @property
    def n_pairs(self) -> int:
        return self.input_ids.shape[0] // 2

    def repeat(self, k: int) -> "PairBatch":
        return PairBatch(*(t.repeat(k, 1) for t in (self.input_ids, self.attention_mask, self.position_ids,
                                                    self.suffix_mask)))


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad token lists → input_ids, attention_mask, position_ids, each (B, T).

    Position ids count real tokens only, so a padded row sees the same positions as it would unpadded.
    """
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, t - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, t - len(s):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


def suffix_token_count(tokenizer, text: str, suffix: str) -> int:
    """How many trailing tokens of ``text`` (tokenized without special tokens) spell ``suffix``: the tokens where
    its tokenization departs from that of ``text`` without the suffix. 0 when ``suffix`` is empty or not the end of
    ``text``."""
    if not suffix or not text.endswith(suffix):
        return 0
    full = tokenizer(text, add_special_tokens=False)["input_ids"]
    head = tokenizer(text[:-len(suffix)], add_special_tokens=False)["input_ids"]
    k = 0
    while k < min(len(full), len(head)) and full[k] == head[k]:
        k += 1
    return len(full) - k


def tokenize_pairs(tokenizer, pairs: list[ContrastivePair], max_suffix_tokens: int = 24) -> PairBatch:
    """Tokenize pairs (no special tokens added: prompts are already rendered) into a left-padded PairBatch.

    The suffix mask of a pair covers the trailing tokens both prompts share **and** that spell its assistant
    suffix (``pair.suffix``; for pairs without one, the shared trailing tokens), at most ``max_suffix_tokens`` and
    at least the final token. n_keep (the mask's width, and the number of positions that get logits) is the
    longest suffix in the batch.
    """
    pos = [tokenizer(p.positive, add_special_tokens=False)["input_ids"] for p in pairs]
    neg = [tokenizer(p.negative, add_special_tokens=False)["input_ids"] for p in pairs]
    ids, mask, posids = left_pad(pos + neg, tokenizer.pad_token_id)
    cap = min(max_suffix_tokens, ids.shape[1] - 1)  # every kept token needs a predecessor
    commons = []
    for p, a, b in zip(pairs, pos, neg):
        common = 0
        while common < min(len(a), len(b), cap) and a[-1 - common] == b[-1 - common]:
            common += 1
        if p.suffix:
            common = min(common, suffix_token_count(tokenizer, p.positive, p.suffix),
                         suffix_token_count(tokenizer, p.negative, p.suffix))
        commons.append(max(common, 1))  # pairs with different endings: constrain at least the final token
    n_keep = max(commons)
    suffix = torch.zeros((2 * len(pairs), n_keep), dtype=torch.bool)
    for i, common in enumerate(commons):
        suffix[i, n_keep - common:] = True
        suffix[len(pairs) + i, n_keep - common:] = True
    return PairBatch(ids, mask, posids, suffix)


def forward_states(model, batch: PairBatch, block: torch.nn.Module, last_k: int):
    """One forward pass → (hidden (B, last_k, d) at ``block``'s output, token log-probs (B, n_keep)).

    Only the last n_keep + 1 positions get logits (``logits_to_keep``), which keeps big-vocabulary models cheap.
    """
    captured = {}

    def hook(_m, _a, out):
        captured["h"] = (out[0] if isinstance(out, tuple) else out)[:, -last_k:]

    n_keep = batch.suffix_mask.shape[1]
    handle = block.register_forward_hook(hook)
    try:
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids, logits_to_keep=n_keep + 1, use_cache=False)
    finally:
        handle.remove()
    logp = out.logits[:, :-1].float().log_softmax(-1)  # (B, n_keep, V)
    targets = batch.input_ids[:, -n_keep:]
    token_logp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, n_keep)
    return captured["h"].float(), token_logp


@dataclass
class PreferenceDirection:
    """Frozen ruler: unit u (r,) in the basis P (d, r) read at ``block_index``'s output; σ = mean separation."""

    block_index: int
    basis_module: str
    u: torch.Tensor
    sigma: float

    def separation(self, h: torch.Tensor, basis: torch.Tensor, n_pairs: int) -> torch.Tensor:
        """s_i = mean over tokens of ⟨Pᵀ(h_pos − h_neg), u⟩ for h (2N·k, K, d) stacked [pos; neg] per group."""
        coords = h @ basis  # (rows, K, r)
        proj = coords @ self.u  # (rows, K)
        proj = proj.view(-1, 2, n_pairs, proj.shape[-1])  # (groups, pos/neg, N, K)
        return (proj[:, 0] - proj[:, 1]).mean(-1)  # (groups, N)


def _basis_for_block(adapter: Adapter, block_index: int) -> str:
    """Name of the adapted residual writer whose U basis measures the loss-layer residual."""
    names = block_names(adapter.model)
    for i in range(block_index, -1, -1):
        prefix = names[i] + "."
        cands = [t for t in adapter.target_names if t.startswith(prefix)]
        if cands:
            return cands[-1]  # the later writer of the block (MLP down projection)
    return adapter.target_names[0]


@torch.no_grad()
def preference_direction(adapter: Adapter, tokenizer, pairs: list[ContrastivePair], cfg: TrainConfig,
                         batch_pairs: int = 16) -> PreferenceDirection:
    """Measure u from the unsteered model on the training pairs (DESIGN §3) and σ, the mean separation."""
    blocks = decoder_blocks(adapter.model)
    idx = min(len(blocks) - 1, int(round(cfg.loss_layer * len(blocks))))
    basis_name = _basis_for_block(adapter, idx)
    basis = adapter.layer(basis_name).U  # (d, r)
    diffs = []
    pairs = pairs[:cfg.direction_pairs]
    for i in range(0, len(pairs), batch_pairs):
        b = tokenize_pairs(tokenizer, pairs[i:i + batch_pairs], cfg.max_suffix_tokens)
        h, _ = forward_states(adapter.model, b, blocks[idx], 1)
        n = b.n_pairs
        diffs.append(h[:n, -1] - h[n:, -1])  # (N, d)
    mean_diff = torch.cat(diffs).mean(0)  # (d,)
    coords = basis.T @ mean_diff  # (r,)
    if coords.norm() == 0:
        raise ValueError("positive and negative prompts give identical hidden states: pairs do not differ")
    u = coords / coords.norm()
    sigma = float((torch.cat(diffs) @ basis @ u).mean())
    return PreferenceDirection(idx, basis_name, u, abs(sigma))


def reprpo_loss(adapter: Adapter, batch: PairBatch, pref: PreferenceDirection, cfg: TrainConfig,
                block: torch.nn.Module) -> tuple[torch.Tensor, dict]:
    """ReprPO loss (module docstring) for one batch; returns (scalar loss, metrics dict of floats)."""
    model, n = adapter.model, batch.n_pairs
    basis = adapter.layer(pref.basis_module).U
    mask = batch.suffix_mask.float()
    with torch.no_grad():
        h0, lp0 = forward_states(model, batch, block, cfg.last_k)
        s0 = pref.separation(h0, basis, n)[0]  # (N,)
    coeffs = torch.cat([torch.ones(2 * n), -torch.ones(2 * n)])  # rows: [pos,neg] at +1, then at −1
    with adapter.steer(coeffs):
        h, lp = forward_states(model, batch.repeat(2), block, cfg.last_k)
    s = pref.separation(h, basis, n)  # (2, N): c=+1, c=−1
    sep = (F.softplus(-cfg.beta * (s[0] - s0) / pref.sigma) + F.softplus(-cfg.beta * (s0 - s[1]) / pref.sigma))
    d_nll = (lp0.repeat(2, 1) - lp)  # NLL_c − NLL_0 per token, (4N, n_keep)
    mask4 = mask.repeat(2, 1)
    coh = ((F.relu(d_nll - cfg.coherence_tau) ** 2) * mask4).sum() / mask4.sum()
    seq_lp0 = (lp0 * mask).sum(-1)  # (2N,)
    seq_lp = (lp * mask4).sum(-1).view(2, 2, n)  # (c, pos/neg, N)
    g0 = seq_lp0[:n] - seq_lp0[n:]
    g = seq_lp[:, 0] - seq_lp[:, 1] - g0  # (2, N)
    mono = F.relu(cfg.mono_margin - g[0]) + F.relu(cfg.mono_margin + g[1])
    loss = sep.mean() + cfg.coherence_weight * coh + cfg.mono_weight * mono.mean()
    metrics = {
        "loss": loss.item(), "sep": sep.mean().item(), "coh": coh.item(), "mono": mono.mean().item(),
        "ds_plus": ((s[0] - s0) / pref.sigma).mean().item(), "ds_minus": ((s0 - s[1]) / pref.sigma).mean().item(),
        "dnll": ((d_nll * mask4).sum() / mask4.sum()).item(),
    }
    return loss, metrics


def check_pairs_differ(tokenizer, pairs: list[ContrastivePair], what: str = "training pairs") -> None:
    """Refuse pairs whose positive and negative prompts tokenize to the same ids (e.g. differ in whitespace only):
    their gradient is float noise.

    Raises:
        ConfigError: naming the offending pairs (0-based indices; pair files are checked per line on load).
    """
    same = [i for i, p in enumerate(pairs)
            if tokenizer(p.positive, add_special_tokens=False)["input_ids"]
            == tokenizer(p.negative, add_special_tokens=False)["input_ids"]]
    if same:
        raise ConfigError(f"{len(same)} of {len(pairs)} {what} tokenize to identical positive and negative prompts "
                          f"(pairs {same[:10]}); a pair must differ in tokens, not only in whitespace", field=what)


def pairs_sha256(pairs: list[ContrastivePair]) -> str:
    """sha256 over the ordered (positive, negative) texts: identifies the data of a run."""
    h = hashlib.sha256()
    for p in pairs:
        h.update(json.dumps([p.positive, p.negative]).encode())
    return h.hexdigest()


RUN_STATE = "run_state.json"
_OWN_FILES = ("metrics.jsonl", "train_config.json", RUN_STATE, f"adapter/{WEIGHTS_NAME}", f"adapter/{CONFIG_NAME}",
              "checkpoint/state.pt")


def _prepare_run_dir(run: Path, signature: dict, overwrite: bool) -> int:
    """Decide fresh start vs resume for ``run``; returns the step to start from (0 = fresh).

    A directory this function has not written (no ``run_state.json``) must be empty; one that holds a run with
    another signature, or a finished run, is refused — with ``overwrite`` the run's own files are removed and
    training starts fresh (other files are kept). Metrics past the checkpoint are dropped on resume.
    """
    state_path = run / RUN_STATE
    if overwrite:
        for f in _OWN_FILES:
            (run / f).unlink(missing_ok=True)
        for sub in ("checkpoint", "adapter"):
            if (run / sub).is_dir() and not any((run / sub).iterdir()):
                (run / sub).rmdir()
        return 0
    if not state_path.is_file():
        if run.is_dir() and any(run.iterdir()):
            raise OutputExistsError("is not empty and holds no innerpissa run (no run_state.json); pass --overwrite "
                                    "(overwrite=True) to train there anyway, or choose another --out", path=run)
        return 0
    try:
        prev = json.loads(state_path.read_text())
        prev_sig, finished = prev["signature"], bool(prev["finished"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ResumeMismatchError(f"unreadable run state ({e}); pass --overwrite to start fresh",
                                  path=state_path) from None
    if prev_sig != signature:
        diffs = _signature_diff(prev_sig, signature)
        raise ResumeMismatchError(f"holds a run with another configuration or data ({'; '.join(diffs[:4])}); "
                                  "pass --overwrite to start fresh there, or choose another --out", path=run)
    if finished:
        raise OutputExistsError("holds a finished run with this configuration; pass --overwrite to train again, or "
                                "choose another --out", path=run)
    start = 0
    ck = run / "checkpoint" / "state.pt"
    if ck.is_file():
        start = int(torch.load(ck, map_location="cpu", weights_only=True)["step"])
    metrics = run / "metrics.jsonl"
    if metrics.is_file():  # drop records past the checkpoint so a resumed run never duplicates steps
        keep = [ln for ln in metrics.read_text().splitlines()
                if ln.strip() and json.loads(ln).get("step", 0) <= start]
        atomic_write(metrics, lambda p: Path(p).write_text("".join(k + "\n" for k in keep)))
    return start


def _signature_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two nested signature dicts ("steps: 125 -> 100")."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _signature_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            short = "pairs differ" if k.endswith("sha256") else f"{a!r} -> {b!r}"
            out.append(f"{prefix}{k}: {short}")
    return out


def _write_run_state(run: Path, signature: dict, step: int, finished: bool) -> None:
    state = {"signature": signature, "step": step, "finished": finished}
    atomic_write(run / RUN_STATE, lambda p: Path(p).write_text(json.dumps(state, indent=1)))


def _seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def train(adapter: Adapter, tokenizer, train_pairs: list[ContrastivePair], val_pairs: list[ContrastivePair],
          cfg: TrainConfig, run_dir: str | Path | None = None, progress: bool = True,
          overwrite: bool = False) -> dict:
    """Train ``adapter`` in place with the ReprPO loss; resumes from ``run_dir/checkpoint`` when present.

    Writes to ``run_dir``: ``run_state.json`` (the run's signature: training and adapter config, a sha256 of the
    pairs, the base fingerprint; step; finished), ``train_config.json`` (resolved), ``metrics.jsonl`` (one line
    per step and per validation), ``checkpoint/state.pt`` (adapter + optimizer + step, loaded with
    ``weights_only=True``, atomic, every ``checkpoint_every`` steps) and the final adapter in ``adapter/``.
    A rerun resumes only a matching unfinished run; anything else is refused unless ``overwrite``, which
    deletes the run's own files (never others) and starts fresh. Returns the last validation metrics.

    Raises:
        ValueError: fewer training pairs than one batch.
        ConfigError: pairs whose two prompts tokenize identically.
        ResumeMismatchError: ``run_dir`` holds a run with another configuration or other pairs.
        OutputExistsError: ``run_dir`` holds a finished run, or files that are not a run.
        TrainingDivergedError: the loss became non-finite or exceeded ``max_loss_factor`` × max(1, first loss),
            or a parameter became non-finite (the adapter is not saved; lower ``lr``).
    """
    cfg.validate()
    if len(train_pairs) < cfg.batch_pairs:
        raise ValueError(f"{len(train_pairs)} training pairs < batch_pairs={cfg.batch_pairs}")
    check_pairs_differ(tokenizer, train_pairs)
    check_pairs_differ(tokenizer, val_pairs, "validation pairs")
    _seed_all(cfg.seed)
    model = adapter.model
    run = Path(run_dir) if run_dir else None
    signature = {"train_config": asdict(cfg), "adapter_config": adapter.config.to_dict(),
                 "train_pairs_sha256": pairs_sha256(train_pairs), "val_pairs_sha256": pairs_sha256(val_pairs),
                 "base_fingerprint": adapter.base_fingerprint, "loss": {"name": LOSS_NAME, "version": LOSS_VERSION}}
    signature = json.loads(json.dumps(signature))  # tuples -> lists, as read back from run_state.json
    start = 0
    if run is not None:
        start = _prepare_run_dir(run, signature, overwrite)
    pref = preference_direction(adapter, tokenizer, train_pairs, cfg)
    block = decoder_blocks(model)[pref.block_index]
    adapter.meta.update({
        "loss": {"name": LOSS_NAME, "version": LOSS_VERSION},
        "train_config": asdict(cfg),
        "coeff_range": [-1.0, 1.0],
        "preference_direction": {"block_index": pref.block_index, "basis_module": pref.basis_module,
                                 "sigma": pref.sigma, "u": pref.u.tolist()},
    })
    params = [p for p in adapter.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: min(1.0, (k + 1) / 10) * 0.5 * (1 + math.cos(math.pi * min(k, cfg.steps) / cfg.steps)))
    if run is not None:
        run.mkdir(parents=True, exist_ok=True)
        _write_run_state(run, signature, start, False)
        atomic_write(run / "train_config.json", lambda p: Path(p).write_text(json.dumps(asdict(cfg), indent=2)))
        if start:
            state = torch.load(run / "checkpoint" / "state.pt", map_location="cpu", weights_only=True)
            adapter.load_state_dict(state["adapter"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
    gen = random.Random(cfg.seed)
    order: list[int] = []
    for _ in range(start):  # replay the sampler so a resumed run sees the same batches
        order = _next_batch(order, gen, len(train_pairs), cfg.batch_pairs)[1]
    last_val: dict = {}
    first_loss: float | None = None
    bar = tqdm(range(start, cfg.steps), desc="train", disable=not progress, initial=start, total=cfg.steps)
    for step in bar:
        idx, order = _next_batch(order, gen, len(train_pairs), cfg.batch_pairs)
        batch = tokenize_pairs(tokenizer, [train_pairs[i] for i in idx], cfg.max_suffix_tokens)
        t0 = time.perf_counter()
        loss, m = reprpo_loss(adapter, batch, pref, cfg, block)
        first_loss = m["loss"] if first_loss is None else first_loss
        _check_divergence(m["loss"], first_loss, step + 1, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if not all(torch.isfinite(p).all() for p in params):
            raise TrainingDivergedError(f"adapter parameters became non-finite at step {step + 1}; lower --lr "
                                        f"(now {cfg.lr:g}) and rerun with --overwrite", field="lr")
        m.update(step=step + 1, seconds=time.perf_counter() - t0, lr=sched.get_last_lr()[0])
        bar.set_postfix(loss=f"{m['loss']:.3f}", sep=f"+{m['ds_plus']:.2f}/-{m['ds_minus']:.2f}",
                        dnll=f"{m['dnll']:.3f}")
        records = [m]
        if (step + 1) % cfg.val_every == 0 or step + 1 == cfg.steps:
            last_val = validate(adapter, tokenizer, val_pairs, pref, cfg, block)
            records.append({"step": step + 1, **{f"val_{k}": v for k, v in last_val.items()}})
        if run is not None:
            with open(run / "metrics.jsonl", "a") as f:
                for r in records:
                    f.write(json.dumps(r, allow_nan=False) + "\n")
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                (run / "checkpoint").mkdir(exist_ok=True)
                state = {"adapter": adapter.state_dict(), "optimizer": opt.state_dict(),
                         "scheduler": sched.state_dict(), "step": step + 1}
                atomic_write(run / "checkpoint" / "state.pt", lambda p: torch.save(state, p))
                _write_run_state(run, signature, step + 1, False)
    if run is not None:
        adapter.save(run / "adapter")
        _write_run_state(run, signature, cfg.steps, True)
        shutil.rmtree(run / "checkpoint", ignore_errors=True)  # finished: the adapter is the result
    return last_val


def _check_divergence(loss: float, first: float, step: int, cfg: TrainConfig) -> None:
    """Raise TrainingDivergedError when ``loss`` is non-finite or > max_loss_factor × max(1, first)."""
    limit = cfg.max_loss_factor * max(1.0, first)
    if not math.isfinite(loss) or loss > limit:
        raise TrainingDivergedError(f"training diverged at step {step}: loss {loss:.4g} (first step {first:.4g}, "
                                    f"limit {limit:.4g}); lower --lr (now {cfg.lr:g}) and rerun with --overwrite",
                                    field="lr")


def _next_batch(order: list[int], gen: random.Random, n: int, k: int) -> tuple[list[int], list[int]]:
    """Draw k indices from a shuffled epoch order, reshuffling when exhausted."""
    if len(order) < k:
        fresh = list(range(n))
        gen.shuffle(fresh)
        order = order + fresh
    return order[:k], order[k:]


@torch.no_grad()
def validate(adapter: Adapter, tokenizer, pairs: list[ContrastivePair], pref: PreferenceDirection,
             cfg: TrainConfig, block: torch.nn.Module) -> dict:
    """Mean ReprPO loss terms on the first ``cfg.val_pairs`` held-out pairs (no grad)."""
    totals: dict[str, float] = {}
    n = 0
    pairs = pairs[:cfg.val_pairs]
    for i in range(0, len(pairs), cfg.batch_pairs):
        chunk = pairs[i:i + cfg.batch_pairs]
        _, m = reprpo_loss(adapter, tokenize_pairs(tokenizer, chunk, cfg.max_suffix_tokens), pref, cfg, block)
        for k, v in m.items():
            totals[k] = totals.get(k, 0.0) + v * len(chunk)
        n += len(chunk)
    return {k: v / max(n, 1) for k, v in totals.items()}
