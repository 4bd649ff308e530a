"""Fast Walsh-Hadamard transforms for rotating weights and activations before quantization.

Rotating a layer's input by an orthonormal Hadamard matrix spreads outlier channels over all
channels, so they no longer dictate the quantization scale; QuaRot (Ashkboos et al., arXiv
2404.00456) applies it online and folds it into weights, SpinQuant (arXiv 2405.16406) uses it as
the fixed part of learned rotations. It must be cheap, hence this module.

Dimensions are decomposed as ``n = 2^k * m``: the matrix is ``H_n = kron(S_{2^k}, M_m)`` where
``S`` is Sylvester's (``S[i, j] = (-1)^popcount(i & j)``) and ``M`` a small Hadamard matrix built
here by Paley's constructions (I: ``m = q + 1``, ``q ≡ 3 mod 4``; II: ``m = 2(q + 1)``,
``q ≡ 1 mod 4``; ``q`` a prime power, fields ``GF(p^r)`` included). The smallest such ``m`` is
chosen, so the transform is one small dense matmul over the ``m`` part plus an O(n log n)
butterfly over the ``2^k`` part. Dimensions with no such decomposition (for instance 92, which has a
Hadamard matrix by other constructions) are refused with a :class:`BitsmithError`; use
:func:`random_orthogonal_matrix` for those.
"""

from __future__ import annotations

import functools
import math
import operator

import torch

from bitsmith.errors import BitsmithError
from bitsmith.tensor_cache import tensor_cache


def _prime_power(q: int) -> tuple[int, int] | None:
    """``(p, r)`` with ``q = p^r`` for a prime ``p``, or None."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)  # smallest divisor: a prime
    r = 0
    while q % p == 0:
        q, r = q // p, r + 1
    return (p, r) if q == 1 else None


def _paley_q(m: int) -> tuple[int, int] | None:
    """``(construction, q)`` giving a Hadamard matrix of order ``m`` by Paley I or II, or None."""
    if m % 4:
        return None
    if (m - 1) % 4 == 3 and _prime_power(m - 1):
        return 1, m - 1
    if (m // 2 - 1) % 4 == 1 and _prime_power(m // 2 - 1):
        return 2, m // 2 - 1
    return None


@functools.lru_cache(maxsize=256)
def _decompose(n: int) -> tuple[int, int] | None:
    """``(2^k, m)`` with ``n = 2^k * m`` and the smallest constructible ``m``, or None."""
    m = n
    while m % 2 == 0:
        m //= 2
    while m <= n:
        if m == 1 or _paley_q(m):
            return n // m, m
        m *= 2
    return None


def _reduce(a: list[int], f: list[int], p: int) -> list[int]:
    """``a mod f`` over GF(p) for a monic ``f`` (coefficients lowest degree first)."""
    a, r = list(a), len(f) - 1
    for d in range(len(a) - 1, r - 1, -1):
        c = a[d]
        if c:
            for i in range(r + 1):
                a[d - r + i] = (a[d - r + i] - c * f[i]) % p
    return [c % p for c in a[:r]] + [0] * (r - len(a))


def _digits(e: int, p: int, r: int) -> list[int]:
    """The ``r`` base-p digits of ``e``, lowest first: element ``e`` of GF(p^r) as a polynomial."""
    return [(e // p**i) % p for i in range(r)]


def _quadratic_character(p: int, r: int) -> torch.Tensor:
    """``chi[e]`` for every element ``e`` of GF(p^r) (base-p digits = polynomial coefficients)."""
    q = p**r
    monics = lambda d: (_digits(low, p, d) + [1] for low in range(p**d))  # noqa: E731
    # irreducible modulus: no monic factor of degree <= r / 2
    f = next(f for f in monics(r) if all(any(_reduce(f, g, p)) for d in range(1, r // 2 + 1) for g in monics(d)))
    chi = torch.full((q,), -1, dtype=torch.int64)
    chi[0] = 0
    for e in range(1, q):
        a, square = _digits(e, p, r), [0] * (2 * r - 1)
        for i in range(r):
            for j in range(r):
                square[i + j] += a[i] * a[j]
        chi[sum(c * p**i for i, c in enumerate(_reduce(square, f, p)))] = 1
    assert int((chi == 1).sum()) == (q - 1) // 2, "GF arithmetic broken"
    return chi


def _jacobsthal(q: int) -> torch.Tensor:
    """``Q[i, j] = chi(e_i - e_j)`` over GF(q)."""
    p, r = _prime_power(q)
    digits = torch.tensor([_digits(e, p, r) for e in range(q)])
    diff = (digits[:, None, :] - digits[None, :, :]) % p
    return _quadratic_character(p, r)[(diff * torch.tensor([p**i for i in range(r)])).sum(-1)]


@tensor_cache()
def _core(m: int) -> torch.Tensor:
    """The ±1 Hadamard matrix of order ``m`` (1 or a Paley order), float64, verified; read-only."""
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    construction, q = _paley_q(m)
    Q, ones = _jacobsthal(q), torch.ones(q, 1, dtype=torch.int64)
    top = torch.cat([torch.zeros(1, 1, dtype=torch.int64), ones.T], 1)
    if construction == 1:  # H = I + [[0, 1^T], [-1, Q]], Q antisymmetric
        H = torch.eye(m, dtype=torch.int64) + torch.cat([top, torch.cat([-ones, Q], 1)])
    else:  # C = [[0, 1^T], [1, Q]] symmetric; 0 -> [[1, -1], [-1, -1]], ±1 -> ±[[1, 1], [1, -1]]
        C = torch.cat([top, torch.cat([ones, Q], 1)])
        H = torch.kron(C, torch.tensor([[1, 1], [1, -1]]))
        H += torch.kron(torch.eye(q + 1, dtype=torch.int64), torch.tensor([[1, -1], [-1, -1]]))
    H = H.to(torch.float64)
    if not torch.equal(H @ H.T, m * torch.eye(m, dtype=torch.float64)):
        raise RuntimeError(f"Paley construction of order {m} is not Hadamard (bug)")
    return H


_BLOCK = 64  # the dense first step spans >= this many columns: short butterfly strides are slow


@tensor_cache(maxsize=64)
def _first_step(n: int, scale: bool, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``kron(S_r, M_m).T`` (``r`` the smallest power of two with ``r * m >= _BLOCK``), scale folded in."""
    pow2, m = _decompose(n)
    r = 1
    while r < pow2 and r * m < _BLOCK:
        r *= 2
    B = torch.kron(_sylvester(r), _core(m))
    return (B.T / math.sqrt(n) if scale else B.T).to(device=device, dtype=dtype)


def _sylvester(n: int) -> torch.Tensor:
    """Sylvester's ±1 matrix of power-of-two order ``n``, float64."""
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < n:
        H = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), H)
    return H


def _supported_orders(limit: int = 100) -> str:
    """The odd-part factors ``m`` up to ``limit`` (``24 = 2 * 12`` is listed as 12)."""
    return ", ".join(str(m) for m in range(3, limit + 1) if _decompose(m) == (1, m))


def _positive_int(n: object, what: str) -> int:
    if isinstance(n, bool) or not hasattr(n, "__index__") or operator.index(n) <= 0:
        raise BitsmithError(f"{what} dimension must be a positive integer, got {n!r}")
    return operator.index(n)


def _checked(n: object) -> tuple[int, int]:
    """``(2^k, m)`` for a valid ``n``, else a one-line BitsmithError."""
    n = _positive_int(n, "Hadamard")
    parts = _decompose(n)
    if parts is None:
        raise BitsmithError(
            f"no Hadamard matrix of order {n} here: n must be 2^k * m with m = 1 or a Paley order "
            f"({_supported_orders()}, ...); use a random orthogonal rotation (random_orthogonal_matrix) instead"
        )
    return parts


def hadamard_supported(n: int) -> bool:
    """Whether :func:`hadamard_matrix` and :func:`hadamard_transform` accept dimension ``n``."""
    try:
        _checked(n)
    except BitsmithError:
        return False
    return True


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The orthonormal Hadamard matrix ``kron(S_{2^k}, M_m) / sqrt(n)``, for tests and weight folding.

    Symmetric when ``m = 1`` (Sylvester) or ``m`` comes from Paley II, not for Paley I cores (12, 20,
    28, 44, 60, ...): mind the transpose. Built densely here, independently of the fast transform.
    """
    pow2, m = _checked(n)
    H = torch.kron(_sylvester(pow2), _core(m)) / math.sqrt(pow2 * m)
    return H.to(dtype)


def hadamard_transform(x: torch.Tensor, scale: bool = True) -> torch.Tensor:
    """``x @ hadamard_matrix(n).T`` along the last dimension of ``x`` (any leading dims), fast.

    One small dense matmul covers the ``m`` part (with the few lowest bits of the ``2^k`` part, whose
    butterfly steps would be slow), then one add/subtract butterfly step per remaining bit.
    Half types are computed in float32 and returned in their dtype; float64 stays float64.
    ``scale=False`` leaves out the ``1/sqrt(n)`` (a ±1 transform). Device-agnostic.
    """
    if not x.is_floating_point():
        raise TypeError(f"hadamard_transform needs a floating-point tensor, got {x.dtype}")
    n, rows = x.shape[-1], math.prod(x.shape[:-1])
    _checked(n)
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    B = _first_step(n, scale, work, x.device)
    c = B.shape[0]
    y = x.to(work).reshape(rows, n // c, c) @ B  # the m part and the lowest bits of the 2^k part
    h = 1
    while h < n // c:  # H_2 on one more bit of the 2^k index per step
        y = y.reshape(rows, n // (2 * h * c), 2, h * c)
        a, b = y[:, :, 0], y[:, :, 1]
        if y.requires_grad and torch.is_grad_enabled():  # out= does not record autograd (SpinQuant trains through this)
            out = torch.stack((a + b, a - b), dim=2)
        else:
            out = torch.empty_like(y)
            torch.add(a, b, out=out[:, :, 0])
            torch.sub(a, b, out=out[:, :, 1])
        y, h = out, 2 * h
    return y.reshape(x.shape).to(x.dtype)


def random_sign_vector(n: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``n`` random ±1 signs from a CPU generator seeded with ``seed`` (same on every machine)."""
    n = _positive_int(n, "sign vector")
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (n,), generator=gen) * 2 - 1).to(dtype)


def random_hadamard_matrix(n: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``H @ diag(s)`` with random signs ``s``: orthonormal, and a different rotation per seed (QuaRot)."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    return (hadamard_matrix(n, work) * random_sign_vector(n, seed, work)).to(dtype)


def random_orthogonal_matrix(n: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A Haar-random orthogonal matrix (QR of a Gaussian, signs fixed): the fallback for any ``n``."""
    n = _positive_int(n, "rotation")
    gen = torch.Generator().manual_seed(seed)
    Q, R = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    signs = torch.sign(torch.diagonal(R))
    signs[signs == 0] = 1
    return (Q * signs).to(dtype)
