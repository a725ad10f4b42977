"""What every ``ipissa`` command shares: the Typer app, the common options, runtime setup, the pairs, and the
checks made on an output or adapter directory before any model is loaded."""

from __future__ import annotations

import json
import os
from enum import Enum
from pathlib import Path

import typer

from ..eval.config import EngineChoice, WeightsChoice

app = typer.Typer(add_completion=False, help=__doc__, no_args_is_help=True, pretty_exceptions_enable=False)


OverwriteOpt = typer.Option(
    False,
    "--overwrite",
    help="write into an existing non-empty output: replace only the "
    "files this command writes (others are kept); for a run directory, start fresh",
)


#: ``--set FIELD=VALUE``: any TrainConfig field, repeatable (``train.config.parse_overrides``).
SetOpt = typer.Option(
    None,
    "--set",
    metavar="FIELD=VALUE",
    help="set any TrainConfig field, repeatable, e.g. --set even_weight=10 --set bias_weight=10 (with "
    "--epochs 1, the recipe docs/results.md tries on Gemma 3 270M; innerpissa/train/config.py lists the fields); "
    "wins over the named options",
)


ModelOpt = typer.Option(
    None,
    "--model",
    "-m",
    help="HF id (with --allow-network), model directory or .gguf file; default: the embedded SmolLM2-135M-Instruct",
)


ConceptOpt = typer.Option(
    "honesty",
    help="built-in concept whose persona pairs train the adapter and whose readout "
    "is the target (data/concepts.json): honesty, sentiment (the positive control), openness",
)


EngineOpt = typer.Option(
    EngineChoice.auto,
    help="evaluator: auto (rust for GGUF models it reads, else torch), torch "
    "(transformers, any model) or rust (GGUF models: Llama family, Gemma 3; all coefficients "
    "of a method in one pass, 3-5x faster on CPU)",
)


class DtypeChoice(str, Enum):
    """Weight dtype of the base model in torch (the adapter's U, S, V, θ, δ stay fp32 in every case)."""

    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


DtypeOpt = typer.Option(
    DtypeChoice.float32,
    help="base-model weight dtype for torch training and evaluation (the adapter stays fp32; c = 0 stays exact): "
    "bfloat16/float16 halve the memory and are slower than float32 on CPUs without AMX; the Rust engine "
    "computes in float32 whatever this says",
)


DeviceOpt = typer.Option(
    None,
    help="torch device of the base model and the adapter: cpu, cuda or cuda:N (default: cuda when CUDA is "
    "available, the process's own GPU under accelerate/torchrun, else cpu); the Rust engine runs on the CPU",
)


def resolve_device(device: str | None) -> str:
    """``--device`` → a torch device string: as given, or by default ``cuda:LOCAL_RANK`` when CUDA is available
    (LOCAL_RANK is set by ``accelerate launch``/``torchrun``, else 0) and ``cpu`` otherwise.

    Raises:
        typer.BadParameter: a CUDA device was asked for on a machine where torch sees none.
    """
    import torch

    if device is None:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise typer.BadParameter(f"--device {device}: torch sees no CUDA device here; use --device cpu")
    return device


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
    dev_items=typer.Option(
        False,
        "--dev-items",
        help="also score the dev items (their effect and bias go in results.json beside the test numbers); "
        "by default only the reported test items are scored, half the item passes",
    ),
)


def setup(allow_network: bool, threads: int | None):
    if not allow_network:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch

    torch.set_num_threads(threads or max(1, os.cpu_count() or 1))
    return torch


def cli_pairs(tokenizer, pairs_path: Path | None, n_pairs: int, seed: int, concept: str = "honesty"):
    from ..concepts import get_concept
    from ..pairs import load_pairs

    if pairs_path is not None:
        return load_pairs(pairs_path, tokenizer, seed=seed)
    return get_concept(concept).pairs(tokenizer, n_pairs=n_pairs, seed=seed)


def check_run_dir(out: Path, overwrite: bool) -> None:
    """Before loading anything: refuse a non-empty directory that is not a run, or a finished run."""
    from ..train import RUN_STATE

    if overwrite or not out.exists():
        return
    from ..outputs import check_output

    state = out / RUN_STATE
    if not state.is_file():
        check_output(out, overwrite)
    elif json.loads(state.read_text() or "{}").get("finished"):
        from ..errors import OutputExistsError

        raise OutputExistsError(
            "holds a finished run; pass --overwrite to train again there, or choose another --out", path=out
        )


def adapter_meta(adapter: Path) -> dict:
    """adapter_config.json of an adapter directory, read before any model is loaded (full checks happen in
    ``load_adapter``). Raises AdapterFileError naming the file."""
    from ..adapter.storage import CONFIG_NAME, read_adapter_config
    from ..errors import MissingFileError

    if not (adapter / CONFIG_NAME).is_file():
        raise MissingFileError(
            f"{CONFIG_NAME} not found: not an adapter directory (from `ipissa train`: RUN/adapter)", path=adapter
        )
    return read_adapter_config(adapter)
