"""Signal discrimination and noise robustness of a pre-inverse (paper Sec. 3.5).

The LE-MMSE weight of training patch ``Q_n A x_k`` for the query ``u = Q_m y`` is a Gaussian
with covariance ``σ² Q_n Q_nᵀ``, ``Q_n = Π_n B``. For a query at the same location,
``u - Q_n A x_k = Q_n z`` with ``z = A (x - x_k) + σ e``, so the squared Mahalanobis distance is

``d = zᵀ Q_nᵀ (Q_n Q_nᵀ)⁺ Q_n z = ‖P_n z‖²``,  ``P_n = Q_n⁺ Q_n`` (a projector of rank ``r_n``),

and ``E d = ‖P_n A (x - x_k)‖² + σ² r_n``: a *signal* term (how far apart the pre-inverse
keeps two different clean images, seen through patch ``n``) plus a *noise* term (``σ²``
times the rank of ``Q_n``). :func:`discrimination` computes both terms for all pairs of
query and training images and all (or some) locations; :meth:`Discrimination.ratio` is the
discrimination-to-noise ratio, the mean signal term over the mean noise term.

The signal term is computed as ``‖W_n Π_n B A (x - x_k)‖²`` with ``W_nᵀ W_n = (Q_n Q_nᵀ)⁺``
(eigen-whitening of the patch Gram matrix, eigenvalues cut at ``P · eps(float64) · λ_max``
as in :mod:`lemmse_core.lemmse`), from the dense ``B Bᵀ`` (small images only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .checks import check_images, check_setup, check_sigma
from .operators import LinearMap
from .patches import check_patch_size, extract_patches, whitening


@dataclass
class Discrimination:
    """Signal and noise terms of ``E d`` (module docstring) for one ``(A, B, p)``.

    - ``signal`` ``(n, N, L)`` float64: ``‖P_l A (x_i - x_k)‖²`` for query image ``i``,
      training image ``k`` and location ``locations[l]``.
    - ``rank`` ``(L,)``: ``rank Q_l``; the noise term is ``σ² rank``.
    - ``locations`` ``(L,)``: flat pixel indices ``h · W + w``.
    """

    signal: torch.Tensor
    rank: torch.Tensor
    locations: torch.Tensor

    def noise(self, sigma: float) -> torch.Tensor:
        """The noise term ``σ² rank Q_l`` per location, ``(L,)``."""
        return check_sigma(sigma) ** 2 * self.rank.double()

    def expected_distance(self, sigma: float) -> torch.Tensor:
        """``E d = signal + σ² rank``, ``(n, N, L)``."""
        return self.signal + self.noise(sigma)

    def ratio(self, sigma: float) -> float:
        """Discrimination-to-noise ratio: mean signal term / mean noise term ``σ² r``.

        The means run over query images, training images and locations (equivalently, the
        ratio of the two terms of ``E d`` summed over all pairs and locations). It scales as
        ``1 / σ²``; ``ratio(σ) > 1`` means the typical clean difference outweighs the noise.
        """
        noise = self.noise(sigma).mean().item()
        if noise == 0:
            raise ValueError("every Q_n has rank 0: the patches see no measurement")
        return self.signal.mean().item() / noise

    def critical_sigma(self) -> float:
        """The noise level at which :meth:`ratio` equals 1: ``sqrt(mean signal / mean rank)``."""
        return math.sqrt(self.signal.mean().item() / self.rank.double().mean().item())


def _index_patches(shape, patch_size: int) -> torch.Tensor:
    """Flat pixel indices of every patch ``(H·W, P)``, in :func:`extract_patches` order."""
    index = torch.arange(math.prod(shape), dtype=torch.float64).reshape(1, *shape)
    return extract_patches(index, patch_size)[0].round().long()


def patch_grams(
    B: LinearMap, y_shape, patch_size: int, locations: torch.Tensor | None = None
) -> torch.Tensor:
    """Patch Gram matrices ``G_n = Π_n B Bᵀ Π_nᵀ`` ``(L, P, P)`` in float64.

    ``y_shape`` is the measurement shape ``(C', H', W')`` that ``B`` takes; ``B`` is made
    dense (small images only).
    """
    b = B.matrix(y_shape)  # (D, M)
    shape = B.output_shape(tuple(y_shape))
    patch_size = check_patch_size(patch_size, shape)
    bbt = b @ b.T
    index = _index_patches(shape, patch_size)
    if locations is not None:
        index = index[torch.as_tensor(locations, dtype=torch.long)]
    return bbt[index[:, :, None], index[:, None, :]]


def discrimination(
    x: torch.Tensor,
    train: torch.Tensor,
    A,
    patch_size: int,
    B: LinearMap | None = None,
    locations: torch.Tensor | None = None,
) -> Discrimination:
    """Signal terms ``‖P_n A (x_i - x_k)‖²`` and ranks ``r_n`` (module docstring).

    ``x`` ``(n, C, H, W)`` are the query images, ``train`` ``(N, C, H, W)`` the training
    images, ``B=None`` means ``B = I``; ``locations`` (flat indices) default to all pixels.
    Memory: ``n · N · L`` float64 values.
    """
    x = check_images(x, "x")
    B, y_shape = check_setup(train, A, B)
    shape = tuple(train.shape[1:])
    if tuple(x.shape[1:]) != shape:
        raise ValueError(f"x has image shape {tuple(x.shape[1:])}, train has {shape}")
    patch_size = check_patch_size(patch_size, shape)
    h, w = shape[1:]
    if locations is None:
        locations = torch.arange(h * w)
    locations = torch.as_tensor(locations, dtype=torch.long).flatten().cpu()
    if len(locations) == 0 or locations.min() < 0 or locations.max() >= h * w:
        raise ValueError(f"locations must be flat pixel indices in [0, {h * w})")
    grams = patch_grams(B, y_shape, patch_size, locations)
    # Locations whose Grams agree to 1e-9 (relative) share one whitening: one for I or a
    # circulant B, one per mask pattern for a diagonal B. Rounding may split a group in two
    # (harmless) but merges only Grams equal to the rounding.
    scale = grams.abs().max().clamp(min=torch.finfo(torch.float64).tiny)
    labels = torch.round(grams.flatten(1) / scale * 1e9)
    _, inverse = torch.unique(labels, dim=0, return_inverse=True)

    def views(images):  # patches Π_n B A x at the chosen locations, (n, L, P)
        return extract_patches(B.A(A.A(images.double())), patch_size)[:, locations].cpu()

    queries, keys = views(x), views(train)
    signal = torch.zeros(len(x), len(train), len(locations), dtype=torch.float64)
    rank = torch.zeros(len(locations), dtype=torch.long)
    for u in range(int(inverse.max()) + 1):
        cols = torch.nonzero(inverse == u).flatten()
        white, _, _ = whitening(grams[cols[0]])
        rank[cols] = white.shape[0]
        if white.shape[0] == 0:
            continue
        q = queries[:, cols] @ white.T  # (n, L_u, r)
        k = keys[:, cols] @ white.T  # (N, L_u, r)
        cross = torch.einsum("ilr,klr->ikl", q, k)
        sq = q.pow(2).sum(-1)[:, None] + k.pow(2).sum(-1)[None] - 2 * cross
        signal[:, :, cols] = sq.clamp(min=0)
    return Discrimination(signal, rank, locations)
