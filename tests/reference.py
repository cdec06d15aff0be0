"""Brute-force float64 references for the estimators, straight from THEORY.md.

Dense matrices and explicit Python loops: clarity over speed, tiny problems only. Nothing
here comes from ``lemmse_core.estimators`` or ``lemmse_core.lemmse``; the operators are only
used for their dense matrices (``.matrix``) and shapes.

Conventions (THEORY.md, "Notation"):

- images ``(C, H, W)`` are flattened row-major over ``(C, H, W)``;
- shifts ``(T_g x)[n] = x[n - g]`` = ``torch.roll(x, shifts=g, dims=(-2, -1))``;
- patches ``(Π_n x)[c, o] = x[c, n + o]``, ``o ∈ {-p//2 … p//2}²``, circular;
- for a PSD matrix ``G``: ``G⁺ = pinv(G, hermitian=True)``, ``rank = matrix_rank(G,
  hermitian=True)`` and ``pdet`` = product of the eigenvalues above ``size · eps · λ_max``,
  all with the default tolerances of ``torch.linalg``;
- for a dense ``B``: ``B⁺ = pinv(B)``, ``P_B = B⁺B`` and ``(BBᵀ)⁺ = (B⁺)ᵀB⁺``;
- support test ``u ∈ Im G``: ``‖(I - G G⁺) u‖ <= 1e-6 ‖u‖`` (so ``u = 0`` is always in);
- softmax weights by log-sum-exp in float64 (subtract the max).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

EPS64 = torch.finfo(torch.float64).eps
SUPPORT_RTOL = 1e-6


# ------------------------------------------------------------------------------ helpers


def flat(x: torch.Tensor) -> torch.Tensor:
    """``(n, C, H, W)`` -> ``(n, C·H·W)`` float64, row-major."""
    return x.double().reshape(x.shape[0], -1)


def shift(x: torch.Tensor, g: tuple[int, int]) -> torch.Tensor:
    """``T_g x``: ``(T_g x)[n] = x[n - g]`` (circular)."""
    return torch.roll(x, shifts=tuple(g), dims=(-2, -1))


def shift_matrix(shape, g: tuple[int, int]) -> torch.Tensor:
    """Dense ``T_g`` ``(D, D)`` on flattened images of ``shape = (C, H, W)``."""
    d = math.prod(shape)
    basis = torch.eye(d, dtype=torch.float64).reshape(d, *shape)
    return shift(basis, g).reshape(d, d).T.contiguous()


def patch_matrix(shape, n: tuple[int, int], p: int) -> torch.Tensor:
    """Dense ``Π_n`` ``(C·p², C·H·W)``; row ``c·p² + a·p + b`` reads ``x[c, i+a-r, j+b-r]``.

    ``r = p // 2``, indices modulo the image size.
    """
    c, h, w = shape
    i, j = n
    r = p // 2
    mat = torch.zeros(c * p * p, c * h * w, dtype=torch.float64)
    for ch in range(c):
        for a in range(p):
            for b in range(p):
                row = ch * p * p + a * p + b
                col = ch * h * w + ((i + a - r) % h) * w + ((j + b - r) % w)
                mat[row, col] = 1.0
    return mat


def all_shifts(h: int, w: int):
    """Every shift ``g = (gi, gj)`` of an ``h × w`` grid, row-major."""
    return [(gi, gj) for gi in range(h) for gj in range(w)]


def operator_matrices(train: torch.Tensor, A, B=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense ``A`` ``(M, D)`` and ``B`` ``(D, M)`` (``B=None``: the identity)."""
    shape = tuple(train.shape[1:])
    a_mat = A.matrix(shape)
    m = a_mat.shape[0]
    y_shape = A.output_shape(shape)
    b_mat = torch.eye(m, dtype=torch.float64) if B is None else B.matrix(y_shape)
    assert b_mat.shape == (math.prod(shape), m), "B must map measurements to images"
    return a_mat, b_mat


def log_softmax_weights(logits: torch.Tensor) -> torch.Tensor:
    """Normalised weights ``exp(ℓ_i - logsumexp ℓ)`` (``-inf`` logits get weight 0)."""
    logits = logits.double()
    top = logits.max()
    w = torch.exp(logits - top)
    return w / w.sum()


def logsumexp(logits: torch.Tensor) -> torch.Tensor:
    top = logits.max()
    return top + torch.log(torch.exp(logits - top).sum())


def psd_pinv(g: torch.Tensor) -> torch.Tensor:
    return torch.linalg.pinv(g, hermitian=True)


def psd_rank(g: torch.Tensor) -> int:
    return int(torch.linalg.matrix_rank(g, hermitian=True))


def psd_log_pdet(g: torch.Tensor) -> float:
    """``log pdet G``: eigenvalues above ``size · eps64 · λ_max`` (empty product = 1)."""
    lam = torch.linalg.eigvalsh(g)
    top = lam.max()
    if top <= 0:
        return 0.0
    keep = lam > g.shape[0] * EPS64 * top
    return float(torch.log(lam[keep]).sum())


def in_image(g: torch.Tensor, g_pinv: torch.Tensor, u: torch.Tensor) -> bool:
    """Support test ``u ∈ Im G``: ``‖(I - G G⁺) u‖ <= 1e-6 ‖u‖``."""
    resid = u - g @ (g_pinv @ u)
    return bool(torch.linalg.vector_norm(resid) <= SUPPORT_RTOL * torch.linalg.vector_norm(u))


def measurement_projector(b_mat: torch.Tensor) -> torch.Tensor:
    """``P_B = B⁺ B`` (projector onto ``Im Bᵀ`` in measurement space)."""
    return torch.linalg.pinv(b_mat) @ b_mat


def metric_of_preinverse(b_mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(BBᵀ, (BBᵀ)⁺)`` with ``(BBᵀ)⁺ = (B⁺)ᵀ B⁺``."""
    bp = torch.linalg.pinv(b_mat)
    return b_mat @ b_mat.T, bp.T @ bp


# ------------------------------------------------------------------------- results


@dataclass
class GlobalRef:
    """Reference of a global estimator.

    ``weights``: ``(n, N)`` for the MMSE; ``(n, H, W, N)`` indexed ``[query, gi, gj, k]``
    over the shifts for the augmented MMSE and the E-MMSE (0 off support).
    ``image_weights`` ``(n, N)``: total weight of each training image;
    ``effective_images = 1 / Σ_k image_weights²``.
    """

    x_hat: torch.Tensor
    weights: torch.Tensor
    image_weights: torch.Tensor
    effective_images: torch.Tensor


@dataclass
class LocalRef:
    """Reference of the LE-MMSE.

    - ``x_hat`` ``(n, C, H, W)``;
    - ``log_density`` ``(n, H, W)``: ``log (1/(N·H·W)) Σ_{contributing n,k} N(u; …)``;
    - ``rank`` ``(n, H, W)``: the stratum rank ``r(u)``;
    - ``weights`` ``(n, H, W, H, W, N)`` indexed ``[query, mi, mj, ni, nj, k]``: the full
      normalised weight table of output pixel ``m`` (0 for non-contributing terms).
    """

    x_hat: torch.Tensor
    log_density: torch.Tensor
    rank: torch.Tensor
    weights: torch.Tensor


def _global_result(x_hat, weights) -> GlobalRef:
    n_query, n_train = weights.shape[0], weights.shape[-1]
    image_weights = weights.reshape(n_query, -1, n_train).sum(dim=1)
    eff = 1.0 / image_weights.square().sum(dim=1)
    return GlobalRef(x_hat, weights, image_weights, eff)


# ---------------------------------------------------------------------------- MMSE


def ref_mmse(y, train, A, sigma: float, B=None) -> GlobalRef:
    """``Σ_k w_k x_k``, ``ℓ_k = -‖P_B (y - A x_k)‖² / (2σ²)`` (Prop. 2.1, Remark 2.2)."""
    a_mat, b_mat = operator_matrices(train, A, B)
    proj = measurement_projector(b_mat)
    xs, ys = flat(train), flat(y)
    n_query, n_train = ys.shape[0], xs.shape[0]
    x_hat = torch.zeros(n_query, xs.shape[1], dtype=torch.float64)
    weights = torch.zeros(n_query, n_train, dtype=torch.float64)
    for i in range(n_query):
        resid = (ys[i][None, :] - xs @ a_mat.T) @ proj.T  # row k: P_B (y - A x_k)
        logits = -resid.square().sum(dim=1) / (2 * sigma**2)
        w = log_softmax_weights(logits)
        weights[i] = w
        x_hat[i] = w @ xs
    return _global_result(x_hat.reshape(n_query, *train.shape[1:]), weights)


def ref_augmented_mmse(y, train, A, sigma: float, B=None) -> GlobalRef:
    """MMSE over ``{T_g x_k}``: ``ℓ_{g,k} = -‖P_B (y - A T_g x_k)‖² / (2σ²)`` (Def. 3.4)."""
    a_mat, b_mat = operator_matrices(train, A, B)
    proj = measurement_projector(b_mat)
    train = train.double()
    ys = flat(y)
    n_query, n_train = ys.shape[0], train.shape[0]
    h, w = train.shape[-2:]
    shifts = all_shifts(h, w)
    values = torch.stack([flat(shift(train, g)) for g in shifts])  # (G, N, D): T_g x_k
    x_hat = torch.zeros(n_query, values.shape[-1], dtype=torch.float64)
    weights = torch.zeros(n_query, h, w, n_train, dtype=torch.float64)
    for i in range(n_query):
        logits = torch.empty(len(shifts), n_train, dtype=torch.float64)
        for gi in range(len(shifts)):
            resid = (ys[i][None, :] - values[gi] @ a_mat.T) @ proj.T  # P_B (y - A T_g x_k)
            logits[gi] = -resid.square().sum(dim=1) / (2 * sigma**2)
        wts = log_softmax_weights(logits.flatten()).reshape(len(shifts), n_train)
        weights[i] = wts.reshape(h, w, n_train)
        x_hat[i] = (wts[..., None] * values).sum(dim=(0, 1))
    return _global_result(x_hat.reshape(n_query, *train.shape[1:]), weights)


def ref_e_mmse(y, train, A, sigma: float, B=None) -> GlobalRef:
    """E-MMSE (Thm. 3.5): ``Σ_{g,k} w_{g,k} T_g x_k`` over the shifts with ``T_g⁻¹v ∈ Im B``.

    ``ℓ_{g,k} = -(T_g⁻¹v - BAx_k)ᵀ (BBᵀ)⁺ (T_g⁻¹v - BAx_k) / (2σ²)``, ``v = B y``.
    """
    a_mat, b_mat = operator_matrices(train, A, B)
    gram, gram_pinv = metric_of_preinverse(b_mat)
    shape = tuple(train.shape[1:])
    train = train.double()
    xs = flat(train)
    v = (flat(y) @ b_mat.T).reshape(y.shape[0], *shape)  # v = B y
    keys = xs @ (b_mat @ a_mat).T  # (N, D): B A x_k
    n_query, n_train = v.shape[0], xs.shape[0]
    h, w = shape[-2:]
    shifts = all_shifts(h, w)
    x_hat = torch.zeros(n_query, xs.shape[1], dtype=torch.float64)
    weights = torch.zeros(n_query, h, w, n_train, dtype=torch.float64)
    for i in range(n_query):
        logits = torch.full((len(shifts), n_train), -torch.inf, dtype=torch.float64)
        for gi, g in enumerate(shifts):
            u = shift(v[i], (-g[0], -g[1])).flatten()  # T_g⁻¹ v
            if not in_image(gram, gram_pinv, u):
                continue
            d = u[None, :] - keys  # row k: T_g⁻¹v - BAx_k
            logits[gi] = -((d @ gram_pinv) * d).sum(dim=1) / (2 * sigma**2)
        if torch.isneginf(logits).all():
            raise ValueError("no shift g with T_g⁻¹ v in Im B")
        wts = log_softmax_weights(logits.flatten()).reshape(len(shifts), n_train)
        weights[i] = wts.reshape(h, w, n_train)
        for gi, g in enumerate(shifts):
            x_hat[i] += wts[gi] @ flat(shift(train, g))
    return _global_result(x_hat.reshape(n_query, *shape), weights)


# ------------------------------------------------------------------------- LE-MMSE


@dataclass
class _Location:
    """Per-location quantities of ``Q_n = Π_n B``."""

    gram: torch.Tensor  # Q_n Q_nᵀ (P, P)
    gram_pinv: torch.Tensor  # (Q_n Q_nᵀ)⁺
    rank: int
    log_pdet: float
    keys: torch.Tensor  # (N, P): Q_n A x_k


def ref_le_mmse(
    y, train, A, sigma: float, p: int, B=None, *, include_pdet: bool = True
) -> LocalRef:
    """LE-MMSE (Thm. 3.8, Prop. B.5), pixel by pixel from the definition.

    For output pixel ``m``: ``u = Π_m v``, ``v = B y``; among the locations ``n`` with
    ``u ∈ Im Q_n`` keep those of minimal ``rank(Q_nQ_nᵀ)``; log-weights
    ``ℓ_{n,k} = -(u - Q_nAx_k)ᵀ (Q_nQ_nᵀ)⁺ (u - Q_nAx_k) / (2σ²) - ½ log pdet(Q_nQ_nᵀ)``;
    output ``Σ w_{n,k} x_k[:, n]``. ``include_pdet=False`` drops the pdet term from the
    weights (a deliberately wrong variant, for the test that shows the term matters); the
    log-density always includes it.
    """
    a_mat, b_mat = operator_matrices(train, A, B)
    shape = tuple(train.shape[1:])
    c, h, w = shape
    train = train.double()
    xs = flat(train)
    n_query, n_train = y.shape[0], xs.shape[0]
    v = flat(y) @ b_mat.T  # (n, D): v = B y
    ax = xs @ a_mat.T  # (N, M): A x_k
    pixels = all_shifts(h, w)  # locations n = (i, j), row-major

    patches = {n: patch_matrix(shape, n, p) for n in pixels}  # Π_n
    locations = []  # in the order of ``pixels``
    for n in pixels:
        q = patches[n] @ b_mat  # Q_n (P, M)
        gram = q @ q.T
        rank = psd_rank(gram)
        lam = torch.linalg.eigvalsh(gram)
        n_kept = int((lam > gram.shape[0] * EPS64 * lam.max()).sum()) if lam.max() > 0 else 0
        assert n_kept == rank, "matrix_rank and the pdet cut disagree"
        locations.append(_Location(gram, psd_pinv(gram), rank, psd_log_pdet(gram), ax @ q.T))
    # The same quantities stacked over the locations, index l = i·W + j:
    eye = torch.eye(c * p * p, dtype=torch.float64)
    off_image = torch.stack([eye - loc.gram @ loc.gram_pinv for loc in locations])  # I - GG⁺
    gram_pinv = torch.stack([loc.gram_pinv for loc in locations])  # (L, P, P)
    rank = torch.tensor([loc.rank for loc in locations])  # (L,)
    log_pdet = torch.tensor([loc.log_pdet for loc in locations], dtype=torch.float64)
    keys = torch.stack([loc.keys for loc in locations])  # (L, N, P): Q_n A x_k
    centres = torch.stack([train[:, :, n[0], n[1]] for n in pixels])  # (L, N, C): x_k[:, n]

    log_gauss = 0.5 * math.log(2 * math.pi * sigma**2)
    x_hat = torch.zeros(n_query, c, h, w, dtype=torch.float64)
    log_density = torch.zeros(n_query, h, w, dtype=torch.float64)
    ranks = torch.zeros(n_query, h, w, dtype=torch.long)
    weights = torch.zeros(n_query, h, w, h * w, n_train, dtype=torch.float64)
    for i in range(n_query):
        for m in pixels:
            u = patches[m] @ v[i]
            # support test u ∈ Im Q_n for every n at once (u = 0 passes everywhere)
            resid = torch.linalg.vector_norm(off_image @ u, dim=1)
            admissible = resid <= SUPPORT_RTOL * torch.linalg.vector_norm(u)
            if not admissible.any():
                raise ValueError(f"query patch at {m} lies in no Im Q_n")
            r = int(rank[admissible].min())
            contributing = admissible & (rank == r)  # Prop. B.5: minimal-rank stratum
            d = u - keys[contributing]  # (L', N, P)
            quad = ((d @ gram_pinv[contributing]) * d).sum(dim=2)
            ell = -quad / (2 * sigma**2)
            half_log_pdet = 0.5 * log_pdet[contributing][:, None]
            logits = ell - half_log_pdet if include_pdet else ell
            wts = log_softmax_weights(logits.flatten()).reshape(logits.shape)
            weights[i, m[0], m[1], contributing] = wts
            x_hat[i, :, m[0], m[1]] = torch.einsum("lk,lkc->c", wts, centres[contributing])
            dens = ell - half_log_pdet - r * log_gauss  # log N(u; Q_nAx_k, σ²Q_nQ_nᵀ)
            log_density[i, m[0], m[1]] = logsumexp(dens.flatten()) - math.log(n_train * h * w)
            ranks[i, m[0], m[1]] = r
    weights = weights.reshape(n_query, h, w, h, w, n_train)
    return LocalRef(x_hat, log_density, ranks, weights)


# -------------------------------------------------------------- derived diagnostics


def top_terms(weights: torch.Tensor, top_k: int):
    """Top-k of a weight table ``(..., H, W, N)`` over its last three axes.

    Returns ``(values, image, location)`` with shapes ``(..., top_k)``, ``(..., top_k)``
    and ``(..., top_k, 2)``, values descending.
    """
    h, w, n_train = weights.shape[-3:]
    flat_w = weights.reshape(*weights.shape[:-3], -1)
    values, idx = flat_w.sort(dim=-1, descending=True)
    values, idx = values[..., :top_k], idx[..., :top_k]
    image = idx % n_train
    loc = idx // n_train
    location = torch.stack([loc // w, loc % w], dim=-1)
    return values, image, location


def mass_count(weights: torch.Tensor, q: float) -> torch.Tensor:
    """Smallest number of terms whose weights sum to ``>= q`` (exact, by sorting)."""
    flat_w = weights.reshape(*weights.shape[:-3], -1)
    cum = flat_w.sort(dim=-1, descending=True).values.cumsum(dim=-1)
    return (cum < q * (1 - 1e-12)).sum(dim=-1) + 1
