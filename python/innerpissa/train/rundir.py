"""A training run's directory: its signature, fresh start vs resume, and the run state written atomically.

Files: ``run_state.json`` (signature, step, finished), ``train_config.json``, ``metrics.jsonl``,
``checkpoint/state.pt`` while the run is unfinished, and ``adapter/`` when it is done.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..adapter.storage import CONFIG_NAME, WEIGHTS_NAME
from ..errors import OutputExistsError, ResumeMismatchError
from ..outputs import atomic_write

RUN_STATE = "run_state.json"
_OWN_FILES = (
    "metrics.jsonl",
    "train_config.json",
    RUN_STATE,
    f"adapter/{WEIGHTS_NAME}",
    f"adapter/{CONFIG_NAME}",
    "checkpoint/state.pt",
)


def prepare_run_dir(run: Path, signature: dict, overwrite: bool) -> int:
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
            raise OutputExistsError(
                "is not empty and holds no innerpissa run (no run_state.json); pass --overwrite "
                "(overwrite=True) to train there anyway, or choose another --out",
                path=run,
            )
        return 0
    try:
        prev = json.loads(state_path.read_text())
        prev_sig, finished = prev["signature"], bool(prev["finished"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ResumeMismatchError(
            f"unreadable run state ({e}); pass --overwrite to start fresh", path=state_path
        ) from None
    if prev_sig != signature:
        diffs = signature_diff(prev_sig, signature)
        raise ResumeMismatchError(
            f"holds a run with another configuration or data ({'; '.join(diffs[:4])}); "
            "pass --overwrite to start fresh there, or choose another --out",
            path=run,
        )
    if finished:
        raise OutputExistsError(
            "holds a finished run with this configuration; pass --overwrite to train again, or choose another --out",
            path=run,
        )
    start = 0
    ck = run / "checkpoint" / "state.pt"
    if ck.is_file():
        start = int(torch.load(ck, map_location="cpu", weights_only=True)["step"])
    metrics = run / "metrics.jsonl"
    if metrics.is_file():  # drop records past the checkpoint so a resumed run never duplicates steps
        keep = [ln for ln in metrics.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= start]
        atomic_write(metrics, lambda p: Path(p).write_text("".join(k + "\n" for k in keep)))
    return start


def signature_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two nested signature dicts ("steps: 125 -> 100")."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += signature_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            short = "pairs differ" if k.endswith("sha256") else f"{a!r} -> {b!r}"
            out.append(f"{prefix}{k}: {short}")
    return out


def write_run_state(run: Path, signature: dict, step: int, finished: bool) -> None:
    state = {"signature": signature, "step": step, "finished": finished}
    atomic_write(run / RUN_STATE, lambda p: Path(p).write_text(json.dumps(state, indent=1)))
