"""lemmse_core: exact closed-form estimators for CNN inverse-problem solvers.

Companion package of *An analytic theory of convolutional neural network inverse
problems solvers* (Nguyen, Do, Pauwels, Weiss, 2026).
"""

from . import data, metrics, operators
from .estimators import augmented_mmse, e_mmse, mmse
from .explain import explain
from .lemmse import LEMMSE, le_mmse, smoothed_le_mmse
from .operators import Blur, Denoising, Downsampling, Inpainting, preinverse

__version__ = "0.1.0"

__all__ = [
    "LEMMSE",
    "Blur",
    "Denoising",
    "Downsampling",
    "Inpainting",
    "augmented_mmse",
    "data",
    "e_mmse",
    "explain",
    "le_mmse",
    "metrics",
    "mmse",
    "operators",
    "preinverse",
    "smoothed_le_mmse",
]
