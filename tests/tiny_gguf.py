"""Write a tiny randomly initialised Llama model as a GGUF file with the ``gguf`` package (test helper).

The file has what llama.cpp and transformers both need: llama.* hyper-parameters, a byte-level BPE vocabulary
(the 256 GPT-2 byte symbols, a few merges, two ChatML control tokens) and F32 tensors named by gguf's own name map,
with llama.cpp's q/k row permutation. Loading it back with transformers (``gguf_file=``) gives the same weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from innerpissa.export.gguf_io import permute_rows, tensor_name_map

SPECIALS = ["<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "e r", "a n", "o n", "Ġ a"]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_vocab() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = [bytes_to_unicode()[b] for b in range(256)]
    merged = ["".join(m.split(" ")) for m in MERGES]
    return symbols + merged + SPECIALS


VOCAB_SIZE = len(byte_vocab())


def tiny_llama_for_gguf(seed: int = 0, layers: int = 4, init: float = 0.15):
    """A tiny Llama with weights large enough that logits are far from uniform; vocab = the GGUF byte vocab."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        initializer_range=init,
        bos_token_id=VOCAB_SIZE - 2,
        eos_token_id=VOCAB_SIZE - 1,
        pad_token_id=VOCAB_SIZE - 1,
    )
    return LlamaForCausalLM(cfg).eval().requires_grad_(False)


def _writer(path: Path, arch: str, cfg):
    """A GGUFWriter with the hyper-parameters every decoder shares (F32 file)."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}-test")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    return w


def _override(w, arch: str, overrides: dict | None) -> None:
    """Replace header fields: ``{"attention.head_count": 0, "rope.dimension_count": None}`` sets
    ``<arch>.attention.head_count`` to 0 (an unsigned 32-bit value, or a string/float for a str/float) and drops
    ``<arch>.rope.dimension_count``. For writing malformed files in tests."""
    import gguf

    for key, val in (overrides or {}).items():
        full = f"{arch}.{key}"
        w.kv_data[0].pop(full, None)
        if val is None:
            continue
        if isinstance(val, str):
            w.add_string(full, val)
        elif isinstance(val, float):
            w.add_float32(full, val)
        else:
            w.add_key_value(full, int(val), gguf.GGUFValueType.UINT32)


def _write_tensors(w, model, arch: str, transform, overrides: dict | None = None) -> None:
    """Add every weight under gguf's name for ``arch`` (tied lm_head skipped), ``transform(gguf name, array)``
    applied, header ``overrides`` applied (see ``_override``), then write and close the file."""
    _override(w, arch, overrides)
    name_map = tensor_name_map(arch, model.config.num_hidden_layers)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", True):
            continue
        gname = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise KeyError(name)
        w.add_tensor(gname, np.ascontiguousarray(transform(gname, t.detach().float().numpy())))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_llama_gguf(model, path: Path, overrides: dict | None = None) -> Path:
    """Write ``model`` (LlamaForCausalLM) to ``path`` as an F32 GGUF llama.cpp and transformers can load.
    ``overrides``: header fields to replace or (None) drop, keys without the ``llama.`` prefix (tests of
    malformed files)."""
    import gguf

    cfg = model.config
    vocab = byte_vocab()
    w = _writer(path, "llama", cfg)
    w.add_rope_freq_base(
        float(cfg.rope_parameters["rope_theta"]) if getattr(cfg, "rope_parameters", None) else cfg.rope_theta
    )
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(len(vocab))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab)
    w.add_token_types([gguf.TokenType.NORMAL] * (len(vocab) - len(SPECIALS)) + [gguf.TokenType.CONTROL] * 2)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(len(vocab) - 2)
    w.add_eos_token_id(len(vocab) - 1)
    w.add_pad_token_id(len(vocab) - 1)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)

    def permute_qk(gname, data):
        if ".attn_q." in gname:
            return permute_rows(data, cfg.num_attention_heads, cfg.num_attention_heads)
        if ".attn_k." in gname:
            return permute_rows(data, cfg.num_attention_heads, cfg.num_key_value_heads)
        return data

    _write_tensors(w, model, "llama", permute_qk, overrides)
    return path


def write_gemma3_gguf(model, path: Path, overrides: dict | None = None) -> Path:
    """Write a Gemma3ForCausalLM as an F32 GGUF the way llama.cpp's converter does: RMS-norm weights stored
    with the +1 added, no q/k permutation, gemma3.* hyper-parameters. No tokenizer (the engine takes ids).
    ``overrides``: as for ``write_llama_gguf`` (keys without the ``gemma3.`` prefix)."""
    cfg = model.config
    w = _writer(path, "gemma3", cfg)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    theta = (
        cfg.rope_parameters["full_attention"]["rope_theta"]
        if isinstance(getattr(cfg, "rope_parameters", None), dict) and "full_attention" in cfg.rope_parameters
        else cfg.rope_theta
    )
    w.add_rope_freq_base(float(theta))
    w.add_sliding_window(cfg.sliding_window)
    _write_tensors(
        w, model, "gemma3", lambda gname, data: data + 1.0 if gname.endswith("norm.weight") else data, overrides
    )
    return path


def tiny_gemma3_for_gguf(vocab_size: int = 300):
    """A tiny Gemma 3 with non-trivial norm weights (zeros at init would make every 1 + w equal 1)."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=12,
        max_position_embeddings=256,
        initializer_range=0.15,
    )
    model = Gemma3ForCausalLM(cfg).eval()
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.data = torch.randn(p.shape) * 0.3
    return model


def randomize_adapter(adapter, seed: int = 0, theta: float = 0.1, delta: float = 0.3):
    """Adapter parameters large enough that steering moves log-probs visibly (θ ~ N(0, theta²), δ ~ delta·S·N)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    for name in adapter.target_names:
        lay = adapter.layer(name)
        lay.theta.data = torch.randn(lay.theta.shape, generator=g) * theta
        lay.delta.data = torch.randn(lay.delta.shape, generator=g) * delta * lay.S
    return adapter
