"""Global closed-form estimators: MMSE, data-augmented MMSE and E-MMSE (paper Sec. 2-3).

All are softmax-weighted averages of training images (or of their translates) with
log-weights ``ℓ = -quadratic / (2σ²)`` (THEORY.md). They are cheap next to the LE-MMSE,
so their logits are computed in float64 whatever ``dtype``; ``dtype`` sets the output.
σ is accepted in ``[4 max(R, 1) / sqrt(f.max), 1 / (4 sqrt(f.tiny))]`` for
``f = torch.finfo(float64)``, i.e. ``[3.0e-154 max(R, 1), 1.7e153]``, with ``R²`` the largest
quadratic form (checked block by block before the division by ``2σ²``, so that no
log-weight overflows; :mod:`lemmse_core.checks`).

- :func:`mmse`: Prop. 2.1 / Remark 2.2, ``ℓ_k = -‖P_B (y - A x_k)‖² / (2σ²)``.
- :func:`augmented_mmse`: Def. 3.4, the MMSE over ``{T_g x_k}``.
- :func:`e_mmse`: Thm. 3.5, ``ℓ_{g,k} = -(T_g⁻¹v - BAx_k)ᵀ (BBᵀ)⁺ (T_g⁻¹v - BAx_k) / (2σ²)``
  over the shifts with ``T_g⁻¹v ∈ Im B``.

Rank cuts: ``P_B`` and ``(BBᵀ)⁺`` keep the singular values of ``B`` above
``max(M, D) · eps(float64)`` times the largest (the default of ``torch.linalg.pinv``; per
channel ``H W eps`` for circulant ``B``). Support test ``T_g⁻¹v ∈ Im B`` of the E-MMSE:
none for ``B = I`` or a circulant ``B`` (``Im B`` is shift-invariant), an exact pattern test
(exact zeros) for a diagonal ``B``; for a general ``B`` the distance ``‖(I - UUᵀ) u‖`` to the
left singular vectors ``U`` of ``B`` is compared with the bound on its rounding,
:func:`~lemmse_core.operators.image_rounding` (dimension ``max(M, D)`` as in the rank cut,
preimage ``‖S⁻¹Uᵀu‖``, data rounding ``eps · sqrt(D) · max|v|``), not a fixed fraction of
``‖u‖``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .checks import (
    check_bool,
    check_chunk_size,
    check_dtype,
    check_problem,
    check_quadratic,
    check_sigma,
)
from .operators import LinearMap, _all_shifts, _correlate
from .streaming import StreamingSoftmax

_BUDGET = 256 * 2**20  # bytes of float64 temporaries per block


@dataclass
class GlobalDiagnostics:
    """Weights of the training images, from the same pass as the estimate.

    ``image_weights[i, k]``: total weight of training image ``k`` (summed over shifts) for
    query ``i``; ``effective_images = 1 / Σ_k image_weights²`` (Kish's effective number).
    """

    image_weights: torch.Tensor
    effective_images: torch.Tensor


# --------------------------------------------------------------------------- helpers


def _image_chunks(n_images: int, per_image_bytes: int, chunk_size: int | None) -> Iterator:
    size = chunk_size or max(1, _BUDGET // max(per_image_bytes, 1))
    for k0 in range(0, n_images, size):
        yield k0, min(k0 + size, n_images)


class _ShiftSoftmaxAverage:
    """Streaming ``Σ_{g,k} w_{g,k} T_g x_k`` from blocks of logits ``(n, K, H, W)``."""

    def __init__(self, n: int, train: torch.Tensor):
        self.train = train.double()
        self.state = StreamingSoftmax(n, device=train.device)
        self.acc = torch.zeros((n, *train.shape[1:]), dtype=torch.complex128, device=train.device)
        self.image_mass: list[tuple[torch.Tensor, torch.Tensor]] = []

    def add(self, logits: torch.Tensor, k0: int, k1: int) -> None:
        new, scale = self.state.update(logits.amax(dim=(1, 2, 3)))
        safe = torch.where(torch.isneginf(new), torch.zeros_like(new), new)
        p = torch.exp(logits - safe[:, None, None, None])
        x_hat = torch.fft.fft2(self.train[k0:k1])
        self.acc = self.acc * scale[:, None, None, None] + torch.einsum(
            "nkhw,kchw->nchw", torch.fft.fft2(p), x_hat
        )
        self.state.add(p.sum(dim=(1, 2, 3)))
        self.image_mass.append((p.sum(dim=(2, 3)), new))

    def result(self) -> tuple[torch.Tensor, GlobalDiagnostics]:
        out = torch.fft.ifft2(self.acc).real / self.state.sum[:, None, None, None]
        final = self.state.max
        weights = (
            torch.cat([mass * torch.exp(m - final)[:, None] for mass, m in self.image_mass], dim=1)
            / self.state.sum[:, None]
        )
        return out, GlobalDiagnostics(weights, 1.0 / (weights**2).sum(dim=1))


def _finish(out, diag, dtype, diagnostics):
    out = out.to(dtype)
    return (out, diag) if diagnostics else out


# ------------------------------------------------------------------------------ MMSE


def mmse_logits(y, train, A, sigma, B, chunk_size=None) -> torch.Tensor:
    """The MMSE log-weights ``ℓ_k = -‖P_B (y - A x_k)‖² / (2σ²)`` ``(n, K)`` (float64),
    arguments checked (:func:`mmse`)."""
    proj = B.row_projector(tuple(y.shape[1:]))
    keep = proj or (lambda r: r)
    py = keep(y.double()).flatten(1)
    logits = []
    per_image = 8 * (py.shape[0] + 2 * py.shape[1])  # one row of logits, A x_k and P_B A x_k
    for k0, k1 in _image_chunks(train.shape[0], per_image, chunk_size):
        pax = keep(A.A(train[k0:k1].double())).flatten(1)
        dist = torch.cdist(py, pax).pow(2)
        check_quadratic(dist, sigma)
        logits.append(-dist / (2 * sigma**2))
    return torch.cat(logits, dim=1)


def mmse(
    y: torch.Tensor,
    train: torch.Tensor,
    A,
    sigma: float,
    B: LinearMap | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    chunk_size: int | None = None,
    diagnostics: bool = False,
):
    """Empirical MMSE ``Σ_k w_k x_k`` (Prop. 2.1, Remark 2.2), ``B=None`` meaning ``B = I``.

    Depends on ``B`` only through ``P_B``. With ``diagnostics=True`` returns
    ``(x_hat, GlobalDiagnostics)``. ``sigma``: in ``[3.0e-154 max(R, 1), 1.7e153]``, ``R``
    the largest ``‖P_B (y - A x_k)‖`` (module doc); ``chunk_size``: training images per
    block, a positive int or ``None`` (automatic).
    """
    B = check_problem(y, train, A, B)
    sigma, dtype = check_sigma(sigma), check_dtype(dtype)
    chunk_size, diagnostics = check_chunk_size(chunk_size), check_bool(diagnostics, "diagnostics")
    weights = torch.softmax(mmse_logits(y, train, A, sigma, B, chunk_size), dim=1)
    out = (weights @ train.double().flatten(1)).reshape(y.shape[0], *train.shape[1:])
    diag = GlobalDiagnostics(weights, 1.0 / (weights**2).sum(dim=1))
    return _finish(out, diag, dtype, diagnostics)


# --------------------------------------------------------------- augmented MMSE (Def. 3.4)


def _augmented_logits_fast(y, train_block, A, sigma, norms):
    """Logits over all shifts for ``P_B = I`` by FFT, ``norms`` of
    :meth:`~lemmse_core.operators.LinearMap.shift_norms` giving ``‖A T_g x_k‖²``."""
    x = train_block.double()
    aty_hat = torch.fft.fft2(A.adjoint(y.double()))
    cross = _correlate(aty_hat, torch.fft.fft2(x))
    y2 = y.double().pow(2).sum(dim=(1, 2, 3))[:, None, None, None]
    quad = y2 + norms(x) - 2 * cross
    check_quadratic(quad, sigma)
    return -quad / (2 * sigma**2)


def _augmented_logits_dense(y, train_block, A, sigma, proj):
    """Logits over all shifts, by applying ``A`` and ``P_B`` to every translate."""
    keep = proj or (lambda r: r)
    n, (kc, _, h, w) = y.shape[0], train_block.shape
    shifted = _all_shifts(train_block.double()).reshape(kc * h * w, *train_block.shape[1:])
    pax = keep(A.A(shifted)).flatten(1)
    dist = torch.cdist(keep(y.double()).flatten(1), pax).pow(2)
    check_quadratic(dist, sigma)
    return -(dist / (2 * sigma**2)).reshape(n, kc, h, w)


def augmented_mmse(
    y: torch.Tensor,
    train: torch.Tensor,
    A,
    sigma: float,
    B: LinearMap | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    chunk_size: int | None = None,
    diagnostics: bool = False,
):
    """MMSE over the augmented set ``{T_g x_k}`` (Def. 3.4), ``B=None`` meaning ``B = I``.

    ``ℓ_{g,k} = -‖P_B (y - A T_g x_k)‖² / (2σ²)``; FFT over all shifts when ``P_B = I`` and
    ``A`` gives its norms over the shifts (:meth:`~lemmse_core.operators.LinearMap.shift_norms`:
    the identity, a convolution or a mask), otherwise every translate is measured.
    ``sigma``: in ``[3.0e-154 max(R, 1), 1.7e153]``, ``R`` the largest ``‖P_B (y - A T_g
    x_k)‖`` (module doc); ``chunk_size``: training images per block, or ``None``.
    """
    B = check_problem(y, train, A, B)
    sigma, dtype = check_sigma(sigma), check_dtype(dtype)
    chunk_size, diagnostics = check_chunk_size(chunk_size), check_bool(diagnostics, "diagnostics")
    proj = B.row_projector(tuple(y.shape[1:]))
    norms = A.shift_norms(tuple(train.shape[1:])) if proj is None else None
    fast = norms is not None
    avg = _ShiftSoftmaxAverage(y.shape[0], train)
    d = train[0].numel()
    per_image = 16 * d * (y.shape[0] + (1 if fast else d))
    for k0, k1 in _image_chunks(train.shape[0], per_image, chunk_size):
        if fast:
            logits = _augmented_logits_fast(y, train[k0:k1], A, sigma, norms)
        else:
            logits = _augmented_logits_dense(y, train[k0:k1], A, sigma, proj)
        avg.add(logits, k0, k1)
    out, diag = avg.result()
    return _finish(out, diag, dtype, diagnostics)


# -------------------------------------------------------------------- E-MMSE (Thm. 3.5)


def e_mmse_average(y, train, A, sigma, B, chunk_size=None) -> _ShiftSoftmaxAverage:
    """The streaming E-MMSE average (Thm. 3.5) over the training images, arguments
    checked (:func:`e_mmse`); its state gives the log-normaliser."""
    metric = B.shift_metric(tuple(y.shape[1:]), y.device)  # (BBᵀ)⁺ and the support test
    q = metric.prepare(B.A(y.double()))
    avg = _ShiftSoftmaxAverage(y.shape[0], train)
    per_image = 32 * train[0].numel() * (y.shape[0] + 1)
    for k0, k1 in _image_chunks(train.shape[0], per_image, chunk_size):
        z = B.A(A.A(train[k0:k1].double()))
        quad = metric.quadratic(q, z)
        check_quadratic(quad, sigma, excluded=True)  # inf: shifts off the support
        avg.add(-quad / (2 * sigma**2), k0, k1)
    return avg


def e_mmse(
    y: torch.Tensor,
    train: torch.Tensor,
    A,
    sigma: float,
    B: LinearMap | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    chunk_size: int | None = None,
    diagnostics: bool = False,
):
    """Translation-equivariant MMSE (Thm. 3.5), ``B=None`` meaning ``B = I``.

    ``f(v) = Σ_{g,k} w_{g,k} T_g x_k`` with ``w_{g,k} ∝ N(T_g⁻¹v; BAx_k, σ² BBᵀ)`` on the
    shifts with ``T_g⁻¹v ∈ Im B``; for ``B = I`` all shifts by FFT cross-correlation.
    ``sigma``: in ``[3.0e-154 max(R, 1), 1.7e153]``, ``R²`` the largest quadratic form
    (module doc); ``chunk_size``: training images per block, or ``None``.
    """
    B = check_problem(y, train, A, B)
    sigma, dtype = check_sigma(sigma), check_dtype(dtype)
    chunk_size, diagnostics = check_chunk_size(chunk_size), check_bool(diagnostics, "diagnostics")
    out, diag = e_mmse_average(y, train, A, sigma, B, chunk_size).result()
    return _finish(out, diag, dtype, diagnostics)
