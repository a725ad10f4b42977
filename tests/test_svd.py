"""Rust top-r SVD (innerpissa._rust via innerpissa.svd) against torch.linalg.svd."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from innerpissa import _rust
from innerpissa.svd import top_r_svd

# (d_out, d_in): square, tall, wide, and the SmolLM2 k/v shape (tall by 3x).
SHAPES = [(64, 64), (96, 40), (40, 96), (576, 192)]
PRECISIONS = ["float64", "float32"]


def _gaussian(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def _with_spectrum(d_out, d_in, seed):
    """W = Q1 diag(s) Q2^T with well separated, decaying singular values, so the
    singular vectors are well conditioned and comparable column by column."""
    g = torch.Generator().manual_seed(seed)
    k = min(d_out, d_in)
    q1, _ = torch.linalg.qr(torch.randn(d_out, k, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(d_in, k, generator=g, dtype=torch.float64))
    s = torch.linspace(10.0, 1.0, k, dtype=torch.float64)
    return (q1 * s) @ q2.T


def _ranks(shape):
    k = min(shape)
    return sorted({1, 8, k // 2, k})


def _fix_signs(u, v):
    """The convention under test: largest-|.| entry of each U column positive."""
    idx = u.abs().argmax(dim=0)
    sign = torch.sign(u[idx, torch.arange(u.shape[1])])
    sign[sign == 0] = 1
    return u * sign, v * sign


def _rank_r_error(w, u, s, v):
    w = w.double()
    return torch.linalg.matrix_norm(w - (u.double() * s.double()) @ v.double().T).item()


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_torch_linalg_svd(shape, precision):
    w = _gaussian(shape, seed=sum(shape))
    u_t, s_t, vh_t = torch.linalg.svd(w, full_matrices=False)  # float32 reference
    s_ref = torch.linalg.svdvals(w.double())  # float64 reference
    wnorm = torch.linalg.matrix_norm(w.double()).item()
    for r in _ranks(shape):
        ((u, s, v),) = top_r_svd([w], r, precision=precision)
        assert u.shape == (shape[0], r) and s.shape == (r,) and v.shape == (shape[1], r)
        assert u.dtype == s.dtype == v.dtype == torch.float32

        # Singular values: against torch float32 (~1e-4 relative) and float64.
        torch.testing.assert_close(s, s_t[:r], rtol=1e-4, atol=1e-5 * s_t[0].item())
        tight = 1e-6 if precision == "float64" else 1e-5
        assert ((s.double() - s_ref[:r]).abs() <= tight * s_ref[0]).all()
        assert (s[:-1] >= s[1:]).all() and (s >= 0).all()

        # Orthonormal columns.
        eye = torch.eye(r)
        torch.testing.assert_close(u.T @ u, eye, rtol=0, atol=1e-5)
        torch.testing.assert_close(v.T @ v, eye, rtol=0, atol=1e-5)

        # Rank-r reconstruction error: same as torch's truncation, and equal to
        # the Eckart–Young value sqrt(sum of discarded sigma^2).
        err = _rank_r_error(w, u, s, v)
        err_t = _rank_r_error(w, u_t[:, :r], s_t[:r], vh_t[:r].T)
        eckart_young = s_ref[r:].square().sum().sqrt().item()
        assert abs(err - err_t) <= 1e-5 * wnorm
        assert abs(err - eckart_young) <= 1e-5 * wnorm


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("shape", SHAPES)
def test_singular_vectors_match_torch_up_to_convention(shape, precision):
    w = _with_spectrum(*shape, seed=7 * shape[0] + shape[1]).float()
    r = min(shape) // 2
    ((u, s, v),) = top_r_svd([w], r, precision=precision)
    u_t, s_t, vh_t = torch.linalg.svd(w.double(), full_matrices=False)
    u_t, v_t = _fix_signs(u_t[:, :r], vh_t[:r].T)
    # faer's native-f32 vectors are ~10x less accurate than LAPACK's sgesdd
    # (max entry error ~1.5e-4 vs ~2e-5 here); the float64 default is ~1e-8.
    atol = 1e-6 if precision == "float64" else 5e-4
    torch.testing.assert_close(u.double(), u_t, rtol=0, atol=atol)
    torch.testing.assert_close(v.double(), v_t, rtol=0, atol=atol)
    torch.testing.assert_close(s.double(), s_t[:r], rtol=1e-5, atol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_sign_convention(shape):
    r = min(shape)
    ((u, _, _),) = top_r_svd([_gaussian(shape, seed=3)], r)
    largest = u[u.abs().argmax(dim=0), torch.arange(r)]
    assert (largest > 0).all()


def test_batch_equals_per_matrix():
    ws = [_gaussian(shape, seed=i) for i, shape in enumerate(SHAPES * 2)]
    r = 16
    arrays = [w.numpy() for w in ws]
    batch = _rust.top_r_svd_batch(arrays, r)
    wrapped = top_r_svd(ws, r)
    assert len(batch) == len(wrapped) == len(ws)
    for a, (u, s, v), (ub, sb, vb) in zip(arrays, wrapped, batch):
        one = _rust.top_r_svd(a, r)
        for x, y, z in zip(one, (ub, sb, vb), (u, s, v)):
            np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)
            np.testing.assert_array_equal(y, z.numpy())


def test_inputs_are_converted():
    w = _gaussian((48, 80), seed=11)
    ((u, s, _v),) = top_r_svd([w], 5)
    # Non-contiguous view, other dtypes: converted to contiguous float32 first.
    for other in (w.T.contiguous().T, w.double(), w.T):
        ((u2, s2, v2),) = top_r_svd([other], 5)
        if other.shape == w.shape:
            torch.testing.assert_close(s2, s, rtol=1e-6, atol=0)
            torch.testing.assert_close(u2, u, rtol=0, atol=1e-5)
        else:  # transpose swaps the roles of U and V (up to the sign convention)
            torch.testing.assert_close(s2, s, rtol=1e-6, atol=0)
            torch.testing.assert_close(v2.abs(), u.abs(), rtol=0, atol=1e-5)
    ((_, s_bf16, _),) = top_r_svd([w.bfloat16()], 5)
    assert s_bf16.dtype == torch.float32
    # numpy non-contiguous input straight into the extension.
    a = w.numpy()
    np.testing.assert_allclose(_rust.top_r_svd(a.T, 5)[1], _rust.top_r_svd(np.ascontiguousarray(a.T), 5)[1], rtol=1e-6)
    assert top_r_svd([], 3) == []


@pytest.mark.parametrize("r", [0, -1, 41, 1000])
def test_bad_rank_raises_value_error(r):
    with pytest.raises(ValueError, match="r must satisfy"):
        top_r_svd([_gaussian((40, 50), seed=0)], r)
    with pytest.raises(ValueError, match="r must satisfy"):
        _rust.top_r_svd(_gaussian((40, 50), seed=0).numpy(), r)


def test_bad_inputs_raise():
    good = _gaussian((10, 12), seed=0)
    with pytest.raises(ValueError, match=r"ws\[1\].*2-D"):
        top_r_svd([good, torch.zeros(3, 4, 5)], 2)
    with pytest.raises(ValueError, match=r"ws\[0\].*2-D"):
        top_r_svd([torch.zeros(7)], 1)
    with pytest.raises(ValueError, match=r"ws\[1\].*r must satisfy"):
        top_r_svd([good, good[:3]], 4)
    with pytest.raises(ValueError, match="NaN"):
        top_r_svd([good * float("nan")], 2)
    with pytest.raises(ValueError, match="precision"):
        top_r_svd([good], 2, precision="float16")
    with pytest.raises(TypeError):
        top_r_svd(good, 2)
    with pytest.raises(TypeError):
        top_r_svd([good], 2.5)
    assert top_r_svd([good], np.int64(2))[0][1].shape == (2,)
    with pytest.raises(TypeError, match="float32"):
        _rust.top_r_svd(good.double().numpy(), 2)
    with pytest.raises(ValueError, match="2-D"):
        _rust.top_r_svd(good.numpy()[0], 1)
