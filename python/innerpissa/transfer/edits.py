"""One-time edits of a student model for the transfer: a steering vector folded into a bias, and directional ablation
(Arditi et al. 2024) as forward hooks (``project_out``) or folded into the weights (``fold_projection``), with
``fold_check`` comparing the folded model to the hooked one."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..adapter.targets import UnsupportedArchitectureError, decoder_blocks, hidden_size, residual_writers
from ..eval.methods import VectorMethod
from ..hooks import forward_hooks, shift_output
from ..prompts import left_pad

if TYPE_CHECKING:
    from .align import AlignResult

from .contrasts import TOUR_GUIDE, ContrastTemplate, ManifestRow, continuation_pairs


def fold_addition(model: nn.Module, layer: int, vector: torch.Tensor) -> None:
    """Fold "add ``vector`` to block ``layer``'s output" into the weights, in place: a bias on its MLP down projection.

    Llama-family only (the MLP writes straight into the residual stream and ``config.mlp_bias`` exists): all MLP
    projections get biases (zeros except this one) and ``config.mlp_bias = True``, so ``save_pretrained`` writes
    a standard checkpoint. Equals ``VectorMethod({layer: vector}).steer(1.0)``.
    Raises:
        UnsupportedArchitectureError: no ``mlp_bias`` in the config (e.g. Gemma 3, whose MLP output is normed).
    """
    cfg = model.config
    if not hasattr(cfg, "mlp_bias"):
        raise UnsupportedArchitectureError(
            f"{type(model).__name__}: folding an addition needs an MLP that writes the residual directly and a "
            "config with mlp_bias (Llama family); use hook-based steering for this model"
        )
    blocks = decoder_blocks(model)
    d = hidden_size(model)
    for block in blocks:
        mlp_name = residual_writers(block, d)["mlp"][0].split(".")[0]
        for lin in getattr(block, mlp_name).modules():
            if isinstance(lin, nn.Linear) and lin.bias is None:
                lin.bias = nn.Parameter(
                    torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device), requires_grad=False
                )
    cfg.mlp_bias = True
    _, down = residual_writers(blocks[layer], d)["mlp"]
    with torch.no_grad():
        down.bias += vector.to(down.bias.dtype)


@contextlib.contextmanager
def project_out(model: nn.Module, directions: list[torch.Tensor]):
    """Hook form of directional ablation: remove span(directions) from every residual write (embeddings, attention
    outputs, MLP outputs), so the residual stream never carries it. Source: Arditi et al. 2024, "Refusal in
    language models is mediated by a single direction" (weight orthogonalisation)."""
    q = _orthonormal(directions)  # (d, m)
    remove = shift_output(lambda h: -((h.float() @ q) @ q.T))  # h − Q Qᵀ h
    d = hidden_size(model)
    writers = [lin for block in decoder_blocks(model) for _, lin in residual_writers(block, d).values()]
    with forward_hooks((m, remove) for m in [model.get_input_embeddings(), *writers]):
        yield


def _orthonormal(directions: list[torch.Tensor]) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.stack([v.float() for v in directions], 1))
    return q  # (d, m)


@torch.no_grad()
def fold_projection(model: nn.Module, directions: list[torch.Tensor]) -> None:
    """Weight form of ``project_out``, in place: W ← (I − QQᵀ)W for every residual writer (and its bias), rows of
    the input embedding ← rows (I − QQᵀ). A tied output head is untied first so the logits read the original
    embedding, as in the hook form."""
    q = _orthonormal(directions)
    proj = torch.eye(q.shape[0]) - q @ q.T
    emb = model.get_input_embeddings()
    out_emb = model.get_output_embeddings()
    if out_emb is not None and out_emb.weight is emb.weight:
        out_emb.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
        if hasattr(model.config, "get_text_config"):
            model.config.get_text_config().tie_word_embeddings = False
    emb.weight.copy_(emb.weight @ proj.to(emb.weight.dtype))
    d = hidden_size(model)
    for block in decoder_blocks(model):
        for _, lin in residual_writers(block, d).values():
            lin.weight.copy_(proj.to(lin.weight.dtype) @ lin.weight)
            if lin.bias is not None:
                lin.bias.copy_(proj.to(lin.bias.dtype) @ lin.bias)


@torch.no_grad()
def fold_check(
    result: AlignResult,
    student,
    contrast: str,
    coeff: float,
    out_dir,
    rows: list[ManifestRow],
    template: ContrastTemplate = TOUR_GUIDE,
    overwrite: bool = False,
) -> dict:
    """Fold coeff·(mapped teacher direction, scaled to the own norm) into a copy of the student, save it as a
    transformers checkpoint in ``out_dir``, and compare its logits with hook-based steering on held-out prompts.

    Returns {"contrast", "coeff", "max_abs_logit_diff_folded", "max_abs_logit_diff_reloaded", "path"}.
    """
    import copy
    import json
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from ..outputs import atomic_dir

    own = result.student_dirs[contrast]
    vec = result.mapped_dirs[contrast] / result.mapped_dirs[contrast].norm() * own.norm() * coeff
    held = [r for r in rows if r.split == "heldout"]
    texts = [p + c for p, c, _ in continuation_pairs(student.tokenizer, held, contrast, template)][:8]
    seqs = [student.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    ids, mask, pos = left_pad(seqs, student.tokenizer.pad_token_id)

    def logits(m):
        return m(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits.float()[mask.bool()]

    with VectorMethod(student.model, {result.student_layer: vec}).steer(1.0):
        want = logits(student.model)
    folded = copy.deepcopy(student.model)
    fold_addition(folded, result.student_layer, vec)
    diff_folded = float((logits(folded) - want).abs().max())

    def fill(tmp: Path):
        folded.save_pretrained(tmp)
        student.tokenizer.save_pretrained(tmp)
        (tmp / "innerpissa_export.json").write_text(
            json.dumps(
                {
                    "kind": "folded-transfer",
                    "contrast": contrast,
                    "coefficient": coeff,
                    "block": result.student_layer,
                    "vector_norm": float(vec.norm()),
                    "note": "mapped teacher direction added at this block as an MLP bias",
                },
                indent=2,
            )
        )

    path = atomic_dir(Path(out_dir), fill, overwrite)
    reloaded = AutoModelForCausalLM.from_pretrained(path).eval()
    diff_reloaded = float((logits(reloaded) - want).abs().max())
    return {
        "contrast": contrast,
        "coeff": coeff,
        "max_abs_logit_diff_folded": diff_folded,
        "max_abs_logit_diff_reloaded": diff_reloaded,
        "logit_scale": float(want.abs().max()),
        "path": str(path),
    }
