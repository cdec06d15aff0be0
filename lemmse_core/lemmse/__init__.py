"""The LE-MMSE: the MMSE over local, translation-equivariant maps (Thm. 3.8, Prop. B.5).

``f(v)[m] = φ*(Π_m v)``, ``φ*(u) = Σ_{n,k} w_{n,k}(u) x_k[n]`` with
``w_{n,k}(u) ∝ N(u; Q_n A x_k, σ² Q_n Q_nᵀ)`` and ``Q_n = Π_n B`` (THEORY.md).

Locations ``n`` sharing the patch Gram matrix ``G_n = Q_n Q_nᵀ`` form a *class*: one class
for ``B = I`` or a circulant ``B``, one per mask pattern for a diagonal ``B``, one per
residue modulo the period for super-resolution, one per location otherwise. Per class,
``G = U Λ Uᵀ`` keeps the eigenvalues above ``P · eps(float64) · λ_max`` (the default cut
of ``torch.linalg.pinv``), and whitening ``W = Λ^{-1/2} Uᵀ`` turns the log-weight into

``ℓ_{n,k}(u) = -‖W u - W Π_n B A x_k‖² / (2σ²) - ½ log pdet G``,

a GEMM between whitened queries and precomputed keys plus a streaming softmax. Rank
stratification (Prop. B.5): a query ``u`` only uses the classes with ``u ∈ Im G`` of the
smallest rank among those. Membership is exact where the structure of ``B`` gives the image
(:meth:`LinearMap.image_support`: identity, diagonal ``B``, e.g. a 0/1 mask): ``u`` must
vanish exactly where ``Q_n`` does, with no tolerance. Otherwise (super-resolution, general
``B``) the distance ``‖(I - UUᵀ) u‖`` to the image, ``U`` the left singular vectors of
``Q_n``, is compared with the bound on its rounding
(:func:`~lemmse_core.operators.image_rounding`): ``8 (eps · P · (s_1 ‖S⁻¹Uᵀu‖ + ‖u‖) +
eps(v) · sqrt(P) · max|v|)``, which follows the preimage of ``u`` rather than a fixed
fraction of ``‖u‖`` (``support_rtol`` adds a relative slack; default 0). One class (``B = I``,
circulant ``B``) needs no test.

Keys are whitened in float64 and stored in ``dtype``. Each class is split into *groups* of
at most ``group_size`` nearby keys (recursive bisection at the median of the principal
direction); each group is centred on its own mean before the dot products (queries shifted
alike), so a query's heavy terms are computed from small vectors, where rounding is
smallest. Per group, its total count ``C_g`` and the box of its keys in the principal
axes of the class bound its weight for any query ``u``: ``log C_g - d²(u, box) / (2σ²)
- ½ log pdet G``. With ``rtol > 0`` the groups whose bounds sum to at most ``rtol`` times
the weight of the query's nearest group (by mean) are skipped (certified pruning): the
skipped weight is at most ``rtol`` of the total, and the output error at most ``rtol``
times the range of the pixel values (the exact bound is returned on request).

Per group and block of queries the estimate is one GEMM (the key bias, log counts and a
per-query shift are folded into three extra dimensions), an in-place ``exp`` and a GEMM with
the ``C + 1`` columns ``[x_k[n], 1]``: the cost of the values does not grow with the patch
dimension. The shift is the largest term of the query's nearest group, found first and
in float64 (it holds the heaviest terms, whose rounding matters most at small σ); a group
with a term above the shift by more than the float range is redone at its own maximum.
Below 48 dimensions PyTorch's fused CPU attention is faster and is used per group instead.
"""

from __future__ import annotations

import torch

from ..checks import (
    check_bool,
    check_dtype,
    check_int,
    check_lemmse_options,
    check_lemmse_sigma,
    check_measurement,
    check_real,
    check_setup,
    check_sigma,
    measurement_norm,
)
from ..operators import LinearMap
from ..patches import check_patch_size, extract_patches
from .diagnostics import Diagnostics, PatchDiagnostics
from .engine import QueryEngine, check_kernel
from .keys import KeyStore, _query_rounding

__all__ = ["LEMMSE", "PatchDiagnostics", "le_mmse", "smoothed_le_mmse"]


class LEMMSE:
    """LE-MMSE estimator for one ``(train, A, B, patch_size)``, reusable across ``y`` and σ.

    Precomputes the location classes, whitening and keys once; ``__call__(y, sigma)``
    returns the estimate ``(n, C, H, W)``. ``B=None`` means ``B = I`` (physics-agnostic).
    ``group_size``: keys per group (the unit of centring and of pruning); ``kernel``:
    ``"fused"`` (PyTorch's CPU flash attention), ``"gemm"`` (GEMM + exp + GEMM, any
    device) or ``"auto"`` (fused on the CPU for patch ranks below 48).

    ``support_rtol``: relative slack of the membership test ``u ∈ Im Q_n`` of the rank
    stratification (Prop. B.5, module doc). The default 0 is exact: exact zeros for a
    structured ``B`` (mask), the rounding bound alone otherwise. A positive value also
    accepts a query whose distance to the image is at most ``support_rtol ‖u‖`` (for a
    mask: whose entries off the pattern have at most that norm); 1e-6 reproduces the
    former fixed tolerance, 1e-4 that of the paper's code. It does not matter with one
    class (``B = I``, circulant ``B``).

    A façade over three parts: the :class:`~lemmse_core.lemmse.keys.KeyStore` (classes and
    keys, built here), the :class:`~lemmse_core.lemmse.engine.QueryEngine` (the estimate)
    and the :class:`~lemmse_core.lemmse.diagnostics.Diagnostics`.
    """

    def __init__(
        self,
        train: torch.Tensor,
        A,
        patch_size: int,
        B: LinearMap | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        support_rtol: float = 0.0,
        group_size: int = 4096,
        kernel: str = "auto",
        progress: bool = False,
    ):
        self.B, self.y_shape = check_setup(train, A, B)
        self.A, self.train = A, train
        self.shape = tuple(train.shape[1:])
        self.p = check_patch_size(patch_size, self.shape)
        self.dtype = check_dtype(dtype)
        support_rtol = check_real(support_rtol, "support_rtol", 0, 1, high_open=True)
        group_size = check_int(group_size, "group_size", low=1)
        kernel = check_kernel(kernel)
        progress = check_bool(progress, "progress")
        self._key_norm = measurement_norm(train, A, self.dtype)  # σ range: checks.lemmse_scale
        self.n_train = train.shape[0]
        self.store = KeyStore(
            train, A, self.B, self.y_shape, self.p, self.dtype, group_size, support_rtol, progress
        )
        self.engine = QueryEngine(self.classes, train, self.dtype, kernel, group_size)
        self.diagnostics = Diagnostics(self.engine, self.n_train)

    @property
    def classes(self) -> list:
        """The classes of locations with their keys (:class:`~lemmse_core.lemmse.keys.KeyStore`)."""
        return self.store.classes

    def estimate(
        self,
        v: torch.Tensor,
        sigma: float,
        *,
        rtol: float = 0.0,
        error_bound: bool = False,
        chunk_size: int | None = None,
        diagnostics: bool = False,
        mass: float | None = None,
        top_k: int | None = None,
        progress: bool = False,
    ):
        """LE-MMSE of pre-inverted measurements ``v = B y`` ``(n, C, H, W)``.

        ``rtol`` in ``[0, 1)``: ``rtol > 0`` skips groups of keys holding provably at most
        ``rtol`` of the weight (module doc); ``error_bound=True`` also returns the guaranteed
        bound ``(n, C, H, W)`` on ``|estimate - exact|`` (zero when nothing is skipped;
        rounding aside). ``chunk_size``: keys per block, a positive int or ``None`` (the
        result does not depend on it). Diagnostics use explicit log-weight blocks and the
        exact computation; ``mass`` in ``(0, 1]`` and ``top_k >= 0`` (default 5) need them.

        ``sigma`` is accepted in ``[σ_min, σ_max]`` (:func:`~lemmse_core.checks.sigma_range`,
        ``f = torch.finfo(dtype)``): ``σ_max = 1/(4 sqrt(f.tiny))`` (float32 2.3e18, float64
        1.7e153), ``σ_min = 4 max(R, 1)/sqrt(f.max)`` (float32 ``2.2e-19 max(R, 1)``, float64
        ``3.0e-154 max(R, 1)``), and with diagnostics ``σ >= 4 R sqrt(eps64/ln(1/f.tiny))``
        (float32 ``6.4e-9 R``, float64 ``2.2e-9 R``), where ``R = ‖W‖ max_n ‖Π_n v‖ + 3 max_k
        ‖A x_k‖`` (:func:`~lemmse_core.checks.lemmse_scale`); outside, a ``ValueError``
        states the range.
        """
        rtol, error_bound, chunk_size, diagnostics, mass, top_k, progress = check_lemmse_options(
            rtol, error_bound, chunk_size, diagnostics, mass, top_k, progress
        )
        sigma, u, stratum, active = self.queries(v, sigma, diagnostics)
        n, (c, h, w) = v.shape[0], self.shape

        def image(flat, dtype=self.dtype):
            return flat.reshape(n, h, w, c).permute(0, 3, 1, 2).to(dtype).contiguous()

        if not diagnostics:
            flat, bound, _ = self.engine.run(u, active, sigma, rtol, chunk_size, progress)
            return (image(flat), image(bound, torch.float64)) if error_bound else image(flat)
        flat, diag = self.diagnostics.run(
            u, active, stratum, sigma, (n, h, w), chunk_size, progress, top_k, mass
        )
        return image(flat), diag

    def queries(self, v: torch.Tensor, sigma: float, diagnostics: bool = False):
        """``(sigma, u, stratum, active)``: σ checked (:meth:`estimate`), the query patches
        ``u`` ``(n·H·W, P)`` (float64, row-major pixels) of ``v`` checked, their stratum ranks
        and active classes (Prop. B.5)."""
        v = check_measurement(v, self.train, self.shape, "v", f"B y has shape {self.shape}")
        sigma = check_lemmse_sigma(self, v, sigma, diagnostics)
        n, (_, h, w) = v.shape[0], self.shape
        u = extract_patches(v.double(), self.p).reshape(n * h * w, -1)
        return (sigma, u, *self.store.active(u, _query_rounding(v, self.p)))

    def __call__(self, y: torch.Tensor, sigma: float, **kwargs):
        """LE-MMSE of measurements ``y`` (see :meth:`estimate` for the keywords)."""
        y = check_measurement(y, self.train, self.y_shape)
        return self.estimate(self.B.A(y.double()), sigma, **kwargs)

    def smoothed(
        self,
        v: torch.Tensor,
        sigma: float,
        eps: float,
        samples: int,
        generator: torch.Generator | None = None,
        *,
        chunk_size: int | None = None,
    ) -> torch.Tensor:
        """Smoothed LE-MMSE ``E_z f(v + eps z)`` (Sec. 4.4) of network inputs ``v``, by
        Monte Carlo over ``samples`` draws of ``z`` (one ``v``-shaped draw after the other
        from ``generator``), all estimated in one call with the precomputed keys."""
        eps = check_sigma(eps, "eps")
        samples = check_int(samples, "samples", low=1)
        v = v.double()
        z = [torch.randn(v.shape, generator=generator, dtype=v.dtype) for _ in range(samples)]
        queries = (v[None] + eps * torch.stack(z).to(v.device)).flatten(0, 1)
        out = self.estimate(queries, sigma, chunk_size=chunk_size).double()
        return out.reshape(samples, *v.shape).mean(dim=0).to(self.dtype)


def le_mmse(
    y: torch.Tensor,
    train: torch.Tensor,
    A,
    sigma: float,
    patch_size: int,
    B: LinearMap | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    rtol: float = 0.0,
    chunk_size: int | None = None,
    diagnostics: bool = False,
    mass: float | None = None,
    top_k: int | None = None,
    progress: bool = False,
):
    """LE-MMSE estimate (Thm. 3.8, Prop. B.5) of ``y`` with patches of odd ``patch_size``.

    ``rtol``: certified pruning (see :meth:`LEMMSE.estimate`); ``chunk_size`` keys per
    block (the result does not depend on it); ``diagnostics=True`` returns
    ``(x_hat, PatchDiagnostics)``; ``mass=q`` adds the mass count (a second pass), ``top_k``
    the number of heaviest terms (default 5). The accepted σ range is that of
    :meth:`LEMMSE.estimate`; the options and the data-independent part of the range are
    checked before the engine is built.
    For several ``y`` or σ with the same data, build one :class:`LEMMSE` and call it.
    """
    check_sigma(sigma, dtype=check_dtype(dtype))
    check_lemmse_options(rtol, False, chunk_size, diagnostics, mass, top_k, progress)
    engine = LEMMSE(train, A, patch_size, B, dtype=dtype, progress=progress)
    return engine(
        y,
        sigma,
        rtol=rtol,
        chunk_size=chunk_size,
        diagnostics=diagnostics,
        mass=mass,
        top_k=top_k,
        progress=progress,
    )


def smoothed_le_mmse(
    y: torch.Tensor,
    train: torch.Tensor,
    A,
    sigma: float,
    patch_size: int,
    B: LinearMap | None = None,
    *,
    eps: float,
    samples: int,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    chunk_size: int | None = None,
):
    """Smoothed LE-MMSE ``E_z f(v + eps z)`` (Sec. 4.4) of ``y``, ``v = B y``, by Monte
    Carlo over ``samples`` draws of ``z`` (:meth:`LEMMSE.smoothed`); the arguments before
    ``eps`` are those of :func:`le_mmse`."""
    check_sigma(sigma, dtype=check_dtype(dtype))  # the rest of its range: by estimate
    check_sigma(eps, "eps")
    check_int(samples, "samples", low=1)
    check_lemmse_options(chunk_size=chunk_size)
    engine = LEMMSE(train, A, patch_size, B, dtype=dtype)
    v = engine.B.A(check_measurement(y, train, engine.y_shape).double())
    return engine.smoothed(v, sigma, eps, samples, generator, chunk_size=chunk_size)
