"""Run exported GGUF artefacts in llama.cpp (through ``llama-cpp-python``) to check them against PyTorch.

``llama-cpp-python`` is optional (``pip install innerpissa[llamacpp]``; it builds llama.cpp from source, about
10 min on 2 cores). Adapters are applied with llama.cpp's own C API: ``llama_adapter_lora_init`` +
``llama_set_adapters_lora`` (the ``--lora-scaled FILE s`` path), and ``llama_set_adapter_cvec`` for control
vectors, whose buffer this module builds from the GGUF the same way llama.cpp's ``--control-vector-scaled``
loader does (``direction.N`` for N ≥ 1, laid out from layer 1, times the scale).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:  # pragma: no cover - the message is the point
        raise ImportError("llama.cpp checks need llama-cpp-python: pip install 'llama-cpp-python==0.3.36'") from e
    return llama_cpp


def control_vector_buffer(path: str | Path, scale: float = 1.0) -> tuple[np.ndarray, int, int]:
    """(data (n_layers·n_embd,) float32 from layer 1, n_embd, last layer) of a control-vector GGUF, times scale.

    Raises:
        ValueError: not a control-vector GGUF, a ``direction.N`` with N < 1 or unparsable, or mixed sizes.
    """
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = reader.fields.get("general.architecture")
    if arch is None or arch.contents() != "controlvector":
        raise ValueError(f"{path}: general.architecture is not 'controlvector'")
    dirs = {}
    for t in reader.tensors:
        prefix, _, idx = t.name.partition(".")
        if prefix != "direction" or not idx.isdigit() or int(idx) < 1:
            raise ValueError(f"{path}: tensor {t.name!r} is not direction.N with N ≥ 1")
        dirs[int(idx)] = np.asarray(t.data, dtype=np.float32).reshape(-1)
    sizes = {v.size for v in dirs.values()}
    if len(sizes) != 1:
        raise ValueError(f"{path}: directions of different sizes {sorted(sizes)}")
    n_embd, last = sizes.pop(), max(dirs)
    data = np.zeros((last, n_embd), dtype=np.float32)
    for idx, v in dirs.items():
        data[idx - 1] = v * scale
    return data.reshape(-1), n_embd, last


class LlamaCppRunner:
    """A GGUF model in llama.cpp with optional LoRA adapters (path, scale) and a control vector (path, scale).

    ``logprobs(tokens)`` returns next-token log-probabilities (T, vocab) for every position of one sequence.
    Use as a context manager (``with LlamaCppRunner(...) as r:``) or call ``close()``.
    """

    def __init__(
        self,
        model_path: str | Path,
        loras: list[tuple[str | Path, float]] = (),
        control_vector: tuple[str | Path, float] | None = None,
        n_ctx: int = 512,
        n_threads: int = 2,
    ):
        llama_cpp = _llama_cpp()
        self._lib = llama_cpp
        self.llm = llama_cpp.Llama(
            model_path=str(model_path),
            n_ctx=n_ctx,
            logits_all=True,
            verbose=False,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            n_batch=n_ctx,
            type_k=0,
            type_v=0,
        )  # F32 KV cache: no F16 rounding in the comparison
        self._adapters = []
        if loras:
            for path, _ in loras:
                ad = llama_cpp.llama_adapter_lora_init(self.llm._model.model, str(path).encode())
                if not ad:
                    raise RuntimeError(f"llama.cpp could not load the LoRA adapter {path}")
                self._adapters.append(ad)
            arr = (llama_cpp.llama_adapter_lora_p_ctypes * len(loras))(*self._adapters)
            scales = (ctypes.c_float * len(loras))(*[float(s) for _, s in loras])
            if llama_cpp.llama_set_adapters_lora(self.llm._ctx.ctx, arr, len(loras), scales) != 0:
                raise RuntimeError(f"llama.cpp refused the LoRA adapters {[str(p) for p, _ in loras]}")
        if control_vector is not None:
            data, n_embd, last = control_vector_buffer(*control_vector)
            self._cvec = data  # keep the buffer alive
            ptr = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            if llama_cpp.llama_set_adapter_cvec(self.llm._ctx.ctx, ptr, data.size, n_embd, 1, last) != 0:
                raise RuntimeError(f"llama.cpp refused the control vector {control_vector[0]}")

    def logprobs(self, tokens: list[int]) -> np.ndarray:
        """Log-probs (T, vocab) float64: row t is the distribution of token t+1 given tokens[:t+1]."""
        self.llm.reset()
        self.llm.eval(list(tokens))
        logits = np.asarray(self.llm.scores[: len(tokens)], dtype=np.float64)
        logits -= logits.max(-1, keepdims=True)
        return logits - np.log(np.exp(logits).sum(-1, keepdims=True))

    def close(self) -> None:
        self.llm.close()

    def __enter__(self) -> LlamaCppRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def llama_cpp_logprobs(model_path: str | Path, tokens: list[int], **kwargs) -> np.ndarray:
    """One sequence's log-probs (T, vocab) in a fresh ``LlamaCppRunner(model_path, **kwargs)``."""
    with LlamaCppRunner(model_path, **kwargs) as runner:
        return runner.logprobs(tokens)
