"""``ipissa eval``, ``ipissa sweep`` and ``ipissa generate``: the coefficient sweep of an adapter and the
baselines (torch or Rust engine), and sampling at a steering coefficient."""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path

import typer

from ..eval.config import EngineChoice, EvalConfig, WeightsChoice
from .common import (
    DeviceOpt,
    DtypeChoice,
    DtypeOpt,
    EngineOpt,
    EvalOpts,
    ModelOpt,
    OverwriteOpt,
    WeightsOpt,
    adapter_meta,
    app,
    cli_pairs,
    resolve_device,
    setup,
)


def evaluate(lm, adapter, split, cfg, out: Path, concept: str = "honesty"):
    """Evaluate ``adapter`` and the baselines (``cfg``: a validated ``EvalConfig``) on ``concept``'s sets; write
    the report to ``out``."""
    from ..concepts import get_concept
    from ..eval import TorchEngine, build_methods, default_datasets, run_suite, write_report
    from ..eval.suite import concept_datasets

    cpt = get_concept(concept)
    if cfg.mwe or cfg.dd_file:
        targets = dict(cpt.targets)
        datasets = default_datasets(
            cfg.data_dir,
            n_target=cfg.n_target,
            n_other=cfg.n_other,
            n_dd=cfg.n_dd,
            seed=cfg.seed,
            dd_file=cfg.dd_file,
            dd_value=cfg.dd_value,
            mwe_files=cfg.mwe,
            targets=targets,
            truthfulqa=cfg.truthfulqa,
        )
    else:
        datasets, targets = concept_datasets(
            cpt, cfg.data_dir, cfg.n_target, cfg.n_other, cfg.n_dd, cfg.seed, truthfulqa=cfg.truthfulqa
        )
    engine = cfg.engine.value
    if engine == "auto":  # the Rust engine where the model is a GGUF file it reads, else transformers
        from ..models import find_gguf

        engine = "rust" if find_gguf(lm.spec) is not None else "torch"
    rust = rust_engine(lm.spec, lm.tokenizer, cfg.weights, cfg.batch_size) if engine == "rust" else None
    eng = rust or TorchEngine(lm.model, lm.tokenizer, cfg.batch_size)
    ms = build_methods(
        lm.model,
        lm.tokenizer,
        adapter,
        list(split.train),
        cfg.seed,
        cfg.methods,
        engine=rust,
        instruction=cpt.instruction,
    )
    t0 = time.perf_counter()
    results = run_suite(
        eng,
        ms,
        datasets,
        seed=cfg.seed,
        kl_budget=cfg.kl_budget,
        targets=targets,
        concept=concept,
        budget_first=True,
        score_other_split=cfg.dev_items,
        meta={"model": lm.spec, "concept": concept, "command": "ipissa " + shlex.join(sys.argv[1:])},
    )
    results["meta"]["eval_seconds"] = round(time.perf_counter() - t0, 1)
    write_report(results, out)
    typer.echo((out / "report.md").read_text())
    typer.echo(
        f"report written to {out / 'report.md'} (evaluation {results['meta']['eval_seconds']} s, "
        f"engine {results['meta']['engine']})"
    )


def rust_engine(spec, tokenizer, weights: WeightsChoice, batch_size: int):
    from ..eval.rust_engine import RustEngine
    from ..models import gguf_for_spec

    return RustEngine(
        gguf_for_spec(spec), tokenizer, weights=WeightsChoice(weights).value, batch_size=max(batch_size, 1)
    )


@app.command("eval")
def eval_cmd(
    adapter: Path = typer.Option(..., help="adapter directory (from `ipissa train`: RUN/adapter)"),
    model: str | None = ModelOpt,
    pairs: Path | None = typer.Option(None, help="pairs for the baselines (default: built-in honesty pairs)"),
    concept: str | None = typer.Option(None, help="concept to read (default: the adapter's, else honesty)"),
    n_pairs: int = typer.Option(400),
    methods: str = EvalOpts["methods"],
    kl_budget: float = EvalOpts["kl_budget"],
    data_dir: Path | None = EvalOpts["data_dir"],
    n_target: int = EvalOpts["n_target"],
    n_other: int = EvalOpts["n_other"],
    n_dd: int = EvalOpts["n_dd"],
    truthfulqa: Path | None = EvalOpts["truthfulqa"],
    dev_items: bool = EvalOpts["dev_items"],
    batch_size: int = EvalOpts["batch_size"],
    dd_file: Path | None = typer.Option(None, help="DailyDilemmas in the full per-action layout (HF release)"),
    dd_value: str | None = typer.Option(None, help="value that labels DailyDilemmas items, e.g. honesty"),
    mwe: list[Path] | None = typer.Option(
        None,
        help="model-written-eval JSONL file (Yes/No or A/B); repeat "
        "for several; default: the persona sets in the data folder",
    ),
    seed: int = typer.Option(0),
    out: Path = typer.Option(Path("runs/eval")),
    overwrite: bool = OverwriteOpt,
    engine: EngineChoice = EngineOpt,
    weights: WeightsChoice = WeightsOpt,
    allow_network: bool = typer.Option(False),
    threads: int | None = typer.Option(None),
    dtype: DtypeChoice = DtypeOpt,
    device: str | None = DeviceOpt,
):
    """Sweep the adapter and the baselines over held-out questions; write report.md, results.json, PNGs."""
    from ..outputs import check_output

    cfg = EvalConfig(
        methods=methods,
        kl_budget=kl_budget,
        data_dir=data_dir,
        n_target=n_target,
        n_other=n_other,
        n_dd=n_dd,
        truthfulqa=truthfulqa,
        batch_size=batch_size,
        dd_file=dd_file,
        dd_value=dd_value,
        mwe=list(mwe or []),
        engine=engine,
        weights=weights,
        seed=seed,
        dev_items=dev_items,
    ).validate()  # a bad option or data file fails before the model loads
    check_output(out, overwrite)
    meta = adapter_meta(adapter)
    torch = setup(allow_network, threads)
    from .. import load_adapter
    from ..models import load_model

    lm = load_model(model or meta.get("base_model"), dtype=getattr(torch, dtype.value), allow_network=allow_network)
    lm.model.to(resolve_device(device))
    ad = load_adapter(lm.model, adapter)
    concept = concept or meta.get("concept", "honesty")
    split = cli_pairs(lm.tokenizer, pairs, n_pairs, seed, concept)
    evaluate(lm, ad, split, cfg, out, concept)


@app.command("sweep")
def sweep_cmd(
    adapter: Path = typer.Option(..., help="adapter directory (from `ipissa train`: RUN/adapter)"),
    model: str | None = ModelOpt,
    coeffs: str = typer.Option("-2,-1,-0.5,0,0.5,1,2", help="comma-separated steering coefficients"),
    methods: str = typer.Option("innerpissa", help="comma-separated: innerpissa, prompting, pca, mean-diff, random"),
    kl_budget: float = EvalOpts["kl_budget"],
    pairs: Path | None = typer.Option(None, help="pairs for the pca/random baselines (default: built-in)"),
    n_pairs: int = typer.Option(400),
    data_dir: Path | None = EvalOpts["data_dir"],
    n_target: int = EvalOpts["n_target"],
    n_other: int = EvalOpts["n_other"],
    n_dd: int = EvalOpts["n_dd"],
    truthfulqa: Path | None = EvalOpts["truthfulqa"],
    dev_items: bool = EvalOpts["dev_items"],
    batch_size: int = typer.Option(64, help="prompts per packed pass"),
    mwe: list[Path] | None = typer.Option(None, help="model-written-eval JSONL file(s) instead of the persona sets"),
    seed: int = typer.Option(0),
    weights: WeightsChoice = WeightsOpt,
    out: Path = typer.Option(Path("runs/sweep")),
    overwrite: bool = OverwriteOpt,
    threads: int | None = typer.Option(None, help="threads (sets RAYON_NUM_THREADS; default: all cores)"),
):
    """Coefficient sweep on the Rust engine: adapter + GGUF model + datasets → report.md, results.json, PNGs.

    Needs no transformers model (only its tokenizer): the GGUF file is read by the Rust engine."""
    if threads:
        os.environ["RAYON_NUM_THREADS"] = str(threads)
    setup(False, threads)
    from ..adapter.storage import read_adapter_tensors
    from ..adapter.targets import select_layers
    from ..eval import build_methods, check_sweep_coeffs, default_datasets, run_suite, write_report
    from ..models import load_tokenizer
    from ..outputs import check_output

    try:
        parsed = [float(c) for c in coeffs.split(",")]
    except ValueError:
        raise typer.BadParameter(f"--coeffs must be comma-separated numbers, got {coeffs!r}") from None
    cs = check_sweep_coeffs(parsed, "--coeffs")
    cfg = EvalConfig(
        methods=methods,
        kl_budget=kl_budget,
        data_dir=data_dir,
        n_target=n_target,
        n_other=n_other,
        n_dd=n_dd,
        truthfulqa=truthfulqa,
        batch_size=batch_size,
        mwe=list(mwe or []),
        engine=EngineChoice.rust,
        weights=weights,
        seed=seed,
        dev_items=dev_items,
    ).validate()
    check_output(out, overwrite)
    meta = adapter_meta(adapter)
    read_adapter_tensors(adapter, meta)  # checksum and finite values, as load_adapter checks them
    spec = model or meta.get("base_model")
    tok = load_tokenizer(spec)
    eng = rust_engine(spec, tok, cfg.weights, cfg.batch_size)
    eng.load_adapter(adapter)
    from ..adapter.config import AdapterConfig

    layers = select_layers(eng.config["n_layer"], AdapterConfig.from_dict(meta["adapter"]))
    need_pairs = set(cfg.methods) - {"innerpissa", "prompting"}
    train_pairs = list(cli_pairs(tok, pairs, n_pairs, cfg.seed).train) if need_pairs else []
    ms = build_methods(
        None, tok, str(adapter), train_pairs, cfg.seed, cfg.methods, layers=layers, adapter_coeffs=cs, engine=eng
    )
    datasets = default_datasets(
        cfg.data_dir,
        n_target=cfg.n_target,
        n_other=cfg.n_other,
        n_dd=cfg.n_dd,
        seed=cfg.seed,
        mwe_files=cfg.mwe,
        truthfulqa=cfg.truthfulqa,
    )
    t0 = time.perf_counter()
    results = run_suite(
        eng,
        ms,
        datasets,
        seed=cfg.seed,
        kl_budget=cfg.kl_budget,
        budget_first=False,  # the --coeffs grid
        score_other_split=cfg.dev_items,
        meta={"model": spec, "command": "ipissa " + shlex.join(sys.argv[1:])},
    )
    results["meta"]["eval_seconds"] = round(time.perf_counter() - t0, 1)
    write_report(results, out)
    typer.echo((out / "report.md").read_text())
    typer.echo(f"report written to {out / 'report.md'} (sweep {results['meta']['eval_seconds']} s)")


@app.command("generate")
def generate_cmd(
    prompt: str = typer.Argument(..., help="user message"),
    coeff: float = typer.Option(1.0, "--coeff", "-c", help="steering coefficient (0 = unsteered)"),
    adapter: Path | None = typer.Option(None, help="adapter directory; without it the base model speaks"),
    model: str | None = ModelOpt,
    max_new_tokens: int = typer.Option(64),
    seed: int = typer.Option(0),
    greedy: bool = typer.Option(True, help="greedy decoding (else temperature-1 sampling)"),
    allow_network: bool = typer.Option(False),
    threads: int | None = typer.Option(None),
):
    """Generate a reply to PROMPT at steering coefficient --coeff."""
    import contextlib

    from ..errors import finite_coeff

    coeff = finite_coeff(coeff, "--coeff")
    torch = setup(allow_network, threads)
    from .. import load_adapter
    from ..models import load_model
    from ..prompts import render_prompt

    meta = adapter_meta(adapter) if adapter else {}
    lm = load_model(model or meta.get("base_model"), allow_network=allow_network)
    ctx = load_adapter(lm.model, adapter).steer(coeff) if adapter else contextlib.nullcontext()
    text = render_prompt(lm.tokenizer, prompt)
    ids = lm.tokenizer(text, return_tensors="pt", add_special_tokens=False)
    torch.manual_seed(seed)
    with ctx, torch.no_grad():
        out = lm.model.generate(
            **ids, max_new_tokens=max_new_tokens, do_sample=not greedy, pad_token_id=lm.tokenizer.pad_token_id
        )
    typer.echo(lm.tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))
