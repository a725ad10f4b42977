"""Preference directions (innerpissa.directions) and the per-pair gap gradients that the Fisher direction uses."""

import pytest
import torch

from innerpissa.directions import fisher_direction, mean_difference, pca_direction, sample_wise


def _diffs(n=200, seed=0):
    gen = torch.Generator().manual_seed(seed)
    axis = torch.tensor([3.0, 0.0, 0.0, 0.0])
    spread = torch.tensor([0.1, 2.0, 0.1, 0.1])  # the largest variance is along dimension 1, the mean along 0
    return axis + spread * torch.randn(n, 4, generator=gen)


def test_mean_difference_and_pca_pick_different_axes():
    d = _diffs()
    m, p = mean_difference(d), pca_direction(d)
    assert m[0] > 0.99 and abs(float(m.norm()) - 1) < 1e-6
    assert abs(p[1]) > 0.99  # variance of the differences, not their mean (repeng's pca_diff)
    assert float(d.mean(0) @ p) >= 0  # signed along the mean
    rows = sample_wise(d)
    torch.testing.assert_close(rows.norm(dim=1), torch.ones(len(d)))


def test_fisher_direction_whitens_the_mean_gradient():
    gen = torch.Generator().manual_seed(1)
    g = torch.tensor([1.0, 1.0, 0.0]) + torch.tensor([0.1, 3.0, 1.0]) * torch.randn(500, 3, generator=gen)
    u = fisher_direction(g, g, damping=1e-9)
    c = (g - g.mean(0)).double()
    want = torch.linalg.solve(c.T @ c / len(g), g.mean(0).double()).float()
    torch.testing.assert_close(u, want / want.norm(), rtol=1e-4, atol=1e-5)
    assert abs(u[0]) > abs(u[1])  # the noisy dimension is down-weighted
    big = fisher_direction(g, g, damping=1e9)  # heavy damping: the plain mean gradient
    torch.testing.assert_close(big, g.mean(0) / g.mean(0).norm(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="damping"):
        fisher_direction(g, g, damping=0.0)


def test_zero_differences_are_refused():
    with pytest.raises(ValueError, match="no direction"):
        mean_difference(torch.zeros(5, 3))


def test_gap_gradients_match_finite_differences():
    from test_objectives import _setup

    from innerpissa.adapter import decoder_blocks
    from innerpissa.train import forward_states, gap_gradients, tokenize_pairs

    model, tok, split = _setup()
    model = model.double()
    batch = tokenize_pairs(tok, list(split.train[:3]), 16)
    block = decoder_blocks(model)[3]
    basis = torch.linalg.qr(torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=torch.double))[0]
    grads = gap_gradients(model, batch, block, basis)
    assert grads.shape == (3, 2)

    def gap(z):
        def shift(_m, _a, out):
            add = (z @ basis.T).repeat(2, 1)[:, None, :]
            return (out[0] + add, *out[1:]) if isinstance(out, tuple) else out + add

        h = block.register_forward_hook(shift)
        try:
            _, lp, _ = forward_states(model, batch, block, 1)
        finally:
            h.remove()
        total = (lp.double() * batch.suffix_mask).sum(-1)
        return total[:3] - total[3:]

    eps = 2e-3  # log-probs are float32 (a smaller step drowns in rounding) and the tiny model is curved
    for j in range(2):
        z = torch.zeros(3, 2, dtype=torch.double)
        z[:, j] = eps
        fd = (gap(z) - gap(-z)) / (2 * eps)
        torch.testing.assert_close(grads[:, j].double(), fd, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("direction", ["pca", "fisher"])
def test_ruler_with_each_direction_is_a_signed_unit_vector(direction):
    from test_objectives import _setup

    from innerpissa import AdapterConfig, attach
    from innerpissa.train import TrainConfig, preference_direction

    model, tok, split = _setup()
    adapter = attach(model, AdapterConfig(rank=8))
    ruler = preference_direction(adapter, tok, list(split.train), TrainConfig(direction=direction))
    assert abs(float(ruler.u.norm()) - 1) < 1e-5 and ruler.sigma > 0
