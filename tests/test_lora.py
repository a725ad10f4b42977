"""LoRA with a signed coefficient and the same objective (adapter/lora.py): c = 0 exact, per-row coefficients,
the exact conversion to an InnerPiSSA-format adapter, removal, and training moving the separation both ways."""

from __future__ import annotations

import torch
from conftest import tiny_llama

from innerpissa import AdapterConfig, load_adapter
from innerpissa.adapter.lora import LoRASteering


@torch.no_grad()
def test_signed_lora_is_exact_at_zero_and_converts_exactly(tmp_path):
    model = tiny_llama(vocab_size=64)
    x = torch.randint(0, 64, (3, 7))
    base = model(x).logits
    lora = LoRASteering(model, AdapterConfig(rank=4))
    for name in lora.target_names:  # B starts at 0: give it values so the delta is visible
        lora._layers[name].lora_B["steer"].weight.normal_(0, 0.1)
    assert torch.equal(model(x).logits, base)  # outside steer: the base model, bit for bit
    with lora.steer(0.0):
        assert torch.equal(model(x).logits, base)
    outs = {}
    for c in (1.0, -1.0):
        with lora.steer(c):
            outs[c] = model(x).logits
    assert (outs[1.0] - base).abs().max() > 1e-3
    with lora.steer(torch.tensor([1.0, 0.0, -1.0])):
        rows = model(x).logits
    torch.testing.assert_close(rows[0], outs[1.0][0])
    torch.testing.assert_close(rows[2], outs[-1.0][2])
    assert torch.equal(rows[1], base[1])
    adapter = lora.to_adapter()
    for name in lora.target_names:  # ΔW(c) = c (α/r) B A exactly in the InnerPiSSA form
        torch.testing.assert_close(
            adapter.layer(name).delta_weight(-0.5), -0.5 * lora.delta_weight(name), atol=1e-6, rtol=1e-5
        )
    lora.remove()
    assert all(
        type(m).__name__ == "Linear" and not hasattr(m, "lora_A")
        for m in model.modules()
        if isinstance(m, torch.nn.Linear)
    )
    assert torch.equal(model(x).logits, base) and not hasattr(model, "peft_config")
    adapter.save(tmp_path / "ad")
    loaded = load_adapter(tiny_llama(vocab_size=64), tmp_path / "ad")
    with loaded.steer(1.0):
        torch.testing.assert_close(loaded.model(x).logits, outs[1.0], atol=1e-5, rtol=1e-5)


def test_lora_trained_with_the_same_objective_orders_the_separation(tmp_path):
    import json

    from test_objectives import _readings, _setup

    from innerpissa.train import TrainConfig, preference_direction, train

    model, tok, split = _setup()
    lora = LoRASteering(model, AdapterConfig(rank=8))
    cfg = TrainConfig(
        steps=30,
        batch_pairs=4,
        lr=2e-2,
        val_every=30,
        checkpoint_every=100,
        basis="pca",
        objective="reprpo-svd",
        schedule="cosine",
        constraint_warmup=0.0,
        weight_decay=0.0,
    )
    train(lora, tok, list(split.train), list(split.val), cfg, run_dir=tmp_path, progress=False)
    adapter = lora.to_adapter()
    lora.remove()
    ruler = preference_direction(adapter, tok, list(split.train), cfg)
    s, _ = _readings(adapter, tok, list(split.val), ruler, cfg)
    assert s[2] > s[1] + 0.05 and s[1] > s[0] + 0.05, s
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["family"] == "lora" and saved["loss"]["name"] == "reprpo-svd"
