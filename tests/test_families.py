"""Other adapter families with a signed coefficient (innerpissa.adapter.families) on tiny Llama and Gemma 3:
c = 0 is the base model exactly, per-row coefficients equal separate passes, −c undoes +c where the family says so,
and removing the adapter restores the base model."""

import pytest
import torch
from conftest import tiny_gemma3, tiny_llama

from innerpissa import AdapterConfig
from innerpissa.adapter.families import FAMILIES, PeftSteering
from innerpissa.adapter.lora import LoRASteering

MODELS = {"llama": tiny_llama, "gemma3": tiny_gemma3}


def _ids(rows=3, t=10):
    return torch.randint(0, 256, (rows, t), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _perturb(steering, seed=0, scale=0.2):
    gen = torch.Generator().manual_seed(seed)
    for p in steering.parameters():
        p.add_(scale * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_family_identity_rows_inverse_and_removal(family, arch):
    model = MODELS[arch]()
    ids = _ids()
    base = model(ids).logits
    st = PeftSteering(model, family, AdapterConfig(rank=4, depth_range=(0.3, None)))
    _perturb(st)
    assert torch.equal(model(ids).logits, base)  # outside steer: c = 0
    with st.steer(0.0):
        assert torch.equal(model(ids).logits, base)
    with st.steer(1.0):
        plus = model(ids).logits
    with st.steer(-1.0):
        minus = model(ids).logits
    assert (plus - base).abs().max() > 1e-4 and (minus - base).abs().max() > 1e-4
    with st.steer(torch.tensor([1.0, -1.0, 0.0])):  # one coefficient per row
        rows = model(ids).logits
    torch.testing.assert_close(rows[0], plus[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rows[1], minus[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rows[2], base[2], rtol=1e-4, atol=1e-5)
    err = st.inverse_error(1.0)
    if FAMILIES[family].exact_inverse:
        assert err < 1e-5
    else:
        assert 0.0 < err < float("inf")
    st.remove()
    assert torch.equal(model(ids).logits, base)
    assert not any(p.requires_grad for p in model.parameters())


def test_generic_lora_equals_the_lora_steering_class():
    ids = _ids()
    a, b = tiny_llama(), tiny_llama()
    cfg = AdapterConfig(rank=4)
    ref, gen = LoRASteering(a, cfg), PeftSteering(b, "lora", cfg)
    _perturb(ref, seed=3)
    state = ref.state_dict()
    gen.load_state_dict(
        {f"{n}.{part}.steer.weight": state[f"{n}.{part}"] for n in ref.target_names for part in ("lora_A", "lora_B")}
    )
    for c in (0.7, -1.3):
        with ref.steer(c), gen.steer(c):
            torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=1e-5, atol=1e-6)


def test_unknown_family_is_refused():
    from innerpissa.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown adapter family 'nope'"):
        PeftSteering(tiny_llama(), "nope")


@pytest.mark.parametrize("family", ["oft", "ia3"])
def test_family_trained_with_the_objective_orders_the_separation_and_reloads(tmp_path, family):
    from test_objectives import _readings, _setup

    from innerpissa.adapter.families import load_steering
    from innerpissa.train import TrainConfig, preference_direction, train

    model, tok, split = _setup()
    st = PeftSteering(model, family, AdapterConfig(rank=8))
    cfg = TrainConfig(steps=30, batch_pairs=4, lr=2e-2, val_every=30, checkpoint_every=100)
    train(st, tok, list(split.train), list(split.val), cfg, run_dir=tmp_path, progress=False)
    ruler = preference_direction(st, tok, list(split.train), cfg)
    s, _ = _readings(st, tok, list(split.val), ruler, cfg)
    assert s[2] > s[1] + 0.05 and s[1] > s[0] + 0.05, s
    ids = _ids(t=8) % len(tok)
    with st.steer(0.8):
        want = model(ids).logits
    st.remove()
    fresh = load_steering(model, tmp_path / "adapter")
    with fresh.steer(0.8):
        torch.testing.assert_close(model(ids).logits, want)
    assert fresh.meta["family"] == family and fresh.meta["loss"]["name"] == cfg.objective


def test_innerpissa_loader_names_the_family_loader(tmp_path):
    from innerpissa.adapter import load_adapter
    from innerpissa.errors import MissingFileError

    model = tiny_llama()
    st = PeftSteering(model, "road", AdapterConfig(rank=4))
    st.save(tmp_path / "a")
    st.remove()
    with pytest.raises(MissingFileError, match="load_steering"):
        load_adapter(model, tmp_path / "a")


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_sublayer_roles_are_found_by_structure(arch):
    from innerpissa.adapter.targets import find_targets

    model = MODELS[arch]()
    names = {
        role: [n.split(".")[-1] for n in find_targets(model, AdapterConfig(modules=(role,), depth_range=(0.5, 0.5)))]
        for role in ("q", "k", "v", "o", "gate", "up", "down", "attn", "mlp")
    }
    assert names == {
        "q": ["q_proj"],
        "k": ["k_proj"],
        "v": ["v_proj"],
        "o": ["o_proj"],
        "gate": ["gate_proj"],
        "up": ["up_proj"],
        "down": ["down_proj"],
        "attn": ["o_proj"],
        "mlp": ["down_proj"],
    }
    readers = find_targets(model, AdapterConfig(modules=("readers",), depth_range=(0.5, 0.5)))
    assert [n.split(".")[-1] for n in readers] == ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]
    both = find_targets(model, AdapterConfig(modules=("writers", "readers"), depth_range=(0.5, 0.5)))
    assert len(both) == 7


def test_family_on_reader_sublayers_is_exact_at_zero():
    model = tiny_llama()
    ids = _ids()
    base = model(ids).logits
    st = PeftSteering(model, "lora", AdapterConfig(rank=4, modules=("q", "up")))
    _perturb(st)
    with st.steer(0.0):
        assert torch.equal(model(ids).logits, base)
    with st.steer(1.0):
        assert (model(ids).logits - base).abs().max() > 1e-4


def test_bad_module_role_is_refused():
    from innerpissa.errors import ConfigError

    with pytest.raises(ConfigError, match="modules"):
        AdapterConfig(modules=("qq",))
