"""Low-precision models (bf16, fp16 weights): the adapter's exactness promises and training, on CPU; and the
big-model options that training refuses or passes through.

The adapter keeps U, S, V, θ, δ and M(c) in fp32 and casts the side path's output once to the activation dtype
(``adapter/layer.py``), so: c = 0 is bit-identical to the base model in every dtype; the steered logits stay
within the dtype's own rounding of the fp32 computation; merged weights (W + ΔW(c) rounded to the dtype) agree
with the side-path form to the same order; unmerge restores the weights bit-exactly; training runs with fp32
adapter parameters and gradients.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_gemma3, tiny_llama, word_tokenizer

from innerpissa import AdapterConfig, attach, load_adapter
from innerpissa.errors import ConfigError
from innerpissa.models import load_model
from innerpissa.pairs import make_honesty_pairs
from innerpissa.train import TrainConfig, train

BUILDERS = {"llama": tiny_llama, "gemma3": tiny_gemma3}
LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _steered(adapter, ids, coeff):
    with torch.no_grad(), adapter.steer(coeff):
        return adapter.model(input_ids=ids).logits.float()


def _model_and_adapter(arch: str, dtype: torch.dtype):
    model = BUILDERS[arch]().to(dtype)
    adapter = attach(model, AdapterConfig(rank=4))
    with torch.no_grad():
        for n in adapter.target_names:  # a trained-looking adapter: rotation and offset both non-zero
            adapter.layer(n).theta.normal_(0, 0.3)
            adapter.layer(n).delta.normal_(0, 0.3)
    return model, adapter


@pytest.mark.parametrize("arch", sorted(BUILDERS))
@pytest.mark.parametrize("dtype", sorted(LOW))
def test_c0_is_bit_identical_in_low_precision(arch, dtype):
    model, adapter = _model_and_adapter(arch, LOW[dtype])
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(input_ids=ids).logits
    assert base.dtype == LOW[dtype]
    for n in adapter.target_names:  # the adapter's own tensors stay fp32 on a low-precision model
        assert all(t.dtype == torch.float32 for t in adapter.layer(n).state_dict().values())
    with torch.no_grad(), adapter.steer(0.0):
        same = model(input_ids=ids).logits
    assert torch.equal(same, base)
    # per-row coefficients: the c = 0 row of a mixed batch is the base row, bit for bit; the other row moves
    with torch.no_grad(), adapter.steer(torch.tensor([0.0, 1.0])):
        mixed = model(input_ids=ids).logits
    assert torch.equal(mixed[0], base[0])
    assert not torch.equal(mixed[1], base[1])


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_bf16_steering_and_merge_stay_within_bf16_rounding_of_fp32(arch):
    model, adapter = _model_and_adapter(arch, torch.bfloat16)
    # the fp32 reference: the same (bf16-valued) weights upcast exactly, the same adapter tensors
    ref_model = copy.deepcopy(model).float()
    ref = attach(ref_model, AdapterConfig(rank=4))
    ref.load_state_dict(adapter.state_dict())
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    base_err = (_steered(adapter, ids, 0.0) - _steered(ref, ids, 0.0)).abs().max()
    assert base_err > 0  # bf16 does round: the bounds below are not vacuous
    for c in (1.0, -1.0):
        want = _steered(ref, ids, c)
        assert (want - _steered(ref, ids, 0.0)).abs().max() > 10 * base_err  # steering moves far more than rounding
        hook = _steered(adapter, ids, c)
        before = {n: m.weight.clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        adapter.merge(c)
        with torch.no_grad():
            merged = model(input_ids=ids).logits.float()
        adapter.unmerge()
        # stated tolerance: 4× the bf16 model's own rounding of the unsteered logits
        assert (hook - want).abs().max() <= 4 * base_err
        assert (merged - want).abs().max() <= 4 * base_err
        for n, m in model.named_modules():  # unmerge restores every weight bit-exactly
            if isinstance(m, torch.nn.Linear):
                assert torch.equal(m.weight, before[n])


def _pairs():
    probe = word_tokenizer([])
    split = make_honesty_pairs(probe, n_pairs=24, seed=0, val_fraction=0.25)
    tok = word_tokenizer([t for p in split.train + split.val for t in (p.positive, p.negative, p.neutral)])
    return tok, make_honesty_pairs(tok, n_pairs=24, seed=0, val_fraction=0.25)


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_training_a_bf16_model_moves_the_fp32_adapter_and_round_trips(arch, tmp_path):
    tok, split = _pairs()
    model = BUILDERS[arch](vocab_size=len(tok)).to(torch.bfloat16)
    adapter = attach(model, AdapterConfig(rank=4))
    start = {k: v.clone() for k, v in adapter.state_dict().items()}
    cfg = TrainConfig(steps=4, batch_pairs=4, val_every=4, val_pairs=4, lr=1e-2)
    metrics = train(adapter, tok, list(split.train), list(split.val), cfg, run_dir=tmp_path / "run", progress=False)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values() if isinstance(v, float))
    state = adapter.state_dict()
    assert all(state[k].dtype == torch.float32 for k in state)
    assert any(not torch.equal(state[k], start[k]) for k in state if k.endswith(("theta", "delta")))
    ids = torch.randint(0, len(tok), (2, 10), generator=torch.Generator().manual_seed(3))
    loaded = load_adapter(model, tmp_path / "run" / "adapter")
    assert torch.equal(_steered(loaded, ids, 1.0), _steered(adapter, ids, 1.0))


def test_training_refuses_gradient_checkpointing(tmp_path):
    tok, split = _pairs()
    model = tiny_llama(vocab_size=len(tok))
    model.gradient_checkpointing_enable()
    adapter = attach(model, AdapterConfig(rank=4))
    with pytest.raises(ConfigError, match="gradient checkpointing"):
        train(adapter, tok, list(split.train), list(split.val), TrainConfig(steps=1, batch_pairs=4), progress=False)


def test_load_model_passes_big_model_options_through_and_refuses_them_for_gguf(tmp_path, monkeypatch):
    import transformers

    tok, _ = _pairs()
    tiny_llama(vocab_size=len(tok)).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    seen = {}
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.update(copy.deepcopy(kwargs))  # from_pretrained converts max_memory in place
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    lm = load_model(str(tmp_path / "m"), dtype=torch.bfloat16, device_map="auto", max_memory={"cpu": "2GiB"})
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    assert seen["device_map"] == "auto" and seen["max_memory"] == {"cpu": "2GiB"}  # accelerate's loader got them
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ConfigError, match="device_map"):
        load_model(str(gguf), device_map="auto")
