"""Input validation shared by every public entry point: clear errors naming the argument.

One module, one set of rules, used by the estimators, the LE-MMSE, the operators and the
networks. Errors are ``TypeError`` (wrong kind of value) or ``ValueError`` (wrong value),
and name the argument and what was expected.

Numbers: Python and NumPy numbers (``np.float32``, ``np.int64``, ...) are accepted wherever
numbers are; ``bool`` is never a number. A real number may also be a one-element real
tensor; an integer must be an integer (``2.0`` is not a size). Tensors must be dense
(strided) and hold data (not on the ``meta`` device); images are real floating point.
The checks are O(1) or one pass over a tensor (``isfinite``), with one synchronisation.

**The noise level σ.** Every estimator weighs its terms by ``exp(ℓ)``, ``ℓ = -X / (2σ²)``,
``X`` a squared distance in the estimator's whitened metric, and ``X <= R²`` for a data scale
``R`` (below). With ``f = torch.finfo(dtype)`` for the dtype the log-weights are computed in
(float64 for :func:`~lemmse_core.mmse`, :func:`~lemmse_core.augmented_mmse` and
:func:`~lemmse_core.e_mmse` whatever their output dtype; the LE-MMSE's ``dtype``), σ is
accepted in ``[σ_min, σ_max]`` (:func:`sigma_range`):

- ``σ_max = 1 / (4 sqrt(f.tiny))``: ``1/σ²`` stays a normal float, 16 times above
  ``f.tiny``, and ``σ²``, ``2πσ²`` stay finite. float32: 2.3e18, float64: 1.7e153. (Above,
  float32 LE-MMSE kernels get a subnormal ``1/σ²`` and return NaN.)
- ``σ_min = 4 max(R, 1) / sqrt(f.max)``: ``R²/σ²`` and ``1/σ²`` stay 16 times below
  ``f.max``, so no log-weight overflows. float32: ``2.2e-19 max(R, 1)``, float64:
  ``3.0e-154 max(R, 1)``. The data scale itself must be at most ``sqrt(f.max) / 4``
  (float32: 4.6e18, float64: 3.4e153), else the squared norms overflow whatever σ.
- LE-MMSE diagnostics (``diagnostics=True``) also need ``σ >= 4 R sqrt(eps64 / ln(1/f.tiny))``:
  they subtract float64 offsets of size up to ``R²/(2σ²)`` from the log-weights, and the
  rounding ``eps64 · R²/σ²`` of that difference must stay below ``ln(1/f.tiny)`` (16 times),
  or the largest weight of a pixel underflows to 0 and the pixel is NaN. float32:
  ``6.4e-9 R``, float64: ``2.2e-9 R``.

The data scale ``R``: for the global estimators, ``R² = max X`` over the computed quadratic
forms (:func:`check_quadratic`, checked block by block before the division by ``2σ²``); for
the LE-MMSE, ``R = ‖W‖ max_n ‖Π_n v‖ + 3 max_k ‖A x_k‖`` (:func:`lemmse_scale`): ``W`` a
whitening of the patch Gram matrices (its rows are orthogonal, so ``‖W‖`` is its largest
row norm), and ``‖W Π_n B A x‖ <= ‖A x‖`` since ``W Q_n`` is a partial isometry; queries and
keys are centred on group means of the keys, hence the 3. The data-independent part of the
range (``R <= 1``) is checked on entry (:func:`check_sigma`), the rest as soon as ``R`` is
known; every error states the range.
"""

import math
import numbers

import numpy as np
import torch
import torch.nn.functional as F

_EPS64 = torch.finfo(torch.float64).eps  # the package's one float64 epsilon
_HEADROOM = 16.0  # σ range: factor kept between the log-weights and the float limits


# ----------------------------------------------------------------------------- numbers


def _number(value, name: str, what: str = "a real number"):
    """``value`` as a Python number: Python/NumPy numbers or a one-element real tensor."""
    if isinstance(value, torch.Tensor):
        check_tensor(value, name)
        if value.numel() != 1:
            raise ValueError(
                f"{name} must be {what} or a one-element tensor, got shape {tuple(value.shape)}"
            )
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be {what}, got a {value.dtype} tensor")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__} {value!r}")
    return value


def _interval(low, high, low_open, high_open) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return "finite"


def check_real(
    value, name: str, low=None, high=None, *, low_open: bool = False, high_open: bool = False
) -> float:
    """A finite real number, optionally in ``[low, high]`` (``low_open``: ``> low``, ...)."""
    value = float(_number(value, name))
    inside = math.isfinite(value)
    inside = inside and (low is None or (value > low if low_open else value >= low))
    inside = inside and (high is None or (value < high if high_open else value <= high))
    if not inside:
        rule = _interval(low, high, low_open, high_open)
        raise ValueError(f"{name} must be a finite number {rule}, got {value!r}")
    return value


def check_int(value, name: str, low=None, high=None) -> int:
    """An integer (Python or NumPy, not ``bool``), optionally in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be an int {_interval(low, high, False, False)}, got {value}")
    return value


def check_bool(value, name: str) -> bool:
    """``True`` or ``False`` (or a NumPy bool)."""
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return bool(value)


def check_chunk_size(chunk_size, name: str = "chunk_size") -> int | None:
    """``None`` (automatic) or a positive int."""
    return None if chunk_size is None else check_int(chunk_size, name, low=1)


# ----------------------------------------------------------------------------- tensors


def check_tensor(x, name: str) -> torch.Tensor:
    """A dense tensor that holds data (not sparse, not on the ``meta`` device)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense tensor, got layout {x.layout}")
    if x.device.type == "meta":
        raise ValueError(f"{name} is on the meta device: it holds no values")
    return x


def check_real_tensor(x, name: str) -> torch.Tensor:
    """A dense tensor with data of a real (not complex) dtype; bool is allowed (0/1)."""
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"{name} must be a tensor or an array of numbers: {err}") from None
    check_tensor(x, name)
    if x.is_complex():
        raise TypeError(f"{name} must be real, got a {x.dtype} tensor")
    return x


def check_images(x, name: str) -> torch.Tensor:
    """A non-empty, finite, real floating tensor ``(n, C, H, W)``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (n, C, H, W), got {type(x).__name__}")
    check_tensor(x, name)
    if x.ndim != 4:
        raise ValueError(f"{name} must have shape (n, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty: it must hold at least one image")
    if min(x.shape[1:]) == 0:
        raise ValueError(f"{name} has empty images: shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a real floating-point tensor, got {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


# ------------------------------------------------------------------------ noise level


def sigma_range(dtype=torch.float64, scale: float = 0.0, diagnostics: bool = False):
    """``(σ_min, σ_max)`` for log-weights computed in ``dtype`` on data of scale ``R``
    (``scale``), see the module doc; ``diagnostics``: the LE-MMSE diagnostics' bound too."""
    f = torch.finfo(dtype)
    largest = math.sqrt(f.max / _HEADROOM)
    if not (math.isfinite(scale) and 0 <= scale <= largest):
        raise ValueError(
            f"the data scale R = {scale:.3g} is too large for {_dtype_name(dtype)} "
            f"log-weights (at most sqrt(max)/4 = {largest:.3g}, else R² overflows): rescale "
            "the data" + (" or use dtype=torch.float64" if dtype != torch.float64 else "")
        )
    low = math.sqrt(_HEADROOM / f.max) * max(scale, 1.0)
    if diagnostics:
        low = max(low, math.sqrt(_HEADROOM * _EPS64 / -math.log(f.tiny)) * scale)
    return low, 1.0 / math.sqrt(_HEADROOM * f.tiny)


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_sigma(
    sigma,
    name: str = "sigma",
    dtype=torch.float64,
    scale: float = 0.0,
    diagnostics: bool = False,
) -> float:
    """A noise level in :func:`sigma_range` ``(dtype, scale, diagnostics)``.

    ``scale = 0`` (default) checks the data-independent part of the range, on entry.
    """
    sigma = float(_number(sigma, name))
    if not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {sigma!r}")
    low, high = sigma_range(dtype, scale, diagnostics)
    if not low <= sigma <= high:
        data = f", data scale R = {scale:.3g}" if scale > 1 else ""
        extra = " with diagnostics" if diagnostics else ""
        raise ValueError(
            f"{name}={sigma:.3g} is outside the accepted range [{low:.3g}, {high:.3g}] of "
            f"{_dtype_name(dtype)} log-weights{extra}{data} (σ_max = 1/(4 sqrt(tiny)), "
            f"σ_min = 4 max(R, 1)/sqrt(max) of torch.finfo; see lemmse_core.checks)"
        )
    return sigma


def check_quadratic(
    quad: torch.Tensor, sigma: float, name: str = "sigma", excluded: bool = False
) -> None:
    """Check σ against a block of squared distances ``X`` before ``-X / (2σ²)`` (float64):
    ``R² = max X``. ``excluded``: ``+inf`` entries mark excluded terms and are ignored
    (otherwise an infinite entry is an overflow). One pass (two with excluded terms)."""
    top = float(quad.amax()) if quad.numel() else 0.0
    if top == math.inf and excluded:  # the largest finite entry, row by row
        rows = quad.reshape(quad.shape[0], -1) if quad.ndim else quad.reshape(1, 1)
        top = max(float(row.masked_fill(row == torch.inf, 0.0).amax()) for row in rows)
    if not math.isfinite(top):
        raise ValueError(
            "the squared distances of the log-weights overflow float64: the data are too "
            "large (rescale them)"
        )
    check_sigma(sigma, name, torch.float64, math.sqrt(max(top, 0.0)))


def measurement_norm(train: torch.Tensor, A, dtype=None, step: int = 256) -> float:
    """``max_k ‖A x_k‖`` over the training images (float64, one pass). With ``dtype``
    (the LE-MMSE's), also checks that keys of scale ``R = 3 max_k ‖A x_k‖`` fit it."""
    top = 0.0
    for k0 in range(0, train.shape[0], step):
        ax = A.A(train[k0 : k0 + step].double())
        top = max(top, float(ax.flatten(1).norm(dim=1).max()))
    if dtype is not None:
        sigma_range(dtype, 3 * top)
    return top


def lemmse_scale(engine, v: torch.Tensor) -> float:
    """The data scale ``R = ‖W‖ max_n ‖Π_n v‖ + 3 max_k ‖A x_k‖`` of an LE-MMSE query ``v``
    (module doc): one pass over ``v``, one over the whitening matrices."""
    rows = [c.whiten.pow(2).sum(dim=1) for c in engine.classes if c.whiten.shape[0]]
    gain = math.sqrt(float(torch.cat(rows).max())) if rows else 0.0
    p, r = engine.p, engine.p // 2
    power = v.detach().double().pow(2).sum(dim=1, keepdim=True)
    if r:
        power = F.pad(power, (r, r, r, r), mode="circular")
    patch = math.sqrt(float(F.avg_pool2d(power, p, stride=1).amax()) * p * p)
    return gain * patch + 3 * engine._key_norm


def check_lemmse_sigma(engine, v: torch.Tensor, sigma, diagnostics: bool) -> float:
    """σ of an LE-MMSE query ``v`` in its :func:`sigma_range` (``engine.dtype``)."""
    sigma = check_sigma(sigma, dtype=engine.dtype)
    return check_sigma(sigma, "sigma", engine.dtype, lemmse_scale(engine, v), diagnostics)


def check_lemmse_options(
    rtol=0.0,
    error_bound=False,
    chunk_size=None,
    diagnostics=False,
    mass=None,
    top_k=None,
    progress=False,
):
    """The keyword options of :meth:`LEMMSE.estimate`, normalised, in this order.

    ``mass`` and ``top_k`` are diagnostics: they need ``diagnostics=True`` (``top_k=None``
    means 5), which in turn needs the exact computation (``rtol=0``, no error bound).
    """
    rtol = check_real(rtol, "rtol", 0, 1, high_open=True)
    error_bound = check_bool(error_bound, "error_bound")
    chunk_size = check_chunk_size(chunk_size)
    diagnostics = check_bool(diagnostics, "diagnostics")
    progress = check_bool(progress, "progress")
    if mass is not None:
        mass = check_real(mass, "mass", 0, 1, low_open=True)
    if top_k is not None:
        top_k = check_int(top_k, "top_k", low=0)
    if not diagnostics:
        for key, value in (("mass", mass), ("top_k", top_k)):
            if value is not None:
                raise ValueError(f"{key} is a diagnostic: it needs diagnostics=True")
    elif rtol > 0 or error_bound:
        raise ValueError("diagnostics are exact: use rtol=0 and error_bound=False with them")
    return rtol, error_bound, chunk_size, diagnostics, mass, 5 if top_k is None else top_k, progress


def check_noise_levels(sigma: torch.Tensor, name: str = "sigma") -> torch.Tensor:
    """A real tensor of noise levels, each finite and >= 0 (one reduction)."""
    check_tensor(sigma, name)
    if sigma.is_complex() or sigma.dtype == torch.bool:
        raise TypeError(f"{name} must be real, got a {sigma.dtype} tensor")
    if not bool(((sigma >= 0) & (sigma < torch.inf)).all()):
        raise ValueError(f"{name} must hold finite noise levels >= 0")
    return sigma


# ------------------------------------------------------------------------- problems


def check_setup(train, A, B):
    """Validate ``train``, ``A`` and ``B``; return ``(B, y_shape)``, ``B=None`` meaning I."""
    from .operators import ForwardOperator, LinearMap, preinverse  # operators uses checks

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


def check_measurement(y, train, y_shape, name: str = "y", what: str = "") -> torch.Tensor:
    """``y`` holds finite images of shape ``y_shape`` on ``train``'s device.

    ``what``: where the shape comes from (default: ``A`` applied to the train images).
    """
    y = check_images(y, name)
    if y.device != train.device:
        raise ValueError(f"{name} is on {y.device} but train is on {train.device}: mixed devices")
    if tuple(y.shape[1:]) != tuple(y_shape):
        what = what or f"A maps the train images {tuple(train.shape[1:])} to {tuple(y_shape)}"
        raise ValueError(f"{name} has image shape {tuple(y.shape[1:])}, but {what}")
    return y


def check_problem(y, train, A, B):
    """Validate a whole estimation problem; return ``B`` (identity when ``None``)."""
    B, y_shape = check_setup(train, A, B)
    check_measurement(y, train, y_shape)
    return B


def check_dtype(dtype) -> torch.dtype:
    """The computation dtype: ``torch.float32`` or ``torch.float64``."""
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    return dtype
