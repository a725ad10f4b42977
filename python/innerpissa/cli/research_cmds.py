"""The research commands: ``ipissa tune`` (dev-split search), ``ipissa ablate`` (ablation bench),
``ipissa align`` (teacher → student transfer) and ``ipissa fetch-data``."""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

import typer

from .common import EvalOpts, OverwriteOpt, app, setup


@app.command("tune")
def tune_cmd(
    grid: Path = typer.Option(..., help="grid file (TOML; format in the innerpissa.tune docstring and docs/tuning.md)"),
    out: Path = typer.Option(
        Path("runs/tune"), help="search directory: rows.jsonl, runs/, summary.md; a rerun resumes it"
    ),
    data_dir: Path | None = EvalOpts["data_dir"],
    threads: int | None = typer.Option(None, help="torch threads (default: all cores)"),
):
    """Dev-split search over training recipes by successive halving (dev items only; resumable)."""
    from ..tune import load_grid, run_search

    load_grid(grid)  # a bad grid fails before the model loads
    setup(False, threads)
    run_search(grid, out, data_dir, log=typer.echo)
    typer.echo(f"summary written to {out / 'summary.md'}")


@app.command("ablate")
def ablate_cmd(
    grid: Path = typer.Option(..., help='ablation grid (TOML, split = "test"; e.g. docs/ablations.toml)'),
    out: Path = typer.Option(Path("runs/ablate"), help="rows.jsonl, runs/, summary.md, ablations.png; resumable"),
    doc: Path | None = typer.Option(None, help="also write the report here (e.g. docs/ablations.md)"),
    data_dir: Path | None = EvalOpts["data_dir"],
    threads: int | None = typer.Option(None, help="torch threads (default: all cores)"),
):
    """Ablation bench: adapter families × sublayers × preference directions × training seeds, on test items."""
    from ..ablate import run_ablation

    setup(False, threads)  # run_ablation checks the grid (split = "test" included) before the model loads
    run_ablation(grid, out, data_dir, doc=doc, log=typer.echo)
    typer.echo(f"summary written to {out / 'summary.md'}")


@app.command("fetch-data")
def fetch_data_cmd(
    out: Path | None = typer.Option(None, help="folder to fill (default: the download cache ~/.cache/innerpissa/data)"),
):
    """Download the default evaluation files (DailyDilemmas, Anthropic persona sets) from their original sources.

    Needs network access. The evaluation commands then find them in the cache with no --data-dir."""
    from ..eval.datasets import default_cache_dir, fetch_default_data

    target = out or default_cache_dir()
    paths = fetch_default_data(target)
    typer.echo(f"{len(paths)} evaluation files in {target}")


@app.command("align")
def align_cmd(
    teacher: str = typer.Option("embedded:gemma3-270m", help="teacher model spec (HF dir, .gguf, embedded:…)"),
    student: str = typer.Option("embedded:smollm2", help="student model spec"),
    manifest: Path | None = typer.Option(
        None, help="JSONL/CSV manifest (default: the built-in tour-guide manifest, 63 places, 15 held out)"
    ),
    template: Path | None = typer.Option(None, help="JSON contrast template (default: the tour-guide template)"),
    k: int = typer.Option(32, help="task-subspace size"),
    teacher_depth: float = typer.Option(0.6, help="teacher block to read, as a fraction of depth"),
    student_depth: float = typer.Option(0.6, help="student block to read and steer, as a fraction of depth"),
    n_suffixes: int = typer.Option(4, help="shared suffixes per manifest row"),
    coeffs: str = typer.Option("-2,-1,0,1,2", help="steering sweep, in units of the student's own direction norm"),
    steer: bool = typer.Option(True, help="measure steering effects (the slow part)"),
    fold: str | None = typer.Option(
        None,
        help="contrast whose mapped teacher direction is folded into a copy "
        "of the student (e.g. N-S); written to OUT/folded",
    ),
    fold_coeff: float = typer.Option(1.0, help="coefficient of the folded direction (units of the own norm)"),
    seed: int = typer.Option(0),
    out: Path = typer.Option(Path("runs/align")),
    overwrite: bool = OverwriteOpt,
    allow_network: bool = typer.Option(False),
    threads: int | None = typer.Option(None),
):
    """Align a teacher's and a student's task subspaces and test the teacher's directions on the student."""
    from ..errors import finite_coeff
    from ..outputs import check_output

    check_output(out, overwrite)
    fold_coeff = finite_coeff(fold_coeff, "--fold-coeff")
    setup(allow_network, threads)
    from safetensors.torch import save_file

    from ..models import load_model
    from ..transfer.align import TransferConfig, align, projection_effects, steering_effects, transfer_report
    from ..transfer.contrasts import TOUR_GUIDE, ContrastTemplate, load_manifest
    from ..transfer.edits import fold_check

    t0 = time.perf_counter()
    tpl = ContrastTemplate.from_file(template) if template else TOUR_GUIDE
    rows = load_manifest(manifest, tpl)
    cfg = TransferConfig(
        teacher_depth=teacher_depth,
        student_depth=student_depth,
        k=k,
        n_suffixes=n_suffixes,
        coeffs=tuple(finite_coeff(c, "--coeffs entry") for c in coeffs.split(",")),
        seed=seed,
    )
    if 0.0 not in cfg.coeffs:
        raise typer.BadParameter("--coeffs must include 0")
    if fold is not None and fold not in tpl.contrasts:
        raise typer.BadParameter(f"--fold {fold!r}: not a contrast of the template ({', '.join(tpl.contrasts)})")
    tlm = load_model(teacher, allow_network=allow_network)
    slm = load_model(student, allow_network=allow_network)
    res = align(tlm, slm, rows, tpl, cfg, progress=typer.echo)
    del tlm
    if steer:
        steering_effects(res, slm, rows, tpl, progress=typer.echo)
        projection_effects(res, slm, rows, tpl, progress=typer.echo)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"map.{k_}": v.contiguous() for k_, v in res.map.state_dict().items()}
    for kind, dirs in (("teacher", res.teacher_dirs), ("student", res.student_dirs), ("mapped", res.mapped_dirs)):
        tensors.update({f"{kind}.{n}": v.float().contiguous() for n, v in dirs.items()})
    from ..outputs import atomic_write

    atomic_write(out / "alignment.safetensors", lambda p: save_file(tensors, str(p)))
    if fold is not None:
        res.meta["fold"] = fold_check(res, slm, fold, fold_coeff, out / "folded", rows, tpl, overwrite=overwrite)
    res.meta.update(
        {
            "teacher": teacher,
            "student": student,
            "manifest": str(manifest or "builtin:tour_guide"),
            "command": "ipissa " + shlex.join(sys.argv[1:]),
            "minutes": round((time.perf_counter() - t0) / 60, 1),
        }
    )
    atomic_write(out / "align.json", lambda p: Path(p).write_text(json.dumps(res.to_json(), indent=2)))
    atomic_write(out / "report.md", lambda p: Path(p).write_text(transfer_report(res)))
    typer.echo((out / "report.md").read_text())
    typer.echo(f"map, directions and report written to {out}")
