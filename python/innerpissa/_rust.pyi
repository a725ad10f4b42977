"""Type stubs of the native extension ``innerpissa._rust`` (Rust, pyo3; source: ``rust/py/src/lib.rs``).

Branches select what one set of rows of a sweep runs: ``Branch.base()`` (the unsteered model), ``Branch.adapter(c)``
(the loaded InnerPiSSA adapter at steering coefficient c) or ``Branch.vector(c, index)`` (control vector ``index``
scaled by c); the tuples ``("base",)``, ``("adapter", c)``, ``("vector", c, index)`` are accepted too.
All work runs with the GIL released on the rayon pool (``RAYON_NUM_THREADS`` / ``CANDLE_NUM_THREADS``).
"""

from collections.abc import Mapping, Sequence
from os import PathLike
from typing import Literal

import numpy as np
import numpy.typing as npt

__version__: str

class Branch:
    """What one set of rows of a pass runs; immutable, comparable and hashable."""

    @staticmethod
    def base() -> Branch:
        """The unsteered model."""

    @staticmethod
    def adapter(c: float) -> Branch:
        """The loaded adapter at steering coefficient ``c`` (finite; ValueError otherwise)."""

    @staticmethod
    def vector(c: float, index: int) -> Branch:
        """Control vector ``index`` (from ``Engine.add_control_vector``) added to block outputs as c·v."""

BranchLike = Branch | tuple[Literal["base"]] | tuple[Literal["adapter"], float] | tuple[Literal["vector"], float, int]
Precision = Literal["float64", "float32"]
F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]

def top_r_svd(w: F32, r: int, *, precision: Precision = "float64") -> tuple[F32, F32, F32]:
    """Top-r SVD of a float32 (d_out, d_in) matrix → U (d_out, r), S (r,) descending, V (d_in, r), float32, with
    w ≈ U diag(S) Vᵀ; the largest-|·| entry of each U column is positive (faer). Raises ValueError for non-2-D
    input or r outside [1, min(d_out, d_in)], TypeError for non-float32 input."""

def top_r_svd_batch(ws: Sequence[F32], r: int, *, precision: Precision = "float64") -> list[tuple[F32, F32, F32]]:
    """``top_r_svd`` of every matrix in ``ws`` (shapes may differ), in parallel; every input is validated before any
    work starts and errors name the offending index."""

def num_threads() -> int:
    """The size of the rayon pool the engine and the SVD run on."""

class Engine:
    """A GGUF decoder (Llama family or Gemma 3) for coefficient sweeps.

    ``weights``: ``"f32"`` (de-quantised at load), ``"native"`` (the file's quantised blocks) or ``"q8_0"``
    (re-quantised to int8 blocks). Sequences are lists of token ids; no special tokens are added. Raises
    FileNotFoundError for a missing file, ValueError for an unsupported file or argument.
    """

    def __init__(
        self, path: str | PathLike[str], weights: Literal["f32", "native", "q8_0"] = "f32", device: str = "cpu"
    ) -> None: ...
    @property
    def config(self) -> dict[str, int | str]:
        """arch, n_layer, d_model, n_head, n_kv_head, head_dim, d_ff, vocab, weights."""

    def load_adapter(self, directory: str | PathLike[str]) -> list[str]:
        """Load an adapter directory (adapter_config.json + adapter_model.safetensors) → its target module names."""

    def steer_matrix(self, name: str, c: float) -> F64:
        """M(c), (r, r) float64, of the loaded adapter's layer ``name``."""

    def add_control_vector(self, directions: Mapping[int, F32]) -> int:
        """{block index: direction (d_model,) float32} → the index for ``Branch.vector(c, index)``."""

    def clear_control_vectors(self) -> None: ...
    def yes_no(
        self,
        seqs: Sequence[Sequence[int]],
        branches: Sequence[BranchLike],
        pos_ids: Sequence[int],
        neg_ids: Sequence[int],
        batch: int = 64,
    ) -> tuple[F64, F64]:
        """(scores, mass), each (len(branches), len(seqs)): logsumexp log p[pos_ids] − logsumexp log p[neg_ids] in
        nats at each sequence's last position, and the mass p(pos) + p(neg)."""

    def token_logprobs(
        self, seqs: Sequence[Sequence[int]], starts: Sequence[int], branches: Sequence[BranchLike], batch: int = 16
    ) -> list[F32]:
        """Branch-major list (len(branches)·len(seqs)) of log p(token t+1 | tokens ≤ t), nats, for t in
        starts[i] … len(seq) − 2."""

    def token_stats(
        self,
        seqs: Sequence[Sequence[int]],
        starts: Sequence[int],
        branches: Sequence[BranchLike],
        batch: int = 16,
        ref_seqs: Sequence[Sequence[int]] | None = None,
        ref_starts: Sequence[int] | None = None,
    ) -> tuple[list[F32], list[F32]]:
        """(log-probs, KL(p_ref ‖ p_branch)) per predicting position, both nats and branch-major as in
        ``token_logprobs``; the reference is the unsteered model on ``ref_seqs`` (default ``seqs``)."""

    def hidden(
        self,
        seqs: Sequence[Sequence[int]],
        layers: Sequence[int],
        branches: Sequence[BranchLike],
        batch: int = 64,
        positions: Sequence[int] | None = None,
    ) -> npt.NDArray[np.float32]:
        """Decoder-block outputs, (len(layers), len(branches), len(seqs), d_model) float32, at ``positions[i]`` of
        sequence i (default: its last token)."""
