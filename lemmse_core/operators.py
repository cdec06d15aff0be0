"""Forward operators and pre-inverses of ``y = A x + sigma e`` (paper Sec. 1, App. C).

Every map acts on batches of images ``(n, C, H, W)`` and is size-agnostic unless it carries
a mask. A :class:`LinearMap` knows how to apply itself (``A``), its adjoint, its dense
matrix (tiny sizes, for tests), and its *structure*, the fact the estimators exploit:

=====================  ===========================================  =========================
class                  structure                                    accessor
=====================  ===========================================  =========================
:class:`Identity`      ``x -> x``                                   none
:class:`Diagonal`      pixel-wise product by a fixed image          :meth:`Diagonal.diagonal`
:class:`Circulant`     circular convolution, same for each channel  :meth:`Circulant.transfer`
:class:`LinearMap`     anything else; ``period`` gives the shifts   none
                       the map commutes with (``B Bᵀ`` for
                       super-resolution is ``s``-periodic)
=====================  ===========================================  =========================

The estimators ask a map for what its structure makes cheap, through methods implemented
in general (dense algebra, one class per location) in :class:`LinearMap` and specialised in
the subclasses, so that a new operator is added in one place:

- :meth:`LinearMap.row_projector`: ``P_B = B⁺B`` of the MMSE (Remark 2.2);
- :meth:`LinearMap.shift_norms`: ``‖A T_g x‖²`` for all shifts, the augmented MMSE (Def. 3.4);
- :meth:`LinearMap.shift_metric`: ``(BBᵀ)⁺`` over all translates, the E-MMSE (Thm. 3.5);
- :meth:`LinearMap.patch_classes`: the locations sharing a patch Gram matrix (Thm. 3.8);
- :meth:`LinearMap.image_support`: the structure of the image: where ``Im`` of the map is
  the span of some pixels and the map writes exact zeros elsewhere (identity, diagonal), it
  returns those pixels, so that membership in the image of a patch of the map is decided
  by exact zeros (the rank strata of the LE-MMSE, Prop. B.5); otherwise ``None``, and
  :func:`image_rounding` bounds the rounding of a numerical membership test.

A :class:`ForwardOperator` adds the exact Moore-Penrose pseudo-inverse ``pinv``, the
Tikhonov inverse ``tikhonov(y, lam) = (AᵀA + lam I)⁻¹ Aᵀ y`` and ``measure``.
:func:`preinverse` turns an operator into the pre-inverse ``B`` the estimators take.

Circulant transfer functions are computed in float64 and cast to the input's precision.
The pseudo-inverse of a transfer function ``h`` keeps the frequencies with
``|h| > rcond * max|h|``; the default ``rcond = D * eps(float64)`` (``D`` the number of
pixels of one channel) is the default of ``torch.linalg.pinv`` on the dense matrix, so
``pinv`` is the exact Moore-Penrose inverse of the float64 matrix, as in the paper (App. C).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .checks import _EPS64, check_int, check_real, check_real_tensor
from .patches import extract_patches

Shape = tuple[int, int, int]
DENSE_LIMIT = 8192  # largest dimension for which a general map is handled by dense algebra


# ----------------------------------------------------------------------------- checks


def _check_batch(x: torch.Tensor, name: str, shape: Shape | None = None) -> torch.Tensor:
    """Check that ``x`` is a float tensor ``(n, C, H, W)``, optionally of image ``shape``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (n, C, H, W), got {type(x)}")
    if x.ndim != 4:
        raise ValueError(f"{name} must have shape (n, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if shape is not None and tuple(x.shape[1:]) != tuple(shape):
        raise ValueError(
            f"{name} has image shape {tuple(x.shape[1:])}, expected (C, H, W) = {tuple(shape)}"
        )
    return x


def _check_positive(value: float, name: str) -> float:
    """A finite number > 0 (Python, NumPy, or a one-element tensor; not bool)."""
    return check_real(value, name, 0, low_open=True)


def _check_rcond(rcond: float | None) -> float | None:
    """``None`` (default cut) or a relative singular-value cut in ``[0, 1)``."""
    return None if rcond is None else check_real(rcond, "rcond", 0, 1, high_open=True)


def _check_shape(shape, name: str = "shape") -> Shape:
    """Normalise an image shape given as ``(H, W)`` or ``(C, H, W)`` (integers)."""
    try:
        sizes = list(shape)
    except TypeError:
        raise TypeError(f"{name} must be a tuple (H, W) or (C, H, W), got {shape!r}") from None
    shape = tuple(check_int(s, f"{name} entry") for s in sizes)
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3 or min(shape) <= 0:
        raise ValueError(f"{name} must be (H, W) or (C, H, W) with positive sizes, got {shape}")
    return shape


def dense_matrix(fn, in_shape, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Dense matrix ``(M, D)`` of a linear map ``fn`` of batches of images of shape
    ``in_shape``, on flattened images (tiny sizes): column ``i`` is ``fn(e_i)``."""
    in_shape = _check_shape(in_shape, "in_shape")
    d = math.prod(in_shape)
    basis = torch.eye(d, dtype=dtype).reshape(d, *in_shape)
    return fn(basis).reshape(d, -1).T.contiguous()


def _dense_limit(dim: int, what: str) -> None:
    if dim > DENSE_LIMIT:
        raise ValueError(
            f"{what}: a general (non-diagonal, non-circulant) B is handled with dense "
            f"matrices, limited to dimension {DENSE_LIMIT}; got {dim}"
        )


def _complex(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64


def _correlate(a_hat: torch.Tensor, b_hat: torch.Tensor) -> torch.Tensor:
    """``Σ_c Σ_m a[c, m + g] b[c, m]`` for all shifts g: ``(n, K, H, W)`` from the FFTs."""
    prod = torch.einsum("nchw,kchw->nkhw", a_hat, b_hat.conj())
    return torch.fft.ifft2(prod).real


def _all_shifts(x: torch.Tensor) -> torch.Tensor:
    """``T_g x`` for every shift g: ``(n, H, W, C, H, W)`` with ``[:, gi, gj] = roll(x, g)``."""
    h, w = x.shape[-2:]
    idx_h, idx_w = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    rows = (idx_h[None, :] - idx_h[:, None]) % h  # [g, n] = n - g
    cols = (idx_w[None, :] - idx_w[:, None]) % w
    out = x[:, :, rows][..., cols]  # (n, C, gi, H, gj, W)
    return out.permute(0, 2, 4, 1, 3, 5)


def _invariant_norms(m: LinearMap) -> Callable:
    """``‖M T_g x‖² = ‖M x‖²`` for a map that commutes with every shift."""
    return lambda x: m.A(x).pow(2).sum(dim=(1, 2, 3))[None, :, None, None]


# ------------------------------------------------------------------------- base class


class LinearMap:
    """A linear map between batches of images; see the module docstring."""

    period: tuple[int, int] | None = None

    def output_shape(self, in_shape: Shape) -> Shape:
        """Image shape ``(C', H', W')`` of ``A x`` for ``x`` of image shape ``in_shape``."""
        return tuple(in_shape)

    def input_shape(self, out_shape: Shape) -> Shape:
        """Image shape ``(C, H, W)`` of ``Aᵀ y`` for ``y`` of image shape ``out_shape``."""
        return tuple(out_shape)

    def A(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the map to a batch ``x`` of shape ``(n, C, H, W)``."""
        raise NotImplementedError

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """Apply the adjoint (transpose) to a batch ``y`` of shape ``(n, C', H', W')``."""
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.A(x)

    def image_support(self, in_shape) -> torch.Tensor | None:
        """Pixels spanning the image, when the image is a coordinate subspace.

        A boolean image of the output shape for inputs of shape ``in_shape`` if ``Im`` of the
        map is the span of those pixels and the map returns exact zeros (not rounding
        errors) on all others; ``None`` when the image has no such structure (the default).
        """
        return None

    def to(self, device=None, dtype=None) -> LinearMap:
        """Copy with tensors moved to ``device`` / ``dtype`` (maps without tensors: self)."""
        return self

    def matrix(self, in_shape, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Dense matrix ``(M, D)`` acting on flattened images of shape ``in_shape`` (tiny)."""
        return dense_matrix(self.A, in_shape, dtype)

    def noise_gain(self, in_shape) -> float:
        """RMS gain of white noise through the map: ``sqrt(E‖M e‖² / M')`` for
        ``e ~ N(0, I)`` of image shape ``in_shape``, i.e. ``‖M‖_F / sqrt(M')`` with ``M'``
        the output size (dense here; exact closed forms in the subclasses)."""
        m = self.matrix(in_shape)
        return float(m.square().sum().div(m.shape[0]).sqrt())

    # What the estimators exploit: the general case here, the structured ones overridden.

    def row_projector(self, in_shape) -> Callable | None:
        """``M⁺M``, the projector onto ``Im Mᵀ``, on batches of image shape ``in_shape``
        (``P_B`` of the MMSE, Remark 2.2); ``None`` where it is the identity. Dense here."""
        _dense_limit(math.prod(in_shape), "P_B")
        b = self.matrix(in_shape)
        proj = torch.linalg.pinv(b) @ b
        return lambda r: (r.reshape(r.shape[0], -1) @ proj.to(r.device)).reshape(r.shape)

    def shift_norms(self, in_shape) -> Callable | None:
        """``x -> ‖M T_g x_k‖²`` for every shift ``g``, broadcastable to ``(1, K, H, W)``, of
        float64 batches ``x`` ``(K, C, H, W)`` of image shape ``in_shape``, where the
        structure gives it by FFT (the augmented MMSE, Def. 3.4); ``None`` (here): every
        translate is measured."""
        return None

    def shift_metric(self, in_shape, device):
        """``(M Mᵀ)⁺`` between every translate ``T_g⁻¹ v`` and images ``z``, with the test
        ``T_g⁻¹ v ∈ Im M``, for inputs of image shape ``in_shape`` (the E-MMSE, Thm. 3.5):
        an object with ``prepare(v)`` and ``quadratic(prepared, z)``. Dense here."""
        return _DenseMetric(self, in_shape, device)

    def patch_classes(self, out_shape, p: int) -> torch.Tensor:
        """Class of every location ``(H·W,)`` of outputs of image shape ``out_shape``: equal
        labels share the Gram matrix ``Π_n M Mᵀ Π_nᵀ`` of the ``p × p`` patches (the classes
        of the LE-MMSE, Thm. 3.8). Here the residue modulo ``period``, or one class per
        location without a period."""
        _, h, w = out_shape
        if self.period is None:
            return torch.arange(h * w)
        si, sj = self.period
        i, j = torch.arange(h)[:, None], torch.arange(w)[None, :]
        return ((i % si) * sj + (j % sj)).reshape(-1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ForwardOperator(LinearMap):
    """A forward operator ``A``: adds ``pinv``, ``tikhonov``, ``measure`` and its
    pre-inverses (:meth:`preinverse`)."""

    def preinverse(self, kind: str, lam: float | None = None) -> LinearMap:
        """The pre-inverse ``B`` of ``kind`` (one of :data:`PREINVERSES`): ``I``
        (physics-agnostic; needs an operator that keeps the image size), ``Aᵀ``, ``A⁺`` or
        Tikhonov ``(AᵀA + lam I)⁻¹ Aᵀ``, as a :class:`LinearMap`."""
        if kind not in PREINVERSES:
            raise ValueError(f"kind must be one of {PREINVERSES}, got {kind!r}")
        if kind == "tikhonov":
            lam = _check_positive(lam, "lam")
        elif lam is not None:
            raise ValueError(f"lam is only used with kind='tikhonov', got lam={lam!r}")
        return self._agnostic() if kind == "identity" else self._aware(kind, lam)

    def _agnostic(self) -> LinearMap:
        return Identity()

    def _aware(self, kind: str, lam: float | None) -> LinearMap:
        """``Aᵀ``, ``A⁺`` or Tikhonov(``lam``) of this operator (arguments checked)."""
        raise TypeError(f"no pre-inverse known for operator {type(self).__name__}")

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        """Exact Moore-Penrose pseudo-inverse ``A⁺ y``."""
        raise NotImplementedError

    def tikhonov(self, y: torch.Tensor, lam: float) -> torch.Tensor:
        """``(AᵀA + lam I)⁻¹ Aᵀ y`` for ``lam > 0``."""
        raise NotImplementedError

    def measure(
        self, x: torch.Tensor, sigma: float, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Draw ``y = A x + sigma e`` with ``e`` standard Gaussian on every output pixel."""
        sigma = _check_positive(sigma, "sigma")
        ax = self.A(x)
        where = ax.device if generator is None else generator.device
        noise = torch.randn(ax.shape, generator=generator, dtype=ax.dtype, device=where)
        return ax + sigma * noise.to(ax.device)


# ------------------------------------------------------------------------- identity


class Identity(LinearMap):
    """The identity map (the physics-agnostic pre-inverse ``B = I``)."""

    period = (1, 1)

    def A(self, x):
        return _check_batch(x, "x")

    def adjoint(self, y):
        return _check_batch(y, "y")

    def noise_gain(self, in_shape) -> float:
        return 1.0

    def image_support(self, in_shape) -> torch.Tensor:
        return torch.ones(_check_shape(in_shape, "in_shape"), dtype=torch.bool)

    def row_projector(self, in_shape):
        return None

    def shift_norms(self, in_shape):
        return _invariant_norms(self)

    def shift_metric(self, in_shape, device):
        return _FilterMetric(None)


class Denoising(Identity, ForwardOperator):
    """Denoising, ``A = I``."""

    def pinv(self, y):
        return _check_batch(y, "y")

    def tikhonov(self, y, lam):
        lam = _check_positive(lam, "lam")
        return _check_batch(y, "y") / (1.0 + lam)

    def _aware(self, kind, lam):
        if kind != "tikhonov":
            return Identity()
        return Diagonal(torch.full((1, 1, 1), 1.0 / (1.0 + lam), dtype=torch.float64))


# ------------------------------------------------------------------------- diagonal


class Diagonal(LinearMap):
    """Pixel-wise product ``x -> d ⊙ x`` by a fixed image ``d`` broadcastable to ``(C, H, W)``."""

    def __init__(self, d: torch.Tensor):
        self.d = _diagonal_image(d, "d")  # float64, cast to the input's precision at use

    def diagonal(self, in_shape: Shape) -> torch.Tensor:
        """The diagonal as a full image of shape ``in_shape``."""
        in_shape = _check_shape(in_shape, "in_shape")
        self._check_size(in_shape, "in_shape")
        return self.d.expand(in_shape)

    def _check_size(self, shape, name):
        if any(d != 1 and d != s for d, s in zip(self.d.shape, shape[-3:], strict=True)):
            raise ValueError(
                f"{name} has image shape {tuple(shape)}, but the mask/diagonal has shape "
                f"{tuple(self.d.shape)}: sizes must match (a size of 1 broadcasts)"
            )

    def A(self, x):
        _check_batch(x, "x")
        self._check_size(x.shape[1:], "x")
        return x * self.d.to(device=x.device, dtype=x.dtype)

    def adjoint(self, y):
        _check_batch(y, "y")
        self._check_size(y.shape[1:], "y")
        return y * self.d.to(device=y.device, dtype=y.dtype)

    def noise_gain(self, in_shape) -> float:
        return float(self.diagonal(in_shape).square().mean().sqrt())

    def image_support(self, in_shape) -> torch.Tensor:
        """The pixels with ``d != 0``: ``d ⊙ x`` is exactly 0 elsewhere."""
        return self.diagonal(in_shape) != 0

    def row_projector(self, in_shape):
        keep = (self.diagonal(in_shape) != 0).double()
        return None if keep.all() else (lambda r: r * keep.to(r.device))

    def shift_norms(self, in_shape):
        """``‖d ⊙ T_g x‖²``: the correlation of ``d²`` with ``x²``."""
        d2_hat = torch.fft.fft2(self.diagonal(in_shape).double()[None] ** 2)
        return lambda x: _correlate(d2_hat, torch.fft.fft2(x**2))[0][None]

    def shift_metric(self, in_shape, device):
        return _DiagonalMetric(self.diagonal(in_shape).double().to(device))

    def patch_classes(self, out_shape, p):
        """One class per pattern of ``d²`` on the patch."""
        sq = self.diagonal(out_shape).double().cpu()[None] ** 2
        return torch.unique(extract_patches(sq, p)[0], dim=0, return_inverse=True)[1]

    def to(self, device=None, dtype=None):
        moved = type(self)(self.d.to(device=device))
        moved.d = moved.d.to(dtype=dtype or moved.d.dtype)
        return moved

    def __repr__(self):
        return f"{type(self).__name__}(shape={tuple(self.d.shape)})"


def _diagonal_image(d, name: str) -> torch.Tensor:
    """A finite, real, not all-zero image ``(H, W)`` or ``(C, H, W)`` as float64 ``(C, H, W)``."""
    d = check_real_tensor(d, name)
    if d.ndim == 2:
        d = d[None]
    if d.ndim != 3 or min(d.shape) == 0:
        raise ValueError(f"{name} must have shape (H, W) or (C, H, W), got {tuple(d.shape)}")
    d = d.to(torch.float64)
    if not torch.isfinite(d).all():
        raise ValueError(f"{name} must be finite")
    if not d.any():
        raise ValueError(f"{name} is all zeros: the map would be 0")
    return d


class Inpainting(Diagonal, ForwardOperator):
    """Inpainting ``A x = m ⊙ x`` with a 0/1 mask ``m`` (1 = observed); ``A`` is a projector.

    The measurement keeps the image size (missing pixels read 0 before noise), so
    ``Aᵀ = A⁺ = A`` and ``tikhonov(y, lam) = m ⊙ y / (1 + lam)``.
    """

    def __init__(self, mask: torch.Tensor):
        super().__init__(_diagonal_image(mask, "mask"))  # 0/1 (or bool), some pixel observed
        if not ((self.d == 0) | (self.d == 1)).all():
            raise ValueError("mask must contain only 0 and 1 (1 = observed pixel)")

    @property
    def mask(self) -> torch.Tensor:
        """The 0/1 mask, shape ``(C or 1, H, W)``."""
        return self.d

    @classmethod
    def center(cls, shape, box: int) -> Inpainting:
        """Mask out a centred ``box × box`` square (paper: 15 × 15) of images of ``shape``."""
        c, h, w = _check_shape(shape)
        box = check_int(box, "box", low=1)
        if box > min(h, w):
            raise ValueError(f"box={box} is larger than the image size {h}×{w}")
        if box == h == w:
            raise ValueError(f"box={box} removes every pixel of the {h}×{w} image")
        mask = torch.ones(1, h, w)
        top, left = (h - box) // 2, (w - box) // 2
        mask[:, top : top + box, left : left + box] = 0
        return cls(mask)

    @classmethod
    def random(cls, shape, fraction: float, seed: int = 0) -> Inpainting:
        """Mask out a random ``fraction`` of the pixels (same pixels in every channel)."""
        c, h, w = _check_shape(shape)
        fraction = check_real(
            fraction, "fraction (of missing pixels)", 0, 1, low_open=True, high_open=True
        )
        gen = torch.Generator().manual_seed(check_int(seed, "seed"))
        n_missing = round(fraction * h * w)
        if not 0 < n_missing < h * w:
            raise ValueError(
                f"fraction={fraction:g} of the {h * w} pixels removes {n_missing}: it must "
                "remove at least one pixel and keep at least one"
            )
        order = torch.randperm(h * w, generator=gen)
        mask = torch.ones(h * w)
        mask[order[:n_missing]] = 0
        return cls(mask.reshape(1, h, w))

    def pinv(self, y):
        return self.adjoint(y)

    def tikhonov(self, y, lam):
        lam = _check_positive(lam, "lam")
        return self.adjoint(y) / (1.0 + lam)

    def _aware(self, kind, lam):
        return Diagonal(self.mask if kind != "tikhonov" else self.mask / (1 + lam))


# ------------------------------------------------------------------------- circulant


def transfer_support(h: torch.Tensor, rcond: float | None = None) -> torch.Tensor:
    """Frequencies kept as non-zero singular values: ``|h| > rcond · max|h|``.

    ``rcond=None`` means ``h.numel() · eps(float64)``, the default of ``torch.linalg.pinv``.
    """
    mag = h.abs()
    if rcond is None:
        rcond = h.numel() * _EPS64
    return mag > rcond * mag.max()


#: Safety factor of :func:`image_rounding`.
IMAGE_ROUNDING_FACTOR = 8.0


def image_rounding(dim: int, lead, preimage, norm, data=0.0):
    """Bound on the computed distance ``‖u - U Uᵀ u‖`` of a member ``u`` of ``Im M``.

    ``U`` (``dim × r``, float64) holds the left singular vectors of the computed ``M`` for
    its ``r`` kept singular values ``s_1 >= ... >= s_r``; ``lead = s_1``, ``preimage =
    ‖S⁻¹ Uᵀ u‖`` (the norm of the smallest ``z`` with ``M z = u``), ``norm = ‖u‖`` and
    ``data`` the absolute rounding already in ``u`` (e.g. from computing ``u = M y`` by FFT:
    ``eps(dtype) · sqrt(dim) · max|v|``). Tensors broadcast.

    If the computed matrix is ``M + E``, then ``u = M z = (M + E) z - E z`` and the singular
    values of ``M + E`` beyond ``r`` are at most ``‖E‖`` (Weyl), so the distance of ``u`` to
    the computed image is at most ``2 ‖E‖ ‖z‖``: it scales with the preimage, not with the
    condition number. With ``‖E‖ ≈ dim · eps · s_1`` (forming ``M``, SVD backward error)
    and ``dim · eps · ‖u‖`` for the two products, the bound is
    ``IMAGE_ROUNDING_FACTOR · (eps64 · dim · (s_1 ‖z‖ + ‖u‖) + data)``; the factor 8 covers
    the 2 and leaves a margin: the measured distances of members (downsampling pre-inverses,
    box and Gaussian, condition numbers of ``M Mᵀ`` up to 1e12, noise-free to σ = 1) stay
    below 0.6 of the unscaled value.
    """
    return IMAGE_ROUNDING_FACTOR * (_EPS64 * dim * (lead * preimage + norm) + data)


def _pinv_transfer(h: torch.Tensor, rcond: float | None) -> torch.Tensor:
    """Moore-Penrose inverse of a transfer function with a relative singular-value cut."""
    keep = transfer_support(h, rcond)
    return torch.where(keep, 1.0 / torch.where(keep, h, torch.ones_like(h)), torch.zeros_like(h))


class Circulant(LinearMap):
    """Circular convolution given by a transfer function ``(H, W) -> complex128 (H, W)``.

    The same transfer function applies to every channel; ``period = (1, 1)``.
    """

    period = (1, 1)

    def __init__(self, transfer_fn: Callable[[int, int], torch.Tensor], name: str = "Circulant"):
        if not callable(transfer_fn):
            raise TypeError(f"transfer_fn must be callable, got {type(transfer_fn).__name__}")
        self._transfer_fn = transfer_fn
        self._cache: dict[tuple[int, int], torch.Tensor] = {}
        self.name = name

    def transfer(self, h: int, w: int) -> torch.Tensor:
        """Complex128 transfer function (2-D DFT of the kernel) on an ``h × w`` grid."""
        key = (int(h), int(w))
        if key not in self._cache:
            self._cache[key] = self._transfer_fn(*key).to(torch.complex128)
        return self._cache[key]

    def _apply(self, x: torch.Tensor, transfer: torch.Tensor) -> torch.Tensor:
        t = transfer.to(device=x.device, dtype=_complex(x.dtype))
        return torch.fft.ifft2(torch.fft.fft2(x) * t).real

    def A(self, x):
        _check_batch(x, "x")
        return self._apply(x, self.transfer(*x.shape[-2:]))

    def adjoint(self, y):
        _check_batch(y, "y")
        return self._apply(y, self.transfer(*y.shape[-2:]).conj())

    def noise_gain(self, in_shape) -> float:
        _, h, w = _check_shape(in_shape, "in_shape")
        return float(self.transfer(h, w).abs().square().mean().sqrt())  # Parseval

    def row_projector(self, in_shape):
        _, h, w = in_shape
        keep = transfer_support(self.transfer(h, w)).to(torch.complex128)
        if keep.real.all():
            return None
        return lambda r: torch.fft.ifft2(torch.fft.fft2(r) * keep.to(r.device)).real

    def shift_norms(self, in_shape):
        return _invariant_norms(self)

    def shift_metric(self, in_shape, device):
        """The filter ``1/|h|`` on the kept frequencies (``(MMᵀ)⁺ = Fᵀ F``)."""
        _, h, w = in_shape
        t = self.transfer(h, w)
        keep = transfer_support(t)
        inverse = torch.where(keep, 1.0 / torch.where(keep, t.abs(), 1.0), 0.0)
        return _FilterMetric(inverse.to(device))

    def __repr__(self):
        return self.name


class Blur(Circulant, ForwardOperator):
    """Circular convolution by a small odd-sized 2-D ``kernel`` centred on its middle element.

    ``(A x)[n] = Σ_o kernel[c + o] x[n - o]`` with ``c`` the middle index; the same kernel for
    every channel. ``pinv`` uses :func:`_pinv_transfer` with relative cut ``rcond``.
    """

    def __init__(self, kernel: torch.Tensor, rcond: float | None = None):
        kernel = check_real_tensor(kernel, "kernel").to(torch.float64)
        if kernel.ndim != 2:
            raise ValueError(f"kernel must be 2-D (kh, kw), got shape {tuple(kernel.shape)}")
        if kernel.shape[0] % 2 == 0 or kernel.shape[1] % 2 == 0:
            raise ValueError(f"kernel sizes must be odd, got {tuple(kernel.shape)}")
        if not torch.isfinite(kernel).all():
            raise ValueError("kernel must be finite")
        if not kernel.any():
            raise ValueError("kernel is all zeros: the blur would map every image to 0")
        self.kernel = kernel
        self.rcond = _check_rcond(rcond)
        super().__init__(self._kernel_transfer, name=f"Blur(kernel {tuple(kernel.shape)})")

    def _kernel_transfer(self, h: int, w: int) -> torch.Tensor:
        kh, kw = self.kernel.shape
        if kh > h or kw > w:
            raise ValueError(f"kernel of size {kh}×{kw} is larger than the image size {h}×{w}")
        full = torch.zeros(h, w, dtype=torch.float64)
        full[:kh, :kw] = self.kernel
        full = torch.roll(full, shifts=(-(kh // 2), -(kw // 2)), dims=(0, 1))
        return torch.fft.fft2(full)

    @classmethod
    def gaussian(cls, std: float, size: int | None = None, rcond: float | None = None) -> Blur:
        """Isotropic Gaussian kernel of standard deviation ``std`` (paper: 1.0), sum 1.

        ``size`` (odd) defaults to ``2 ceil(3 std) + 1``.
        """
        std = _check_positive(std, "std")
        size = 2 * math.ceil(3 * std) + 1 if size is None else check_int(size, "size")
        if size <= 0 or size % 2 == 0:
            raise ValueError(f"size must be a positive odd int, got {size!r}")
        t = torch.arange(size, dtype=torch.float64) - size // 2
        g = torch.exp(-(t**2) / (2 * std**2))
        kernel = torch.outer(g, g)
        return cls(kernel / kernel.sum(), rcond=rcond)

    @classmethod
    def defocus(cls, radius: float, rcond: float | None = None) -> Blur:
        """Uniform disk kernel ``{‖o‖ ≤ radius}`` (defocus blur), sum 1."""
        radius = _check_positive(radius, "radius")
        size = 2 * math.floor(radius) + 1
        t = torch.arange(size, dtype=torch.float64) - size // 2
        disk = ((t[:, None] ** 2 + t[None, :] ** 2) <= radius**2).double()
        return cls(disk / disk.sum(), rcond=rcond)

    def pinv(self, y):
        _check_batch(y, "y")
        return self._apply(y, _pinv_transfer(self.transfer(*y.shape[-2:]), self.rcond).conj())

    def pinv_transfer(self, h: int, w: int) -> torch.Tensor:
        """Transfer function of ``A⁺``."""
        return _pinv_transfer(self.transfer(h, w), self.rcond).conj()

    def tikhonov_transfer(self, h: int, w: int, lam: float) -> torch.Tensor:
        """Transfer function of ``(AᵀA + lam I)⁻¹ Aᵀ``."""
        t = self.transfer(h, w)
        return t.conj() / (t.abs() ** 2 + lam)

    def tikhonov(self, y, lam):
        lam = _check_positive(lam, "lam")
        _check_batch(y, "y")
        return self._apply(y, self.tikhonov_transfer(*y.shape[-2:], lam))

    def _aware(self, kind, lam):
        fns = {
            "adjoint": lambda h, w: self.transfer(h, w).conj(),
            "pinv": self.pinv_transfer,
            "tikhonov": lambda h, w: self.tikhonov_transfer(h, w, lam),
        }
        return Circulant(fns[kind], name=f"{_label(kind, lam)} of {self!r}")

    def to(self, device=None, dtype=None):
        return self  # transfer functions are cast at application time


# ---------------------------------------------------------------------- downsampling


class Downsampling(ForwardOperator):
    """Super-resolution: ``A = S K``, circular anti-aliasing ``K`` then decimation ``S`` by s.

    ``antialias="box"``: ``(A x)[i, j]`` is the mean of the ``s × s`` block starting at
    ``(s i, s j)``. ``antialias="gaussian"``: Gaussian blur of std ``std`` (default ``s / 2``)
    centred on the kept pixel ``(s i, s j)``. ``A Aᵀ`` is circulant on the low-resolution
    grid, which gives ``pinv = Aᵀ (A Aᵀ)⁺`` and ``tikhonov = Aᵀ (A Aᵀ + lam I)⁻¹`` exactly.
    ``period = (s, s)``: the operator commutes with shifts by multiples of ``s``.
    """

    def __init__(
        self,
        factor: int,
        antialias: str = "box",
        std: float | None = None,
        rcond: float | None = None,
    ):
        factor = check_int(factor, "factor", low=1)
        if antialias not in ("box", "gaussian"):
            raise ValueError(f"antialias must be 'box' or 'gaussian', got {antialias!r}")
        self.factor = factor
        self.antialias = antialias
        self.std = _check_positive(std if std is not None else factor / 2, "std")
        self.rcond = _check_rcond(rcond)
        self.period = (factor, factor)
        self._cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def __repr__(self):
        return f"Downsampling(factor={self.factor}, antialias={self.antialias!r})"

    def output_shape(self, in_shape):
        c, h, w = in_shape
        self._check_divisible(h, w, "x")
        return (c, h // self.factor, w // self.factor)

    def input_shape(self, out_shape):
        c, h, w = out_shape
        return (c, h * self.factor, w * self.factor)

    def _check_divisible(self, h, w, name):
        if h % self.factor or w % self.factor:
            raise ValueError(
                f"{name} has size {h}×{w}, which the downsampling factor {self.factor} "
                "does not divide"
            )

    def _kernel(self, h: int, w: int) -> torch.Tensor:
        s = self.factor
        full = torch.zeros(h, w, dtype=torch.float64)
        if self.antialias == "box":
            # (K x)[n] = mean of x[n + a], a in [0, s)²: kernel at -a.
            idx_h = (-torch.arange(s)) % h
            idx_w = (-torch.arange(s)) % w
            full[idx_h[:, None], idx_w[None, :]] = 1.0 / s**2
        else:
            r = math.ceil(3 * self.std)
            if 2 * r + 1 > min(h, w):
                raise ValueError(f"Gaussian antialias of std {self.std} too wide for {h}×{w}")
            t = torch.arange(-r, r + 1, dtype=torch.float64)
            g = torch.exp(-(t**2) / (2 * self.std**2))
            k = torch.outer(g, g)
            full[t.long()[:, None] % h, t.long()[None, :] % w] = k / k.sum()
        return full

    def _transfers(self, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Transfer of ``K`` (high resolution) and of ``A Aᵀ`` (low resolution)."""
        if (h, w) not in self._cache:
            self._check_divisible(h, w, "image")
            k_hat = torch.fft.fft2(self._kernel(h, w))
            autocorr = torch.fft.ifft2(k_hat.abs() ** 2).real
            s = self.factor
            gram_hat = torch.fft.fft2(autocorr[::s, ::s]).to(torch.complex128)
            self._cache[(h, w)] = (k_hat, gram_hat)
        return self._cache[(h, w)]

    def A(self, x):
        _check_batch(x, "x")
        h, w = x.shape[-2:]
        k_hat, _ = self._transfers(h, w)
        t = k_hat.to(device=x.device, dtype=_complex(x.dtype))
        blurred = torch.fft.ifft2(torch.fft.fft2(x) * t).real
        return blurred[..., :: self.factor, :: self.factor].contiguous()

    def adjoint(self, y):
        _check_batch(y, "y")
        s = self.factor
        h, w = y.shape[-2] * s, y.shape[-1] * s
        k_hat, _ = self._transfers(h, w)
        up = y.new_zeros(*y.shape[:-2], h, w)
        up[..., ::s, ::s] = y
        t = k_hat.conj().to(device=y.device, dtype=_complex(y.dtype))
        return torch.fft.ifft2(torch.fft.fft2(up) * t).real

    def gram_transfer(self, h: int, w: int) -> torch.Tensor:
        """Transfer function of ``A Aᵀ`` on the ``(h/s) × (w/s)`` grid, images ``h × w``."""
        return self._transfers(h, w)[1]

    def _lowres_solve(self, y, fn):
        s = self.factor
        gram = self.gram_transfer(y.shape[-2] * s, y.shape[-1] * s)
        t = fn(gram).to(device=y.device, dtype=_complex(y.dtype))
        return torch.fft.ifft2(torch.fft.fft2(y) * t).real

    def pinv(self, y):
        _check_batch(y, "y")
        return self.adjoint(self._lowres_solve(y, lambda g: _pinv_transfer(g, self.rcond)))

    def tikhonov(self, y, lam):
        lam = _check_positive(lam, "lam")
        _check_batch(y, "y")
        return self.adjoint(self._lowres_solve(y, lambda g: 1.0 / (g + lam)))

    def _agnostic(self):
        raise ValueError("kind='identity' needs an operator that keeps the image size")

    def _aware(self, kind, lam):
        fns = {
            "adjoint": lambda g: torch.ones_like(g),
            "pinv": lambda g: _pinv_transfer(g, self.rcond),
            "tikhonov": lambda g: 1.0 / (g + lam),
        }
        return _AdjointThenLowres(self, fns[kind], name=f"{_label(kind, lam)} of {self!r}")


class _AdjointThenLowres(LinearMap):
    """``B y = Aᵀ (C y)`` for super-resolution: ``C`` a low-resolution circulant filter.

    ``C = I`` gives ``Aᵀ``, ``C = (A Aᵀ)⁺`` gives ``A⁺``, ``C = (A Aᵀ + lam I)⁻¹`` Tikhonov.
    """

    def __init__(self, op: Downsampling, lowres_fn: Callable[[torch.Tensor], torch.Tensor], name):
        self.op = op
        self.lowres_fn = lowres_fn
        self.period = op.period
        self.name = name

    def output_shape(self, in_shape):
        return self.op.input_shape(in_shape)

    def input_shape(self, out_shape):
        return self.op.output_shape(out_shape)

    def A(self, y):
        _check_batch(y, "y")
        return self.op.adjoint(self.op._lowres_solve(y, self.lowres_fn))

    def adjoint(self, x):
        _check_batch(x, "x")
        return self.op._lowres_solve(self.op.A(x), lambda g: self.lowres_fn(g).conj())

    def __repr__(self):
        return self.name


# -------------------------------------------- (M Mᵀ)⁺ over all translates (E-MMSE, Thm. 3.5)


class _FilterMetric:
    """``(MMᵀ)⁺ = Fᵀ F`` with ``F`` commuting with the shifts: the identity (``filter``
    ``None``) or a circulant filter. ``Im M`` is shift-invariant: no support test."""

    def __init__(self, filter: torch.Tensor | None):
        self.filter = filter

    def _filter(self, x):
        if self.filter is None:
            return x
        return torch.fft.ifft2(torch.fft.fft2(x) * self.filter.to(x.device)).real

    def prepare(self, v: torch.Tensor) -> dict:
        """Per-query quantities that do not depend on the training images."""
        fv = self._filter(v)
        return {"v_hat": torch.fft.fft2(fv), "v2": fv.pow(2).sum(dim=(1, 2, 3))}

    def quadratic(self, q: dict, z: torch.Tensor) -> torch.Tensor:
        """``(T_g⁻¹v - z_k)ᵀ (MMᵀ)⁺ (T_g⁻¹v - z_k)``, ``(n, K, H, W)``."""
        fz = self._filter(z)
        cross = _correlate(q["v_hat"], torch.fft.fft2(fz))
        z2 = fz.pow(2).sum(dim=(1, 2, 3))
        return q["v2"][:, None, None, None] + z2[None, :, None, None] - 2 * cross


class _DiagonalMetric:
    """``(MMᵀ)⁺ = diag(ω)``, ``ω = 1/β²`` on the support of the diagonal ``β``; a shift is
    in the support when ``T_g⁻¹v`` vanishes off it (a pattern test: exact zeros)."""

    def __init__(self, beta: torch.Tensor):
        support = beta != 0
        self.omega = torch.where(support, 1.0 / torch.where(support, beta, 1.0) ** 2, 0.0)
        self.outside_hat = torch.fft.fft2((~support).double())

    def prepare(self, v: torch.Tensor) -> dict:
        """Per-query quantities that do not depend on the training images."""
        v_hat = torch.fft.fft2(v)
        t1 = _correlate(torch.fft.fft2(v**2), torch.fft.fft2(self.omega[None]))[:, 0]
        nonzero_hat = torch.fft.fft2((v != 0).double())
        count = _correlate(nonzero_hat, self.outside_hat[None])[:, 0]
        return {"v_hat": v_hat, "t1": t1, "bad": count.round() > 0}

    def quadratic(self, q: dict, z: torch.Tensor) -> torch.Tensor:
        """``(T_g⁻¹v - z_k)ᵀ (MMᵀ)⁺ (T_g⁻¹v - z_k)``, ``(n, K, H, W)``; ``inf`` off support."""
        cross = _correlate(q["v_hat"], torch.fft.fft2(self.omega * z))
        z2 = (self.omega * z**2).sum(dim=(1, 2, 3))
        quad = q["t1"][:, None] + z2[None, :, None, None] - 2 * cross
        return quad.masked_fill(q["bad"][:, None], torch.inf)


class _DenseMetric:
    """``(MMᵀ)⁺ = Wᵀ W`` from the SVD ``M = U S Vᵀ`` (``W = S⁻¹Uᵀ``, singular values cut at
    ``max(M, D) · eps · s_1``); a shift is in the support when the distance of ``T_g⁻¹v`` to
    ``Im U`` is within its rounding bound, :func:`image_rounding`."""

    def __init__(self, m: LinearMap, in_shape, device):
        _dense_limit(math.prod(m.output_shape(tuple(in_shape))), "E-MMSE")
        matrix = m.matrix(in_shape)
        u, s, _ = torch.linalg.svd(matrix, full_matrices=False)
        rank = int((s > s.max() * max(matrix.shape) * torch.finfo(s.dtype).eps).sum())
        self.basis = u[:, :rank].to(device)
        self.whiten = (u[:, :rank] / s[:rank]).T.to(device)  # (r, D): (MMᵀ)⁺ = Wᵀ W
        self.lead, self.dim = float(s[0]), max(matrix.shape)  # for image_rounding

    def prepare(self, v: torch.Tensor) -> dict:
        """Per-query quantities that do not depend on the training images."""
        n, c, h, w = v.shape
        shifts = _all_shifts(v)  # [:, g] = T_g v, and T_g⁻¹ v = T_{-g} v
        inv = torch.roll(shifts.flip(1, 2), shifts=(1, 1), dims=(1, 2)).reshape(n, h * w, -1)
        resid = inv - (inv @ self.basis) @ self.basis.T
        white = inv @ self.whiten.T  # ‖white‖ = ‖S⁻¹Uᵀu‖, the preimage of u = T_g⁻¹v
        norm = v.flatten(1).norm(dim=1)[:, None]  # ‖T_g⁻¹v‖ = ‖v‖
        data = torch.finfo(v.dtype).eps * (c * h * w) ** 0.5 * v.flatten(1).abs().amax(dim=1)
        bound = image_rounding(self.dim, self.lead, white.norm(dim=2), norm, data[:, None])
        bad = resid.norm(dim=2) > bound
        return {"white": white, "bad": bad.reshape(n, h, w)}

    def quadratic(self, q: dict, z: torch.Tensor) -> torch.Tensor:
        """``(T_g⁻¹v - z_k)ᵀ (MMᵀ)⁺ (T_g⁻¹v - z_k)``, ``(n, K, H, W)``; ``inf`` off support."""
        n, h, w = q["bad"].shape
        keys = z.flatten(1) @ self.whiten.T
        quad = torch.cdist(q["white"], keys[None].expand(n, -1, -1)).pow(2)
        quad = quad.transpose(1, 2).reshape(n, -1, h, w)
        return quad.masked_fill(q["bad"][:, None], torch.inf)


# ------------------------------------------------------------------------ pre-inverses

PREINVERSES = ("identity", "adjoint", "pinv", "tikhonov")


def preinverse(A: ForwardOperator, kind: str, lam: float | None = None) -> LinearMap:
    """The pre-inverse ``B`` fed to the estimators: ``I``, ``Aᵀ``, ``A⁺`` or Tikhonov(lam)
    (:meth:`ForwardOperator.preinverse`)."""
    if not isinstance(A, ForwardOperator):
        raise TypeError(f"A must be a ForwardOperator, got {type(A).__name__}")
    return A.preinverse(kind, lam)


def _label(kind: str, lam: float | None) -> str:
    return {"adjoint": "Aᵀ", "pinv": "A⁺", "tikhonov": f"Tikhonov(λ={lam})"}[kind]
