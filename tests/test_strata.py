"""Exactness of the rank stratification (Prop. B.5): the membership ``u ∈ Im Q_n``.

A query patch ``u`` uses the locations ``n`` with ``u ∈ Im Q_nQ_nᵀ`` of the smallest rank.
A relative tolerance in that test (``‖(I - UUᵀ) u‖ <= 1e-6 ‖u‖``) puts a query with one
observed entry below ``1e-6 ‖u‖`` into a smaller stratum. Here the LE-MMSE is compared with
brute-force definitions whose membership is exact:

- physics-aware centre inpainting of Fashion-MNIST at σ = 0.002 (the measured case);
- small synthetic problems with a query planted at ``1e-9 ‖u‖`` from the image of a
  smaller-rank location, for every operator whose ``B`` gives several strata;
- ``support_rtol`` (a relative slack, 0 by default) and noise-free blank patches.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import lemmse_core as lc
from lemmse_core import operators as ops
from lemmse_core import reference
from lemmse_core.reference import EPS64, operator_matrices, patch_matrix, ref_e_mmse, ref_le_mmse

SIGMA = 0.002
PLANTED = 1e-9  # relative distance of the planted query to the smaller image
# Exact membership of the dense brute force for a general B: the float64 rounding of these
# small problems is below 1e-13 ‖u‖ and the planted queries are 1e-9 ‖u‖ away, so a
# relative margin of 1e-12 separates the two (exact zeros decide the masks).
MARGIN = 1e-12


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- brute-force references


def patches(x: torch.Tensor, p: int) -> torch.Tensor:
    """All circular patches ``(n, H·W, C·p²)`` of ``x (n, C, H, W)`` (plain unfold)."""
    n, c, h, w = x.shape
    r = p // 2
    win = F.pad(x, (r, r, r, r), mode="circular").unfold(2, p, 1).unfold(3, p, 1)
    return win.permute(0, 2, 3, 1, 4, 5).reshape(n, h * w, c * p * p)


def exact_inpainting(y, train, mask, sigma: float, p: int) -> torch.Tensor:
    """LE-MMSE for ``B = Aᵀ = diag(m)`` (0/1 mask) from Prop. B.5 with exact membership.

    ``Q_nQ_nᵀ = diag(Π_n m)``: ``u ∈ Im`` iff ``u`` vanishes wherever ``Π_n m`` does (exact
    zeros), rank = number of observed entries, pdet = 1, ``(Q_nQ_nᵀ)⁺ = diag(Π_n m)``, so
    ``ℓ = -‖u - Π_n(m ⊙ x_k)‖² / (2σ²)`` (both vectors vanish off the observed entries).
    Queries are grouped by their support, which decides their contributing locations.
    """
    n, c, h, w = y.shape
    u = patches(mask * y, p).reshape(n * h * w, -1)
    seen = patches(mask.expand(1, c, h, w).double(), p)[0] != 0  # (L, P)
    rank = seen.sum(dim=1)
    keys = patches(mask * train, p)  # (N, L, P)
    centres = train.flatten(2).transpose(1, 2)  # (N, L, C)
    out = torch.empty(len(u), c, dtype=torch.float64)
    support, which = torch.unique(u != 0, dim=0, return_inverse=True)
    for g, sup in enumerate(support):
        admissible = ~(sup & ~seen).any(dim=1)
        contributing = admissible & (rank == rank[admissible].min())
        k = keys[:, contributing].reshape(-1, u.shape[1])
        values = centres[:, contributing].reshape(-1, c)
        rows = torch.nonzero(which == g).flatten()
        for q in rows.split(256):
            logits = -torch.cdist(u[q], k).pow(2) / (2 * sigma**2)
            out[q] = torch.softmax(logits, dim=1) @ values
    return out.reshape(n, h, w, c).permute(0, 3, 1, 2)


@functools.cache
def dense_patch_maps(op_name: str, kind: str):
    """``[Q_n]`` (dense ``Π_n B``) for every location, row-major, and ``(A, B, train)``."""
    shape, A, B = synthetic_problem(op_name, kind)
    train = train_images(shape)
    _, b_mat = operator_matrices(train, A, B)
    h, w = shape[1:]
    return [patch_matrix(shape, (i, j), P) @ b_mat for i in range(h) for j in range(w)]


def image_basis(q: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of ``Im Q`` (rank with the default cut of ``matrix_rank``)."""
    u, s, _ = torch.linalg.svd(q, full_matrices=False)
    rank = int(torch.linalg.matrix_rank(q @ q.T, hermitian=True))
    return u[:, :rank]


def exact_le_mmse(y, train, A, B, sigma: float, p: int) -> torch.Tensor:
    """LE-MMSE from Prop. B.5 with dense matrices and exact membership ``u ∈ Im Q_n``.

    ``u`` must vanish on the rows of ``Q_n`` that are exactly zero (masks) and lie in
    ``Im Q_n``: ``‖(I - UUᵀ) u‖ <= MARGIN ‖u‖`` with ``U`` the left singular vectors of
    ``Q_n`` (see ``MARGIN``; ``I - GG⁺`` would carry errors ``~ eps · cond(G)``, 1e-6 for
    the Gaussian downsampling).
    """
    a_mat, b_mat = operator_matrices(train, A, B)
    shape = tuple(train.shape[1:])
    c, h, w = shape
    v = y.double().reshape(len(y), -1) @ b_mat.T
    ax = train.double().reshape(len(train), -1) @ a_mat.T
    maps = [patch_matrix(shape, (i, j), p) @ b_mat for i in range(h) for j in range(w)]
    grams = [q @ q.T for q in maps]
    pinvs = [torch.linalg.pinv(g, hermitian=True) for g in grams]
    ranks = torch.tensor([int(torch.linalg.matrix_rank(g, hermitian=True)) for g in grams])
    log_pdet = []
    for g in grams:
        lam = torch.linalg.eigvalsh(g)
        keep = lam > g.shape[0] * EPS64 * lam.max()
        log_pdet.append(float(lam[keep].log().sum()) if lam.max() > 0 else 0.0)
    zero_rows = [(q == 0).all(dim=1) for q in maps]
    bases = [image_basis(q) for q in maps]
    centres = train.double().flatten(2)  # (N, C, L)
    out = torch.zeros(len(y), c, h, w, dtype=torch.float64)
    for i in range(len(y)):
        for m in range(h * w):
            u = patch_matrix(shape, divmod(m, w), p) @ v[i]
            member = torch.tensor(
                [
                    not bool((u[zero_rows[n]] != 0).any())
                    and float((u - bases[n] @ (bases[n].T @ u)).norm()) <= MARGIN * float(u.norm())
                    for n in range(h * w)
                ]
            )
            assert member.any(), "a query lies in no Im Q_n"
            contributing = torch.nonzero(member & (ranks == ranks[member].min())).flatten()
            logits, values = [], []
            for n in contributing.tolist():
                d = u - ax @ maps[n].T  # (N, P): u - Q_n A x_k
                quad = ((d @ pinvs[n]) * d).sum(dim=1)
                logits.append(-quad / (2 * sigma**2) - 0.5 * log_pdet[n])
                values.append(centres[:, :, n])
            weights = torch.softmax(torch.cat(logits), dim=0)
            out[i, :, m // w, m % w] = weights @ torch.cat(values)
    return out


# -------------------------------------------------------------- Fashion-MNIST inpainting


@functools.cache
def fashion_case():
    """Aware centre inpainting (13 × 13 hole), N = 200, 4 test images, σ = 0.002, p = 5."""
    train = lc.data.load("fashionmnist", "train", n=200).double()
    test = lc.data.load("fashionmnist", "test", n=4).double()
    A = ops.Inpainting.center((1, 28, 28), box=13)
    y = A.measure(test, SIGMA, torch.Generator().manual_seed(3))
    return train, A, y


def test_fashion_mnist_aware_inpainting_matches_exact_strata():
    """At σ = 0.002 some observed entries fall below 1e-6 of their patch norm; the
    tolerance-based test misplaced 3 pixels (error up to 0.40 here)."""
    train, A, y = fashion_case()
    B = ops.preinverse(A, "adjoint")
    got = lc.LEMMSE(train, A, 5, B, dtype=torch.float64)(y, SIGMA)
    expected = exact_inpainting(y, train, A.mask.double(), SIGMA, 5)
    error = (got - expected).abs()
    off = int((error > 1e-8).sum())
    assert off == 0, f"{off} pixels off, max error {error.max().item():.3f}"
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-8)


def test_fashion_mnist_stratum_is_smallest_admissible_rank():
    """The diagnostics' stratum is the smallest observed count among the locations whose
    mask covers the query's support (exact zeros)."""
    train, A, y = fashion_case()
    B = ops.preinverse(A, "adjoint")
    engine = lc.LEMMSE(train, A, 5, B, dtype=torch.float64)
    _, diag = engine(y[:1], SIGMA, diagnostics=True, top_k=1)
    u = patches(A.mask * y[:1], 5)[0]
    seen = patches(A.mask[None].double(), 5)[0] != 0
    admissible = ~((u != 0)[:, None, :] & ~seen[None]).any(dim=2)  # (queries, L)
    rank = torch.where(admissible, seen.sum(dim=1)[None], 10**6).min(dim=1).values
    assert torch.equal(diag.rank.flatten(), rank)


# ------------------------------------------------------------------- planted queries

P = 3
# operators whose B gives several strata (ranks) on small images; image shapes
SYNTHETIC = {
    "inpaint_center": ((1, 6, 6), lambda shape: ops.Inpainting.center(shape, box=2)),
    "inpaint_random": ((1, 6, 6), lambda shape: ops.Inpainting.random(shape, 0.3, seed=1)),
    "inpaint_color": ((3, 6, 6), lambda shape: ops.Inpainting.random(shape, 0.3, seed=2)),
    "down_box4": ((1, 8, 8), lambda shape: ops.Downsampling(4)),
    "down_gaussian": (
        (1, 6, 6),
        lambda shape: ops.Downsampling(2, antialias="gaussian", std=0.3),
    ),
}
KINDS = ("adjoint", "pinv", "tikhonov")
PLANT_CASES = [(op, kind) for op in SYNTHETIC for kind in KINDS]


@functools.cache
def synthetic_problem(op_name: str, kind: str):
    shape, make = SYNTHETIC[op_name]
    A = make(shape)
    return shape, A, ops.preinverse(A, kind, lam=0.1 if kind == "tikhonov" else None)


@functools.cache
def train_images(shape):
    return torch.rand((4, *shape), generator=torch.Generator().manual_seed(11), dtype=torch.float64)


@functools.cache
def planted(op_name: str, kind: str):
    """``(y, m, n)``: the patch of ``B y`` at location ``m`` is ``1e-9 ‖u‖`` away from
    ``Im Q_n``, a location of smaller rank whose image lies inside ``Im Q_m``.

    ``u = Q_n z + δ`` with ``δ ∈ Im Q_m ⊥ Im Q_n``; for a mask ``δ`` is one observed entry.
    The pair with the smallest rank gap is used; ``y`` is a noisy measurement elsewhere.
    """
    shape, A, B = synthetic_problem(op_name, kind)
    maps = dense_patch_maps(op_name, kind)
    bases = [image_basis(q) for q in maps]
    pairs = [
        (bases[m].shape[1] - bases[n].shape[1], m, n)
        for m in range(len(maps))
        for n in range(len(maps))
        if bases[n].shape[1] < bases[m].shape[1]
        and bases[n].shape[1] > 0
        and (bases[n] - bases[m] @ (bases[m].T @ bases[n])).norm() < 1e-10
    ]
    assert pairs, "no nested pair of images of different ranks"
    _, m, n = min(pairs)
    gen = torch.Generator().manual_seed(5)
    y = A.measure(torch.rand((1, *shape), generator=gen, dtype=torch.float64), 0.05, gen)
    star = maps[n] @ torch.rand(maps[n].shape[1], generator=gen, dtype=torch.float64)
    w = bases[m] @ torch.randn(bases[m].shape[1], generator=gen, dtype=torch.float64)
    delta = w - bases[n] @ (bases[n].T @ w)
    u = star + PLANTED * star.norm() * delta / delta.norm()
    flat = y.reshape(-1)
    flat += torch.linalg.pinv(maps[m]) @ (u - maps[m] @ flat)
    return y, m, n


def rank_of(op_name, kind, location) -> int:
    return image_basis(dense_patch_maps(op_name, kind)[location]).shape[1]


def tolerance(op_name: str) -> float:
    """1e-8; 1e-5 for the Gaussian downsampling, whose patch Gram matrices have condition
    numbers near 4.5e9 (see ``test_estimators.tolerance``)."""
    return 1e-5 if op_name == "down_gaussian" else 1e-8


@pytest.mark.parametrize("op_name, kind", PLANT_CASES)
def test_planted_query_is_not_in_the_smaller_stratum(op_name, kind):
    shape, A, B = synthetic_problem(op_name, kind)
    train = train_images(shape)
    y, m, n = planted(op_name, kind)
    sigma = 0.1
    expected = exact_le_mmse(y, train, A, B, sigma, P)
    got, diag = lc.le_mmse(y, train, A, sigma, P, B, dtype=torch.float64, diagnostics=True)
    tol = tolerance(op_name)
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    w = shape[2]
    assert int(diag.rank[0, m // w, m % w]) == rank_of(op_name, kind, m)
    # the case is sensitive: the 1e-6 tolerance of lemmse_core.reference misplaces the query
    loose = ref_le_mmse(y, train, A, sigma, P, B)
    assert int(loose.rank[0, m // w, m % w]) <= rank_of(op_name, kind, n)
    assert (loose.x_hat - expected).abs().max() > 1e-3


@pytest.mark.parametrize("op_name, kind", PLANT_CASES)
def test_support_rtol_is_a_relative_slack(op_name, kind):
    """``support_rtol=1e-6`` reproduces the former fixed tolerance (the reference's 1e-6
    test); ``support_rtol=0`` is the default."""
    shape, A, B = synthetic_problem(op_name, kind)
    train = train_images(shape)
    y, m, n = planted(op_name, kind)
    tol = tolerance(op_name)
    loose = lc.LEMMSE(train, A, P, B, dtype=torch.float64, support_rtol=1e-6)
    torch.testing.assert_close(
        loose(y, 0.1), ref_le_mmse(y, train, A, 0.1, P, B).x_hat, rtol=tol, atol=tol
    )
    zero = lc.LEMMSE(train, A, P, B, dtype=torch.float64, support_rtol=0.0)
    default = lc.LEMMSE(train, A, P, B, dtype=torch.float64)
    torch.testing.assert_close(zero(y, 0.1), default(y, 0.1), rtol=0, atol=0)


@pytest.mark.parametrize("value", [-1e-6, float("nan"), float("inf")])
def test_bad_support_rtol(value):
    shape, A, B = synthetic_problem("inpaint_center", "adjoint")
    with pytest.raises(ValueError, match="support_rtol"):
        lc.LEMMSE(train_images(shape), A, P, B, support_rtol=value)


# ------------------------------------------------------------------ rounding, general B


def test_noise_free_blank_patches_join_the_smallest_stratum():
    """``B = Aᵀ`` of box downsampling by FFT: the patches of a blank region of ``B A x``
    are rounding errors (~1e-17, not 0); they are ``0`` up to rounding, which lies in every
    image, so their stratum is the smallest rank (a relative test rejects them everywhere)."""
    shape = (1, 8, 8)
    A = ops.Downsampling(4)
    B = ops.preinverse(A, "adjoint")
    train = train_images(shape)
    x = torch.zeros((1, *shape), dtype=torch.float64)
    x[..., :4, :4] = torch.rand((4, 4), generator=torch.Generator().manual_seed(0))
    y = A.A(x)
    assert (B.A(y)[..., 4:, 4:] != 0).any(), "expected rounding errors in the blank part"
    _, diag = lc.le_mmse(y, train, A, 0.1, P, B, dtype=torch.float64, diagnostics=True)
    blank = torch.zeros(8, 8, dtype=torch.bool)
    blank[5:7, 5:7] = True  # patches entirely inside the blank quarter
    smallest = min(rank_of("down_box4", "adjoint", loc) for loc in range(64))
    assert (diag.rank[0][blank] == smallest).all()


@pytest.mark.parametrize("kind", KINDS)
def test_e_mmse_general_support_is_exact(kind, monkeypatch):
    """E-MMSE with a general ``B`` (Thm. 3.5) uses the shifts with ``T_g⁻¹v ∈ Im B``: a
    shift whose ``T_g⁻¹v`` is ``1e-9 ‖v‖`` away from ``Im B`` is not admissible (a 1e-6
    relative test admits it)."""
    shape, A, B = synthetic_problem("down_box4", kind)
    train = train_images(shape)
    _, b_mat = operator_matrices(train, A, B)
    basis = image_basis(b_mat)
    # v = star + δ: star ∈ Im B ∩ T_g Im B, δ ∈ Im B ⊥ T_g Im B, for g = (1, 0)
    shifted = torch.roll(basis.T.reshape(-1, *shape), shifts=(1, 0), dims=(-2, -1))
    shifted = shifted.reshape(basis.shape[1], -1).T  # basis of T_g Im B
    cross = torch.linalg.svd(basis.T @ shifted)
    common = basis @ cross.U[:, cross.S > 1 - 1e-10]
    assert common.shape[1] > 0
    gen = torch.Generator().manual_seed(2)
    star = common @ torch.rand(common.shape[1], generator=gen, dtype=torch.float64)
    z = basis @ torch.randn(basis.shape[1], generator=gen, dtype=torch.float64)
    delta = z - shifted @ (shifted.T @ z)
    v = star + PLANTED * star.norm() * delta / delta.norm()
    y = (torch.linalg.pinv(b_mat) @ v).reshape(1, *A.output_shape(shape))
    got = lc.e_mmse(y, train, A, 0.1, B, dtype=torch.float64)
    monkeypatch.setattr(reference, "SUPPORT_RTOL", MARGIN)
    expected = ref_e_mmse(y, train, A, 0.1, B).x_hat
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-8)
    monkeypatch.setattr(reference, "SUPPORT_RTOL", 1e-6)
    assert (ref_e_mmse(y, train, A, 0.1, B).x_hat - expected).abs().max() > 1e-3
