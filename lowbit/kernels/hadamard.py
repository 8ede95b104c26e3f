"""Orthonormal Hadamard and random rotations for rotating weights and activations (QuaRot-style).

Every matrix here is orthonormal, ``Q @ Q.T == I``; Hadamard matrices have entries ``±1/sqrt(n)``.

A width ``n`` is supported when ``n = m · 2^k`` with ``m`` either 1 or a small *base order* whose Hadamard matrix
is built in code by a Paley construction over the finite field GF(q), q = p or p²:

* Paley I, ``m = q + 1`` with ``q ≡ 3 (mod 4)``:  ``H_m = I + S``, ``S = [[0, 1ᵀ], [-1, Q]]``;
* Paley II, ``m = 2(q + 1)`` with ``q ≡ 1 (mod 4)``:  ``H_m = C ⊗ [[1, 1], [1, -1]] + I ⊗ [[1, -1], [-1, -1]]``,
  ``C = [[0, 1ᵀ], [1, Q]]``;

where ``Q[a, b] = χ(a - b)`` is the Jacobsthal matrix (χ the quadratic character of GF(q)). The ``2^k`` factor is
Sylvester's ``H_2 ⊗ … ⊗ H_2``, applied in O(n log n) by :func:`fwht`. The full matrix is the Kronecker product
``H_n = H_m ⊗ H_{2^k}`` (each factor scaled to be orthonormal), so for ``x`` of shape ``(..., n)``::

    x @ H_n == (H_mᵀ @ x.reshape(..., m, 2^k) @ H_{2^k}).reshape(..., n)

which is what :func:`hadamard_transform` computes without forming the ``(n, n)`` matrix. Widths with no such
factorization (e.g. 11008 = 172 · 64) fall back to a random orthogonal rotation, ``rotation="random"``.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from ..errors import LowbitError

MAX_BASE_ORDER = 256  # largest non-power-of-two base order m (the m-axis is applied by an (m, m) matmul)


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, e) with q = p**e for e in {1, 2} and p an odd prime, else None."""
    for p, e in ((q, 1), (math.isqrt(q), 2)):
        if p > 2 and p**e == q and all(p % d for d in range(2, math.isqrt(p) + 1)):
            return p, e
    return None


def _jacobsthal(q: int) -> Tensor:
    """(q, q) Jacobsthal matrix Q[a, b] = χ(a - b) over GF(q), q = p or p² (GF(p²) = GF(p)[t] / (t² - c))."""
    p, e = _prime_power(q)
    c = next(c for c in range(2, p) if pow(c, (p - 1) // 2, p) == p - 1)  # a quadratic non-residue mod p
    elems = [(a, b) for b in range(p if e == 2 else 1) for a in range(p)]  # a + b·t
    squares = {((a * a + b * b * c) % p, (2 * a * b) % p) for a, b in elems if (a, b) != (0, 0)}
    chi = {x: (0 if x == (0, 0) else 1 if x in squares else -1) for x in elems}
    return torch.tensor([[chi[((a - a2) % p, (b - b2) % p)] for a2, b2 in elems] for a, b in elems],
                        dtype=torch.float64)


def _paley_case(m: int) -> int:
    """1 if Paley I builds order m (q = m - 1), 2 if Paley II does (q = m/2 - 1), 0 if neither (Paley I preferred)."""
    if _prime_power(m - 1) and (m - 1) % 4 == 3:
        return 1
    return 2 if m % 2 == 0 and _prime_power(m // 2 - 1) and (m // 2 - 1) % 4 == 1 else 0


def _paley(m: int) -> Tensor:
    """(m, m) unnormalized ±1 Hadamard matrix by Paley I or II (m must be a base order)."""
    if _paley_case(m) == 1:
        s = torch.zeros(m, m, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(m - 1)
        return torch.eye(m, dtype=torch.float64) + s
    k = m // 2
    c = torch.zeros(k, k, dtype=torch.float64)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(k - 1)
    a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, a) + torch.kron(torch.eye(k, dtype=torch.float64), b)


# non-power-of-two orders built by Paley I or II (powers of two always use Sylvester alone)
BASE_ORDERS: tuple[int, ...] = tuple(m for m in range(12, MAX_BASE_ORDER + 1, 4) if m & (m - 1) and _paley_case(m))
# the base orders that are not a supported order times a power of two: the ones worth naming in messages
_MINIMAL_ORDERS = tuple(m for m in BASE_ORDERS
                        if not any(m % 2**i == 0 and m // 2**i in BASE_ORDERS for i in range(1, 5)))


def factorize(n: int) -> tuple[int, int]:
    """(m, 2^k) with n = m · 2^k, m = 1 or a base order; the largest power of two that works. LowbitError if none."""
    if not isinstance(n, int) or n <= 0:
        raise LowbitError(f"Hadamard width must be a positive integer, got {n!r}.")
    pow2 = n & -n
    odd = n // pow2
    if odd == 1:
        return 1, n
    m = odd * 4
    while m <= min(n, MAX_BASE_ORDER):
        if m in BASE_ORDERS:
            return m, n // m
        m *= 2
    raise LowbitError(
        f"No Hadamard matrix for width {n}: supported widths are n = m·2^k with m in {{1, "
        f"{', '.join(map(str, _MINIMAL_ORDERS))}}}. Use rotation=\"random\" "
        f"for a random orthogonal rotation instead, e.g. rotation_matrix({n}, kind=\"random\").")


def supports_hadamard(n: int) -> bool:
    """Whether :func:`hadamard_matrix` and :func:`hadamard_transform` accept width n."""
    try:
        factorize(n)
    except LowbitError:
        return False
    return True


@functools.cache
def _base(m: int) -> Tensor:
    """Orthonormal (m, m) base Hadamard matrix in fp64 (m = 1 or a base order); cached, never handed out."""
    return torch.ones(1, 1, dtype=torch.float64) if m == 1 else _paley(m) / math.sqrt(m)


def fwht(x: Tensor) -> Tensor:
    """Orthonormal fast Walsh–Hadamard transform of x (..., n) along the last dim, n a power of two: x @ H_n.

    O(n log n) butterflies; returns (..., n) in x's dtype (computed in at least fp32)."""
    n = x.shape[-1]
    if n <= 0 or n & (n - 1):
        raise LowbitError(f"fwht needs a power-of-two last dim, got {n}; use hadamard_transform for n = m·2^k.")
    y, h = x.to(_work_dtype(x)), 1
    while h < n:
        y = y.reshape(*x.shape[:-1], n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    out = y.reshape(x.shape) / math.sqrt(n)
    return out.to(x.dtype) if x.is_floating_point() else out


def _work_dtype(x: Tensor) -> torch.dtype:
    """fp64 stays fp64, everything else (bf16, fp16, integers) is computed in fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


SYLVESTER_BLOCK = 128  # the 2^k factor is applied as dense (p, p) matmuls of Sylvester blocks of at most this size


@functools.cache
def _sylvester(p: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Orthonormal (p, p) Sylvester block H_p for a power of two p <= SYLVESTER_BLOCK; cached, never written (a
    normal tensor even when first built under ``torch.inference_mode``: autograd may save it later)."""
    with torch.inference_mode(False):
        return fwht(torch.eye(p, dtype=torch.float64)).to(dtype=dtype, device=device)


def hadamard_transform(x: Tensor) -> Tensor:
    """x (..., n) -> x @ hadamard_matrix(n), shape (..., n), in x's dtype, without forming the (n, n) matrix.

    ``H_{2^k} = H_{p_1} ⊗ … ⊗ H_{p_j}`` with blocks ``p_i <= SYLVESTER_BLOCK``: the input is viewed as
    ``(rows, m, p_1, …, p_j)`` and each axis multiplied by its block (a GEMM, ``p_i`` multiply-adds per element;
    on CPU 2-4x faster than ``log2(n)`` butterfly passes over memory), then the m-axis by ``H_mᵀ``. fp32 CPU rows
    without autograd (inference: QUAD's and QuaRot's online rotations) go to the C++ kernel instead, which rotates
    each row in cache (``csrc/hadamard.cpp``; equal up to fp32 summation order)."""
    n = x.shape[-1]
    m, p = factorize(n)
    if _compiled_applies(x):
        from .cpu import extension

        hm = _base_fp32(m)
        return extension().hadamard_rows(x.reshape(-1, n).contiguous(), hm).reshape(x.shape)
    blocks = []
    while p > SYLVESTER_BLOCK:
        blocks.append(SYLVESTER_BLOCK)
        p //= SYLVESTER_BLOCK
    blocks += [p] if p > 1 else []
    y = x.to(_work_dtype(x)).reshape(-1, *blocks)
    for axis in range(len(blocks), 0, -1):  # the last (contiguous) axis first: one plain GEMM
        h = _sylvester(blocks[axis - 1], y.dtype, y.device)
        y = y @ h if axis == len(blocks) else torch.movedim(torch.movedim(y, axis, -1) @ h, -1, axis)
    if m > 1:
        y = _base(m).T.to(dtype=y.dtype, device=y.device) @ y.reshape(-1, m, n // m)  # H_mᵀ @ (rows, m, 2^k)
    return y.reshape(x.shape).to(x.dtype) if x.is_floating_point() else y.reshape(x.shape)


def _compiled_applies(x: Tensor) -> bool:
    """Whether :func:`hadamard_transform` runs ``x`` through the C++ kernel: fp32 CPU rows nothing differentiates,
    the extension built, a kernel choice other than ``reference`` (:mod:`lowbit.kernels`), outside ``torch.compile``
    tracing (the kernel is no torch op: torch's path stays traceable)."""
    if x.dtype != torch.float32 or x.device.type != "cpu" or (x.requires_grad and torch.is_grad_enabled()):
        return False
    if torch.compiler.is_compiling():
        return False
    from . import FASTEST, _choice
    from .cpu import extension

    return _choice() in FASTEST and extension() is not None


@functools.cache
def _base_fp32(m: int) -> Tensor:
    """:func:`_base` as a contiguous fp32 CPU tensor, for the C++ kernel (never written)."""
    return _base(m).float().contiguous()


@functools.lru_cache(maxsize=4)  # few entries: an (n, n) fp64 matrix is n²·8 bytes (1.6 GB at n = 14336)
def _hadamard_fp64(n: int) -> Tensor:
    """The cached fp64 H_m ⊗ H_{2^k}, shape (n, n); never handed out without a copy."""
    m, p = factorize(n)
    return torch.kron(_base(m), fwht(torch.eye(p, dtype=torch.float64)))


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """Orthonormal (n, n) Hadamard matrix H_m ⊗ H_{2^k} (entries ±1/sqrt(n)); a fresh copy in dtype."""
    return _hadamard_fp64(n).to(dtype=dtype, copy=True)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_hadamard(n: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> Tensor:
    """QuaRot's randomized Hadamard, (n, n) Q = D @ H with D a seeded random ±1 diagonal; x @ Q = (x * d) @ H."""
    h = _hadamard_fp64(n)  # validates n first
    signs = torch.randint(0, 2, (n,), generator=_generator(seed), dtype=torch.float64) * 2 - 1
    return (signs[:, None] * h).to(dtype)


def random_orthogonal(n: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> Tensor:
    """Haar-random orthogonal (n, n) matrix: QR of a seeded Gaussian with the sign fix Q · sign(diag(R))."""
    if not isinstance(n, int) or n <= 0:
        raise LowbitError(f"Rotation width must be a positive integer, got {n!r}.")
    q, r = torch.linalg.qr(torch.randn(n, n, generator=_generator(seed), dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).to(dtype)


ROTATION_KINDS = ("hadamard", "random")


def rotation_matrix(n: int, kind: str = "hadamard", seed: int = 0, dtype: torch.dtype = torch.float64) -> Tensor:
    """Orthonormal (n, n) rotation: kind "hadamard" -> random_hadamard, "random" -> random_orthogonal."""
    if kind == "hadamard":
        return random_hadamard(n, seed=seed, dtype=dtype)
    if kind == "random":
        return random_orthogonal(n, seed=seed, dtype=dtype)
    raise LowbitError(f"Unknown rotation kind {kind!r}; valid kinds: {', '.join(map(repr, ROTATION_KINDS))}.")
