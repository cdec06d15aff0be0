"""The estimators against brute-force references (lemmse_core.reference) and the theory.

- exactness: every estimator vs its float64 reference, every operator × pre-inverse;
- streaming: the LE-MMSE does not depend on the chunk size;
- properties: equivariance, locality, p = H = W, Cor. 3.7, Lemma B.3, memorisation,
  convex hull, patchwork limit, float32 vs float64;
- the pseudo-determinant of the LE-MMSE weights matters;
- diagnostics vs the reference; bad input.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

import lemmse_core as lc
from lemmse_core import operators as ops
from lemmse_core.reference import (
    EPS64,
    all_shifts,
    mass_count,
    operator_matrices,
    patch_matrix,
    ref_augmented_mmse,
    ref_e_mmse,
    ref_le_mmse,
    ref_mmse,
    shift,
    top_terms,
)

SIGMAS = (0.05, 0.3, 1.0)
N_TRAIN = 4
P = 3
LAM = 0.1
TOL = {"rtol": 1e-8, "atol": 1e-8}
SHAPES = {"gray": (1, 5, 6), "color": (3, 5, 6)}
DOWN_SHAPES = {"gray": (1, 6, 6), "color": (3, 6, 4)}  # Downsampling(2) needs even sizes

OPERATORS = {
    "denoising": lambda shape: ops.Denoising(),
    "inpaint_center": lambda shape: ops.Inpainting.center(shape, box=2),
    "inpaint_random": lambda shape: ops.Inpainting.random(shape, fraction=0.3, seed=1),
    "blur_gaussian": lambda shape: ops.Blur.gaussian(0.7, size=5),
    "blur_defocus": lambda shape: ops.Blur.defocus(1.0),
    "down_box": lambda shape: ops.Downsampling(2),
    # the default std (1.0) is too wide for 6×4 images; 0.3 gives a 3×3 kernel
    "down_gaussian": lambda shape: ops.Downsampling(2, antialias="gaussian", std=0.3),
}
CASES = [
    (op, kind)
    for op in OPERATORS
    for kind in ops.PREINVERSES
    if not (op.startswith("down") and kind == "identity")
]
ESTIMATORS = ("mmse", "augmented_mmse", "e_mmse", "le_mmse")
REFERENCES = {
    "mmse": ref_mmse,
    "augmented_mmse": ref_augmented_mmse,
    "e_mmse": ref_e_mmse,
    "le_mmse": lambda y, train, A, sigma, B: ref_le_mmse(y, train, A, sigma, P, B),
}


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny problems: one thread avoids oversubscription (much faster on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def image_shape(op_name: str, color: str):
    return (DOWN_SHAPES if op_name.startswith("down") else SHAPES)[color]


def make_pre(A, kind):
    return ops.preinverse(A, kind, lam=LAM if kind == "tikhonov" else None)


def rand_images(n, shape, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand((n, *shape), generator=gen, dtype=torch.float64)


@functools.cache
def problem(op_name: str, kind: str, color: str, sigma: float):
    """``(train, A, B, y)``: y = two noisy held-out measurements + one training ``A x_2``."""
    shape = image_shape(op_name, color)
    A = OPERATORS[op_name](shape)
    B = make_pre(A, kind)
    gen = torch.Generator().manual_seed(1234)
    train = torch.rand((N_TRAIN, *shape), generator=gen, dtype=torch.float64)
    held_out = torch.rand((2, *shape), generator=gen, dtype=torch.float64)
    y = torch.cat([A.measure(held_out, sigma, gen), A.A(train[2:3])])
    return train, A, B, y


@functools.cache
def reference(est: str, op_name: str, kind: str, color: str, sigma: float):
    train, A, B, y = problem(op_name, kind, color, sigma)
    return REFERENCES[est](y, train, A, sigma, B)


@functools.cache
def patch_gram_condition(op_name: str, kind: str, color: str) -> float:
    """Largest condition number of ``Q_nQ_nᵀ`` (on its range) over the locations n."""
    train, A, B, _ = problem(op_name, kind, color, SIGMAS[0])
    _, b_mat = operator_matrices(train, A, B)
    worst = 1.0
    for n in all_shifts(*train.shape[-2:]):
        q = patch_matrix(tuple(train.shape[1:]), n, P) @ b_mat
        lam = torch.linalg.eigvalsh(q @ q.T)
        lam = lam[lam > lam.shape[0] * EPS64 * lam.max()]
        worst = max(worst, float(lam.max() / lam.min()))
    return worst


def tolerance(est: str, op_name: str, kind: str, color: str) -> dict:
    """1e-8, except for an LE-MMSE whose patch Gram matrices are ill-conditioned.

    Gaussian-antialiased downsampling with ``B = Aᵀ, A⁺`` or Tikhonov gives
    ``cond(Q_nQ_nᵀ) ≈ 4.5e9`` (a patch sees only the far tails of some kernels): the
    quadratic forms then carry rounding errors ``~ eps · cond``, and two correct float64
    computations differ by ~1e-6. A 50-digit mpmath evaluation of one such pixel (σ = 0.05)
    put both the implementation (+1.6e-6) and this reference (-1.1e-6) that far from the
    exact value, so neither is wrong; the tolerance is then 1e-5.
    """
    if est == "le_mmse" and patch_gram_condition(op_name, kind, color) > 1e7:
        return {"rtol": 1e-5, "atol": 1e-5}
    return TOL


def run(est, y, train, A, sigma, B=None, **kwargs):
    """Call an estimator in float64 (``le_mmse`` with ``patch_size = P`` unless given)."""
    kwargs.setdefault("dtype", torch.float64)
    if est == "le_mmse":
        p = kwargs.pop("patch_size", P)
        return lc.le_mmse(y, train, A, sigma, p, B, **kwargs)
    return getattr(lc, est)(y, train, A, sigma, B, **kwargs)


# ------------------------------------------------------------------------ references


def test_reference_le_mmse_full_patch_is_e_mmse():
    """Reference consistency: LE-MMSE with p = H = W (odd) is the E-MMSE (denoising)."""
    A = ops.Denoising()
    train = rand_images(4, (1, 5, 5), 0)
    y = A.measure(rand_images(2, (1, 5, 5), 1), 0.3, torch.Generator().manual_seed(2))
    le = ref_le_mmse(y, train, A, 0.3, 5)
    e = ref_e_mmse(y, train, A, 0.3)
    torch.testing.assert_close(le.x_hat, e.x_hat, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["identity", "tikhonov"])
def test_reference_e_mmse_is_augmented_for_blur(kind):
    """Reference consistency: Cor. 3.7 (circulant A, invertible B)."""
    A = ops.Blur.gaussian(0.7, size=5)
    B = make_pre(A, kind)
    train = rand_images(4, (3, 5, 6), 0)
    y = A.measure(rand_images(2, (3, 5, 6), 1), 0.3, torch.Generator().manual_seed(2))
    e = ref_e_mmse(y, train, A, 0.3, B)
    aug = ref_augmented_mmse(y, train, A, 0.3, B)
    torch.testing.assert_close(e.x_hat, aug.x_hat, rtol=0, atol=1e-12)


def test_reference_patch_matrix():
    x = rand_images(1, (2, 5, 6), 0)
    p, (i, j) = 3, (0, 5)
    patch = patch_matrix((2, 5, 6), (i, j), p) @ x.flatten()
    rows = torch.tensor([i - 1, i, i + 1]) % 5
    cols = torch.tensor([j - 1, j, j + 1]) % 6
    torch.testing.assert_close(patch, x[0][:, rows][:, :, cols].flatten(), rtol=0, atol=0)


# ------------------------------------------------------------------------ exactness


@pytest.mark.parametrize("sigma", SIGMAS)
@pytest.mark.parametrize("color", ["gray", "color"])
@pytest.mark.parametrize("op_name,kind", CASES)
@pytest.mark.parametrize("est", ESTIMATORS)
def test_exact_vs_reference(est, op_name, kind, color, sigma):
    train, A, B, y = problem(op_name, kind, color, sigma)
    out = run(est, y, train, A, sigma, B)
    ref = reference(est, op_name, kind, color, sigma)
    assert out.dtype == torch.float64
    assert out.shape == (y.shape[0], *train.shape[1:])
    torch.testing.assert_close(out, ref.x_hat, **tolerance(est, op_name, kind, color))


@pytest.mark.parametrize("est", ESTIMATORS)
def test_default_preinverse_is_identity(est):
    train, A, _, y = problem("blur_gaussian", "identity", "gray", 0.3)
    out_none = run(est, y, train, A, 0.3, None)
    out_id = run(est, y, train, A, 0.3, ops.preinverse(A, "identity"))
    torch.testing.assert_close(out_none, out_id, rtol=0, atol=1e-12)


@pytest.mark.parametrize("est", ESTIMATORS)
def test_output_dtype_default_float32(est):
    train, A, B, y = problem("inpaint_center", "adjoint", "color", 0.3)
    out = run(est, y, train, A, 0.3, B, dtype=torch.float32)
    assert out.dtype == torch.float32
    ref = reference(est, "inpaint_center", "adjoint", "color", 0.3)
    torch.testing.assert_close(out.double(), ref.x_hat, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------- streaming


STREAM_CASES = [
    ("denoising", "identity"),
    ("inpaint_center", "adjoint"),
    ("down_gaussian", "adjoint"),
    ("blur_defocus", "tikhonov"),
]


@pytest.mark.parametrize("op_name,kind", STREAM_CASES)
def test_le_mmse_streaming_chunks(op_name, kind):
    shape = (1, 8, 8)
    A = OPERATORS[op_name](shape)
    B = make_pre(A, kind)
    train = rand_images(6, shape, 3)
    y = A.measure(rand_images(2, shape, 4), 0.2, torch.Generator().manual_seed(5))
    results = [
        run("le_mmse", y, train, A, 0.2, B, chunk_size=c, diagnostics=True)
        for c in (1, 7, 64, None)
    ]
    out0, diag0 = results[0]
    for out, diag in results[1:]:
        torch.testing.assert_close(out, out0, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(diag.log_density, diag0.log_density, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(diag.top_weights, diag0.top_weights, rtol=1e-10, atol=1e-10)


PRUNE_SIGMAS = (0.01, 0.05, 0.2, 1.0)


@pytest.mark.parametrize("color", ["gray", "color"])
@pytest.mark.parametrize("op_name,kind", CASES)
def test_le_mmse_pruning_bound_holds(op_name, kind, color):
    """rtol > 0: |pruned - exact| <= the returned bound <= rtol · range, for every σ; small
    groups (4 keys) so that many are skipped; both kernels."""
    pruned_somewhere = False
    for sigma in PRUNE_SIGMAS:
        train, A, B, y = problem(op_name, kind, color, sigma)
        v = B.A(y)
        exact = lc.LEMMSE(train, A, P, B, dtype=torch.float64).estimate(v, sigma)
        span = float(train.max() - train.min())
        for kernel in ("fused", "gemm"):
            engine = lc.LEMMSE(train, A, P, B, dtype=torch.float64, group_size=4, kernel=kernel)
            for rtol in (1e-8, 1e-2):
                out, bound = engine.estimate(v, sigma, rtol=rtol, error_bound=True)
                assert bound.shape == out.shape and (bound >= 0).all()
                assert ((out - exact).abs() <= bound + 1e-11).all(), (sigma, kernel, rtol)
                assert (bound <= rtol * span * (1 + 1e-9)).all()
                pruned_somewhere |= bool((bound > 0).any())
    assert pruned_somewhere  # otherwise the test exercises nothing


def test_le_mmse_pruning_skips_work_and_bound_is_tight_enough():
    """At σ = 0.01 the pruned estimate skips groups (bound > 0) and stays within 1e-6."""
    train, A, B, y = problem("denoising", "identity", "gray", 0.05)
    engine = lc.LEMMSE(train, A, P, B, dtype=torch.float64, group_size=2)
    exact = engine.estimate(y, 0.01)
    out, bound = engine.estimate(y, 0.01, rtol=1e-6, error_bound=True)
    assert (bound > 0).float().mean() > 0.5
    assert (out - exact).abs().max() <= 1e-6


@pytest.mark.parametrize("op_name,kind", CASES)
def test_le_mmse_exact_path_is_unpruned(op_name, kind):
    """rtol = 0 (the default) is the exact computation: bound identically 0, output
    bit-identical to the default call; kernels and group sizes agree to rounding."""
    train, A, B, y = problem(op_name, kind, "color", 0.05)
    v = B.A(y)
    engines = [
        lc.LEMMSE(train, A, P, B, dtype=torch.float64, group_size=g, kernel=k)
        for g in (3, 10**6)
        for k in ("fused", "gemm")
    ]
    base = engines[0].estimate(v, 0.05)
    out, bound = engines[0].estimate(v, 0.05, rtol=0.0, error_bound=True)
    assert torch.equal(out, base) and torch.equal(bound, torch.zeros_like(bound))
    for engine in engines[1:]:
        torch.testing.assert_close(
            engine.estimate(v, 0.05), base, **tolerance("le_mmse", op_name, kind, "color")
        )


def test_le_mmse_float32_gemm_kernel_matches_float64():
    """The GEMM kernel in float32 (shift folded into the GEMM, lazy rescaling) at σ = 0.01."""
    train, A, B, y = problem("inpaint_random", "adjoint", "color", 0.05)
    ref = lc.LEMMSE(train, A, P, B, dtype=torch.float64)(y, 0.01)
    for g in (2, 4096):
        out = lc.LEMMSE(train, A, P, B, group_size=g, kernel="gemm")(y, 0.01)
        assert out.dtype == torch.float32
        assert (out.double() - ref).abs().max() < 1e-4


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"rtol": -0.1}, "rtol"),
        ({"rtol": 1.0}, "rtol"),
        ({"rtol": True}, "rtol"),
        ({"rtol": 1e-3, "diagnostics": True}, "diagnostics"),
    ],
)
def test_le_mmse_bad_rtol(kwargs, match):
    train, A, B, y = problem("denoising", "identity", "gray", 0.3)
    with pytest.raises((ValueError, TypeError), match=match):  # bool: TypeError
        lc.le_mmse(y, train, A, 0.3, P, B, **kwargs)


@pytest.mark.parametrize(
    "kwargs,match", [({"group_size": 0}, "group_size"), ({"kernel": "flash"}, "kernel")]
)
def test_lemmse_bad_construction(kwargs, match):
    train, A, B, _ = problem("denoising", "identity", "gray", 0.3)
    with pytest.raises(ValueError, match=match):
        lc.LEMMSE(train, A, P, B, **kwargs)


@pytest.mark.parametrize("est", ["mmse", "augmented_mmse", "e_mmse"])
def test_global_streaming_chunks(est):
    train, A, B, y = problem("inpaint_random", "adjoint", "gray", 0.3)
    outs = [run(est, y, train, A, 0.3, B, chunk_size=c) for c in (1, 3, None)]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------ properties


EQUIVARIANCE_CASES = [
    ("denoising", "identity"),
    ("blur_gaussian", "identity"),
    ("blur_gaussian", "adjoint"),
    ("blur_defocus", "adjoint"),
]


@pytest.mark.parametrize("op_name,kind", EQUIVARIANCE_CASES)
@pytest.mark.parametrize("est", ["e_mmse", "le_mmse"])
def test_translation_equivariance(est, op_name, kind):
    """``f(T_g y) = T_g f(y)`` for convolutional A and B (circulant or identity)."""
    shape = (1, 6, 7)
    A = OPERATORS[op_name](shape)
    B = make_pre(A, kind)
    train = rand_images(4, shape, 6)
    y = A.measure(rand_images(2, shape, 7), 0.3, torch.Generator().manual_seed(8))
    for g in [(2, 3), (-1, 5)]:
        lhs = run(est, shift(y, g), train, A, 0.3, B)
        rhs = shift(run(est, y, train, A, 0.3, B), g)
        torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("op_name,kind", [("denoising", "identity"), ("inpaint_center", "adjoint")])
def test_le_mmse_locality(op_name, kind):
    """Changing y (hence v = B y) outside the p×p window of m leaves output m unchanged."""
    shape = (1, 7, 8)
    A = OPERATORS[op_name](shape)
    B = make_pre(A, kind)
    train = rand_images(5, shape, 9)
    y = A.measure(rand_images(1, shape, 10), 0.3, torch.Generator().manual_seed(11))
    m = (3, 4)
    window = torch.zeros(shape[-2:], dtype=torch.bool)
    window[m[0] - 1 : m[0] + 2, m[1] - 1 : m[1] + 2] = True
    perturbation = torch.randn(y.shape, generator=torch.Generator().manual_seed(12), dtype=y.dtype)
    y2 = y + 0.5 * perturbation * (~window)
    out1 = run("le_mmse", y, train, A, 0.3, B)
    out2 = run("le_mmse", y2, train, A, 0.3, B)
    torch.testing.assert_close(out2[..., m[0], m[1]], out1[..., m[0], m[1]], rtol=0, atol=1e-12)
    assert (out2 - out1).abs().max() > 1e-3  # the perturbation does change the other pixels


@pytest.mark.parametrize("sigma", SIGMAS)
def test_le_mmse_full_patch_is_e_mmse(sigma):
    """LE-MMSE with p = H = W (odd) equals the E-MMSE for denoising (THEORY.md, fact 3)."""
    A = ops.Denoising()
    train = rand_images(4, (1, 5, 5), 13)
    y = A.measure(rand_images(3, (1, 5, 5), 14), sigma, torch.Generator().manual_seed(15))
    le = run("le_mmse", y, train, A, sigma, patch_size=5)
    e = run("e_mmse", y, train, A, sigma)
    torch.testing.assert_close(le, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("op_name", ["blur_gaussian", "blur_defocus"])
@pytest.mark.parametrize("kind", ["identity", "tikhonov"])
def test_cor37_e_mmse_is_augmented_for_blur(op_name, kind):
    train, A, B, y = problem(op_name, kind, "color", 0.3)
    e = run("e_mmse", y, train, A, 0.3, B)
    aug = run("augmented_mmse", y, train, A, 0.3, B)
    torch.testing.assert_close(e, aug, rtol=1e-10, atol=1e-10)


def test_cor37_e_mmse_differs_from_augmented_for_inpainting():
    train, A, B, y = problem("inpaint_center", "adjoint", "gray", 0.3)
    e = run("e_mmse", y, train, A, 0.3, B)
    aug = run("augmented_mmse", y, train, A, 0.3, B)
    assert (e - aug).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ops.PREINVERSES)
def test_lemma_b3_reconstruction_equivariance(kind):
    """``f(B(A T_g x + σe)) = T_g f(B(A x + σ T_g⁻¹ e))`` (same noise, shifted), blur."""
    shape = (3, 5, 6)
    A = OPERATORS["blur_gaussian"](shape)
    B = make_pre(A, kind)
    train = rand_images(4, shape, 16)
    x = rand_images(2, shape, 17)
    e = torch.randn(x.shape, generator=torch.Generator().manual_seed(18), dtype=x.dtype)
    sigma, g = 0.3, (1, 4)
    lhs = run("e_mmse", A.A(shift(x, g)) + sigma * e, train, A, sigma, B)
    rhs = shift(run("e_mmse", A.A(x) + sigma * shift(e, (-g[0], -g[1])), train, A, sigma, B), g)
    torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "op_name,kind",
    [("denoising", "identity"), ("inpaint_center", "adjoint"), ("blur_gaussian", "pinv")],
)
def test_mmse_memorisation(op_name, kind):
    """σ → 0: the MMSE returns the training image whose (projected) measurement is nearest."""
    shape = (1, 5, 6)
    A = OPERATORS[op_name](shape)
    B = make_pre(A, kind)
    train = rand_images(6, shape, 19)
    y = A.measure(rand_images(3, shape, 20), 0.1, torch.Generator().manual_seed(21))
    proj = torch.linalg.pinv(B.matrix(A.output_shape(shape)))
    proj = proj @ B.matrix(A.output_shape(shape))
    resid = (y.flatten(1)[:, None, :] - A.A(train).flatten(1)[None]) @ proj.T
    dist = resid.square().sum(-1)  # (n, N)
    best = dist.argmin(dim=1)
    gaps = dist.sort(dim=1).values
    assert ((gaps[:, 1] - gaps[:, 0]) / (2 * 1e-3**2) > 50).all(), "test data has near ties"
    out = run("mmse", y, train, A, 1e-3, B)
    torch.testing.assert_close(out, train[best], rtol=0, atol=1e-6)


def test_e_mmse_memorisation():
    """σ → 0, denoising: the E-MMSE returns the nearest translate ``T_g x_k``."""
    shape = (1, 5, 6)
    A = ops.Denoising()
    train = rand_images(4, shape, 22)
    y = A.measure(rand_images(2, shape, 23), 0.1, torch.Generator().manual_seed(24))
    out = run("e_mmse", y, train, A, 1e-3)
    for i in range(y.shape[0]):
        candidates = [
            (float((y[i] - shift(train[k], (gi, gj))).square().sum()), k, (gi, gj))
            for k in range(train.shape[0])
            for gi in range(shape[1])
            for gj in range(shape[2])
        ]
        candidates.sort()
        assert (candidates[1][0] - candidates[0][0]) / (2 * 1e-3**2) > 50
        _, k, g = candidates[0]
        torch.testing.assert_close(out[i], shift(train[k], g), rtol=0, atol=1e-6)


@pytest.mark.parametrize("sigma", [0.05, 0.3, 1.0, 10.0])
@pytest.mark.parametrize("op_name,kind", [("denoising", "identity"), ("inpaint_random", "adjoint")])
def test_convex_hull(op_name, kind, sigma):
    """MMSE: a convex combination of the x_k; E-MMSE: within the range of the x_k."""
    shape = (3, 5, 6)
    A = OPERATORS[op_name](shape)
    B = make_pre(A, kind)
    train = rand_images(5, shape, 25)
    y = A.measure(rand_images(3, shape, 26), sigma, torch.Generator().manual_seed(27))
    out, diag = run("mmse", y, train, A, sigma, B, diagnostics=True)
    lo, hi = train.min(dim=0).values, train.max(dim=0).values
    assert ((out >= lo - 1e-12) & (out <= hi + 1e-12)).all()
    eff = diag.effective_images
    assert eff.shape == (y.shape[0],)
    assert ((eff >= 1 - 1e-12) & (eff <= train.shape[0] + 1e-9)).all()
    weights = diag.image_weights
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(y.shape[0], dtype=torch.float64))
    torch.testing.assert_close(out.flatten(1), weights @ train.flatten(1), rtol=1e-10, atol=1e-10)
    out_e, diag_e = run("e_mmse", y, train, A, sigma, B, diagnostics=True)
    lo_c = train.amin(dim=(0, 2, 3))[:, None, None]
    hi_c = train.amax(dim=(0, 2, 3))[:, None, None]
    assert ((out_e >= lo_c - 1e-12) & (out_e <= hi_c + 1e-12)).all()
    eff_e = diag_e.effective_images
    assert ((eff_e >= 1 - 1e-12) & (eff_e <= train.shape[0] + 1e-9)).all()


def test_le_mmse_patchwork_limit():
    """σ → 0 (denoising): each pixel is the centre of the nearest training patch."""
    shape = (1, 6, 7)
    A = ops.Denoising()
    train = rand_images(5, shape, 28)
    y = A.measure(rand_images(2, shape, 29), 0.1, torch.Generator().manual_seed(30))
    out = run("le_mmse", y, train, A, 1e-3)
    h, w = shape[1:]
    pats = torch.stack([patch_matrix(shape, (i, j), P) for i in range(h) for j in range(w)])
    keys = torch.einsum("lpd,kd->lkp", pats, train.flatten(1))  # (L, N, P): Π_n x_k
    checked = 0
    for q in range(y.shape[0]):
        for li in range(h * w):
            u = pats[li] @ y[q].flatten()
            dist = (keys - u).square().sum(-1).flatten()  # over (n, k)
            order = dist.argsort()
            if (dist[order[1]] - dist[order[0]]) / (2 * 1e-3**2) < 50:
                continue  # near tie: the limit averages, skip
            n, k = divmod(int(order[0]), train.shape[0])
            expected = train[k, :, n // w, n % w]
            torch.testing.assert_close(out[q, :, li // w, li % w], expected, rtol=0, atol=1e-6)
            checked += 1
    assert checked >= 0.9 * y.shape[0] * h * w


def _smooth_images(n, seed, size=28):
    gen = torch.Generator().manual_seed(seed)
    noise = torch.rand((n, 1, size, size), generator=gen)
    return ops.Blur.gaussian(1.5).A(noise).clamp(0, 1)


@functools.cache
def _fashion():
    try:
        x = lc.data.load("fashionmnist", n=50, download=False)
        source = "FashionMNIST"
    except (FileNotFoundError, ValueError, OSError):
        x, source = _smooth_images(50, 31), "smooth random images"
    return x[:48], x[48:], source


@pytest.mark.parametrize("sigma", [0.01, 0.1, 1.0])
def test_float32_vs_float64(sigma):
    """FashionMNIST (or smooth images), N = 48, p = 5: float32 within 1e-3 of float64."""
    train, clean, source = _fashion()
    A = ops.Denoising()
    y = A.measure(clean, sigma, torch.Generator().manual_seed(32))
    diffs = {}
    for est in ("mmse", "e_mmse", "le_mmse"):
        kw = {"patch_size": 5} if est == "le_mmse" else {}
        out32 = run(est, y, train, A, sigma, dtype=torch.float32, **kw)
        out64 = run(est, y.double(), train.double(), A, sigma, dtype=torch.float64, **kw)
        assert out32.dtype == torch.float32 and torch.isfinite(out32).all()
        diffs[est] = (out32.double() - out64).abs().max().item()
    print(f"\n{source}, sigma={sigma}: max |float32 - float64| = {diffs}")
    assert max(diffs.values()) <= 1e-3, diffs


def test_float32_finite_at_small_sigma():
    train, clean, _ = _fashion()
    A = ops.Denoising()
    y = A.measure(clean[:1], 1e-3, torch.Generator().manual_seed(33))
    for est in ESTIMATORS:
        kw = {"patch_size": 5} if est == "le_mmse" else {}
        out = run(est, y, train[:12], A, 1e-3, dtype=torch.float32, **kw)
        assert out.dtype == torch.float32
        assert torch.isfinite(out).all(), est


# ------------------------------------------------------------------ pseudo-determinant


def _soft_preinverse_problem():
    """NOTES.md: denoising, B = diag(b), b = 0.15 on a 2×3 block, 4×5 gray, N = 6."""
    shape = (1, 4, 5)
    b = torch.ones(shape, dtype=torch.float64)
    b[:, 1:3, 1:4] = 0.15
    B = ops.Diagonal(b)
    A = ops.Denoising()
    train = rand_images(6, shape, 34)
    y = A.measure(rand_images(3, shape, 35), 0.4, torch.Generator().manual_seed(36))
    return train, A, B, y


def test_pdet_matters():
    train, A, B, y = _soft_preinverse_problem()
    out = run("le_mmse", y, train, A, 0.4, B, patch_size=3)
    with_pdet = ref_le_mmse(y, train, A, 0.4, 3, B)
    without = ref_le_mmse(y, train, A, 0.4, 3, B, include_pdet=False)
    torch.testing.assert_close(out, with_pdet.x_hat, **TOL)
    gap = (without.x_hat - with_pdet.x_hat).abs().max()
    assert gap > 1e-2, f"the pdet term should change the estimate, max change {gap:.2e}"
    assert (out - without.x_hat).abs().max() > 1e-2


# ------------------------------------------------------------------------ diagnostics


DIAG_CASES = [
    ("denoising", "identity", "gray"),
    ("inpaint_center", "adjoint", "color"),
    ("inpaint_random", "tikhonov", "gray"),
    ("blur_gaussian", "pinv", "color"),
    ("down_gaussian", "adjoint", "gray"),
    ("down_box", "pinv", "color"),
]


@pytest.mark.parametrize("sigma", [0.05, 0.3])
@pytest.mark.parametrize("op_name,kind,color", DIAG_CASES)
@pytest.mark.parametrize("est", ["mmse", "augmented_mmse", "e_mmse"])
def test_global_diagnostics(est, op_name, kind, color, sigma):
    train, A, B, y = problem(op_name, kind, color, sigma)
    out, diag = run(est, y, train, A, sigma, B, diagnostics=True)
    ref = reference(est, op_name, kind, color, sigma)
    torch.testing.assert_close(out, ref.x_hat, **TOL)
    torch.testing.assert_close(diag.effective_images.double(), ref.effective_images, **TOL)


def _check_top(diag, ref_weights, top_k, tol=None):
    """Top-k weights everywhere; sources wherever the ranking is unambiguous."""
    values, image, location = top_terms(ref_weights, top_k)
    tol = tol or {"rtol": 1e-8, "atol": 1e-10}
    torch.testing.assert_close(diag.top_weights.double(), values, **tol)
    assert diag.top_image.dtype == torch.int64 and diag.top_location.dtype == torch.int64
    # rank j is unambiguous when its weight is > 0 and separated from ranks j-1 and j+1
    all_sorted = ref_weights.flatten(-3).sort(dim=-1, descending=True).values
    padded = torch.cat([all_sorted[..., :1] * 2 + 1, all_sorted], dim=-1)
    prev, cur, nxt = padded[..., :top_k], padded[..., 1 : top_k + 1], padded[..., 2 : top_k + 2]
    margin = 1 + max(1e-6, 10 * tol["rtol"])
    clear = (cur > 1e-12) & (prev > cur * margin) & (cur > nxt * margin)
    assert clear[..., 0].float().mean() > 0.9, "too many ties for the dominant source"
    assert (diag.top_image[clear] == image[clear]).all()
    assert (diag.top_location[clear] == location[clear]).all()


@pytest.mark.parametrize("sigma", [0.05, 0.3, 1.0])
@pytest.mark.parametrize("op_name,kind,color", DIAG_CASES)
def test_le_mmse_diagnostics(op_name, kind, color, sigma):
    train, A, B, y = problem(op_name, kind, color, sigma)
    ref = reference("le_mmse", op_name, kind, color, sigma)
    tol = tolerance("le_mmse", op_name, kind, color)
    h, w = train.shape[-2:]
    for q in (0.5, 0.9):
        out, diag = run("le_mmse", y, train, A, sigma, B, diagnostics=True, mass=q, top_k=5)
        torch.testing.assert_close(out, ref.x_hat, **tol)
        assert diag.log_density.shape == (y.shape[0], h, w)
        torch.testing.assert_close(diag.log_density.double(), ref.log_density, **tol)
        assert diag.top_weights.shape == (y.shape[0], h, w, 5)
        assert diag.top_location.shape == (y.shape[0], h, w, 5, 2)
        _check_top(diag, ref.weights, 5, tol if tol is not TOL else None)
        expected = mass_count(ref.weights, q)
        assert diag.mass_count.dtype == torch.int64
        assert diag.mass_count.shape == (y.shape[0], h, w)
        err = (diag.mass_count - expected).abs().double()
        assert (err <= 0.02 * expected.double() + 1).all(), (diag.mass_count, expected)


def test_le_mmse_diagnostics_soft_preinverse():
    """Diagnostics where Q_nQ_nᵀ varies with the location (pdet in the log-density)."""
    train, A, B, y = _soft_preinverse_problem()
    ref = ref_le_mmse(y, train, A, 0.4, 3, B)
    out, diag = run("le_mmse", y, train, A, 0.4, B, diagnostics=True, mass=0.9, top_k=3)
    torch.testing.assert_close(diag.log_density.double(), ref.log_density, **TOL)
    _check_top(diag, ref.weights, 3)
    expected = mass_count(ref.weights, 0.9)
    assert ((diag.mass_count - expected).abs() <= 0.02 * expected + 1).all()


def test_le_mmse_top1_is_dominant_source_at_small_sigma():
    """Top-1 source = argmax of the reference weights (the patchwork map)."""
    train, A, B, y = problem("denoising", "identity", "gray", 0.05)
    ref = reference("le_mmse", "denoising", "identity", "gray", 0.05)
    _, diag = run("le_mmse", y, train, A, 0.05, B, diagnostics=True, top_k=1)
    _, image, location = top_terms(ref.weights, 1)
    assert (diag.top_image[..., 0] == image[..., 0]).all()
    assert (diag.top_location[..., 0, :] == location[..., 0, :]).all()
    # the noise-free training query (index 2) is its own dominant source everywhere
    assert (diag.top_image[2, ..., 0] == 2).all()
    h, w = train.shape[-2:]
    grid = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), dim=-1)
    assert (diag.top_location[2, ..., 0, :] == grid).all()


# diagnostics with many small key groups, so that the group bounds actually skip pairs
PRUNE_DIAG_CASES = [
    ("denoising", "identity", "gray"),
    ("inpaint_center", "adjoint", "color"),
    ("blur_gaussian", "pinv", "gray"),
    ("down_gaussian", "adjoint", "gray"),
]


def _spy_scans(monkeypatch):
    """Record the number of queries of every explicit (group, block of queries) scan."""
    scanned = []
    scan = lc.lemmse.diagnostics.Diagnostics._term_logits

    def spy(self, cls, g, w, sigma):
        scanned.append(len(w))
        return scan(self, cls, g, w, sigma)

    monkeypatch.setattr(lc.lemmse.diagnostics.Diagnostics, "_term_logits", spy)
    return scanned


def _unpruned(monkeypatch):
    """Make the diagnostics scan every (query, group) pair and the whole histogram."""
    every = lc.lemmse.diagnostics._full_cap
    monkeypatch.setattr(lc.lemmse.diagnostics, "_mass_guess", every)
    bounds = lc.lemmse.diagnostics.Diagnostics._term_bounds

    def no_bounds(self, cls, w, masses, sigma):
        return torch.full_like(bounds(self, cls, w, masses, sigma), torch.inf)

    monkeypatch.setattr(lc.lemmse.diagnostics.Diagnostics, "_term_bounds", no_bounds)


@pytest.mark.parametrize("sigma", [0.05, 0.3])
@pytest.mark.parametrize("op_name,kind,color", PRUNE_DIAG_CASES)
def test_le_mmse_diagnostics_small_groups(op_name, kind, color, sigma, monkeypatch):
    """Group size 4: the bounds skip groups, and the diagnostics stay those of the
    reference (top-k, log-density) and of the scan of every term (mass counts, exactly)."""
    train, A, B, y = problem(op_name, kind, color, sigma)
    ref = reference("le_mmse", op_name, kind, color, sigma)
    tol = tolerance("le_mmse", op_name, kind, color)
    engine = lc.LEMMSE(train, A, P, B, dtype=torch.float64, group_size=4)
    assert max(len(cls.bounds) for cls in engine.classes) > 1
    for top_k, q in ((1, 0.9), (5, 0.5)):
        out, diag = engine(y, sigma, diagnostics=True, mass=q, top_k=top_k)
        torch.testing.assert_close(out, ref.x_hat, **tol)
        torch.testing.assert_close(diag.log_density.double(), ref.log_density, **tol)
        _check_top(diag, ref.weights, top_k, tol if tol is not TOL else None)
        with monkeypatch.context() as patch:
            _unpruned(patch)
            _, every = engine(y, sigma, diagnostics=True, mass=q, top_k=top_k)
        assert torch.equal(diag.mass_count, every.mass_count)
        assert torch.equal(diag.top_image, every.top_image)
        assert torch.equal(diag.top_location, every.top_location)
        torch.testing.assert_close(diag.top_weights, every.top_weights, rtol=1e-12, atol=0)


def test_le_mmse_diagnostics_skip_groups(monkeypatch):
    """The bounds leave most (query, group) pairs out at a small σ, and all in without them."""
    train, A, B, y = problem("denoising", "identity", "gray", 0.05)
    engine = lc.LEMMSE(train, A, P, B, dtype=torch.float64, group_size=4)
    (cls,) = engine.classes
    pairs = y.shape[0] * y.shape[-2] * y.shape[-1] * len(cls.bounds)
    scanned = _spy_scans(monkeypatch)
    _, diag = engine(y, 0.05, diagnostics=True, mass=0.9, top_k=5)
    assert 0 < sum(scanned) < pairs / 3
    scanned.clear()
    with monkeypatch.context() as patch:
        _unpruned(patch)
        _, every = engine(y, 0.05, diagnostics=True, mass=0.9, top_k=5)
    assert sum(scanned) >= pairs
    assert torch.equal(diag.mass_count, every.mass_count)
    assert torch.equal(diag.top_image, every.top_image)


@pytest.mark.parametrize("caps", ["guess", "guess and cap"])
def test_le_mmse_mass_count_fallbacks(caps, monkeypatch):
    """Caps that prove too tight are redone (with the certified cap, then in full): the
    counts do not change."""
    train, A, B, y = problem("inpaint_center", "adjoint", "color", 0.3)
    engine = lc.LEMMSE(train, A, P, B, dtype=torch.float64, group_size=4)
    _, diag = engine(y, 0.3, diagnostics=True, mass=0.9, top_k=2)

    def tight(views, rows, mass, log_norm, sync=None):
        return torch.zeros_like(rows)

    monkeypatch.setattr(lc.lemmse.diagnostics, "_mass_guess", tight)
    if caps == "guess and cap":
        monkeypatch.setattr(lc.lemmse.diagnostics, "_mass_cap", tight)
    redone = []
    counts = lc.lemmse.diagnostics._MassHistogram.counts

    def spy(self, mass, sync):
        out = counts(self, mass, sync)
        redone.append(int((~out[1]).sum()))
        return out

    monkeypatch.setattr(lc.lemmse.diagnostics._MassHistogram, "counts", spy)
    _, again = engine(y, 0.3, diagnostics=True, mass=0.9, top_k=2)
    assert redone[0] > 0
    assert torch.equal(again.mass_count, diag.mass_count)
    assert torch.equal(again.top_image, diag.top_image)


# ------------------------------------------------------------------------- bad input


ALL_ESTIMATORS = (*ESTIMATORS, "smoothed_le_mmse")


def call(est, y, train, A, sigma=0.3, patch_size=3, B=None, **kwargs):
    if est == "le_mmse":
        return lc.le_mmse(y, train, A, sigma, patch_size, B, **kwargs)
    if est == "smoothed_le_mmse":
        eps, samples = kwargs.pop("eps", 0.1), kwargs.pop("samples", 2)
        return lc.smoothed_le_mmse(
            y, train, A, sigma, patch_size, B, eps=eps, samples=samples, **kwargs
        )
    return getattr(lc, est)(y, train, A, sigma, B, **kwargs)


def _small():
    A = ops.Denoising()
    train = rand_images(3, (1, 5, 6), 40).float()
    y = A.measure(rand_images(2, (1, 5, 6), 41).float(), 0.3)
    return train, A, y


@pytest.mark.parametrize("sigma", [0, -1, math.nan, math.inf])
@pytest.mark.parametrize("est", ALL_ESTIMATORS)
def test_bad_sigma(est, sigma):
    train, A, y = _small()
    with pytest.raises(ValueError, match="sigma"):
        call(est, y, train, A, sigma=sigma)


@pytest.mark.parametrize("patch_size", [4, 7])
@pytest.mark.parametrize("est", ["le_mmse", "smoothed_le_mmse"])
def test_bad_patch_size(est, patch_size):
    train, A, y = _small()  # 5×6 images: 7 is too large, 4 is even
    with pytest.raises(ValueError, match="patch_size"):
        call(est, y, train, A, patch_size=patch_size)


@pytest.mark.parametrize("est", ALL_ESTIMATORS)
def test_empty_train(est):
    train, A, y = _small()
    with pytest.raises(ValueError, match="train"):
        call(est, y, train[:0], A)


@pytest.mark.parametrize("est", ALL_ESTIMATORS)
def test_train_operator_size_mismatch(est):
    A = ops.Inpainting.center((1, 5, 6), box=2)
    train = rand_images(3, (1, 6, 6), 42)
    y = rand_images(1, (1, 6, 6), 43)
    with pytest.raises(ValueError, match="train"):
        call(est, y, train, A)


@pytest.mark.parametrize("est", ALL_ESTIMATORS)
def test_y_shape_mismatch(est):
    train, A, y = _small()
    with pytest.raises(ValueError, match="y"):
        call(est, y[..., :5], train, A)
    A2 = ops.Downsampling(2)
    train2 = rand_images(3, (1, 6, 6), 44)
    with pytest.raises(ValueError, match="y"):
        call(est, train2[:1], train2, A2)  # y at full size, A downsamples


@pytest.mark.parametrize("est", ALL_ESTIMATORS)
def test_nan_input(est):
    train, A, y = _small()
    bad_y = y.clone()
    bad_y[0, 0, 1, 1] = math.nan
    with pytest.raises(ValueError, match="y"):
        call(est, bad_y, train, A)
    bad_train = train.clone()
    bad_train[1, 0, 2, 2] = math.nan
    with pytest.raises(ValueError, match="train"):
        call(est, y, bad_train, A)


def test_smoothed_bad_eps_and_samples():
    train, A, y = _small()
    with pytest.raises(ValueError, match="eps"):
        call("smoothed_le_mmse", y, train, A, eps=0.0)
    with pytest.raises(ValueError, match="samples"):
        call("smoothed_le_mmse", y, train, A, samples=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="mixed devices need a GPU")
@pytest.mark.parametrize("est", ALL_ESTIMATORS)
def test_mixed_devices(est):
    train, A, y = _small()
    with pytest.raises(ValueError, match="y"):
        call(est, y.cuda(), train, A)


def test_smoothed_le_mmse_is_the_monte_carlo_average():
    """Sec. 4.4: with the same draws, the smoothed estimate averages LE-MMSEs of v + eps z."""
    train, A, B, y = problem("denoising", "identity", "gray", 0.3)
    eps, samples = 0.1, 3
    got = lc.smoothed_le_mmse(
        y,
        train,
        A,
        0.3,
        3,
        eps=eps,
        samples=samples,
        generator=torch.Generator().manual_seed(5),
        dtype=torch.float64,
    )
    gen = torch.Generator().manual_seed(5)
    draws = [torch.randn(y.shape, generator=gen, dtype=torch.float64) for _ in range(samples)]
    expected = (
        sum(lc.le_mmse(y.double() + eps * z, train, A, 0.3, 3, dtype=torch.float64) for z in draws)
        / samples
    )
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert (got - lc.le_mmse(y, train, A, 0.3, 3, dtype=torch.float64)).abs().max() > 1e-6


@pytest.mark.parametrize("kind", ["identity", "pinv"])
def test_engine_smoothed_is_smoothed_le_mmse(kind):
    """``LEMMSE.smoothed`` on ``v = B y`` draws the z of :func:`smoothed_le_mmse`; another
    draw gives another estimate; bad eps and samples are named."""
    train, A, B, y = problem("blur_gaussian", kind, "gray", 0.2)
    engine = lc.LEMMSE(train, A, 3, B, dtype=torch.float64)
    ours = engine.smoothed(B.A(y.double()), 0.2, 0.1, 5, torch.Generator().manual_seed(7))
    theirs = lc.smoothed_le_mmse(
        y,
        train,
        A,
        0.2,
        3,
        B,
        eps=0.1,
        samples=5,
        dtype=torch.float64,
        generator=torch.Generator().manual_seed(7),
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    other = engine.smoothed(B.A(y.double()), 0.2, 0.1, 5, torch.Generator().manual_seed(8))
    assert (other - ours).abs().max() > 1e-4
    with pytest.raises(ValueError, match="samples"):
        engine.smoothed(B.A(y.double()), 0.2, 0.1, 0)
    with pytest.raises(ValueError, match="eps"):
        engine.smoothed(B.A(y.double()), 0.2, 0.0, 2)


@pytest.mark.parametrize("diagnostics", [False, True])
def test_le_mmse_with_fully_hidden_patches(diagnostics):
    """Rank-0 locations: patches entirely inside the hole match only each other."""
    shape = (1, 7, 7)
    A = ops.Inpainting.center(shape, box=5)
    B = ops.preinverse(A, "adjoint")
    gen = torch.Generator().manual_seed(3)
    train = torch.rand((4, *shape), generator=gen, dtype=torch.float64)
    y = A.measure(torch.rand((2, *shape), generator=gen, dtype=torch.float64), 0.2, gen)
    ref = ref_le_mmse(y, train, A, 0.2, 3, B)
    out = lc.le_mmse(y, train, A, 0.2, 3, B, dtype=torch.float64, diagnostics=diagnostics)
    if diagnostics:
        out, diag = out
        assert (diag.rank[:, 3, 3] == 0).all()
        torch.testing.assert_close(diag.log_density, ref.log_density, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(out, ref.x_hat, rtol=1e-8, atol=1e-8)
