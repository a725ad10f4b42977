"""The Rust engine (``innerpissa._rust``, GGUF models) behind the evaluator's engine interface: every coefficient of a
method in one batched pass with the adapter as a low-rank side path, and hidden-state capture for the steering-vector
baselines."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from ..pairs import ContrastivePair
from .datasets import EvalDataset
from .engines import answer_token_sets, eval_prompt, mc_score, mc_texts, neutral_head, token_ids


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
    name: str = "rust"
    engine: object = field(init=False, repr=False)
    _adapter_key: object = field(default=None, init=False, repr=False)
    _vectors: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        from .. import _rust

        self.gguf = Path(self.gguf)
        self.engine = _rust.Engine(str(self.gguf), self.weights)
        self.Branch = _rust.Branch  # what one set of rows runs: Branch.base(), .adapter(c), .vector(c, index)
        self.name = f"rust ({self.weights})"

    @property
    def config(self) -> dict:
        return self.engine.config

    def load_adapter(self, directory: str | Path) -> list[str]:
        """Load a saved adapter directory (U, S, V, θ, δ as saved; nothing is re-decomposed)."""
        names = self.engine.load_adapter(str(directory))
        self._adapter_key = ("dir", str(Path(directory).resolve()))
        return names

    def set_adapter(self, adapter) -> None:
        """Load an in-memory ``Adapter``: saved to a temporary directory and loaded, unless the engine already
        holds these exact parameters (keyed on their content, so further training is never missed)."""
        from ..adapter.storage import tensor_checksum

        key = ("mem", tensor_checksum({k: v.detach().cpu() for k, v in adapter.state_dict().items()}))
        if self._adapter_key == key:
            return
        with tempfile.TemporaryDirectory() as tmp:
            adapter.save(tmp)
            self.engine.load_adapter(tmp)
        self._adapter_key = key

    def add_control_vector(self, directions: dict[int, torch.Tensor]) -> int:
        """Register block-output directions {block ℓ: (d,)}; returns the index for ``Branch.vector(c, index)``."""
        return self.engine.add_control_vector(
            {int(k): np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for k, v in directions.items()}
        )

    def answer_scores(self, prompts: list[str], kind: str, branches: list) -> tuple[np.ndarray, np.ndarray]:
        """Answer log-odds and mass, each (len(branches), len(prompts)); as ``TorchEngine.answer_scores``."""
        pos, neg = answer_token_sets(self.tokenizer, kind)
        seqs = [token_ids(self.tokenizer, p) for p in prompts]
        return self.engine.yes_no(seqs, branches, pos, neg, self.batch_size)

    def mc_scores(self, items, branches: list, user_prefix: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Multiple-choice items → (``mc_score``, mass of ones), each (len(branches), len(items)); as
        ``TorchEngine.mc_scores``."""
        seqs, starts, spans = [], [], []
        for it in items:
            head, answers = mc_texts(self.tokenizer, it, user_prefix)
            h = token_ids(self.tokenizer, head)
            spans.append((len(seqs), len(answers), len(it.true_answers)))
            for a in answers:
                seqs.append(h + token_ids(self.tokenizer, a))
                starts.append(len(h) - 1)
        lps = self.engine.token_logprobs(seqs, starts, branches, max(self.batch_size // 4, 1))
        n = len(seqs)
        scores = np.zeros((len(branches), len(items)))
        for b in range(len(branches)):
            for i, (k, m, n_true) in enumerate(spans):
                rows = [lps[b * n + j] for j in range(k, k + m)]
                scores[b, i] = mc_score([np.sum(r, dtype=np.float64) for r in rows], [len(r) for r in rows], n_true)
        return scores, np.ones_like(scores)

    def text_stats(self, texts: list[str], branches: list, user_prefix: str | None = None) -> list[tuple[float, float]]:
        """Per branch, (mean NLL, mean KL(p₀‖p_branch)) per reply token of ``texts``, nats/token; p₀ is the base
        model on the unprefixed request (as ``TorchEngine.text_stats``)."""
        tok = self.tokenizer
        h0 = token_ids(tok, neutral_head(tok))
        hc = token_ids(tok, neutral_head(tok, user_prefix))
        bodies = [token_ids(tok, t) for t in texts]
        seqs = [hc + b for b in bodies]
        refs = [h0 + b for b in bodies]
        lps, kls = self.engine.token_stats(
            seqs, [len(hc) - 1] * len(seqs), branches, max(self.batch_size // 4, 1), refs, [len(h0) - 1] * len(refs)
        )
        n, total = len(seqs), sum(len(b) for b in bodies)
        return [
            (
                -float(sum(np.sum(lps[b * n + i], dtype=np.float64) for i in range(n))) / total,
                float(sum(np.sum(kls[b * n + i], dtype=np.float64) for i in range(n))) / total,
            )
            for b in range(len(branches))
        ]

    def last_token_states(
        self, texts: list[str], layers: list[int], special_tokens: bool = False, branches: list | None = None
    ) -> dict[int, np.ndarray]:
        """Decoder-block outputs at each text's last token: {ℓ: (n, d) float32} (first branch; default the base
        model)."""
        seqs = [token_ids(self.tokenizer, t, special_tokens) for t in texts]
        branches = list(branches) if branches is not None else [self.Branch.base()]
        h = self.engine.hidden(seqs, list(layers), branches, self.batch_size)  # (L, B, n, d)
        return {ell: h[i, 0] for i, ell in enumerate(layers)}

    def _branches(self, method, coeffs: list[float]) -> list:
        if method.kind == "adapter":
            if isinstance(method.adapter, (str, Path)):  # a directory: `ipissa sweep` never builds a torch model
                if self._adapter_key != ("dir", str(Path(method.adapter).resolve())):
                    self.load_adapter(method.adapter)
            else:
                self.set_adapter(method.adapter)
            return [self.Branch.adapter(float(c)) if c != 0 else self.Branch.base() for c in coeffs]
        if method.kind == "vector":
            idx = self._vectors.get(id(method.directions))
            if idx is None:
                idx = self._vectors[id(method.directions)] = self.add_control_vector(method.directions)
            return [self.Branch.vector(float(c), idx) if c != 0 else self.Branch.base() for c in coeffs]
        raise ConfigError(
            f"the rust engine cannot run method {method.name!r} (kind {method.kind!r}); use the torch engine",
            field="engine",
        )

    def _points(self, branches: list, datasets, neutral_texts, user_prefix: str | None) -> list[dict]:
        res: list[dict] = [dict() for _ in branches]
        for d in datasets:
            if d.kind == "mc":
                s, m = self.mc_scores(d.items, branches, user_prefix)
            else:
                prompts = [eval_prompt(self.tokenizer, it.question, d.kind, user_prefix) for it in d.items]
                s, m = self.answer_scores(prompts, d.kind, branches)
            for b in range(len(branches)):
                res[b][d.name] = (s[b], m[b])
        for b, (nll, kl) in enumerate(self.text_stats(neutral_texts, branches, user_prefix)):
            res[b]["__nll__"], res[b]["__kl__"] = nll, kl
        return res

    def evaluate(
        self, method, coeffs: list[float], datasets: list[EvalDataset], neutral_texts: list[str]
    ) -> list[dict]:
        """As ``TorchEngine.evaluate``; adapter and vector coefficients share one packed pass per dataset,
        prompting runs one pass per coefficient."""
        if method.kind == "prompt":
            return [
                self._points([self.Branch.base()], datasets, neutral_texts, method.user_prefix(c))[0] for c in coeffs
            ]
        return self._points(self._branches(method, coeffs), datasets, neutral_texts, None)


def mean_difference_control_vector(
    engine: RustEngine, pairs: list[ContrastivePair], layers: list[int]
) -> dict[int, torch.Tensor]:
    """``methods.mean_difference_control_vector`` with hidden states from the Rust engine."""
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
