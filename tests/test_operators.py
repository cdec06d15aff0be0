"""Operators and pre-inverses against dense float64 linear algebra (every operator)."""

import math

import pytest
import torch

from lemmse_core import operators as ops

SHAPES = {"gray": (1, 8, 10), "color": (3, 10, 8)}


def make_operator(name, shape):
    return {
        "denoising": lambda: ops.Denoising(),
        "inpaint_center": lambda: ops.Inpainting.center(shape, box=3),
        "inpaint_random": lambda: ops.Inpainting.random(shape, fraction=0.3, seed=1),
        "blur_gaussian": lambda: ops.Blur.gaussian(1.0),
        "blur_defocus": lambda: ops.Blur.defocus(1.5),
        "down_box": lambda: ops.Downsampling(2),
        "down_gaussian": lambda: ops.Downsampling(2, antialias="gaussian", std=0.8),
    }[name]()


OPERATORS = [
    "denoising",
    "inpaint_center",
    "inpaint_random",
    "blur_gaussian",
    "blur_defocus",
    "down_box",
    "down_gaussian",
]


@pytest.fixture(params=OPERATORS)
def op_name(request):
    return request.param


@pytest.fixture(params=list(SHAPES))
def shape(request):
    return SHAPES[request.param]


def dense(op, shape):
    return op.matrix(shape)


def apply_dense(fn, op, shape):
    """Dense matrix of ``fn`` (a map from the output space of ``op`` to its input space)."""
    return ops.dense_matrix(fn, op.output_shape(shape))


def test_dense_matrix_columns_are_the_images_of_the_basis():
    def fn(x):
        return 3 * x.flip(-1)

    shape = (2, 3, 4)
    d = math.prod(shape)
    mat = ops.dense_matrix(fn, shape)
    basis = torch.eye(d, dtype=torch.float64).reshape(d, *shape)
    assert mat.shape == (d, d)
    torch.testing.assert_close(mat.T, fn(basis).reshape(d, d))
    torch.testing.assert_close(mat @ mat.T, 9 * torch.eye(d, dtype=torch.float64))


def rand(shape, n=3, dtype=torch.float64, seed=0):
    return torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_dense_export_matches_application(op_name, shape):
    op = make_operator(op_name, shape)
    x = rand(shape)
    mat = dense(op, shape)
    expected = op.A(x).reshape(x.shape[0], -1)
    torch.testing.assert_close(x.reshape(x.shape[0], -1) @ mat.T, expected, rtol=0, atol=1e-12)


def test_adjointness(op_name, shape):
    op = make_operator(op_name, shape)
    x = rand(shape, seed=1)
    y = rand(op.output_shape(shape), seed=2)
    lhs = (op.A(x) * y).sum(dim=(1, 2, 3))
    rhs = (x * op.adjoint(y)).sum(dim=(1, 2, 3))
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(apply_dense(op.adjoint, op, shape), dense(op, shape).T)


def test_penrose_identities(op_name, shape):
    op = make_operator(op_name, shape)
    a = dense(op, shape)
    p = apply_dense(op.pinv, op, shape)
    tol = dict(rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(a @ p @ a, a, **tol)
    torch.testing.assert_close(p @ a @ p, p, **tol)
    torch.testing.assert_close((a @ p).T, a @ p, **tol)
    torch.testing.assert_close((p @ a).T, p @ a, **tol)
    torch.testing.assert_close(p, torch.linalg.pinv(a), **tol)


def test_tikhonov_matches_dense_solve(op_name, shape):
    op = make_operator(op_name, shape)
    a = dense(op, shape)
    lam = 0.05
    expected = torch.linalg.solve(a.T @ a + lam * torch.eye(a.shape[1], dtype=a.dtype), a.T)
    got = apply_dense(lambda y: op.tikhonov(y, lam), op, shape)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", ops.PREINVERSES)
def test_preinverse_matrices(op_name, shape, kind):
    op = make_operator(op_name, shape)
    if kind == "identity" and isinstance(op, ops.Downsampling):
        with pytest.raises(ValueError, match="identity"):
            ops.preinverse(op, kind)
        return
    lam = 0.1 if kind == "tikhonov" else None
    b = ops.preinverse(op, kind, lam=lam)
    a = dense(op, shape)
    expected = {
        "identity": lambda: torch.eye(a.shape[0], dtype=a.dtype),
        "adjoint": lambda: a.T,
        "pinv": lambda: torch.linalg.pinv(a),
        "tikhonov": lambda: torch.linalg.solve(a.T @ a + lam * torch.eye(a.shape[1]).double(), a.T),
    }[kind]()
    got = b.matrix(op.output_shape(shape))
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    # B's adjoint and its structural facts agree with its matrix.
    torch.testing.assert_close(apply_dense(b.adjoint, b, op.output_shape(shape)), got.T)
    check_structure(b, op.output_shape(shape), got)
    # The RMS noise gain of B (the networks' input noise level) is ‖B‖_F / sqrt(rows).
    gain = (expected.square().sum() / expected.shape[0]).sqrt().item()
    assert b.noise_gain(op.output_shape(shape)) == pytest.approx(gain, rel=1e-9)


def check_structure(b, shape, mat):
    c, h, w = shape
    if isinstance(b, ops.Identity):
        torch.testing.assert_close(mat, torch.eye(mat.shape[0], dtype=mat.dtype))
    elif isinstance(b, ops.Diagonal):
        torch.testing.assert_close(torch.diag(mat), b.diagonal(shape).reshape(-1).double())
        torch.testing.assert_close(mat, torch.diag(torch.diag(mat)))
    elif isinstance(b, ops.Circulant):
        kernel = torch.fft.ifft2(b.transfer(h, w))
        assert kernel.imag.abs().max() < 1e-10
        impulse = torch.zeros(1, c, h, w, dtype=torch.float64)
        impulse[..., 0, 0] = 1
        torch.testing.assert_close(b.A(impulse)[0, 0], kernel.real)
    else:
        assert b.period is not None
        bbt = mat @ mat.T  # commutes with shifts by the period, on the output grid
        out = b.output_shape(shape)
        idx = torch.arange(mat.shape[0]).reshape(out)
        shifted = torch.roll(idx, shifts=b.period, dims=(1, 2)).reshape(-1)
        torch.testing.assert_close(bbt[shifted][:, shifted], bbt)


@pytest.mark.parametrize("kind", ops.PREINVERSES)
def test_structure_methods_match_dense(op_name, shape, kind):
    """What the estimators ask of B (P_B, patch classes) and of A (norms over all shifts)
    agree with dense linear algebra."""
    op = make_operator(op_name, shape)
    if kind == "identity" and isinstance(op, ops.Downsampling):
        return
    b = ops.preinverse(op, kind, lam=0.1 if kind == "tikhonov" else None)
    y_shape = op.output_shape(shape)
    mat = b.matrix(y_shape)
    proj = b.row_projector(y_shape)
    got = torch.eye(mat.shape[1]).double() if proj is None else apply_dense(proj, op, shape)
    torch.testing.assert_close(got, torch.linalg.pinv(mat) @ mat, rtol=1e-9, atol=1e-9)
    labels, p = b.patch_classes(shape, 3), 3
    bbt = (mat @ mat.T).reshape(*shape, *shape)
    grams = [_patch_gram(bbt, divmod(n, shape[2]), p) for n in range(shape[1] * shape[2])]
    for n, label in enumerate(labels.tolist()):
        first = int(torch.nonzero(labels == label)[0])
        torch.testing.assert_close(grams[n], grams[first], rtol=1e-12, atol=1e-12)
    norms = op.shift_norms(shape)
    if norms is not None:
        x = rand(shape, n=2, seed=3)
        expected = torch.stack(
            [
                op.A(torch.roll(x, shifts=(i, j), dims=(2, 3))).pow(2).sum(dim=(1, 2, 3))
                for i in range(shape[1])
                for j in range(shape[2])
            ],
            dim=1,
        ).reshape(1, 2, shape[1], shape[2])
        torch.testing.assert_close(norms(x).expand_as(expected), expected)


def _patch_gram(bbt, at, p):
    """Gram matrix of the circular ``p × p`` patch at ``at`` from ``B Bᵀ`` ``(C, H, W)²``."""
    _, h, w = bbt.shape[:3]
    rows = torch.arange(at[0] - p // 2, at[0] + p // 2 + 1) % h
    cols = torch.arange(at[1] - p // 2, at[1] + p // 2 + 1) % w
    sub = bbt[:, rows][:, :, cols][..., rows, :][..., cols]
    return sub.reshape(-1, sub[0, 0, 0].numel())


@pytest.mark.parametrize("name", ["blur_gaussian", "blur_defocus"])
def test_fft_blur_matches_direct_circular_convolution(name):
    shape = (2, 9, 7)
    op = make_operator(name, shape)
    x = rand(shape, n=2)
    k = op.kernel
    kh, kw = k.shape
    expected = torch.zeros_like(x)
    for i in range(shape[1]):
        for j in range(shape[2]):
            for a in range(kh):
                for b in range(kw):
                    src_i, src_j = (i - a + kh // 2) % shape[1], (j - b + kw // 2) % shape[2]
                    expected[..., i, j] += k[a, b] * x[..., src_i, src_j]
    torch.testing.assert_close(op.A(x), expected, rtol=1e-12, atol=1e-12)


def test_box_downsampling_is_block_mean():
    x = rand((3, 6, 8))
    y = ops.Downsampling(2).A(x)
    expected = x.reshape(3, 3, 3, 2, 4, 2).mean(dim=(3, 5))
    torch.testing.assert_close(y, expected)


def test_gaussian_kernel_and_masks():
    blur = ops.Blur.gaussian(1.0)
    assert blur.kernel.shape == (7, 7)
    assert abs(blur.kernel.sum().item() - 1) < 1e-12
    assert torch.equal(blur.kernel, blur.kernel.T)
    center = ops.Inpainting.center((28, 28), box=15)
    assert center.mask.sum() == 28 * 28 - 15 * 15
    assert center.mask[0, 6:21, 6:21].sum() == 0
    rnd = ops.Inpainting.random((3, 10, 10), fraction=0.3, seed=0)
    assert rnd.mask.sum() == 70
    assert torch.equal(rnd.mask, ops.Inpainting.random((10, 10), 0.3, seed=0).mask)


@pytest.mark.parametrize("op_name", OPERATORS)
@pytest.mark.parametrize("method", ["A", "adjoint", "pinv", "tikhonov"])
def test_float32_agrees_with_float64(op_name, method):
    shape = SHAPES["color"]
    op = make_operator(op_name, shape)
    in_shape = shape if method == "A" else op.output_shape(shape)
    x64 = rand(in_shape, seed=4)
    fn = (lambda v: op.tikhonov(v, 0.1)) if method == "tikhonov" else getattr(op, method)
    r64, r32 = fn(x64), fn(x64.float())
    assert r32.dtype == torch.float32
    assert (r32.double() - r64).norm() <= 1e-5 * r64.norm()


def test_measure_is_seeded_and_has_right_noise():
    op = ops.Inpainting.center((1, 32, 32), box=8)
    x = rand((1, 32, 32), n=64)
    y1 = op.measure(x, 0.3, generator=torch.Generator().manual_seed(0))
    y2 = op.measure(x, 0.3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(y1, y2)
    noise = y1 - op.A(x)
    assert abs(noise.std().item() - 0.3) < 0.01  # noise on every pixel, masked ones included


def test_to_moves_mask():
    op = ops.Inpainting.center((4, 4), box=2).to(dtype=torch.float64)
    assert op.mask.dtype == torch.float64
    assert isinstance(op, ops.Inpainting)
    assert ops.Inpainting.center((4, 4), box=2).to(dtype=torch.float32).mask.dtype == torch.float32


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: ops.Denoising().A(torch.zeros(3, 4)), "x must have shape"),
        (lambda: ops.Inpainting.center((8, 8), box=3).A(torch.zeros(1, 1, 8, 9)), "x has image"),
        (lambda: ops.Inpainting.center((8, 8), box=0), "box"),
        (lambda: ops.Inpainting.center((8, 8), box=9), "box"),
        (lambda: ops.Inpainting.random((8, 8), fraction=0.0), "fraction"),
        (lambda: ops.Inpainting(torch.full((4, 4), 0.5)), "mask"),
        (lambda: ops.Blur.gaussian(0.0), "std"),
        (lambda: ops.Blur.gaussian(-1.0), "std"),
        (lambda: ops.Blur.defocus(0.0), "radius"),
        (lambda: ops.Blur(torch.ones(4, 3)), "odd"),
        (lambda: ops.Blur.gaussian(2.0).A(torch.zeros(1, 1, 8, 8)), "larger than the image"),
        (lambda: ops.Downsampling(0), "factor"),
        (lambda: ops.Downsampling(2, antialias="bicubic"), "antialias"),
        (lambda: ops.Downsampling(3).A(torch.zeros(1, 1, 8, 9)), "does not divide"),
        (lambda: ops.Denoising().measure(torch.zeros(1, 1, 2, 2), 0.0), "sigma"),
        (lambda: ops.Denoising().measure(torch.zeros(1, 1, 2, 2), float("nan")), "sigma"),
        (lambda: ops.preinverse(ops.Denoising(), "tikhonov"), "lam"),
        (lambda: ops.preinverse(ops.Denoising(), "inverse"), "kind"),
        (lambda: ops.preinverse(ops.Downsampling(2), "identity"), "identity"),
    ],
)
def test_bad_input_is_rejected(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
