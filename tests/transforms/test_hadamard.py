"""Hadamard and random rotations: orthonormality, ±1/sqrt(n) entries, agreement between the fast transforms and the
explicit matrices, seeding, dtype and batch handling, and the error (with its fallback) for unsupported widths."""

from __future__ import annotations

import math

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.kernels.hadamard import (
    BASE_ORDERS,
    factorize,
    fwht,
    hadamard_matrix,
    hadamard_transform,
    random_hadamard,
    random_orthogonal,
    rotation_matrix,
    supports_hadamard,
)


def _assert_orthonormal(q: torch.Tensor, atol: float = 1e-10) -> None:
    eye = torch.eye(q.shape[0], dtype=q.dtype)
    torch.testing.assert_close(q @ q.T, eye, atol=atol, rtol=0)
    torch.testing.assert_close(q.T @ q, eye, atol=atol, rtol=0)


@pytest.mark.parametrize("n", [1, 2, 64, 576, 1536, *BASE_ORDERS])
def test_hadamard_matrix_is_orthonormal_with_pm_one_over_sqrt_n_entries(n):
    h = hadamard_matrix(n)
    assert h.shape == (n, n) and h.dtype == torch.float64
    _assert_orthonormal(h)
    torch.testing.assert_close(h.abs(), torch.full_like(h, 1 / math.sqrt(n)), atol=1e-12, rtol=0)


def test_base_orders_cover_the_required_ones():
    for m in (12, 20, 28, 36, 44, 52, 60):
        assert m in BASE_ORDERS and factorize(m) == (m, 1)


@pytest.mark.parametrize("n,expected", [(64, (1, 64)), (576, (36, 16)), (1536, (12, 128)), (192, (12, 16)),
                                        (768, (12, 64)), (2048, (1, 2048)), (4096, (1, 4096)),
                                        (14336, (28, 512)), (40, (20, 2)), (88, (44, 2)), (1, (1, 1))])
def test_factorize(n, expected):
    assert factorize(n) == expected and supports_hadamard(n)


def test_hadamard_matrix_returns_a_fresh_copy_in_the_requested_dtype():
    a = hadamard_matrix(12)
    a.zero_()
    assert hadamard_matrix(12).abs().sum() > 0
    h32 = hadamard_matrix(12, dtype=torch.float32)
    assert h32.dtype == torch.float32
    torch.testing.assert_close(h32.double(), hadamard_matrix(12), atol=1e-7, rtol=0)


@pytest.mark.parametrize("n", [1, 2, 8, 64, 256])
def test_fwht_matches_the_matrix(n):
    x = torch.randn(5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    torch.testing.assert_close(fwht(x), x @ hadamard_matrix(n), atol=1e-12, rtol=0)


@pytest.mark.parametrize("n", [12, 20, 28, 36, 52, 576, 1536])
def test_hadamard_transform_matches_the_matrix(n):
    x = torch.randn(4, n, generator=torch.Generator().manual_seed(n))
    expected = x @ hadamard_matrix(n, dtype=torch.float32)
    torch.testing.assert_close(hadamard_transform(x), expected, atol=1e-5, rtol=0)
    xd = x.double()
    torch.testing.assert_close(hadamard_transform(xd), xd @ hadamard_matrix(n), atol=1e-12, rtol=0)


def test_hadamard_transform_large_width_preserves_norm_and_inverts():
    n = 14336  # 28 · 512: never build the (n, n) matrix here
    x = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = hadamard_transform(x)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), atol=1e-9, rtol=0)
    # x @ H @ Hᵀ == x, checked on a few output coordinates j: (y @ Hᵀ)[:, j] = y @ H[j, :], H[j, :] = e_j @ H
    idx = torch.tensor([0, 1, 511, 512, 9000, n - 1])
    one_hot = torch.nn.functional.one_hot(idx, n).double()
    rows = hadamard_transform(one_hot)  # H[idx, :]
    torch.testing.assert_close(y @ rows.T, x[:, idx], atol=1e-9, rtol=0)


def test_leading_batch_dims():
    x = torch.randn(2, 3, 4, 192, generator=torch.Generator().manual_seed(1))
    y = hadamard_transform(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, x @ hadamard_matrix(192, dtype=torch.float32), atol=1e-5, rtol=0)
    torch.testing.assert_close(fwht(x[..., :64]), x[..., :64] @ hadamard_matrix(64, dtype=torch.float32),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs_keep_their_dtype(dtype):
    x = torch.randn(4, 96, generator=torch.Generator().manual_seed(2)).to(dtype)
    ref = x.double() @ hadamard_matrix(96)
    for out in (hadamard_transform(x), fwht(x[..., :64])):
        assert out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(hadamard_transform(x).double(), ref, atol=tol * 4, rtol=tol)


def test_random_hadamard_orthonormal_seeded_and_seed_dependent():
    q0 = random_hadamard(576, seed=0)
    _assert_orthonormal(q0)
    torch.testing.assert_close(q0.abs(), hadamard_matrix(576).abs(), atol=0, rtol=0)
    assert torch.equal(q0, random_hadamard(576, seed=0))
    assert not torch.equal(q0, random_hadamard(576, seed=1))
    # Q = D @ H: x @ Q == hadamard_transform(x * d)
    d = q0[:, 0] / hadamard_matrix(576)[:, 0]
    x = torch.randn(2, 576, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(x @ q0, hadamard_transform(x * d), atol=1e-12, rtol=0)
    assert random_hadamard(64, dtype=torch.float32).dtype == torch.float32


def test_random_orthogonal_and_rotation_matrix():
    q = random_orthogonal(100, seed=5)
    _assert_orthonormal(q)
    assert torch.equal(q, random_orthogonal(100, seed=5))
    assert not torch.equal(q, random_orthogonal(100, seed=6))
    assert torch.equal(rotation_matrix(100, kind="random", seed=5), q)
    assert torch.equal(rotation_matrix(64, kind="hadamard", seed=2), random_hadamard(64, seed=2))
    assert rotation_matrix(64, dtype=torch.float32).dtype == torch.float32
    with pytest.raises(LowbitError, match="'hadamard', 'random'"):
        rotation_matrix(64, kind="givens")


@pytest.mark.parametrize("n", [11008, 26, 50, 3, 92 * 64])
def test_unsupported_width_names_width_and_fallback(n):
    assert not supports_hadamard(n)
    for fn in (factorize, hadamard_matrix, random_hadamard, lambda n: hadamard_transform(torch.zeros(1, n))):
        with pytest.raises(LowbitError, match=rf"width {n}\b.*m in \{{1, 12, 20, .*rotation=\"random\""):
            fn(n)
    _assert_orthonormal(rotation_matrix(min(n, 512), kind="random"))  # the named fallback works (kept small)


@pytest.mark.parametrize("n", [0, -4])
def test_non_positive_width(n):
    with pytest.raises(LowbitError, match="positive integer"):
        factorize(n)
    with pytest.raises(LowbitError, match="positive integer"):
        random_orthogonal(n)
    assert not supports_hadamard(n)


def test_fwht_rejects_non_power_of_two():
    with pytest.raises(LowbitError, match="power-of-two.*hadamard_transform"):
        fwht(torch.zeros(2, 12))


@pytest.mark.parametrize("n", [12, 20, 40, 128, 576, 1536, 4096])
@pytest.mark.parametrize("rows", [1, 7, 8, 9, 37])
def test_the_compiled_rotation_equals_the_torch_one(monkeypatch, n, rows):
    """fp32 CPU rows without autograd take the C++ kernel (csrc/hadamard.cpp: 8 rows per vector, a register
    transpose where 8 whole rows and 8 columns are left, scalar otherwise): equal to the matrix product and to the
    torch path (``reference``) up to fp32 summation order, for widths m · 2^k with and without a base order, row
    counts off its 8-row groups and leading dims; inputs that need a gradient keep the torch path."""
    from lowbit import kernels
    from lowbit.kernels import hadamard
    from lowbit.kernels.cpu import extension

    monkeypatch.delenv("LOWBIT_KERNEL", raising=False)
    if extension() is None:
        pytest.skip("no C++ compiler here: the torch path runs everywhere")
    x = torch.randn(rows, 3, n)
    assert hadamard._compiled_applies(x)
    y = hadamard_transform(x)
    with kernels.force("reference"):
        assert not hadamard._compiled_applies(x)
        torch_path = hadamard_transform(x)
    exact = (x.double() @ hadamard_matrix(n)).float()
    torch.testing.assert_close(y, exact, atol=2e-6 * math.log2(n), rtol=0)
    torch.testing.assert_close(y, torch_path, atol=4e-6 * math.log2(n), rtol=0)
    xg = x.clone().requires_grad_(True)
    assert not hadamard._compiled_applies(xg)
    (g,) = torch.autograd.grad(hadamard_transform(xg).sum(), xg)
    torch.testing.assert_close(g, torch.ones_like(x) @ hadamard_matrix(n, torch.float32).T, atol=1e-4, rtol=1e-5)
