"""Patch extraction ``Π_n`` with circular boundary (paper Sec. 3.4, Def. A.11)."""

import torch
import torch.nn.functional as F

from .checks import _EPS64, check_int


def check_patch_size(patch_size, shape=None, low: int = 1) -> int:
    """Validate an odd patch size ``>= low``, no larger than the image ``shape = (C, H, W)``
    if given."""
    patch_size = check_int(patch_size, "patch_size")  # Python or NumPy int, not bool
    if patch_size < low or patch_size % 2 == 0:
        raise ValueError(f"patch_size must be an odd int >= {low}, got {patch_size}")
    if shape is not None and patch_size > min(shape[-2:]):
        raise ValueError(
            f"patch_size={patch_size} is larger than the image size {shape[-2]}×{shape[-1]}"
        )
    return patch_size


def extract_patches(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """All circular patches of ``x (n, C, H, W)``: ``(n, H·W, C·p²)``, row-major locations.

    Entry ``[i, h·W + w, c·p² + a·p + b]`` is ``x[i, c, h + a - p//2, w + b - p//2]`` (mod size).
    """
    r = patch_size // 2
    padded = F.pad(x, (r, r, r, r), mode="circular") if r else x
    windows = padded.unfold(2, patch_size, 1).unfold(3, patch_size, 1)  # (n, C, H, W, p, p)
    n, c, h, w = x.shape
    return windows.permute(0, 2, 3, 1, 4, 5).reshape(n, h * w, c * patch_size**2)


def patch_at(x: torch.Tensor, patch_size: int, i: int, j: int) -> torch.Tensor:
    """The patch of ``x (n, C, H, W)`` centred at pixel ``(i, j)``: ``(n, C·p²)``."""
    r = patch_size // 2
    h, w = x.shape[-2:]
    rows = torch.arange(i - r, i + r + 1, device=x.device) % h
    cols = torch.arange(j - r, j + r + 1, device=x.device) % w
    return x[:, :, rows][:, :, :, cols].reshape(x.shape[0], -1)


def whitening(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(W, U_r, log pdet)`` of a PSD patch Gram matrix ``G`` ``(P, P)`` (in float64):
    ``G = U Λ Uᵀ`` keeps the eigenvalues above ``P · eps(float64) · λ_max`` (the default cut
    of ``torch.linalg.pinv``; ``r`` of them, the rank), ``W = Λ^{-1/2} U_rᵀ`` ``(r, P)``
    with ``Wᵀ W = G⁺``, and ``log pdet G = Σ log λ`` over the kept eigenvalues."""
    lam, vec = torch.linalg.eigh(gram.double())
    top = max(lam.max().item(), 0.0)
    keep = lam > top * gram.shape[0] * _EPS64 if top > 0 else torch.zeros_like(lam).bool()
    lam, vec = lam[keep], vec[:, keep]
    return (vec / lam.sqrt()).T.contiguous(), vec, float(lam.log().sum())
