"""The ablation bench (``ipissa ablate``): one objective on other adapter families, sublayers and preference
directions, several training seeds, reported on **test** items.

An ablation grid is a search grid (``tune``'s TOML format, same runner, same resumable ``rows.jsonl``) with
``split = "test"`` in ``[tune]``, one rung (the training length) and usually ``train_seeds``; its axes are any of
``family`` (``tune.FAMILY_CHOICES``), ``adapter.<field>`` (e.g. ``modules``: sublayer roles, ``rotate``,
``scale``) and ``train.<field>`` (e.g. ``direction``: ``mean-diff``, ``pca``, ``fisher``). Nothing is chosen from an
ablation's numbers: the defaults come from the dev-split search (``docs/tuning.md``).

Outputs in ``out``: ``rows.jsonl``, ``runs/``, ``summary.md`` (every row, then the mean over training seeds with a
t-interval), ``ablation_rows.json`` (that seed summary) and ``ablations.png`` (mean score per setting with that
interval); with ``doc``, the summary under a header naming the command, machine, date and wall time.
"""

from __future__ import annotations

import datetime
import json
import platform
import time
from pathlib import Path

from .errors import ConfigError
from .outputs import atomic_write
from .tune import load_grid, run_search, seed_summary


def plot(rows: list[dict], grid, path: Path) -> None:
    """Horizontal bars: mean score over training seeds per setting (longest training), with the 95 % t-interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = seed_summary(rows, grid)
    if not groups:
        return
    last = max(g["epochs"] for g in groups)
    groups = [g for g in groups if g["epochs"] == last][::-1]
    axes = grid.columns()
    labels = [", ".join(f"{a.split('.')[-1]}={g['params'].get(a)}" for a in axes) or "default" for g in groups]
    means = [g["mean"] for g in groups]
    err = [
        [g["mean"] - g["ci"][0] if g["ci"] else 0 for g in groups],
        [g["ci"][1] - g["mean"] if g["ci"] else 0 for g in groups],
    ]
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(groups) + 1.5))
    ax.barh(range(len(groups)), means, xerr=err, color="tab:blue", alpha=0.8)
    ax.set_yticks(range(len(groups)), labels, fontsize=8)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel("score: signed balanced effect at the KL budget (nats), mean over training seeds, 95 % t-CI")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_ablation(grid_path: str | Path, out: str | Path, data_dir=None, doc: Path | None = None, log=print) -> list:
    """Run (or resume) the ablation grid into ``out``; write the plot and, with ``doc``, the markdown report.

    Raises:
        ConfigError: a grid whose ``[tune] split`` is not "test" (an ablation reports test items), or any error of
            ``tune.load_grid``.
    """
    grid = load_grid(grid_path)
    if grid.tune["split"] != "test":
        raise ConfigError(
            'an ablation reports test items: set split = "test" in [tune] (dev-split searches are ipissa tune)',
            path=grid_path,
            field="split",
        )
    out = Path(out)
    t0 = time.perf_counter()
    rows = run_search(grid_path, out, data_dir, log=log)
    minutes = (time.perf_counter() - t0) / 60  # run_search has written summary.md
    plot(rows, grid, out / "ablations.png")
    summary = json.dumps(seed_summary(rows, grid), indent=1)
    atomic_write(out / "ablation_rows.json", lambda p: Path(p).write_text(summary))
    if doc is not None:
        flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
        cpu = f"{platform.machine()}, {'AVX-512' if 'avx512f' in flags else 'AVX2' if 'avx2' in flags else 'no AVX2'}"
        train_min = sum((r.get("train_minutes") or 0) + (r.get("eval_minutes") or 0) for r in rows)
        header = [
            "# Ablations",
            "",
            f"Command: `ipissa ablate --grid {grid_path}` (written {datetime.date.today()}; {cpu}; the rows took "
            f"{train_min:.0f} min of training and evaluation in all, {minutes:.0f} of them in this call). "
            "Test items only; every method at the common KL budget; see `docs/design.md` §5.",
            "",
        ]
        text = "\n".join(header) + (out / "summary.md").read_text().split("\n", 1)[1]
        atomic_write(Path(doc), lambda p: Path(p).write_text(text))
    return rows
