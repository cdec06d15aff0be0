"""Slow, exact definitions of the estimators: the brute-force float64 references.

Each estimator of the paper transcribed from its definition with dense matrices, tiny
problems only; the tests check the fast engines (:mod:`lemmse_core.estimators`,
:mod:`lemmse_core.lemmse`) against them and the chapters use them as the direct
implementation. Nothing here comes from those engines; the operators are only used for
their dense matrices (``.matrix``) and shapes.

Conventions (THEORY.md, "Notation"):

- images ``(C, H, W)`` are flattened row-major over ``(C, H, W)``;
- shifts ``(T_g x)[n] = x[n - g]`` = ``torch.roll(x, shifts=g, dims=(-2, -1))``;
- patches ``(Π_n x)[c, o] = x[c, n + o]``, ``o ∈ {-p//2 … p//2}²``, circular;
- for a PSD matrix ``G``: ``G⁺ = pinv(G, hermitian=True)``; ``rank`` and ``pdet`` count and
  multiply the eigenvalues above ``size · eps · λ_max`` (the cut of ``torch.linalg``);
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
BLOCK = 2**22  # entries of the largest difference tensor of one LE-MMSE block

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


def softmax_weights(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Normalised weights ``exp(ℓ_i - logsumexp ℓ)`` along ``dim`` (``-inf``: weight 0)."""
    logits = logits.double()
    w = torch.exp(logits - logits.amax(dim=dim, keepdim=True))
    return w / w.sum(dim=dim, keepdim=True)


def logsumexp(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``log Σ_i exp ℓ_i`` along ``dim``, by subtracting the max."""
    top = logits.amax(dim=dim, keepdim=True)
    return (top + torch.log(torch.exp(logits - top).sum(dim=dim, keepdim=True))).squeeze(dim)


def psd_pinv(g: torch.Tensor) -> torch.Tensor:
    """``G⁺`` of a PSD matrix (``torch.linalg.pinv``, default cut)."""
    return torch.linalg.pinv(g, hermitian=True)


def psd_eigenvalues(g: torch.Tensor) -> torch.Tensor:
    """The eigenvalues of a PSD ``G`` above ``size · eps64 · λ_max`` (none if ``G = 0``)."""
    lam = torch.linalg.eigvalsh(g)
    return lam[lam > g.shape[0] * EPS64 * lam.max().clamp(min=0)]


def psd_rank(g: torch.Tensor) -> int:
    """``rank G``: the number of eigenvalues above the cut."""
    return psd_eigenvalues(g).numel()


def psd_log_pdet(g: torch.Tensor) -> float:
    """``log pdet G`` (Def. A.1): eigenvalues above the cut (empty product = 1)."""
    return float(torch.log(psd_eigenvalues(g)).sum())


def in_image(off_image: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Support test ``u ∈ Im G``, ``‖(I - G G⁺) u‖ <= 1e-6 ‖u‖``, from ``off_image = I - GG⁺``.

    Batched: ``off_image (..., P, P)`` and ``u (..., P)`` broadcast.
    """
    resid = torch.linalg.vector_norm((off_image @ u[..., None])[..., 0], dim=-1)
    return resid <= SUPPORT_RTOL * torch.linalg.vector_norm(u, dim=-1)


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
        w = softmax_weights(logits)
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
        wts = softmax_weights(logits.flatten()).reshape(len(shifts), n_train)
        weights[i] = wts.reshape(h, w, n_train)
        x_hat[i] = (wts[..., None] * values).sum(dim=(0, 1))
    return _global_result(x_hat.reshape(n_query, *train.shape[1:]), weights)


def ref_e_mmse(y, train, A, sigma: float, B=None) -> GlobalRef:
    """E-MMSE (Thm. 3.5): ``Σ_{g,k} w_{g,k} T_g x_k`` over the shifts with ``T_g⁻¹v ∈ Im B``.

    ``ℓ_{g,k} = -(T_g⁻¹v - BAx_k)ᵀ (BBᵀ)⁺ (T_g⁻¹v - BAx_k) / (2σ²)``, ``v = B y``.
    """
    a_mat, b_mat = operator_matrices(train, A, B)
    gram, gram_pinv = metric_of_preinverse(b_mat)
    off_image = torch.eye(len(gram), dtype=torch.float64) - gram @ gram_pinv
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
            if not in_image(off_image, u):
                continue
            d = u[None, :] - keys  # row k: T_g⁻¹v - BAx_k
            logits[gi] = -((d @ gram_pinv) * d).sum(dim=1) / (2 * sigma**2)
        if torch.isneginf(logits).all():
            raise ValueError("no shift g with T_g⁻¹ v in Im B")
        wts = softmax_weights(logits.flatten()).reshape(len(shifts), n_train)
        weights[i] = wts.reshape(h, w, n_train)
        for gi, g in enumerate(shifts):
            x_hat[i] += wts[gi] @ flat(shift(train, g))
    return _global_result(x_hat.reshape(n_query, *shape), weights)


# ------------------------------------------------------------------------- LE-MMSE


@dataclass
class Locations:
    """``Q_n = Π_n B`` and the training terms at every location ``n``, stacked over the
    locations (row-major, index ``l = i·W + j``)."""

    q: torch.Tensor  # Q_n (L, P, M)
    gram_pinv: torch.Tensor  # (Q_n Q_nᵀ)⁺ (L, P, P)
    off_image: torch.Tensor  # I - (Q_n Q_nᵀ)(Q_n Q_nᵀ)⁺ (L, P, P)
    rank: torch.Tensor  # rank(Q_n Q_nᵀ) (L,)
    log_pdet: torch.Tensor  # log pdet(Q_n Q_nᵀ) (L,)
    keys: torch.Tensor  # Q_n A x_k (L, N, P)
    centres: torch.Tensor  # x_k[:, n] (L, N, C)


def locations(train, A, p: int, B=None) -> Locations:
    """The :class:`Locations` of the LE-MMSE of ``train`` for ``A``, ``B`` and ``p × p``
    patches (Thm. 3.8)."""
    a_mat, b_mat = operator_matrices(train, A, B)
    shape = tuple(train.shape[1:])
    patches = torch.stack([patch_matrix(shape, n, p) for n in all_shifts(*shape[1:])])
    q = patches @ b_mat
    gram = q @ q.transpose(1, 2)
    gram_pinv = torch.stack([psd_pinv(g) for g in gram])
    eye = torch.eye(gram.shape[1], dtype=torch.float64)
    return Locations(
        q=q,
        gram_pinv=gram_pinv,
        off_image=eye - gram @ gram_pinv,
        rank=torch.tensor([psd_rank(g) for g in gram]),
        log_pdet=torch.tensor([psd_log_pdet(g) for g in gram], dtype=torch.float64),
        keys=torch.einsum("lpm,km->lkp", q, flat(train) @ a_mat.T),
        centres=train.double().flatten(2).permute(2, 0, 1),
    )


def le_mmse_log_terms(u: torch.Tensor, loc: Locations, sigma: float):
    """Degenerate Gaussian log-densities ``log N(u; Q_nAx_k, σ²Q_nQ_nᵀ)`` (Def. A.1) of the
    query patches ``u (Q, P)``: ``(Q, L, N)``, ``-inf`` outside the stratum ``S(u)``
    (Prop. B.5); and the stratum rank ``r(u)`` ``(Q,)``."""
    admissible = in_image(loc.off_image, u[:, None, :])  # u ∈ Im Q_n, (Q, L)
    if not admissible.any(dim=1).all():
        raise ValueError("a query patch lies in no Im Q_n")
    rank = torch.where(admissible, loc.rank, loc.rank.max() + 1).amin(dim=1)
    stratum = admissible & (loc.rank == rank[:, None])
    d = u[:, None, None, :] - loc.keys  # (Q, L, N, P)
    quad = torch.einsum("qlkp,lpr,qlkr->qlk", d, loc.gram_pinv, d)
    log_gauss = 0.5 * math.log(2 * math.pi * sigma**2)  # of one dimension
    log_norm = 0.5 * loc.log_pdet[:, None] + rank[:, None, None].double() * log_gauss
    terms = -quad / (2 * sigma**2) - log_norm
    return terms.masked_fill(~stratum[:, :, None], -math.inf), rank


def _logits(terms: torch.Tensor, loc: Locations, include_pdet: bool) -> torch.Tensor:
    """Log-weights up to a constant; without ``-½ log pdet`` if ``include_pdet`` is False."""
    return terms if include_pdet else terms + 0.5 * loc.log_pdet[:, None]


def le_mmse_log_weights(u, loc: Locations, sigma: float, *, include_pdet: bool = True):
    """Normalised log-weights ``log w_{n,k}(u)`` ``(Q, L, N)`` of (7) on the stratum
    (Thm. 3.8, Prop. B.5); ``include_pdet=False`` drops the pdet term (wrong on purpose)."""
    logits = _logits(le_mmse_log_terms(u, loc, sigma)[0], loc, include_pdet)
    return logits - logsumexp(logits.flatten(1))[:, None, None]


def ref_le_mmse(
    y, train, A, sigma: float, p: int, B=None, *, include_pdet: bool = True
) -> LocalRef:
    """LE-MMSE (Thm. 3.8, Prop. B.5) from the definition, every output pixel ``m`` apart.

    For output pixel ``m``: ``u = Π_m v``, ``v = B y``; the weights of
    :func:`le_mmse_log_weights` and the output ``Σ w_{n,k} x_k[:, n]``.
    ``include_pdet=False`` drops the pdet term from the weights (a deliberately wrong
    variant); the log-density always includes it.
    """
    loc = locations(train, A, p, B)
    n_query, (c, h, w), n_train = y.shape[0], train.shape[1:], train.shape[0]
    u = torch.einsum("lpm,qm->qlp", loc.q, flat(y)).flatten(0, 1)  # Π_m B y
    parts = []
    for chunk in u.split(max(1, BLOCK // loc.keys.numel())):
        terms, rank = le_mmse_log_terms(chunk, loc, sigma)
        wts = softmax_weights(_logits(terms, loc, include_pdet).flatten(1))
        x_hat = wts @ loc.centres.flatten(0, 1)  # Σ w_{n,k} x_k[:, n]
        log_density = logsumexp(terms.flatten(1)) - math.log(n_train * h * w)
        parts.append((x_hat, log_density, rank, wts))
    x_hat, log_density, rank, wts = (torch.cat(part) for part in zip(*parts, strict=True))
    return LocalRef(
        x_hat.reshape(n_query, h, w, c).permute(0, 3, 1, 2),
        log_density.reshape(n_query, h, w),
        rank.reshape(n_query, h, w),
        wts.reshape(n_query, h, w, h, w, n_train),
    )


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
