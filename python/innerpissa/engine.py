"""The Rust evaluation engine: ``innerpissa._rust.Engine`` driven with the same prompts, tokens and answer sets as
the PyTorch evaluator (``evaluate.py``), so either engine gives the same ``Sweep`` (DESIGN.md §5, §8).

Engines:

- ``torch`` (default): transformers on any model (HF id, directory or GGUF), one forward per coefficient.
- ``rust``: a GGUF file (Llama family or Gemma 3) read by candle; one packed pass serves every coefficient of a
  method (see ``rust/core/src/engine``): the prompt prefix shared by a batch is computed once, the layers below
  the first steered layer once for all coefficients, and only answer positions reach the output head. Weights
  are de-quantized to f32 (``weights="f32"``, the same weights transformers loads) unless asked otherwise.

Tokenization stays in Python (the model's own tokenizer), so both engines see identical token ids.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .evaldata import EvalDataset
from .evaluate import Sweep, answer_token_sets, eval_prompt, neutral_head
from .pairs import ContrastivePair


def gguf_for_spec(spec: str | None) -> Path:
    """The GGUF file behind a model spec: the embedded models, a ``.gguf`` path, or a directory holding one.

    Raises:
        ValueError: the spec is a transformers checkpoint (the Rust engine reads only GGUF files).
        FileNotFoundError: a missing path or embedded package (with how to install it).
    """
    from .models import DEFAULT_MODEL, GEMMA3_270M, embedded_gemma3_gguf, embedded_smollm2_gguf

    spec = spec or DEFAULT_MODEL
    if spec == DEFAULT_MODEL:
        return embedded_smollm2_gguf()
    if spec == GEMMA3_270M:
        return embedded_gemma3_gguf()
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return path
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if ggufs and not (path / "config.json").exists():
            return ggufs[0]
    raise ValueError(f"--engine rust reads GGUF files; {spec!r} is not one. Use --engine torch, or convert the "
                     "model with llama.cpp's convert_hf_to_gguf.py and pass the .gguf file")


def _tok(tokenizer, text: str, special: bool = False) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


@dataclass
class RustEngine:
    """A GGUF model in the Rust engine plus the tokenizer that feeds it.

    Args:
        gguf: path of the GGUF file (the same file the torch model was de-quantized from, for parity).
        tokenizer: the model's Hugging Face tokenizer.
        weights: ``"f32"`` (de-quantized, parity reference), ``"native"`` (the file's quantized blocks) or
            ``"q8_0"`` (int8 blocks); see docs/benchmarks.md for their speed and error.
        batch_size: prompts per packed pass (memory grows with batch × coefficients).
    """

    gguf: Path
    tokenizer: object
    weights: str = "f32"
    batch_size: int = 64
    engine: object = field(init=False, repr=False)
    _adapter_id: int | str | None = field(default=None, init=False, repr=False)
    _vectors: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        from . import _rust

        self.gguf = Path(self.gguf)
        self.engine = _rust.Engine(str(self.gguf), self.weights)

    @property
    def config(self) -> dict:
        return self.engine.config

    def load_adapter(self, directory: str | Path) -> list[str]:
        """Load a saved adapter directory (U, S, V, θ, δ as saved; nothing is re-decomposed)."""
        names = self.engine.load_adapter(str(directory))
        self._adapter_id = str(directory)
        return names

    def set_adapter(self, adapter) -> None:
        """Load an in-memory ``Adapter`` (saved to a temporary directory first); a no-op when already loaded."""
        if self._adapter_id == id(adapter):
            return
        with tempfile.TemporaryDirectory() as tmp:
            adapter.save(tmp)
            self.engine.load_adapter(tmp)
        self._adapter_id = id(adapter)

    def add_control_vector(self, directions: dict[int, torch.Tensor]) -> int:
        """Register block-output directions {block ℓ: (d,)}; returns the index for ``("vector", c, index)``."""
        return self.engine.add_control_vector(
            {int(k): np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for k, v in directions.items()})

    def answer_scores(self, prompts: list[str], kind: str, branches: list[tuple]) -> tuple[np.ndarray, np.ndarray]:
        """Yes/No (or A/B) log-odds and answer mass, each (len(branches), len(prompts)); as ``evaluate.answer_scores``."""
        pos, neg = answer_token_sets(self.tokenizer, kind)
        seqs = [_tok(self.tokenizer, p) for p in prompts]
        return self.engine.yes_no(seqs, branches, pos, neg, self.batch_size)

    def continuation_logprobs(self, heads: list[str], bodies: list[str], branches: list[tuple]
                              ) -> list[list[tuple[float, int]]]:
        """Per branch, (sum of log p in nats, token count) of each body after its head; as
        ``evaluate.continuation_logprobs`` (head and body tokenized separately, then concatenated)."""
        hs = [_tok(self.tokenizer, h) for h in heads]
        bs = [_tok(self.tokenizer, b) for b in bodies]
        seqs = [h + b for h, b in zip(hs, bs)]
        lps = self.engine.token_logprobs(seqs, [max(len(h) - 1, 0) for h in hs], branches, max(self.batch_size // 4, 1))
        n = len(seqs)
        return [[(float(np.sum(lps[b * n + i], dtype=np.float64)), len(bs[i])) for i in range(n)]
                for b in range(len(branches))]

    def text_nll(self, texts: list[str], branches: list[tuple], system: str | None = None) -> list[float]:
        """Per branch, mean per-token NLL (nats/token) of ``texts`` as the reply to a neutral request."""
        head = neutral_head(self.tokenizer, system)
        rows = self.continuation_logprobs([head] * len(texts), texts, branches)
        return [-sum(s for s, _ in r) / max(sum(k for _, k in r), 1) for r in rows]

    def last_token_states(self, texts: list[str], layers: list[int], special_tokens: bool = False,
                          branches: list[tuple] = (("base",),)) -> dict[int, np.ndarray]:
        """Decoder-block outputs at each text's last token: {ℓ: (n, d) float32} (first branch)."""
        seqs = [_tok(self.tokenizer, t, special_tokens) for t in texts]
        h = self.engine.hidden(seqs, list(layers), list(branches), self.batch_size)  # (L, B, n, d)
        return {ell: h[i, 0] for i, ell in enumerate(layers)}


def mean_difference_control_vector(engine: RustEngine, pairs: list[ContrastivePair], layers: list[int]
                                   ) -> dict[int, torch.Tensor]:
    """``baselines.mean_difference_control_vector`` with hidden states from the Rust engine."""
    pos = engine.last_token_states([p.positive for p in pairs], layers)
    neg = engine.last_token_states([p.negative for p in pairs], layers)
    return {ell: torch.from_numpy((pos[ell] - neg[ell]).mean(0)) for ell in layers}


def pca_control_vector(engine: RustEngine, pairs: list[ContrastivePair], layers: list[int]) -> dict[int, torch.Tensor]:
    """repeng's ``pca_diff`` control vector (``ControlVector.train``) with hidden states from the Rust engine.

    Same recipe as repeng 0.4.0 ``read_representations``: texts tokenized with special tokens, the output of
    block ℓ at the last token, first principal component (scikit-learn PCA) of positive − negative differences,
    signed so that positives project higher on most pairs. Returns unit directions {ℓ: (d,) float32}.
    """
    from sklearn.decomposition import PCA

    texts = [s for p in pairs for s in (p.positive, p.negative)]
    hs = engine.last_token_states(texts, layers, special_tokens=True)
    out = {}
    for ell in layers:
        h = hs[ell]
        d = PCA(n_components=1, whiten=False).fit(h[::2] - h[1::2]).components_.astype(np.float32)[0]
        proj = h @ d / np.linalg.norm(d)
        smaller = np.mean(proj[::2] < proj[1::2])
        larger = np.mean(proj[::2] > proj[1::2])
        out[ell] = torch.from_numpy(-d if smaller > larger else d)
    return out


def _branches(engine: RustEngine, method, coeffs: list[float]) -> list[tuple]:
    from .baselines import AdapterMethod, VectorMethod

    if isinstance(method, AdapterMethod):
        if isinstance(method.adapter, (str, Path)):  # a directory: `ipissa sweep` never builds a torch model
            if engine._adapter_id != str(method.adapter):
                engine.load_adapter(method.adapter)
                engine._adapter_id = str(method.adapter)
        else:
            engine.set_adapter(method.adapter)
        return [("adapter", float(c)) if c != 0 else ("base",) for c in coeffs]
    if isinstance(method, VectorMethod):
        idx = engine._vectors.get(id(method.directions))
        if idx is None:
            idx = engine._vectors[id(method.directions)] = engine.add_control_vector(method.directions)
        return [("vector", float(c), idx) if c != 0 else ("base",) for c in coeffs]
    raise TypeError(f"the rust engine cannot run method {method.name!r} ({type(method).__name__})")


def run_sweep(engine: RustEngine, method, datasets: list[EvalDataset], neutral_texts: list[str],
              base_cache: dict | None = None, progress=None) -> Sweep:
    """``evaluate.run_sweep`` on the Rust engine: every coefficient of a method in one packed pass per dataset.

    Methods that change the prompt (prompting) run one pass per coefficient; c = 0 results are shared through
    ``base_cache`` exactly as in the torch evaluator.
    """
    from .baselines import PromptMethod

    tok = engine.tokenizer
    coeffs = list(method.coeffs)
    scores: dict[str, list] = {d.name: [None] * len(coeffs) for d in datasets}
    mass: dict[str, list] = {d.name: [None] * len(coeffs) for d in datasets}
    nll: list = [None] * len(coeffs)
    cache = base_cache if base_cache is not None else {}

    def fill(k: int, res: dict) -> None:
        for d in datasets:
            s, m = res[d.name]
            scores[d.name][k] = np.asarray(s).tolist()
            mass[d.name][k] = np.asarray(m).tolist()
        nll[k] = res["__nll__"]

    def evaluate(branches: list[tuple], system: str | None) -> list[dict]:
        res = [dict() for _ in branches]
        for d in datasets:
            prompts = [eval_prompt(tok, it.question, d.kind, system) for it in d.items]
            s, m = engine.answer_scores(prompts, d.kind, branches)
            for b in range(len(branches)):
                res[b][d.name] = (s[b], m[b])
        for b, v in enumerate(engine.text_nll(neutral_texts, branches, system)):
            res[b]["__nll__"] = v
        return res

    todo = []
    for k, c in enumerate(coeffs):
        system = method.system(c)
        key = ("base", system)
        if c == 0 and key in cache:
            fill(k, cache[key])
        else:
            todo.append(k)
    if isinstance(method, PromptMethod):
        for k in todo:
            system = method.system(coeffs[k])
            res = evaluate([("base",)], system)[0]
            if coeffs[k] == 0:
                cache[("base", system)] = res
            fill(k, res)
    elif todo:
        branches = _branches(engine, method, [coeffs[k] for k in todo])
        for k, res in zip(todo, evaluate(branches, None)):
            if coeffs[k] == 0:
                cache[("base", None)] = res
            fill(k, res)
    if progress is not None:
        for c in coeffs:
            progress(method.name, c)
    return Sweep(method.name, coeffs, scores, mass, nll)
