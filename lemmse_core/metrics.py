"""Image-quality metrics on batches ``(n, C, H, W)`` (paper App. C: PSNR with peak 1)."""

import torch


def _check_pair(x: torch.Tensor, ref: torch.Tensor) -> None:
    if x.shape != ref.shape:
        raise ValueError(
            f"x and ref must have the same shape, got {tuple(x.shape)} and {tuple(ref.shape)}"
        )
    if x.ndim < 2:
        raise ValueError(f"x must be a batch (n, ...) of images, got shape {tuple(x.shape)}")


def mse(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared error, shape ``(n,)``."""
    _check_pair(x, ref)
    return (x - ref).pow(2).flatten(1).mean(dim=1)


def psnr(x: torch.Tensor, ref: torch.Tensor, peak: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB, ``10 log10(peak² / mse)``, shape ``(n,)`` (``inf`` if equal)."""
    if not peak > 0:
        raise ValueError(f"peak must be > 0, got {peak!r}")
    return 10 * torch.log10(peak**2 / mse(x, ref))
