"""``ipissa train`` and ``ipissa run`` (train, then evaluate against the baselines)."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from ..eval.config import EngineChoice, EvalConfig, WeightsChoice
from .common import (
    ConceptOpt,
    DeviceOpt,
    DtypeChoice,
    DtypeOpt,
    EngineOpt,
    EvalOpts,
    ModelOpt,
    OverwriteOpt,
    SetOpt,
    WeightsOpt,
    app,
    check_run_dir,
    cli_pairs,
    resolve_device,
    setup,
)


def train_adapter(
    model_spec,
    pairs_path,
    n_pairs,
    steps,
    seed,
    rank,
    out: Path,
    allow_network,
    threads,
    quiet=False,
    overwrite: bool = False,
    cfg_kwargs: dict | None = None,
    concept: str = "honesty",
    dtype: str = "float32",
    device: str | None = None,
    overrides: list[str] | None = None,
):
    from .. import AdapterConfig
    from ..concepts import get_concept
    from ..train import TrainConfig
    from ..train.config import parse_overrides

    get_concept(concept)
    kw = {k: v for k, v in {"steps": steps, **(cfg_kwargs or {})}.items() if v is not None}  # unset: TrainConfig's
    kw |= parse_overrides(overrides or [])  # --set FIELD=VALUE wins over the named options
    if "steps" in kw and "epochs" not in kw:  # an explicit --steps means steps, whatever the default recipe says
        kw["epochs"] = 0.0
    tcfg = TrainConfig(seed=seed, **kw)  # validated before any compute
    acfg = AdapterConfig(rank=rank, seed=seed)
    check_run_dir(out, overwrite)
    torch = setup(allow_network, threads)
    from .. import attach
    from ..models import load_model
    from ..train import train

    if pairs_path is not None and not pairs_path.is_file():
        raise FileNotFoundError(f"--pairs {pairs_path}: file not found")
    device = resolve_device(device)
    lm = load_model(model_spec, dtype=getattr(torch, dtype), allow_network=allow_network)
    lm.model.to(device)
    split = cli_pairs(lm.tokenizer, pairs_path, n_pairs, seed, concept)
    from ..train.objectives import needs_neutral

    if "objective" not in kw and needs_neutral(tcfg.objective) and not all(p.neutral for p in split.train):
        import dataclasses

        typer.echo(
            f"note: the default objective {tcfg.objective!r} needs persona-free prompts, which these pairs "
            "do not carry; training with 'reprpo-svd' (pass --objective to choose)"
        )
        tcfg = dataclasses.replace(tcfg, objective="reprpo-svd")
    torch.manual_seed(seed)
    adapter = attach(
        lm.model,
        acfg,
        meta={
            "base_model": lm.spec,
            "concept": concept,
            "pairs": str(pairs_path) if pairs_path else f"builtin:{concept}",
        },
        pairs=list(split.train),
        tokenizer=lm.tokenizer,
    )
    t0 = time.perf_counter()
    val = train(
        adapter,
        lm.tokenizer,
        list(split.train),
        list(split.val),
        tcfg,
        run_dir=out,
        progress=not quiet,
        overwrite=overwrite,
    )
    minutes = (time.perf_counter() - t0) / 60
    typer.echo(
        f"trained {tcfg.total_steps(len(split.train))} steps in {minutes:.1f} min; validation: "
        + (", ".join(f"{k}={v:.3f}" for k, v in val.items()) or "none (no validation pairs)")
    )
    typer.echo(f"adapter saved to {out / 'adapter'}")
    return lm, adapter, split


@app.command("train")
def train_cmd(
    model: str | None = ModelOpt,
    pairs: Path | None = typer.Option(
        None, help="JSONL of {positive, negative} / A/B items / DPO triples; default: built-in honesty pairs"
    ),
    concept: str = ConceptOpt,
    n_pairs: int = typer.Option(400, help="number of built-in concept pairs (≥ 300)"),
    steps: int | None = typer.Option(None, help="optimizer steps (default: TrainConfig's; --epochs wins)"),
    seed: int = typer.Option(0),
    rank: int | None = typer.Option(None, help="adapter rank r (default hidden_size // 8)"),
    lr: float | None = typer.Option(None, help="learning rate (default: TrainConfig's)"),
    batch_pairs: int | None = typer.Option(None, help="pairs per step (default: TrainConfig's)"),
    objective: str | None = typer.Option(
        None,
        help="training objective: reprpo-svd, antiparallel or anchored "
        "(innerpissa/train/objectives.py; default: TrainConfig's)",
    ),
    epochs: float | None = typer.Option(
        None, help="passes over the training pairs (> 0 overrides --steps; default: TrainConfig's)"
    ),
    schedule: str | None = typer.Option(
        None, help="learning-rate schedule: cosine or one-cycle (default: TrainConfig's)"
    ),
    out: Path = typer.Option(
        Path("runs/honesty"),
        help="run directory (resumes an unfinished run with the same "
        "configuration and pairs; anything else is refused without --overwrite)",
    ),
    overwrite: bool = OverwriteOpt,
    allow_network: bool = typer.Option(False, help="allow Hugging Face hub downloads"),
    threads: int | None = typer.Option(None, help="torch threads (default: all cores)"),
    dtype: DtypeChoice = DtypeOpt,
    device: str | None = DeviceOpt,
    set_: list[str] | None = SetOpt,
):
    """Train an InnerPiSSA adapter at c = +1 and c = −1 with the chosen objective (default: the anchored loss).

    Data-parallel over processes: ``accelerate launch --multi_gpu --num_processes N -m innerpissa.cli train …`` (GPUs,
    or CPU processes on a machine without CUDA); each process trains on its share of every batch, gradients are
    averaged, process 0 writes the run."""
    train_adapter(
        model,
        pairs,
        n_pairs,
        steps,
        seed,
        rank,
        out,
        allow_network,
        threads,
        overwrite=overwrite,
        cfg_kwargs={
            "lr": lr,
            "batch_pairs": batch_pairs,
            "objective": objective,
            "epochs": epochs,
            "schedule": schedule,
        },
        concept=concept,
        dtype=dtype.value,
        device=device,
        overrides=set_,
    )


@app.command("run")
def run_cmd(
    model: str | None = ModelOpt,
    steps: int | None = typer.Option(None, help="optimizer steps (default: TrainConfig's recipe)"),
    seed: int = typer.Option(0),
    out: Path = typer.Option(Path("runs/main")),
    methods: str = EvalOpts["methods"],
    kl_budget: float = EvalOpts["kl_budget"],
    data_dir: Path | None = EvalOpts["data_dir"],
    n_target: int = EvalOpts["n_target"],
    n_other: int = EvalOpts["n_other"],
    n_dd: int = EvalOpts["n_dd"],
    truthfulqa: Path | None = EvalOpts["truthfulqa"],
    dev_items: bool = EvalOpts["dev_items"],
    batch_size: int = EvalOpts["batch_size"],
    engine: EngineChoice = EngineOpt,
    weights: WeightsChoice = WeightsOpt,
    concept: str = ConceptOpt,
    control: str | None = typer.Option(
        "sentiment",
        help="positive-control concept trained and evaluated the "
        "same way after the main one, in OUT/control (--control '' to skip)",
    ),
    overwrite: bool = OverwriteOpt,
    allow_network: bool = typer.Option(False),
    threads: int | None = typer.Option(None),
    device: str | None = DeviceOpt,
    set_: list[str] | None = SetOpt,
):
    """The main job: train the concept's adapter, evaluate it against prompting, PCA, mean-difference and random
    vectors at a common KL budget; then the same for the positive control (--control) in OUT/control."""
    from ..concepts import get_concept
    from .eval_cmds import evaluate

    get_concept(concept)
    if control:
        get_concept(control)
    from ..eval.datasets import data_dir as resolve_data_dir
    from ..train import TrainConfig
    from ..train.config import parse_overrides

    TrainConfig(**parse_overrides(set_ or []))  # a bad --set fails before any model loads

    cfg = EvalConfig(
        methods=methods,
        kl_budget=kl_budget,
        data_dir=data_dir,
        n_target=n_target,
        n_other=n_other,
        n_dd=n_dd,
        truthfulqa=truthfulqa,
        batch_size=batch_size,
        engine=engine,
        weights=weights,
        seed=seed,
        dev_items=dev_items,
    ).validate()
    resolve_data_dir(data_dir)  # the evaluation data must be there before minutes of training
    t0 = time.perf_counter()
    runs = [(concept, out)] + ([(control, out / "control")] if control and control != concept else [])
    for _name, run_dir in runs:
        check_run_dir(run_dir, overwrite)
    for name, run_dir in runs:
        typer.echo(f"== {name}: training and evaluation in {run_dir}")
        lm, adapter, split = train_adapter(
            model,
            None,
            400,
            steps,
            seed,
            None,
            run_dir,
            allow_network,
            threads,
            overwrite=overwrite,
            concept=name,
            device=device,
            overrides=set_,
        )
        evaluate(lm, adapter, split, cfg, run_dir, concept=name)
    typer.echo(f"main job finished in {(time.perf_counter() - t0) / 60:.1f} min")
