"""Evaluation of steering methods on held-out behaviour sets (docs/design.md §5, §6).

``datasets`` (loaders, label-balanced sampling and dev/test splits, neutral texts) → ``methods`` (InnerPiSSA
adapter, prompting, PCA / mean-difference / random control vectors) → ``engines`` (torch or Rust; one sweep loop)
→ ``metrics`` (balanced effect, bias, KL-matched coefficient, flip score, ρ, symmetry) → ``report``; ``suite`` ties
them together.
"""

from .engines import Sweep, TorchEngine, check_sweep_coeffs, run_sweep
from .methods import AdapterMethod, HookMethod, PromptMethod, VectorMethod, build_methods, check_methods
from .metrics import KL_BUDGET, summarize
from .report import write_report
from .rust_engine import RustEngine
from .suite import HONESTY_TARGETS, default_datasets, run_suite

__all__ = [
    "HONESTY_TARGETS",
    "KL_BUDGET",
    "AdapterMethod",
    "HookMethod",
    "PromptMethod",
    "RustEngine",
    "Sweep",
    "TorchEngine",
    "VectorMethod",
    "build_methods",
    "check_methods",
    "check_sweep_coeffs",
    "default_datasets",
    "run_suite",
    "run_sweep",
    "summarize",
    "write_report",
]
