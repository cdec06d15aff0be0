"""Issue #12, "Nothing silent": every public entry point validates its inputs the same way.

- ``FAULTS``: one row per fault, grouped by entry point; each raises a ``ValueError`` or
  ``TypeError`` whose message names the argument;
- ``ACCEPTED``: NumPy scalars and other valid edge cases work wherever Python numbers do;
- the noise level σ: both ends of the accepted range (``checks.sigma_range``), per dtype,
  for every estimator: just inside gives a finite output, just outside the error.
"""

from __future__ import annotations

import functools
import math
import re

import numpy as np
import pytest
import torch

import lemmse_core as lc
from lemmse_core import checks, nets
from lemmse_core import operators as ops

SHAPE = (1, 5, 6)
P = 3
GLOBAL = ("mmse", "augmented_mmse", "e_mmse")
ESTIMATORS = (*GLOBAL, "le_mmse")


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.cache
def small():
    """``(train, A, y)``: 3 random training images, 2 measurements, denoising."""
    gen = torch.Generator().manual_seed(0)
    train = torch.rand((3, *SHAPE), generator=gen, dtype=torch.float64)
    y = torch.rand((2, *SHAPE), generator=gen, dtype=torch.float64)
    return train, ops.Denoising(), y


@functools.cache
def engine(dtype=torch.float64, kernel="auto"):
    train, A, _ = small()
    return lc.LEMMSE(train, A, P, dtype=dtype, kernel=kernel)


def call(est, **kwargs):
    """Estimator ``est`` on :func:`small`, with ``kwargs`` replacing its arguments."""
    train, A, y = small()
    args = {"y": y, "train": train, "A": A, "sigma": 0.3, **kwargs}
    if est == "le_mmse":
        args.setdefault("patch_size", P)
    if est == "smoothed_le_mmse":
        args = {"patch_size": P, "eps": 0.1, "samples": 2, **args}
    return getattr(lc, est)(**args)


def estimate(**kwargs):
    """``LEMMSE.estimate`` of :func:`engine` (float64) on ``v = y``."""
    args = {"v": small()[2], "sigma": 0.3, **kwargs}
    return engine().estimate(**args)


def net_call(v=None, sigma=0.1):
    net = nets.build("resnet", 3, 1).eval()
    with torch.no_grad():
        return net(torch.rand(2, 1, 6, 6) if v is None else v, sigma)


def _meta(shape=(2, *SHAPE)):
    return torch.empty(shape, device="meta", dtype=torch.float64)


Y = small()[2]
KERNEL = torch.ones(3, 3) / 9

# (id, call, exception, message fragment naming the argument)
FAULTS = [
    # -------------------------------------------------- every estimator: sigma, y, train, ...
    *[
        row
        for est in ESTIMATORS
        for row in [
            (f"{est}-sigma-str", lambda e=est: call(e, sigma="0.3"), TypeError, "sigma"),
            (f"{est}-sigma-bool", lambda e=est: call(e, sigma=True), TypeError, "sigma"),
            (f"{est}-sigma-none", lambda e=est: call(e, sigma=None), TypeError, "sigma"),
            (f"{est}-sigma-complex", lambda e=est: call(e, sigma=1j), TypeError, "sigma"),
            (f"{est}-sigma-nan", lambda e=est: call(e, sigma=math.nan), ValueError, "sigma"),
            (f"{est}-sigma-neg", lambda e=est: call(e, sigma=-0.1), ValueError, "sigma"),
            (f"{est}-sigma-1e200", lambda e=est: call(e, sigma=1e200), ValueError, "sigma"),
            (f"{est}-sigma-1e-200", lambda e=est: call(e, sigma=1e-200), ValueError, "sigma"),
            (
                f"{est}-sigma-vector",
                lambda e=est: call(e, sigma=torch.tensor([0.1, 0.2])),
                ValueError,
                "sigma",
            ),
            (
                f"{est}-sigma-meta",
                lambda e=est: call(e, sigma=torch.tensor(0.3, device="meta")),
                ValueError,
                "sigma",
            ),
            (
                f"{est}-sigma-complex-tensor",
                lambda e=est: call(e, sigma=torch.tensor(0.3 + 0j)),
                TypeError,
                "sigma",
            ),
            (
                f"{est}-sigma-bool-tensor",
                lambda e=est: call(e, sigma=torch.tensor(True)),
                TypeError,
                "sigma",
            ),
            (f"{est}-y-meta", lambda e=est: call(e, y=_meta()), ValueError, "y"),
            (
                f"{est}-y-complex",
                lambda e=est: call(e, y=Y.to(torch.complex128)),
                TypeError,
                "y",
            ),
            (f"{est}-y-bool", lambda e=est: call(e, y=Y > 0.5), TypeError, "y"),
            (f"{est}-y-sparse", lambda e=est: call(e, y=Y.to_sparse()), TypeError, "y"),
            (f"{est}-y-numpy", lambda e=est: call(e, y=Y.numpy()), TypeError, "y"),
            (f"{est}-y-empty-image", lambda e=est: call(e, y=Y[..., :0]), ValueError, "y"),
            (
                f"{est}-train-meta",
                lambda e=est: call(e, train=_meta((3, *SHAPE))),
                ValueError,
                "train",
            ),
            (f"{est}-A-type", lambda e=est: call(e, A="denoising"), TypeError, "A"),
            (f"{est}-B-type", lambda e=est: call(e, B=torch.eye(30)), TypeError, "B"),
            (f"{est}-dtype", lambda e=est: call(e, dtype=torch.float16), ValueError, "dtype"),
            (f"{est}-chunk-0", lambda e=est: call(e, chunk_size=0), ValueError, "chunk_size"),
            (f"{est}-chunk-neg", lambda e=est: call(e, chunk_size=-1), ValueError, "chunk_size"),
            (f"{est}-chunk-float", lambda e=est: call(e, chunk_size=2.5), TypeError, "chunk_size"),
            (f"{est}-chunk-bool", lambda e=est: call(e, chunk_size=True), TypeError, "chunk_size"),
            (
                f"{est}-diagnostics-str",
                lambda e=est: call(e, diagnostics="yes"),
                TypeError,
                "diagnostics",
            ),
        ]
    ],
    # ------------------------------------------------------------------ data scale
    (
        "mmse-data-1e160",
        lambda: call("mmse", train=small()[0] * 1e160, y=Y * 1e160),
        ValueError,
        "data",
    ),
    (  # R ≈ 1e16: float32 accepts σ >= 2.2e-19 R ≈ 2e-3 only
        "le_mmse-float32-data-1e15",
        lambda: call("le_mmse", train=small()[0] * 1e15, y=Y * 1e15, sigma=1e-6),
        ValueError,
        "sigma",
    ),
    (  # R ≈ 1e21 > sqrt(max32)/4: the keys' squared norms overflow float32
        "LEMMSE-float32-data-1e20",
        lambda: lc.LEMMSE(small()[0] * 1e20, small()[1], P, dtype=torch.float32),
        ValueError,
        "data",
    ),
    ("smoothed-chunk-0", lambda: call("smoothed_le_mmse", chunk_size=0), ValueError, "chunk_size"),
    ("smoothed-sigma-1e200", lambda: call("smoothed_le_mmse", sigma=1e200), ValueError, "sigma"),
    # ------------------------------------------------------------------ LE-MMSE options
    ("le_mmse-top_k-neg", lambda: call("le_mmse", diagnostics=True, top_k=-1), ValueError, "top_k"),
    (
        "le_mmse-top_k-float",
        lambda: call("le_mmse", diagnostics=True, top_k=2.5),
        TypeError,
        "top_k",
    ),
    (
        "le_mmse-top_k-bool",
        lambda: call("le_mmse", diagnostics=True, top_k=True),
        TypeError,
        "top_k",
    ),
    ("le_mmse-top_k-no-diag", lambda: call("le_mmse", top_k=3), ValueError, "top_k"),
    ("le_mmse-mass-0", lambda: call("le_mmse", diagnostics=True, mass=0.0), ValueError, "mass"),
    ("le_mmse-mass-1.5", lambda: call("le_mmse", diagnostics=True, mass=1.5), ValueError, "mass"),
    (
        "le_mmse-mass-nan",
        lambda: call("le_mmse", diagnostics=True, mass=math.nan),
        ValueError,
        "mass",
    ),
    ("le_mmse-mass-str", lambda: call("le_mmse", diagnostics=True, mass="0.5"), TypeError, "mass"),
    ("le_mmse-mass-no-diag", lambda: call("le_mmse", mass=0.5), ValueError, "mass"),
    ("le_mmse-rtol-nan", lambda: call("le_mmse", rtol=math.nan), ValueError, "rtol"),
    ("le_mmse-rtol-str", lambda: call("le_mmse", rtol="0.1"), TypeError, "rtol"),
    ("le_mmse-progress-str", lambda: call("le_mmse", progress="no"), TypeError, "progress"),
    ("le_mmse-patch-bool", lambda: call("le_mmse", patch_size=True), TypeError, "patch_size"),
    ("le_mmse-patch-float", lambda: call("le_mmse", patch_size=3.0), TypeError, "patch_size"),
    # ------------------------------------------------------------------ LEMMSE(...)
    *[
        (
            f"LEMMSE-{key}-{value!r}",
            lambda k=key, v=value: lc.LEMMSE(*small()[:2], P, **{k: v}),
            exc,
            key,
        )
        for key, value, exc in [
            ("support_rtol", -1e-6, ValueError),
            ("support_rtol", math.nan, ValueError),
            ("support_rtol", 1.0, ValueError),
            ("support_rtol", "1e-6", TypeError),
            ("group_size", 2.5, TypeError),
            ("group_size", 0, ValueError),
            ("kernel", "flash", ValueError),
            ("dtype", torch.complex64, ValueError),
            ("progress", "yes", TypeError),
        ]
    ],
    # ------------------------------------------------------------------ LEMMSE.estimate
    ("estimate-v-nan", lambda: estimate(v=torch.full((1, *SHAPE), math.nan)), ValueError, "v"),
    ("estimate-v-size", lambda: estimate(v=Y[..., :5]), ValueError, "v"),
    ("estimate-v-channels", lambda: estimate(v=Y.expand(2, 3, 5, 6)), ValueError, "v"),
    ("estimate-v-3d", lambda: estimate(v=Y[0]), ValueError, "v"),
    ("estimate-v-int", lambda: estimate(v=(Y * 10).long()), TypeError, "v"),
    ("estimate-v-meta", lambda: estimate(v=_meta()), ValueError, "v"),
    ("estimate-v-numpy", lambda: estimate(v=Y.numpy()), TypeError, "v"),
    ("estimate-sigma-nan", lambda: estimate(sigma=math.nan), ValueError, "sigma"),
    (
        "estimate-sigma-meta",
        lambda: estimate(sigma=torch.tensor(0.3, device="meta")),
        ValueError,
        "sigma",
    ),
    ("estimate-chunk-0", lambda: estimate(chunk_size=0), ValueError, "chunk_size"),
    ("estimate-chunk-float", lambda: estimate(chunk_size=2.5), TypeError, "chunk_size"),
    ("estimate-top_k-neg", lambda: estimate(diagnostics=True, top_k=-1), ValueError, "top_k"),
    ("estimate-top_k-no-diag", lambda: estimate(top_k=1), ValueError, "top_k"),
    ("estimate-mass-no-diag", lambda: estimate(mass=0.9), ValueError, "mass"),
    ("estimate-mass-2", lambda: estimate(diagnostics=True, mass=2.0), ValueError, "mass"),
    ("estimate-error_bound-str", lambda: estimate(error_bound="yes"), TypeError, "error_bound"),
    ("estimate-rtol-neg", lambda: estimate(rtol=-0.1), ValueError, "rtol"),
    ("call-y-meta", lambda: engine()(_meta(), 0.3), ValueError, "y"),
    # ------------------------------------------------------------------ smoothed LE-MMSE
    ("smoothed-samples-float", lambda: call("smoothed_le_mmse", samples=2.5), TypeError, "samples"),
    ("smoothed-samples-0", lambda: call("smoothed_le_mmse", samples=0), ValueError, "samples"),
    ("smoothed-eps-nan", lambda: call("smoothed_le_mmse", eps=math.nan), ValueError, "eps"),
    ("smoothed-eps-bool", lambda: call("smoothed_le_mmse", eps=True), TypeError, "eps"),
    # ------------------------------------------------------------------ operators: Blur
    ("Blur-str-kernel", lambda: ops.Blur("box"), TypeError, "kernel"),
    ("Blur-zero-kernel", lambda: ops.Blur(torch.zeros(3, 3)), ValueError, "kernel"),
    ("Blur-nan-kernel", lambda: ops.Blur(torch.full((3, 3), math.nan)), ValueError, "kernel"),
    ("Blur-meta-kernel", lambda: ops.Blur(torch.empty(3, 3, device="meta")), ValueError, "kernel"),
    ("Blur-complex-kernel", lambda: ops.Blur(KERNEL.to(torch.complex64)), TypeError, "kernel"),
    ("Blur-empty-kernel", lambda: ops.Blur(torch.zeros(0, 3)), ValueError, "kernel"),
    ("Blur-rcond-nan", lambda: ops.Blur(KERNEL, rcond=math.nan), ValueError, "rcond"),
    ("Blur-rcond-neg", lambda: ops.Blur(KERNEL, rcond=-1.0), ValueError, "rcond"),
    ("Blur-rcond-str", lambda: ops.Blur(KERNEL, rcond="1e-3"), TypeError, "rcond"),
    ("Blur-rcond-1", lambda: ops.Blur(KERNEL, rcond=1.0), ValueError, "rcond"),
    ("Blur.gaussian-std-bool", lambda: ops.Blur.gaussian(True), TypeError, "std"),
    ("Blur.gaussian-std-nan", lambda: ops.Blur.gaussian(math.nan), ValueError, "std"),
    ("Blur.gaussian-size-bool", lambda: ops.Blur.gaussian(1.0, size=True), TypeError, "size"),
    ("Blur.gaussian-size-float", lambda: ops.Blur.gaussian(1.0, size=5.0), TypeError, "size"),
    ("Blur.gaussian-size-even", lambda: ops.Blur.gaussian(1.0, size=4), ValueError, "size"),
    ("Blur.defocus-radius-inf", lambda: ops.Blur.defocus(math.inf), ValueError, "radius"),
    # ------------------------------------------------------------------ Downsampling
    ("Down-factor-bool", lambda: ops.Downsampling(True), TypeError, "factor"),
    ("Down-factor-float", lambda: ops.Downsampling(2.0), TypeError, "factor"),
    ("Down-factor-0", lambda: ops.Downsampling(0), ValueError, "factor"),
    ("Down-rcond-nan", lambda: ops.Downsampling(2, rcond=math.nan), ValueError, "rcond"),
    ("Down-rcond-neg", lambda: ops.Downsampling(2, rcond=-1), ValueError, "rcond"),
    ("Down-rcond-str", lambda: ops.Downsampling(2, rcond="a"), TypeError, "rcond"),
    ("Down-std-nan", lambda: ops.Downsampling(2, "gaussian", std=math.nan), ValueError, "std"),
    ("Down-antialias", lambda: ops.Downsampling(2, antialias=None), ValueError, "antialias"),
    # ------------------------------------------------------------------ Inpainting, Diagonal
    ("Inpainting-zero-mask", lambda: ops.Inpainting(torch.zeros(4, 4)), ValueError, "mask"),
    ("Inpainting-half-mask", lambda: ops.Inpainting(torch.full((4, 4), 0.5)), ValueError, "mask"),
    (
        "Inpainting-nan-mask",
        lambda: ops.Inpainting(torch.full((4, 4), math.nan)),
        ValueError,
        "mask",
    ),
    ("Inpainting-1d-mask", lambda: ops.Inpainting(torch.ones(4)), ValueError, "mask"),
    ("Inpainting-empty-mask", lambda: ops.Inpainting(torch.ones(0, 4)), ValueError, "mask"),
    (
        "Inpainting-meta-mask",
        lambda: ops.Inpainting(torch.ones(4, 4, device="meta")),
        ValueError,
        "mask",
    ),
    (
        "Inpainting-complex-mask",
        lambda: ops.Inpainting(torch.ones(4, 4, dtype=torch.complex64)),
        TypeError,
        "mask",
    ),
    (
        "Inpainting.center-box-bool",
        lambda: ops.Inpainting.center((8, 8), box=True),
        TypeError,
        "box",
    ),
    ("Inpainting.center-box-all", lambda: ops.Inpainting.center((5, 5), box=5), ValueError, "box"),
    (
        "Inpainting.center-box-float",
        lambda: ops.Inpainting.center((8, 8), box=2.5),
        TypeError,
        "box",
    ),
    (
        "Inpainting.center-shape-float",
        lambda: ops.Inpainting.center((8, 8.5), box=2),
        TypeError,
        "shape",
    ),
    ("Inpainting.center-shape-1d", lambda: ops.Inpainting.center((8,), box=2), ValueError, "shape"),
    (
        "Inpainting.center-shape-0",
        lambda: ops.Inpainting.center((0, 8), box=2),
        ValueError,
        "shape",
    ),
    (
        "Inpainting.random-fraction-str",
        lambda: ops.Inpainting.random((8, 8), "0.3"),
        TypeError,
        "fraction",
    ),
    (
        "Inpainting.random-fraction-nan",
        lambda: ops.Inpainting.random((8, 8), math.nan),
        ValueError,
        "fraction",
    ),
    (
        "Inpainting.random-fraction-none-missing",
        lambda: ops.Inpainting.random((8, 8), 0.001),
        ValueError,
        "fraction",
    ),
    (
        "Inpainting.random-fraction-all-missing",
        lambda: ops.Inpainting.random((8, 8), 0.999),
        ValueError,
        "fraction",
    ),
    (
        "Inpainting.random-seed-float",
        lambda: ops.Inpainting.random((8, 8), 0.3, seed=1.5),
        TypeError,
        "seed",
    ),
    ("Diagonal-zero", lambda: ops.Diagonal(torch.zeros(4, 4)), ValueError, "d"),
    ("Diagonal-meta", lambda: ops.Diagonal(torch.ones(4, 4, device="meta")), ValueError, "d"),
    ("Circulant-not-callable", lambda: ops.Circulant(torch.ones(4, 4)), TypeError, "transfer_fn"),
    # ------------------------------------------------------------------ other operator calls
    ("measure-sigma-bool", lambda: ops.Denoising().measure(Y, True), TypeError, "sigma"),
    ("measure-sigma-inf", lambda: ops.Denoising().measure(Y, math.inf), ValueError, "sigma"),
    ("tikhonov-lam-str", lambda: ops.Denoising().tikhonov(Y, "0.1"), TypeError, "lam"),
    (
        "preinverse-lam-bool",
        lambda: ops.preinverse(ops.Blur(KERNEL), "tikhonov", lam=True),
        TypeError,
        "lam",
    ),
    ("matrix-in_shape-float", lambda: ops.Denoising().matrix((2, 2.5)), TypeError, "in_shape"),
    # ------------------------------------------------------------------ networks
    *[
        (f"build-{name}-channels-{c!r}", lambda n=name, c=c: nets.build(n, 3, c), exc, "channels")
        for name in nets.NETS
        for c, exc in [(0, ValueError), (-1, ValueError), (True, TypeError), (1.5, TypeError)]
    ],
    ("build-patch-float", lambda: nets.build("unet", 5.0), TypeError, "patch_size"),
    ("build-width-0", lambda: nets.build("resnet", 3, width=0), ValueError, "width"),
    ("net-sigma-neg", lambda: net_call(sigma=-0.1), ValueError, "sigma"),
    ("net-sigma-nan", lambda: net_call(sigma=math.nan), ValueError, "sigma"),
    ("net-sigma-inf", lambda: net_call(sigma=math.inf), ValueError, "sigma"),
    (
        "net-sigma-tensor-nan",
        lambda: net_call(sigma=torch.tensor([0.1, math.nan])),
        ValueError,
        "sigma",
    ),
    (
        "net-sigma-tensor-neg",
        lambda: net_call(sigma=torch.tensor([0.1, -0.2])),
        ValueError,
        "sigma",
    ),
    ("net-sigma-str", lambda: net_call(sigma="0.1"), TypeError, "sigma"),
    ("net-sigma-complex", lambda: net_call(sigma=torch.tensor([0.1j, 0.2])), TypeError, "sigma"),
    ("net-v-numpy", lambda: net_call(v=np.zeros((2, 1, 6, 6))), TypeError, "v"),
    ("net-v-int", lambda: net_call(v=torch.zeros(2, 1, 6, 6, dtype=torch.long)), TypeError, "v"),
]


@pytest.mark.parametrize(
    ("fault", "exc", "match"), [row[1:] for row in FAULTS], ids=[r[0] for r in FAULTS]
)
def test_fault_is_rejected(fault, exc, match):
    """The exception type, and the argument's name as a word of the message."""
    with pytest.raises(exc, match=rf"\b{re.escape(match)}\b"):
        fault()


def _finite(out):
    out = out[0] if isinstance(out, tuple) else out
    return bool(torch.isfinite(out).all())


# valid calls, with NumPy scalars where Python numbers are accepted
ACCEPTED = [
    *[
        (f"{est}-{key}-{type(value).__name__}", lambda e=est, k=key, v=value: call(e, **{k: v}))
        for est in ESTIMATORS
        for key, value in [
            ("sigma", np.float32(0.3)),
            ("sigma", np.float64(0.3)),
            ("sigma", np.int64(1)),
            ("sigma", torch.tensor(0.3)),
            ("chunk_size", np.int64(2)),
            ("diagnostics", np.bool_(True)),
        ]
    ],
    ("le_mmse-patch-np", lambda: call("le_mmse", patch_size=np.int64(3))),
    ("le_mmse-rtol-np", lambda: call("le_mmse", rtol=np.float32(1e-3))),
    (
        "le_mmse-mass-np",
        lambda: call("le_mmse", diagnostics=True, mass=np.float32(0.5), top_k=np.int64(2)),
    ),
    ("le_mmse-top_k-0", lambda: call("le_mmse", diagnostics=True, top_k=0)),
    (
        "LEMMSE-np",
        lambda: lc.LEMMSE(
            *small()[:2], np.int64(3), support_rtol=np.float32(1e-6), group_size=np.int64(2)
        )(Y, 0.3),
    ),
    ("smoothed-np", lambda: call("smoothed_le_mmse", eps=np.float32(0.1), samples=np.int64(2))),
    ("Blur-np", lambda: ops.Blur(KERNEL.numpy(), rcond=np.float32(1e-3)).pinv(Y)),
    ("Blur.gaussian-np", lambda: ops.Blur.gaussian(np.float32(1.0), size=np.int64(5)).A(Y)),
    ("Blur.defocus-np", lambda: ops.Blur.defocus(np.float64(1.0)).A(Y)),
    (
        "Down-np",
        lambda: ops.Downsampling(np.int64(2), rcond=np.float64(1e-6)).pinv(torch.rand(1, 1, 3, 3)),
    ),
    ("Inpainting-bool-mask", lambda: ops.Inpainting(torch.ones(5, 6, dtype=torch.bool)).A(Y)),
    ("Inpainting.center-np", lambda: ops.Inpainting.center(np.array([5, 6]), box=np.int64(2)).A(Y)),
    (
        "Inpainting.random-np",
        lambda: ops.Inpainting.random((5, 6), np.float32(0.3), seed=np.int64(1)).A(Y),
    ),
    ("measure-np", lambda: ops.Denoising().measure(Y, np.float32(0.1))),
    (
        "preinverse-np",
        lambda: ops.preinverse(ops.Blur(KERNEL), "tikhonov", lam=np.float32(0.1)).A(Y),
    ),
    (
        "build-np",
        lambda: nets.build("patchmlp", np.int64(3), np.int64(1)).eval()(
            torch.rand(1, 1, 6, 6), 0.1
        ),
    ),
    ("net-sigma-np", lambda: net_call(sigma=np.float32(0.1))),
    ("net-sigma-0", lambda: net_call(sigma=0.0)),
    ("net-sigma-tensor", lambda: net_call(sigma=torch.tensor([0.0, 0.5], dtype=torch.float64))),
]


@pytest.mark.parametrize("accepted", [row[1] for row in ACCEPTED], ids=[r[0] for r in ACCEPTED])
def test_accepted(accepted):
    assert _finite(accepted())


# ----------------------------------------------------------------------------- sigma range


def _constant_problem():
    """Training images 0 and 1, measurement 0.4 (denoising): known data scales."""
    train = torch.stack([torch.zeros(SHAPE), torch.ones(SHAPE)]).double()
    y = torch.full((1, *SHAPE), 0.4, dtype=torch.float64)
    return train, ops.Denoising(), y


def _ends(lo, hi, margin=1.001):
    return [lo * margin, hi / margin], [lo / margin, hi * margin]


def test_sigma_range_formula():
    """The documented values: σ_max = 1/(4√tiny), σ_min = 4 max(R, 1)/√max, and the
    diagnostics' σ ≥ 4 R √(eps64 / ln(1/tiny))."""
    for dtype, hi, lo, diag in [
        (torch.float32, 2.306e18, 2.168e-19, 6.38e-9),
        (torch.float64, 1.676e153, 2.983e-154, 2.24e-9),
    ]:
        assert checks.sigma_range(dtype) == pytest.approx((lo, hi), rel=1e-3)
        assert checks.sigma_range(dtype, 10.0) == pytest.approx((10 * lo, hi), rel=1e-3)
        assert checks.sigma_range(dtype, 10.0, diagnostics=True) == pytest.approx(
            (10 * diag, hi), rel=1e-3
        )
    for dtype, largest in [(torch.float32, 4.61e18), (torch.float64, 3.35e153)]:
        checks.sigma_range(dtype, largest / 1.01)  # R up to sqrt(max)/4
        with pytest.raises(ValueError, match="scale"):
            checks.sigma_range(dtype, largest * 1.01)  # R² would overflow whatever σ


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("est", GLOBAL)
def test_sigma_range_global(est, dtype):
    """Logits in float64 whatever ``dtype``; R² = the largest squared distance 0.6² · 30."""
    train, A, y = _constant_problem()
    lo, hi = checks.sigma_range(torch.float64, math.sqrt(0.36 * 30))
    inside, outside = _ends(lo, hi)
    for sigma in inside:
        out = getattr(lc, est)(y, train, A, sigma, dtype=dtype)
        assert out.dtype == dtype and _finite(out), sigma
    for sigma in outside:
        with pytest.raises(ValueError, match="sigma") as err:
            getattr(lc, est)(y, train, A, sigma, dtype=dtype)
        assert f"{lo:.3g}" in str(err.value) or f"{hi:.3g}" in str(err.value)


@pytest.mark.parametrize("diagnostics", [False, True])
@pytest.mark.parametrize("kernel", ["fused", "gemm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sigma_range_le_mmse(dtype, kernel, diagnostics):
    """R = ‖W‖ max_n ‖Π_n v‖ + 3 max_k ‖A x_k‖ = √(9 · 0.16) + 3 √30 for B = I."""
    train, A, y = _constant_problem()
    eng = lc.LEMMSE(train, A, P, dtype=dtype, kernel=kernel)
    scale = checks.lemmse_scale(eng, y)
    assert scale == pytest.approx(1.2 + 3 * math.sqrt(30), rel=1e-9)
    lo, hi = checks.sigma_range(dtype, scale, diagnostics=diagnostics)
    inside, outside = _ends(lo, hi)
    for sigma in inside:
        out = eng(y, sigma, diagnostics=diagnostics)
        if diagnostics:
            out, diag = out
            assert torch.isfinite(diag.log_density).all(), sigma
        assert out.dtype == dtype and _finite(out), sigma
    for sigma in outside:
        with pytest.raises(ValueError, match="sigma") as err:
            eng(y, sigma, diagnostics=diagnostics)
        assert f"{lo:.3g}" in str(err.value) or f"{hi:.3g}" in str(err.value)


@functools.cache
def _random_problem(op_name):
    gen = torch.Generator().manual_seed(7)
    shape = (1, 8, 8)
    A = {
        "denoising": ops.Denoising(),
        "inpainting": ops.Inpainting.center(shape, box=3),
        "blur": ops.Blur.gaussian(0.7, size=5),
    }[op_name]
    kind = {"denoising": "identity", "inpainting": "adjoint", "blur": "pinv"}[op_name]
    train = torch.rand((6, *shape), generator=gen, dtype=torch.float64)
    y = A.measure(torch.rand((2, *shape), generator=gen, dtype=torch.float64), 0.1, gen)
    return train, A, ops.preinverse(A, kind), y


@pytest.mark.parametrize("op_name", ["denoising", "inpainting", "blur"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sigma_range_ends_are_finite_on_random_data(op_name, dtype):
    """Every estimator just inside both ends of its range: finite (and the diagnostics)."""
    train, A, B, y = _random_problem(op_name)
    eng = lc.LEMMSE(train, A, P, B, dtype=dtype)
    v = B.A(y)
    for diagnostics in (False, True):
        lo, hi = checks.sigma_range(dtype, checks.lemmse_scale(eng, v), diagnostics)
        for sigma in (lo * 1.001, hi / 1.001):
            out = eng(y, sigma, diagnostics=diagnostics)
            if diagnostics:
                out, diag = out
                assert torch.isfinite(diag.log_density).all(), (sigma, diagnostics)
            assert _finite(out), (sigma, diagnostics)
    hi64 = checks.sigma_range(torch.float64)[1]
    for est in GLOBAL:
        out = getattr(lc, est)(y, train, A, hi64 / 1.001, B, dtype=dtype)
        assert _finite(out), est


@pytest.mark.parametrize(
    ("est", "dtype", "sigma", "diagnostics"),
    [
        ("le_mmse", torch.float32, 1e-20, False),  # was all-NaN
        ("le_mmse", torch.float32, 1e19, False),  # was all-NaN
        ("le_mmse", torch.float64, 1e-10, True),  # was NaN pixels
        ("mmse", torch.float64, 1e200, False),  # was OverflowError
        ("e_mmse", torch.float64, 1e200, False),  # was OverflowError
    ],
)
def test_reported_sigma_faults(est, dtype, sigma, diagnostics):
    kwargs = {"diagnostics": True} if diagnostics else {}
    with pytest.raises(ValueError, match=r"sigma.*range"):
        call(est, sigma=sigma, dtype=dtype, **kwargs)
