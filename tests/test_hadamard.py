"""Hadamard rotations: exact constructions, the fast transform against the dense matrix, errors."""

from __future__ import annotations

import math

import pytest
import torch

from bitsmith.errors import BitsmithError
from bitsmith.transforms import hadamard as had
from bitsmith.transforms.hadamard import (
    hadamard_matrix,
    hadamard_supported,
    hadamard_transform,
    random_hadamard_matrix,
    random_orthogonal_matrix,
    random_sign_vector,
)

CORES = [1, 12, 20, 28, 36, 40, 52, 60]
DIMS = sorted({m * 2**k for m in CORES for k in (0, 1, 3)} | {64, 256, 344, 576, 1536})
UNSUPPORTED = [3, 6, 7, 14, 92, 116, 172, 232]


def test_decomposition_of_target_dims():
    assert had._decompose(576) == (16, 36)
    assert had._decompose(1536) == (128, 12)
    assert had._decompose(64) == (64, 1)
    assert had._decompose(40) == (2, 20)  # Sylvester doubling of Paley I (q = 19)
    assert had._decompose(28) == (1, 28)  # Paley I over GF(27)
    assert had._decompose(52) == (1, 52)  # Paley II over GF(25)
    assert had._decompose(11008) == (32, 344)  # Paley I over GF(343): LLaMA-2-7B's MLP width


@pytest.mark.parametrize("q", [3, 5, 7, 9, 11, 13, 25, 27, 49, 81, 121, 125])
def test_jacobsthal_over_prime_power_fields(q):
    """Q Q^T = q I - J and Q J = 0 characterise a correct quadratic character, GF(p^r) included."""
    Q = had._jacobsthal(q)
    assert set(Q.diagonal().tolist()) == {0}
    assert torch.equal(Q @ Q.T, q * torch.eye(q, dtype=torch.int64) - 1)
    assert torch.equal(Q.sum(1), torch.zeros(q, dtype=torch.int64))
    assert torch.equal(Q.T, Q if q % 4 == 1 else -Q)


@pytest.mark.parametrize("n", DIMS)
def test_orthonormal_with_equal_magnitude_entries(n):
    H32 = hadamard_matrix(n)
    assert H32.dtype == torch.float32 and H32.shape == (n, n)
    assert torch.allclose(H32 @ H32.T, torch.eye(n), atol=1e-5, rtol=0)
    H64 = hadamard_matrix(n, torch.float64)
    assert torch.allclose(H64 @ H64.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.equal(H64.abs(), torch.full((n, n), 1 / math.sqrt(n), dtype=torch.float64))


@pytest.mark.parametrize("n", DIMS)
def test_fast_transform_matches_dense(n):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(3, 5, n, generator=gen, dtype=torch.float64)
    H = hadamard_matrix(n, torch.float64)
    y = hadamard_transform(x)
    assert y.shape == x.shape and y.dtype == torch.float64
    assert torch.allclose(y, x @ H.T, atol=1e-10, rtol=0)
    assert torch.allclose(hadamard_transform(x, scale=False), x @ H.T * math.sqrt(n), atol=1e-8, rtol=0)
    x32 = x.float()
    assert torch.allclose(hadamard_transform(x32), x32 @ hadamard_matrix(n).T, atol=1e-4, rtol=0)


@pytest.mark.parametrize("block", [1, 4096])
def test_all_butterfly_or_all_dense_paths(monkeypatch, block):
    """The split between the dense first step and the butterfly must not change the result."""
    monkeypatch.setattr(had, "_BLOCK", block)
    had._first_step.cache_clear()
    try:
        for n in (64, 576, 1536):
            x = torch.randn(6, n, dtype=torch.float64)
            assert torch.allclose(hadamard_transform(x), x @ hadamard_matrix(n, torch.float64).T, atol=1e-10, rtol=0)
    finally:
        had._first_step.cache_clear()


@pytest.mark.parametrize("n", [12, 576, 1536])
def test_transpose_inverts_the_transform(n):
    x = torch.randn(4, 2, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = hadamard_transform(x)
    assert not torch.allclose(y, x, atol=1e-3)
    assert torch.allclose(y @ hadamard_matrix(n, torch.float64), x, atol=1e-10, rtol=0)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-10, rtol=0)


def test_symmetry_and_transpose_convention():
    """Paley I cores are not symmetric, so the x @ H.T convention is observable and must hold."""
    for n in (12, 20, 60, 1536):
        H = hadamard_matrix(n, torch.float64)
        assert not torch.equal(H, H.T)
        x = torch.randn(2, n, dtype=torch.float64)
        assert not torch.allclose(hadamard_transform(x), x @ H, atol=1e-3)
    for n in (64, 36, 576):  # Sylvester and Paley II are symmetric: the transform is an involution
        H = hadamard_matrix(n, torch.float64)
        assert torch.equal(H, H.T)
        x = torch.randn(2, n, dtype=torch.float64)
        assert torch.allclose(hadamard_transform(hadamard_transform(x)), x, atol=1e-10, rtol=0)


def test_transform_handles_non_contiguous_and_1d_inputs():
    x = torch.randn(576, 8).T  # non-contiguous (8, 576)
    assert torch.allclose(hadamard_transform(x), x @ hadamard_matrix(576).T, atol=1e-4, rtol=0)
    v = torch.randn(20)
    assert torch.allclose(hadamard_transform(v), hadamard_matrix(20) @ v, atol=1e-5, rtol=0)
    assert hadamard_transform(torch.zeros(0, 3, 576)).shape == (0, 3, 576)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [64, 576, 1536])
def test_half_precision_inputs(dtype, n):
    x = torch.randn(16, n, generator=torch.Generator().manual_seed(2)).to(dtype)
    y = hadamard_transform(x)
    assert y.dtype == dtype and y.shape == x.shape
    ref = hadamard_transform(x.float())
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    assert torch.allclose(y.float(), ref, atol=tol * ref.abs().max().item(), rtol=0)


def test_random_signs_and_random_hadamard():
    s = random_sign_vector(576, seed=0)
    assert set(s.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(s, random_sign_vector(576, seed=0))
    assert not torch.equal(s, random_sign_vector(576, seed=1))
    R = random_hadamard_matrix(576, seed=0, dtype=torch.float64)
    assert torch.allclose(R @ R.T, torch.eye(576, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.allclose(R.T @ R, torch.eye(576, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.equal(R, hadamard_matrix(576, torch.float64) * s.double())
    assert torch.equal(R, random_hadamard_matrix(576, seed=0, dtype=torch.float64))
    assert not torch.equal(R, random_hadamard_matrix(576, seed=1, dtype=torch.float64))
    assert random_hadamard_matrix(64, seed=3).dtype == torch.float32


@pytest.mark.parametrize("n", [7, 92, 100])
def test_random_orthogonal_fallback(n):
    Q = random_orthogonal_matrix(n, seed=0, dtype=torch.float64)
    assert torch.allclose(Q @ Q.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.equal(Q, random_orthogonal_matrix(n, seed=0, dtype=torch.float64))
    assert not torch.allclose(Q, random_orthogonal_matrix(n, seed=1, dtype=torch.float64), atol=1e-3)
    assert random_orthogonal_matrix(n, seed=0).dtype == torch.float32


def test_supported_predicate():
    assert all(hadamard_supported(n) for n in DIMS)
    assert hadamard_supported(44) and hadamard_supported(100 * 4)
    assert not any(hadamard_supported(n) for n in UNSUPPORTED)
    assert not any(hadamard_supported(n) for n in (0, -4, 4.0, "64", True))


@pytest.mark.parametrize("n", UNSUPPORTED)
def test_unsupported_dimensions_raise_helpful_error(n):
    with pytest.raises(BitsmithError, match=rf"order {n}\b.*12, 20, 28, 36.*random orthogonal") as err:
        hadamard_matrix(n)
    assert "\n" not in str(err.value)
    with pytest.raises(BitsmithError, match=rf"order {n}\b"):
        hadamard_transform(torch.zeros(2, n))


@pytest.mark.parametrize("n", [0, -8, 2.5, 64.0, "64", None, True])
def test_invalid_dimensions_raise(n):
    with pytest.raises(BitsmithError, match="positive integer"):
        hadamard_matrix(n)
    with pytest.raises(BitsmithError, match="positive integer"):
        random_hadamard_matrix(n, seed=0)
    with pytest.raises(BitsmithError, match="positive integer"):
        random_orthogonal_matrix(n, seed=0)


def test_integer_input_rejected():
    with pytest.raises(TypeError, match="floating-point"):
        hadamard_transform(torch.ones(2, 64, dtype=torch.int64))


def test_transform_is_differentiable():
    """SpinQuant trains through the online rotations: gradients must flow (and match the dense product's)."""
    from bitsmith.transforms.hadamard import hadamard_matrix, hadamard_transform

    x = torch.randn(3, 96, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 96, dtype=torch.float64)
    (grad,) = torch.autograd.grad((hadamard_transform(x) * g).sum(), x)
    torch.testing.assert_close(grad, g @ hadamard_matrix(96, torch.float64))
