"""Exact properties of the InnerPiSSA adapter on tiny random Llama and Gemma 3 models (docs/design.md §2)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_gemma3, tiny_llama
from torch import nn

from innerpissa import AdapterConfig, UnsupportedArchitectureError, attach, load_adapter
from innerpissa.adapter import cayley, find_targets, skew
from innerpissa.adapter.layer import InnerPiSSALayer


def _ids(vocab: int = 256, batch: int = 3, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _trained_like(adapter, seed: int = 0, scale: float = 0.3) -> None:
    """Give θ and δ sizeable random values, as after training."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)


@torch.no_grad()
def test_c0_is_bit_identical_to_base(tiny_model):
    ids = _ids()
    base = tiny_model(ids).logits
    adapter = attach(tiny_model, AdapterConfig(rank=8))
    _trained_like(adapter)
    with adapter.steer(0.0):
        same = tiny_model(ids).logits
    with adapter.steer(1.0):
        moved = tiny_model(ids).logits
    assert torch.equal(base, same)
    assert (moved - base).abs().max() > 1e-3
    after = tiny_model(ids).logits  # hooks removed on exit
    assert torch.equal(base, after)


def test_targets_found_by_structure(tiny_model):
    targets = find_targets(tiny_model, AdapterConfig(depth_range=(0.3, None)))
    names = list(targets)
    # 6 layers: round(0.3*6)=2 .. 6-3=3 → blocks 2 and 3, attention output + MLP down projection each
    assert names == [
        "model.layers.2.self_attn.o_proj",
        "model.layers.2.mlp.down_proj",
        "model.layers.3.self_attn.o_proj",
        "model.layers.3.mlp.down_proj",
    ]
    only_mlp = find_targets(tiny_model, AdapterConfig(modules=("mlp",), depth_range=(0.0, 1.0)))
    assert all(n.endswith("mlp.down_proj") for n in only_mlp) and len(only_mlp) == 6


def test_unsupported_architecture_is_a_clear_error():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with pytest.raises(UnsupportedArchitectureError, match="decoder blocks"):
        attach(model, AdapterConfig(rank=2))


def test_cayley_orthogonal_and_inverse():
    torch.manual_seed(0)
    a = skew(torch.randn(8, 8))
    assert torch.allclose(a, -a.T)
    for c in (0.3, 1.0, 2.5):
        r_pos = cayley(a, torch.tensor(c))
        r_neg = cayley(a, torch.tensor(-c))
        eye = torch.eye(8)
        assert torch.allclose(r_pos @ r_pos.T, eye, atol=1e-5)
        assert torch.allclose(r_neg, r_pos.T, atol=1e-5)  # R(−c) = R(c)ᵀ
        assert torch.allclose(r_neg @ r_pos, eye, atol=1e-5)  # −c undoes +c


def test_cayley_per_sample_at_large_rank():
    """Per-sample coefficients at r = 320 (Qwen3-4B's default rank): PyTorch 2.15's batched CPU solve raised here."""
    torch.manual_seed(0)
    a = skew(torch.randn(320, 320) * 0.01)
    coeff = torch.tensor([-1.0, 0.0, 1.0])
    rot = cayley(a, coeff)
    assert rot.shape == (3, 320, 320)
    for i, c in enumerate(coeff):
        assert torch.allclose(rot[i], cayley(a, c), atol=1e-6)
    assert torch.equal(rot[1], torch.eye(320))
    assert torch.allclose(rot[0] @ rot[2], torch.eye(320), atol=1e-5)


def _layer(scale="additive", rotate=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(10, 4, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(7, 4, generator=gen))
    s = torch.tensor([4.0, 3.0, 2.0, 1.0])
    lay = InnerPiSSALayer(u, s, v, scale=scale, rotate=rotate, init_std=0.3, generator=gen)
    return lay


@pytest.mark.parametrize("scale", ["additive", "multiplicative"])
def test_m0_is_zero(scale):
    lay = _layer(scale)
    assert torch.equal(lay.steer_matrix(0.0), torch.zeros(4, 4))


def test_additive_without_rotation_is_linear_in_c():
    lay = _layer(rotate=False)
    for c in (-2.0, 0.5, 3.0):
        assert torch.allclose(lay.steer_matrix(c), c * torch.diag(lay.delta.detach()), atol=1e-6)


def test_per_row_coefficients_match_scalar_runs():
    model = tiny_llama()
    adapter = attach(model, AdapterConfig(rank=8))
    _trained_like(adapter)
    ids = _ids(batch=4)
    coeffs = torch.tensor([1.0, -1.0, 0.0, 2.0])
    with torch.no_grad(), adapter.steer(coeffs):
        batched = model(ids).logits
    for i, c in enumerate(coeffs.tolist()):
        with torch.no_grad(), adapter.steer(c):
            single = model(ids[i : i + 1]).logits
        assert torch.allclose(batched[i], single[0], atol=1e-5)


@pytest.mark.parametrize("scale", ["additive", "multiplicative"])
def test_merged_weights_equal_delta_form(tiny_model, scale):
    adapter = attach(tiny_model, AdapterConfig(rank=8, scale=scale))
    _trained_like(adapter)
    ids = _ids()
    before = {n: p.clone() for n, p in tiny_model.named_parameters()}
    with torch.no_grad():
        with adapter.steer(0.7):
            hooked = tiny_model(ids).logits
        adapter.merge(0.7)
        merged = tiny_model(ids).logits
        with pytest.raises(RuntimeError, match="merged"):
            with adapter.steer(1.0):
                pass
        adapter.unmerge()
    assert torch.allclose(hooked, merged, atol=1e-4)
    for n, p in tiny_model.named_parameters():
        assert torch.allclose(p, before[n], atol=1e-6), n


def test_steer_removes_hooks_on_error():
    model = tiny_llama()
    adapter = attach(model, AdapterConfig(rank=8))
    _trained_like(adapter)
    ids = _ids()
    base = model(ids).logits
    with pytest.raises(ZeroDivisionError):
        with adapter.steer(1.0):
            _ = 1 / 0
    assert torch.equal(model(ids).logits, base)


def test_save_load_round_trip(tmp_path, tiny_model):
    adapter = attach(tiny_model, AdapterConfig(rank=8, seed=3), meta={"base_model": "tiny"})
    _trained_like(adapter)
    adapter.save(tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["adapter"]["rank"] == 8 and cfg["base_model"] == "tiny"
    loaded = load_adapter(tiny_model, tmp_path / "ad")
    ids = _ids()
    with torch.no_grad():
        with adapter.steer(1.3):
            a = tiny_model(ids).logits
        with loaded.steer(1.3):
            b = tiny_model(ids).logits
    assert torch.equal(a, b)
    # the stored bases are used, not recomputed
    name = adapter.target_names[0]
    assert torch.equal(loaded.layer(name).U, adapter.layer(name).U)


def test_wrong_base_model_is_refused(tmp_path):
    adapter = attach(tiny_llama(seed=0), AdapterConfig(rank=8))
    adapter.save(tmp_path / "ad")
    with pytest.raises(ValueError, match="different base model"):
        load_adapter(tiny_llama(seed=1), tmp_path / "ad")  # same shapes, other values
    with pytest.raises(ValueError, match="different base model"):
        load_adapter(tiny_gemma3(), tmp_path / "ad")  # other architecture


def test_missing_or_broken_adapter_files(tmp_path):
    model = tiny_llama()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(model, tmp_path)
    adapter = attach(model, AdapterConfig(rank=8))
    adapter.save(tmp_path / "ad")
    (tmp_path / "ad" / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json"):
        load_adapter(model, tmp_path / "ad")


def test_bad_config_values():
    with pytest.raises(ValueError, match="scale"):
        AdapterConfig(scale="exp")
    with pytest.raises(ValueError, match="modules"):
        AdapterConfig(modules=("q_proj",))
    with pytest.raises(ValueError, match="rank"):
        attach(tiny_llama(), AdapterConfig(rank=1000))


def test_rotating_u_is_the_transposed_steering_matrix_and_merges_exactly():
    from innerpissa.errors import ConfigError

    model = tiny_llama()
    ids = _ids()
    base = model(ids).logits
    v_side = attach(model, AdapterConfig(rank=8))
    _trained_like(v_side)
    u_side = attach(model, AdapterConfig(rank=8, rotate_side="u"))
    u_side.load_state_dict(v_side.state_dict())
    name = v_side.target_names[0]
    lay = u_side.layer(name)
    for c in (0.7, -1.3):
        torch.testing.assert_close(lay.steer_matrix(c), v_side.layer(name).steer_matrix(c).T)
        # W(c) = (U R(c)) diag(S + cδ) Vᵀ + (W − U diag(S) Vᵀ): the rotation turns the output side
        rot = cayley(skew(lay.theta.detach()), torch.tensor(c))
        want = lay.U @ rot @ torch.diag(lay.S + c * lay.delta.detach()) @ lay.V.T - lay.U @ torch.diag(lay.S) @ lay.V.T
        torch.testing.assert_close(lay.delta_weight(c), want, rtol=1e-4, atol=1e-5)
    with torch.no_grad(), u_side.steer(0.0):
        assert torch.equal(model(ids).logits, base)
    with pytest.raises(ConfigError, match="rotate_side"):
        AdapterConfig(rotate_side="w")
