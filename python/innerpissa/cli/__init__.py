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

import sys

import typer

from .common import app

# isort: off
# each module registers its commands; this order is the order of `ipissa --help`
from . import train_cmds  # noqa: F401
from . import eval_cmds  # noqa: F401
from . import export_cmds  # noqa: F401
from . import research_cmds  # noqa: F401

# isort: on

app.info.help = __doc__


def _one_line(err: BaseException) -> str:
    msg = str(err).strip() or type(err).__name__
    from ..errors import InnerPiSSAError

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
