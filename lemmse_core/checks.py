"""Input validation shared by the estimators: clear errors naming the argument."""

import math

import torch

from .operators import ForwardOperator, LinearMap, preinverse


def check_sigma(sigma, name: str = "sigma") -> float:
    """A finite noise level > 0."""
    if isinstance(sigma, torch.Tensor):
        if sigma.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(sigma.shape)}")
        sigma = sigma.item()
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(sigma).__name__}")
    if not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {sigma!r}")
    return float(sigma)


def check_images(x, name: str) -> torch.Tensor:
    """A non-empty, finite, floating tensor ``(n, C, H, W)``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (n, C, H, W), got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{name} must have shape (n, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty: it must hold at least one image")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def check_setup(train, A, B):
    """Validate ``train``, ``A`` and ``B``; return ``(B, y_shape)``, ``B=None`` meaning I."""
    train = check_images(train, "train")
    if not isinstance(A, ForwardOperator):
        raise TypeError(f"A must be a ForwardOperator, got {type(A).__name__}")
    image_shape = tuple(train.shape[1:])
    try:
        y_shape = tuple(A.A(train[:1].double()).shape[1:])
    except ValueError as err:
        raise ValueError(f"train images {image_shape} do not fit the operator A: {err}") from err
    if B is None:
        B = preinverse(A, "identity")
    if not isinstance(B, LinearMap):
        raise TypeError(f"B must be a LinearMap (see operators.preinverse), got {type(B)}")
    try:
        b_shape = tuple(B.A(torch.zeros((1, *y_shape), dtype=torch.float64)).shape[1:])
    except ValueError as err:
        raise ValueError(f"B does not accept measurements of shape {y_shape}: {err}") from err
    if b_shape != image_shape:
        raise ValueError(
            f"B maps measurements {y_shape} to {b_shape}, expected the image shape {image_shape}"
        )
    return B, y_shape


def check_measurement(y, train, y_shape) -> torch.Tensor:
    """``y`` holds finite measurements of shape ``y_shape`` on ``train``'s device."""
    y = check_images(y, "y")
    if y.device != train.device:
        raise ValueError(f"y is on {y.device} but train is on {train.device}: mixed devices")
    if tuple(y.shape[1:]) != tuple(y_shape):
        raise ValueError(
            f"y has image shape {tuple(y.shape[1:])}, but A maps the train images "
            f"{tuple(train.shape[1:])} to {tuple(y_shape)}"
        )
    return y


def check_problem(y, train, A, B):
    """Validate a whole estimation problem; return ``B`` (identity when ``None``)."""
    B, y_shape = check_setup(train, A, B)
    check_measurement(y, train, y_shape)
    return B


def check_dtype(dtype) -> torch.dtype:
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    return dtype
