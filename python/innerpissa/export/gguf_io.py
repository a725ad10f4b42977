"""GGUF files for llama.cpp: merged steered models, LoRA adapters and control vectors (docs/design.md §7).

Written with the ``gguf`` package (llama.cpp's own Python writer). Conventions used, from llama.cpp:

- Tensor names come from ``gguf.get_tensor_name_map`` (e.g. ``model.layers.3.self_attn.o_proj`` →
  ``blk.3.attn_output.weight``). numpy shape (rows, cols) is ggml's (ne1, ne0), so a (d_out, d_in) weight is
  stored as numpy (d_out, d_in).
- For ``general.architecture = llama`` llama.cpp's converter permutes the rows of the q and k projections (rotary
  pairs interleaved); transformers undoes this on load. Rows written into those tensors (merged weights,
  ``lora_b``) get the same permutation here.
- LoRA adapter: ``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha`` (float32); tensors
  ``<base>.lora_a`` (r, d_in) and ``<base>.lora_b`` (d_out, r). llama.cpp adds scale·(alpha/r)·B·A·x, so with
  alpha = r a run-time ``--lora-scaled FILE s`` multiplies B·A by exactly s.
- Control vector: ``general.architecture = controlvector``, tensors ``direction.N`` (n_embd,) for N ≥ 1, added to
  the output of decoder block N (0-based), as repeng's ``export_gguf`` writes and llama.cpp's
  ``--control-vector`` reads. Block 0 cannot carry one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InnerPiSSAError
from ..outputs import atomic_write

ROW_PERMUTED_ARCHS = {"llama"}


class GGUFExportError(InnerPiSSAError, ValueError):
    """A GGUF file or field that the export cannot use (the file and field are named)."""


def _gguf():
    import gguf

    return gguf


def read_field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def architecture(reader, path: Path | str = "") -> str:
    arch = read_field(reader, "general.architecture")
    if arch is None:
        raise GGUFExportError(f"{path}: no general.architecture field")
    return arch


def tensor_name_map(arch: str, n_blocks: int):
    """gguf's HF → GGUF tensor name map for architecture ``arch`` (e.g. ``llama``, ``gemma3``)."""
    gguf = _gguf()
    by_name = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in by_name:
        raise GGUFExportError(f"GGUF architecture {arch!r} is unknown to the installed gguf package")
    return gguf.get_tensor_name_map(by_name[arch], n_blocks)


def gguf_tensor_name(name_map, module_name: str) -> str:
    """GGUF weight name for an HF linear module name, e.g. ``blk.3.attn_output.weight``.

    Raises:
        GGUFExportError: gguf has no mapping for the module.
    """
    mapped = name_map.get_name(module_name)
    if mapped is None:
        raise GGUFExportError(f"no GGUF tensor name for module {module_name!r}")
    return f"{mapped}.weight"


def permute_rows(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp's q/k row permutation (convert_hf_to_gguf ``LlamaModel.permute``): HF row order → GGUF.

    w: (n_head·head_dim, …). transformers' ``_reverse_permute_weights`` is its inverse.
    """
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _row_permutation(arch: str, gguf_name: str, model_config) -> tuple[int, int] | None:
    if arch not in ROW_PERMUTED_ARCHS:
        return None
    cfg = getattr(model_config, "text_config", model_config)
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    if ".attn_q." in gguf_name:
        return (n_head, n_head)
    if ".attn_k." in gguf_name:
        return (n_head, n_kv)
    return None


def to_gguf_rows(rows: np.ndarray, arch: str, gguf_name: str, model_config) -> np.ndarray:
    """Apply llama.cpp's q/k row permutation to a (d_out, …) array when ``gguf_name`` needs it."""
    perm = _row_permutation(arch, gguf_name, model_config)
    return rows if perm is None else permute_rows(rows, *perm)


def _atomic_gguf(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)
    return path


def _copy_fields(reader, writer, skip: set[str]) -> None:
    gguf = _gguf()
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF.") or field.name in skip:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)


def _write(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def quantize_as(w: np.ndarray, qtype) -> tuple[np.ndarray, object]:
    """Quantize a float32 (rows, cols) array to ``qtype`` if gguf can; else return it as F32.

    Returns (data, type written). gguf quantizes F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (not the K-quants).
    """
    gguf = _gguf()
    T = gguf.GGMLQuantizationType
    if qtype == T.F32:
        return w.astype(np.float32), T.F32
    if qtype == T.F16:
        return w.astype(np.float16), T.F16
    try:
        return gguf.quants.quantize(w.astype(np.float32), qtype), qtype
    except (NotImplementedError, gguf.quants.QuantError, ValueError):
        return w.astype(np.float32), T.F32


def write_merged_gguf(
    base_gguf: str | Path,
    out: str | Path,
    deltas: dict[str, np.ndarray],
    model_config,
    tensor_type: str = "same",
    metadata: dict[str, object] | None = None,
) -> dict[str, str]:
    """Copy ``base_gguf`` to ``out`` with W ← dequant(W) + ΔW for each module in ``deltas``.

    Args:
        base_gguf: the GGUF the steered PyTorch model was loaded from (same de-quantized weights).
        deltas: {HF module name: ΔW (d_out, d_in) float32, HF row order}.
        model_config: the HF config (head counts for the llama q/k row permutation).
        tensor_type: ``same`` (re-quantize each edited tensor to its input type where gguf can, else F32),
            or ``f32`` / ``f16`` / ``q8_0`` / any ``gguf.GGMLQuantizationType`` name.
        metadata: extra string/float keys (written under ``innerpissa.*``).
    Returns:
        {GGUF tensor name: type written} for the edited tensors.
    Raises:
        GGUFExportError: an unknown architecture, a module without a GGUF tensor, or a shape mismatch.
    """
    gguf = _gguf()
    base_gguf = Path(base_gguf)
    reader = gguf.GGUFReader(str(base_gguf))
    arch = architecture(reader, base_gguf)
    n_blocks = int(read_field(reader, f"{arch}.block_count", 0))
    name_map = tensor_name_map(arch, n_blocks)
    by_gguf = {gguf_tensor_name(name_map, m): (m, d) for m, d in deltas.items()}
    present = {t.name for t in reader.tensors}
    missing = sorted(set(by_gguf) - present)
    if missing:
        raise GGUFExportError(f"{base_gguf}: no tensor {missing[0]} (for {by_gguf[missing[0]][0]})")
    written: dict[str, str] = {}
    T = gguf.GGMLQuantizationType

    def write(tmp):
        writer = gguf.GGUFWriter(tmp, arch)
        _copy_fields(reader, writer, skip=set())
        for k, v in (metadata or {}).items():
            _add_meta(writer, f"innerpissa.{k}", v)
        for t in reader.tensors:
            if t.name not in by_gguf:
                writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
                continue
            module, delta = by_gguf[t.name]
            w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            d = to_gguf_rows(np.asarray(delta, dtype=np.float32), arch, t.name, model_config)
            if w.shape != d.shape:
                raise GGUFExportError(f"{base_gguf}: {t.name} has shape {w.shape}, ΔW of {module} {d.shape}")
            want = t.tensor_type if tensor_type == "same" else T[tensor_type.upper()]
            data, got = quantize_as(w + d, want)
            writer.add_tensor(t.name, data, raw_dtype=got)
            written[t.name] = got.name
        _write(writer)

    _atomic_gguf(Path(out), write)
    return written


def _add_meta(writer, key: str, value) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_int64(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    else:
        writer.add_string(key, str(value))


def dequantize_gguf(src: str | Path, out: str | Path) -> Path:
    """Copy a GGUF with every quantized tensor de-quantized to F32 (the weights transformers computes with).

    llama.cpp multiplies quantized weights with quantized activations (e.g. Q4_1 × Q8_1), which alone moves
    SmolLM2's next-token log-probs by ~0.2 nats; on the F32 copy llama.cpp and PyTorch compute the same thing,
    so exports can be checked exactly.
    """
    gguf = _gguf()
    reader = gguf.GGUFReader(str(src))
    arch = architecture(reader, src)
    T = gguf.GGMLQuantizationType

    def write(tmp):
        writer = gguf.GGUFWriter(tmp, arch)
        _copy_fields(reader, writer, skip={"general.file_type"})
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)
        for t in reader.tensors:
            if t.tensor_type in (T.F32, T.F16, T.BF16):
                writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
            else:
                writer.add_tensor(t.name, gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32))
        _write(writer)

    return _atomic_gguf(Path(out), write)


def write_lora_gguf(
    out: str | Path,
    arch: str,
    n_blocks: int,
    factors: dict[str, tuple[np.ndarray, np.ndarray]],
    model_config,
    metadata: dict[str, object] | None = None,
) -> Path:
    """Write a llama.cpp LoRA adapter GGUF with alpha = r, so ``--lora-scaled FILE s`` applies s·B·A exactly.

    Args:
        arch: the base model's ``general.architecture`` (llama.cpp refuses a mismatch).
        factors: {HF module name: (A (r, d_in), B (d_out, r))} float32, HF row order; ΔW = B·A.
        metadata: extra keys written under ``innerpissa.*``.
    Raises:
        GGUFExportError: ranks differ across modules (llama.cpp's alpha/r is per file) or a name has no mapping.
    """
    gguf = _gguf()
    name_map = tensor_name_map(arch, n_blocks)
    ranks = {a.shape[0] for a, _ in factors.values()}
    if len(ranks) != 1:
        raise GGUFExportError(f"LoRA factors have different ranks {sorted(ranks)}; one file needs one rank")
    rank = ranks.pop()

    def write(tmp):
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_string("general.type", "adapter")
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", float(rank))
        for k, v in (metadata or {}).items():
            _add_meta(writer, f"innerpissa.{k}", v)
        for module, (a, b) in factors.items():
            base = gguf_tensor_name(name_map, module)
            writer.add_tensor(f"{base}.lora_a", np.ascontiguousarray(a, dtype=np.float32))
            b = to_gguf_rows(np.asarray(b, dtype=np.float32), arch, base, model_config)
            writer.add_tensor(f"{base}.lora_b", np.ascontiguousarray(b))
        _write(writer)

    return _atomic_gguf(Path(out), write)


def write_control_vector_gguf(out: str | Path, directions: dict[int, np.ndarray], model_hint: str) -> Path:
    """Write a control vector in repeng's / llama.cpp's GGUF layout.

    Args:
        directions: {block index ℓ (0-based, ≥ 1): vector (n_embd,)}; ``--control-vector-scaled FILE c`` then adds
            c·v_ℓ to block ℓ's output, as ``VectorMethod`` does.
        model_hint: the base model's architecture (informational, ``controlvector.model_hint``).
    Raises:
        GGUFExportError: a direction for block 0, or vectors of different sizes.
    """
    gguf = _gguf()
    if 0 in directions:
        raise GGUFExportError("llama.cpp control vectors cannot steer block 0 (direction.0 is not read)")
    sizes = {np.asarray(v).shape for v in directions.values()}
    if len(sizes) != 1 or len(next(iter(sizes))) != 1:
        raise GGUFExportError(f"control vector directions must all be (n_embd,), got {sorted(sizes)}")

    def write(tmp):
        writer = gguf.GGUFWriter(tmp, "controlvector")
        writer.add_string("controlvector.model_hint", model_hint)
        writer.add_uint32("controlvector.layer_count", len(directions))
        for layer in sorted(directions):
            writer.add_tensor(f"direction.{layer}", np.asarray(directions[layer], dtype=np.float32))
        _write(writer)

    return _atomic_gguf(Path(out), write)
