"""Shared fixtures: tiny randomly initialised models and a download-free word-level tokenizer."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

torch.set_num_threads(2)


def word_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """Word-level tokenizer whose vocabulary is every word / punctuation mark in ``texts`` (+ chat tokens)."""
    words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", t)})
    vocab = {"[UNK]": 0, "<|im_start|>": 1, "<|im_end|>": 2, "[PAD]": 3, "yes": 4, "no": 5, "Yes": 6, "No": 7}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHATML
    fast.padding_side = "left"
    return fast


def tiny_llama(vocab_size: int = 256, seed: int = 0, layers: int = 6):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(cfg).eval().requires_grad_(False)


def tiny_gemma3(vocab_size: int = 256, seed: int = 0, layers: int = 6):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=16,
        max_position_embeddings=256,
    )
    return Gemma3ForCausalLM(cfg).eval().requires_grad_(False)


@pytest.fixture
def byte_yes_no(monkeypatch):
    """The tiny byte-vocabulary GGUF has no whole-word "yes"/"no" tokens: both engines score the bytes "y" / "n"."""

    def answer_tokens(tok, kind="yesno"):
        return [tok.convert_tokens_to_ids("y")], [tok.convert_tokens_to_ids("n")]

    for engine_module in ("engines", "rust_engine"):
        monkeypatch.setattr(f"innerpissa.eval.{engine_module}.answer_token_sets", answer_tokens)


@pytest.fixture(params=["llama", "gemma3"])
def tiny_model(request):
    return {"llama": tiny_llama, "gemma3": tiny_gemma3}[request.param]()


def yes_bias(model, yes_ids: list[int], per_unit: float):
    """make(c) for a HookMethod that only adds per_unit·c to the logits of the ``yes_ids`` tokens: a pure answer
    bias, which the evaluator must report as bias with a balanced effect of 0."""
    import contextlib

    @contextlib.contextmanager
    def make(c):
        def hook(_m, _a, out):
            out = out.clone()
            out[..., yes_ids] += per_unit * c
            return out

        h = model.lm_head.register_forward_hook(hook)
        try:
            yield
        finally:
            h.remove()

    return make
