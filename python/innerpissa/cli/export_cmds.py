"""``ipissa export`` (merged weights, LoRA files, live-coefficient graphs) and ``ipissa control-vector``."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from .common import ModelOpt, OverwriteOpt, adapter_meta, app, cli_pairs, setup


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
    from ..errors import ConfigError, finite_coeff
    from ..outputs import check_output

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
    meta = adapter_meta(adapter)
    setup(allow_network, threads)
    from .. import export as ex
    from .. import load_adapter
    from ..models import load_model

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
    from ..outputs import check_output

    check_output(out, overwrite, kind="file")
    setup(allow_network, threads)
    from .. import AdapterConfig
    from ..adapter.targets import decoder_blocks, select_layers
    from ..eval.methods import mean_difference_control_vector, pca_control_vector
    from ..export import export_control_vector
    from ..models import load_model

    if method not in ("pca", "mean-diff"):
        raise typer.BadParameter(f"--method must be pca or mean-diff, not {method!r}")
    lm = load_model(model, allow_network=allow_network)
    split = cli_pairs(lm.tokenizer, pairs, n_pairs, seed)
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
