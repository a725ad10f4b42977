"""``ipissa``: train, evaluate and generate with InnerPiSSA steering adapters.

    ipissa run        train the default honesty adapter on the embedded model, then evaluate it with baselines
    ipissa train      train an adapter on contrastive pairs (default: the built-in honesty pairs)
    ipissa eval       coefficient sweep of the adapter and the baselines → report.md, results.json, PNGs
    ipissa sweep      the same sweep on the Rust engine (GGUF models; every coefficient in one pass)
    ipissa generate   sample text at a steering coefficient
    ipissa export     merged HF / GGUF / ONNX at c, llama.cpp or PEFT LoRA, ONNX or llama.cpp with a live c
    ipissa control-vector   PCA or mean-difference control vector as a llama.cpp GGUF
    ipissa align      teacher → student: contrast directions, weighted Procrustes map, transfer report
    ipissa fetch-data download the default evaluation files into the cache (networked machines)

Errors print one line naming the file or option at fault (exit 1); add --debug anywhere for the traceback.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from enum import Enum
from pathlib import Path

import typer

from .eval.config import EngineChoice, EvalConfig, WeightsChoice

app = typer.Typer(add_completion=False, help=__doc__, no_args_is_help=True, pretty_exceptions_enable=False)

OverwriteOpt = typer.Option(
    False,
    "--overwrite",
    help="write into an existing non-empty output: replace only the "
    "files this command writes (others are kept); for a run directory, start fresh",
)

ModelOpt = typer.Option(
    None,
    "--model",
    "-m",
    help="HF id (with --allow-network), model directory or .gguf file; default: the embedded SmolLM2-135M-Instruct",
)


def _setup(allow_network: bool, threads: int | None):
    if not allow_network:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch

    torch.set_num_threads(threads or max(1, os.cpu_count() or 1))
    return torch


def _pairs(tokenizer, pairs_path: Path | None, n_pairs: int, seed: int, concept: str = "honesty"):
    from .concepts import get_concept
    from .pairs import load_pairs

    if pairs_path is not None:
        return load_pairs(pairs_path, tokenizer, seed=seed)
    return get_concept(concept).pairs(tokenizer, n_pairs=n_pairs, seed=seed)


ConceptOpt = typer.Option(
    "honesty",
    help="built-in concept whose persona pairs train the adapter and whose readout "
    "is the target (data/concepts.json): honesty, sentiment (the positive control), openness",
)


def _check_run_dir(out: Path, overwrite: bool) -> None:
    """Before loading anything: refuse a non-empty directory that is not a run, or a finished run."""
    from .train import RUN_STATE

    if overwrite or not out.exists():
        return
    from .adapter.model import check_output

    state = out / RUN_STATE
    if not state.is_file():
        check_output(out, overwrite)
    elif json.loads(state.read_text() or "{}").get("finished"):
        from .errors import OutputExistsError

        raise OutputExistsError(
            "holds a finished run; pass --overwrite to train again there, or choose another --out", path=out
        )


def _train(
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
):
    from . import AdapterConfig
    from .concepts import get_concept
    from .train import TrainConfig

    get_concept(concept)
    kw = {k: v for k, v in {"steps": steps, **(cfg_kwargs or {})}.items() if v is not None}  # unset: TrainConfig's
    if "steps" in kw and "epochs" not in kw:  # an explicit --steps means steps, whatever the default recipe says
        kw["epochs"] = 0.0
    tcfg = TrainConfig(seed=seed, **kw)  # validated before any compute
    acfg = AdapterConfig(rank=rank, seed=seed)
    _check_run_dir(out, overwrite)
    torch = _setup(allow_network, threads)
    from . import attach
    from .models import load_model
    from .train import train

    if pairs_path is not None and not pairs_path.is_file():
        raise FileNotFoundError(f"--pairs {pairs_path}: file not found")
    lm = load_model(model_spec, allow_network=allow_network)
    split = _pairs(lm.tokenizer, pairs_path, n_pairs, seed, concept)
    from .objectives import needs_neutral

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
        "(innerpissa/objectives.py; default: TrainConfig's)",
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
):
    """Train an InnerPiSSA adapter at c = +1 and c = −1 with the chosen objective (default: the ReprPO loss)."""
    _train(
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
    )


def _evaluate(lm, adapter, split, cfg, out: Path, concept: str = "honesty"):
    """Evaluate ``adapter`` and the baselines (``cfg``: a validated ``EvalConfig``) on ``concept``'s sets; write
    the report to ``out``."""
    from .concepts import get_concept
    from .eval import TorchEngine, build_methods, default_datasets, run_suite, write_report
    from .eval.suite import concept_datasets

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
        from .eval.engines import gguf_for_spec

        try:
            gguf_for_spec(lm.spec)
            engine = "rust"
        except (ValueError, FileNotFoundError):
            engine = "torch"
    rust = _rust_engine(lm.spec, lm.tokenizer, cfg.weights, cfg.batch_size) if engine == "rust" else None
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
        meta={"model": lm.spec, "concept": concept, "command": "ipissa " + shlex.join(sys.argv[1:])},
    )
    results["meta"]["eval_seconds"] = round(time.perf_counter() - t0, 1)
    write_report(results, out)
    typer.echo((out / "report.md").read_text())
    typer.echo(
        f"report written to {out / 'report.md'} (evaluation {results['meta']['eval_seconds']} s, "
        f"engine {results['meta']['engine']})"
    )


def _rust_engine(spec, tokenizer, weights: WeightsChoice, batch_size: int):
    from .eval.engines import RustEngine, gguf_for_spec

    return RustEngine(
        gguf_for_spec(spec), tokenizer, weights=WeightsChoice(weights).value, batch_size=max(batch_size, 1)
    )


EngineOpt = typer.Option(
    EngineChoice.auto,
    help="evaluator: auto (rust for GGUF models it reads, else torch), torch "
    "(transformers, any model) or rust (GGUF models: Llama family, Gemma 3; all coefficients "
    "of a method in one pass, 3-5x faster on CPU)",
)
WeightsOpt = typer.Option(
    WeightsChoice.f32,
    help="rust engine weights: f32 (de-quantized, matches torch; fastest on CPU), "
    "native (the GGUF's own quantized blocks) or q8_0 (int8 blocks): these two only save "
    "memory, they are slower and less exact; see docs/benchmarks.md",
)


EvalOpts = dict(
    methods=typer.Option(
        "innerpissa,prompting,pca,mean-diff,random",
        help="comma-separated methods to compare (innerpissa, prompting, pca, mean-diff, random)",
    ),
    kl_budget=typer.Option(
        0.05,
        help="coherence budget: every method is read at the |c| where the mean per-token "
        "KL(p0 || pc) on neutral text reaches this many nats/token",
    ),
    data_dir=typer.Option(
        None,
        help="folder with dailydilemmas/ and anthropic_mwe/ (default: ../shared/data, "
        "$IPISSA_DATA_DIR, or the download cache)",
    ),
    n_target=typer.Option(64, help="items per honesty target set (split 50/50 dev/test)"),
    n_other=typer.Option(16, help="items per off-target persona set"),
    n_dd=typer.Option(48, help="DailyDilemmas situations"),
    batch_size=typer.Option(32),
    truthfulqa=typer.Option(
        None,
        help="TruthfulQA.csv (github.com/sylinrl/TruthfulQA) to add as a multiple-choice "
        "set: length-normalised log-likelihood of true minus false answers; a target of the "
        "honesty concept",
    ),
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
):
    """Sweep the adapter and the baselines over held-out questions; write report.md, results.json, PNGs."""
    from .adapter.model import check_output

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
    ).validate()  # a bad option or data file fails before the model loads
    check_output(out, overwrite)
    meta = _adapter_meta(adapter)
    _setup(allow_network, threads)
    from . import load_adapter
    from .models import load_model

    lm = load_model(model or meta.get("base_model"), allow_network=allow_network)
    ad = load_adapter(lm.model, adapter)
    concept = concept or meta.get("concept", "honesty")
    split = _pairs(lm.tokenizer, pairs, n_pairs, seed, concept)
    _evaluate(lm, ad, split, cfg, out, concept)


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
    _setup(False, threads)
    from .adapter.model import _read_adapter_tensors, check_output, select_layers
    from .eval import build_methods, check_sweep_coeffs, default_datasets, run_suite, write_report
    from .models import load_tokenizer

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
    ).validate()
    check_output(out, overwrite)
    meta = _adapter_meta(adapter)
    _read_adapter_tensors(adapter, meta)  # checksum and finite values, as load_adapter checks them
    spec = model or meta.get("base_model")
    tok = load_tokenizer(spec)
    eng = _rust_engine(spec, tok, cfg.weights, cfg.batch_size)
    eng.load_adapter(adapter)
    from .adapter.config import AdapterConfig

    layers = select_layers(eng.config["n_layer"], AdapterConfig.from_dict(meta["adapter"]))
    need_pairs = set(cfg.methods) - {"innerpissa", "prompting"}
    train_pairs = list(_pairs(tok, pairs, n_pairs, cfg.seed).train) if need_pairs else []
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
        meta={"model": spec, "command": "ipissa " + shlex.join(sys.argv[1:])},
    )
    results["meta"]["eval_seconds"] = round(time.perf_counter() - t0, 1)
    write_report(results, out)
    typer.echo((out / "report.md").read_text())
    typer.echo(f"report written to {out / 'report.md'} (sweep {results['meta']['eval_seconds']} s)")


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
):
    """The main job: train the concept's adapter, evaluate it against prompting, PCA, mean-difference and random
    vectors at a common KL budget; then the same for the positive control (--control) in OUT/control."""
    from .concepts import get_concept

    get_concept(concept)
    if control:
        get_concept(control)
    from .eval.datasets import data_dir as resolve_data_dir

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
    ).validate()
    resolve_data_dir(data_dir)  # the evaluation data must be there before minutes of training
    t0 = time.perf_counter()
    runs = [(concept, out)] + ([(control, out / "control")] if control and control != concept else [])
    for _name, run_dir in runs:
        _check_run_dir(run_dir, overwrite)
    for name, run_dir in runs:
        typer.echo(f"== {name}: training and evaluation in {run_dir}")
        lm, adapter, split = _train(
            model, None, 400, steps, seed, None, run_dir, allow_network, threads, overwrite=overwrite, concept=name
        )
        _evaluate(lm, adapter, split, cfg, run_dir, concept=name)
    typer.echo(f"main job finished in {(time.perf_counter() - t0) / 60:.1f} min")


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

    from .errors import finite_coeff

    coeff = finite_coeff(coeff, "--coeff")
    torch = _setup(allow_network, threads)
    from . import load_adapter
    from .models import load_model
    from .prompts import render_prompt

    meta = _adapter_meta(adapter) if adapter else {}
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


class ExportFormat(str, Enum):
    """``ipissa export --format``: merged HF / GGUF / ONNX at one c, llama.cpp or PEFT LoRA, or a live c."""

    hf = "hf"
    gguf = "gguf"
    onnx = "onnx"
    onnx_live = "onnx-live"
    lora = "lora"
    lora_live = "lora-live"
    peft = "peft"


@app.command("export")
def export_cmd(
    adapter: Path = typer.Argument(..., help="adapter directory (from `ipissa train`: RUN/adapter)"),
    fmt_choice: ExportFormat = typer.Option(..., "--format", "-f", help="what to write (docs/export.md)"),
    out: Path = typer.Option(..., "--out", "-o", help="output file (gguf, lora) or directory (others)"),
    coeff: float | None = typer.Option(None, "--coeff", "-c", help="steering coefficient (formats at one c)"),
    model: str | None = ModelOpt,
    base_gguf: Path | None = typer.Option(
        None, help="GGUF of the base weights (default: the adapter's base model when it is a GGUF)"
    ),
    tensor_type: str = typer.Option(
        "same",
        help="gguf: type of edited tensors: same (re-quantize to the input's "
        "type where gguf can, else f32), f32, f16, q8_0, q4_1, …",
    ),
    c_min: float = typer.Option(-2.0, help="live formats: low end of the coefficient range to fit"),
    c_max: float = typer.Option(2.0, help="live formats: high end of the coefficient range to fit"),
    degree: int | None = typer.Option(
        None, help="live formats: polynomial degree K (default: smallest K ≤ 8 within --tol)"
    ),
    tol: float = typer.Option(1e-3, help="live formats: target worst-case relative error of M(c)"),
    overwrite: bool = OverwriteOpt,
    allow_network: bool = typer.Option(False),
    threads: int | None = typer.Option(None),
):
    """Export a steered model for transformers, llama.cpp, ONNX Runtime or PEFT (see docs/export.md)."""
    from .adapter.model import check_output
    from .errors import ConfigError, finite_coeff

    fmt = ExportFormat(fmt_choice).value
    live = fmt in ("onnx-live", "lora-live")
    if not live and coeff is None:
        raise typer.BadParameter(f"--format {fmt} exports one coefficient: pass --coeff")
    if coeff is not None:
        coeff = finite_coeff(coeff, "--coeff")
    c_min, c_max = finite_coeff(c_min, "--c-min"), finite_coeff(c_max, "--c-max")
    if live and not c_min < c_max:
        raise ConfigError(f"--c-min {c_min:g} must be below --c-max {c_max:g}", field="--c-min")
    check_output(out, overwrite, kind="file" if fmt in ("gguf", "lora") else "dir", protect=(adapter,))
    meta = _adapter_meta(adapter)
    _setup(allow_network, threads)
    from . import export as ex
    from . import load_adapter
    from .models import load_model

    lm = load_model(model or meta.get("base_model"), allow_network=allow_network)
    ad = load_adapter(lm.model, adapter)
    if fmt == "hf":
        ex.export_merged_hf(ad, lm.tokenizer, coeff, out, overwrite=overwrite)
    elif fmt == "gguf":
        types = ex.export_merged_gguf(ad, coeff, out, base_gguf, tensor_type, overwrite=overwrite)
        written = sorted(set(types.values()))
        typer.echo(f"edited tensors written as {', '.join(written)}")
        if set(written) & {"Q4_0", "Q4_1", "Q5_0", "Q5_1"}:
            typer.echo(
                "note: re-quantizing W(c) to ≤ 5 bits moves Yes/No log-odds by up to ~0.8 nats on SmolLM2, as "
                "much as the steering itself (docs/export.md); prefer --tensor-type q8_0 or f32, or "
                "--format lora on the unchanged base"
            )
    elif fmt == "onnx":
        ex.export_onnx_merged(ad, coeff, out, overwrite=overwrite)
    elif fmt == "peft":
        ex.export_peft_lora(ad, coeff, out, overwrite=overwrite)
    elif fmt == "lora":
        ex.export_llama_lora(ad, coeff, out, base_gguf, overwrite=overwrite)
        typer.echo(f"llama.cpp: llama-cli -m BASE.gguf --lora-scaled {out} 1")
    else:
        fits = ex.fit_adapter(ad, (c_min, c_max), degree=degree, tol=tol)
        k = next(iter(fits.values())).degree
        rel = max(f.max_rel_error for f in fits.values())
        if fmt == "onnx-live":
            ex.export_onnx_live(ad, fits, out, overwrite=overwrite)
        else:
            res = ex.export_llama_lora_live(
                ad, out, (c_min, c_max), base_gguf=base_gguf, fits=fits, overwrite=overwrite
            )
            typer.echo("llama.cpp at c=1: llama-cli -m BASE.gguf " + res.llama_cli_args(1.0))
            typer.echo("  file k takes scale c**k" + (" (one file: exact at every c)" if res.exact else ""))
        typer.echo(
            f"polynomial degree {k} over c in [{c_min}, {c_max}]: worst relative error of M(c) "
            f"{rel:.2e}"
            + (" (the fit's tolerance was not reached: raise --degree or narrow the range)" if rel > tol else "")
        )
    typer.echo(f"exported {fmt} to {out}")


@app.command("tune")
def tune_cmd(
    grid: Path = typer.Option(..., help="grid file (TOML; see innerpissa/tune.py and docs/tuning.md)"),
    out: Path = typer.Option(
        Path("runs/tune"), help="search directory: rows.jsonl, runs/, summary.md; a rerun resumes it"
    ),
    data_dir: Path | None = EvalOpts["data_dir"],
    threads: int | None = typer.Option(None, help="torch threads (default: all cores)"),
):
    """Dev-split search over training recipes by successive halving (dev items only; resumable)."""
    from .tune import load_grid, run_search

    load_grid(grid)  # a bad grid fails before the model loads
    _setup(False, threads)
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
    from .ablate import run_ablation

    _setup(False, threads)  # run_ablation checks the grid (split = "test" included) before the model loads
    run_ablation(grid, out, data_dir, doc=doc, log=typer.echo)
    typer.echo(f"summary written to {out / 'summary.md'}")


@app.command("fetch-data")
def fetch_data_cmd(
    out: Path | None = typer.Option(None, help="folder to fill (default: the download cache ~/.cache/innerpissa/data)"),
):
    """Download the default evaluation files (DailyDilemmas, Anthropic persona sets) from their original sources.

    Needs network access. The evaluation commands then find them in the cache with no --data-dir."""
    from .eval.datasets import default_cache_dir, fetch_default_data

    target = out or default_cache_dir()
    paths = fetch_default_data(target)
    typer.echo(f"{len(paths)} evaluation files in {target}")


@app.command("control-vector")
def control_vector_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="output .gguf"),
    method: str = typer.Option("pca", help="pca (repeng) or mean-diff (CAA)"),
    model: str | None = ModelOpt,
    pairs: Path | None = typer.Option(None, help="JSONL pairs (default: built-in honesty pairs)"),
    n_pairs: int = typer.Option(400),
    layers: str | None = typer.Option(None, help="comma-separated block indices ≥ 1 (default: 30 %..L−3)"),
    seed: int = typer.Option(0),
    overwrite: bool = OverwriteOpt,
    allow_network: bool = typer.Option(False),
    threads: int | None = typer.Option(None),
):
    """Train a PCA (repeng) or mean-difference control vector on pairs; write llama.cpp's GGUF layout."""
    from .adapter.model import check_output

    check_output(out, overwrite, kind="file")
    _setup(allow_network, threads)
    from . import AdapterConfig
    from .adapter.model import decoder_blocks, select_layers
    from .eval.methods import mean_difference_control_vector, pca_control_vector
    from .export import export_control_vector
    from .models import load_model

    if method not in ("pca", "mean-diff"):
        raise typer.BadParameter(f"--method must be pca or mean-diff, not {method!r}")
    lm = load_model(model, allow_network=allow_network)
    split = _pairs(lm.tokenizer, pairs, n_pairs, seed)
    n_blocks = len(decoder_blocks(lm.model))
    ids = [int(x) for x in layers.split(",")] if layers else select_layers(n_blocks, AdapterConfig())
    bad = [i for i in ids if not 1 <= i < n_blocks]
    if bad:
        raise typer.BadParameter(f"--layers {bad}: llama.cpp control vectors need block indices 1..{n_blocks - 1}")
    make = pca_control_vector if method == "pca" else mean_difference_control_vector
    dirs = make(lm.model, lm.tokenizer, list(split.train), ids)
    export_control_vector({k: v.numpy() for k, v in dirs.items()}, out, lm.model.config.model_type, overwrite=overwrite)
    typer.echo(
        f"{method} control vector for blocks {ids[0]}..{ids[-1]} written to {out}; "
        f"llama.cpp: --control-vector-scaled {out} C"
    )


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
    from .adapter.model import check_output
    from .errors import finite_coeff

    check_output(out, overwrite)
    fold_coeff = finite_coeff(fold_coeff, "--fold-coeff")
    _setup(allow_network, threads)
    from safetensors.torch import save_file

    from .models import load_model
    from .transfer.align import TransferConfig, align, fold_check, projection_effects, steering_effects, transfer_report
    from .transfer.contrasts import TOUR_GUIDE, ContrastTemplate, load_manifest

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
    from .adapter.model import atomic_write

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


def _adapter_meta(adapter: Path) -> dict:
    """adapter_config.json of an adapter directory, read before any model is loaded (full checks happen in
    ``load_adapter``). Raises AdapterFileError naming the file."""
    from .adapter.model import CONFIG_NAME, _read_adapter_config
    from .errors import MissingFileError

    if not (adapter / CONFIG_NAME).is_file():
        raise MissingFileError(
            f"{CONFIG_NAME} not found: not an adapter directory (from `ipissa train`: RUN/adapter)", path=adapter
        )
    return _read_adapter_config(adapter)


def _one_line(err: BaseException) -> str:
    msg = str(err).strip() or type(err).__name__
    from .errors import InnerPiSSAError

    if isinstance(err, (InnerPiSSAError, ValueError, OSError, RuntimeError, KeyError)):
        return msg if not isinstance(err, KeyError) else f"missing key {msg}"
    return f"{type(err).__name__}: {msg} (rerun with --debug for the traceback)"


def main(argv: list[str] | None = None) -> int:
    """The ``ipissa`` entry point: run the typer app; print library errors as one line and exit 1.

    ``--debug`` (anywhere on the command line) re-raises instead, showing the traceback.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    try:
        rv = app(args=args, prog_name="ipissa", standalone_mode=False)
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 1
    except typer.exceptions.TyperException as e:  # usage errors (typer's click): usage line + one-line message
        if debug or not hasattr(e, "show"):
            raise
        e.show()
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    except Exception as e:
        if debug:
            raise
        typer.echo(f"error: {_one_line(e)}", err=True)
        return 1
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    sys.exit(main())
