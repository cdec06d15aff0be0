import math

import pytest
import torch

import lemmse_core as lc
from lemmse_core.discrimination import discrimination, patch_grams
from lemmse_core.patches import extract_patches, whitening

F64 = torch.float64


def _images(n, shape, seed):
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _patch_rows(shape, p):
    index = torch.arange(math.prod(shape), dtype=F64).reshape(1, *shape)
    return extract_patches(index, p)[0].round().long()  # (H·W, P)


def _brute_force(x, train, A, B, p):
    """‖P_n A (x_i - x_k)‖² with P_n = Q_n⁺ Q_n from dense matrices; and rank Q_n."""
    shape = tuple(train.shape[1:])
    y_shape = tuple(A.A(train[:1]).shape[1:])
    a = A.matrix(shape)  # (M, D)
    b = B.matrix(y_shape)  # (D, M)
    rows = _patch_rows(shape, p)
    signal = torch.zeros(len(x), len(train), len(rows), dtype=F64)
    rank = torch.zeros(len(rows), dtype=torch.long)
    diff = x.flatten(1)[:, None] - train.flatten(1)[None]  # (n, N, D)
    for loc, idx in enumerate(rows):
        q = b[idx]  # Q_n = Π_n B
        proj = torch.linalg.pinv(q) @ q
        rank[loc] = torch.linalg.matrix_rank(q)
        signal[:, :, loc] = (diff @ a.T @ proj.T).pow(2).sum(-1)
    return signal, rank


def _cases():
    blur = lc.Blur.gaussian(0.8, size=3)
    inpaint = lc.Inpainting.center((1, 6, 7), box=3)
    down = lc.Downsampling(2)
    return [
        ("blur-I", blur, lc.preinverse(blur, "identity"), (1, 6, 7)),
        ("blur-adjoint", blur, lc.preinverse(blur, "adjoint"), (1, 6, 7)),
        ("blur-pinv", blur, lc.preinverse(blur, "pinv"), (1, 6, 7)),
        ("blur-tikhonov", blur, lc.preinverse(blur, "tikhonov", 0.05), (1, 6, 7)),
        ("inpaint-I", inpaint, lc.preinverse(inpaint, "identity"), (1, 6, 7)),
        ("inpaint-adjoint", inpaint, lc.preinverse(inpaint, "adjoint"), (1, 6, 7)),
        ("down-adjoint", down, lc.preinverse(down, "adjoint"), (1, 6, 8)),
        ("down-pinv", down, lc.preinverse(down, "pinv"), (2, 6, 8)),
    ]


@pytest.mark.parametrize("name,A,B,shape", _cases(), ids=[c[0] for c in _cases()])
def test_signal_and_rank_match_dense_definition(name, A, B, shape):
    x, train = _images(2, shape, 0), _images(3, shape, 1)
    disc = discrimination(x, train, A, 3, B)
    signal, rank = _brute_force(x, train, A, B, 3)
    assert torch.equal(disc.rank, rank)
    torch.testing.assert_close(disc.signal, signal, rtol=1e-9, atol=1e-11)
    assert torch.equal(disc.locations, torch.arange(shape[1] * shape[2]))


def test_default_B_is_identity_and_locations_subset():
    A = lc.Blur.gaussian(1.0, size=3)
    x, train = _images(2, (1, 5, 5), 2), _images(4, (1, 5, 5), 3)
    full = discrimination(x, train, A, 3)
    same = discrimination(x, train, A, 3, lc.preinverse(A, "identity"))
    torch.testing.assert_close(full.signal, same.signal, rtol=0, atol=0)
    locations = torch.tensor([0, 7, 24])
    part = discrimination(x, train, A, 3, locations=locations)
    torch.testing.assert_close(part.signal, full.signal[:, :, locations], rtol=1e-12, atol=0)
    assert torch.equal(part.locations, locations)


def test_inpainting_mask_keeps_signal_and_drops_rank():
    A = lc.Inpainting.center((1, 7, 7), box=3)
    x, train = _images(2, (1, 7, 7), 4), _images(3, (1, 7, 7), 5)
    agnostic = discrimination(x, train, A, 3)
    aware = discrimination(x, train, A, 3, lc.preinverse(A, "adjoint"))
    scaled = discrimination(x, train, A, 3, lc.preinverse(A, "tikhonov", 2.0))
    torch.testing.assert_close(aware.signal, agnostic.signal, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(scaled.signal, aware.signal, rtol=1e-10, atol=1e-12)
    assert (aware.rank <= agnostic.rank).all() and aware.rank.min() == 0  # centre: all hidden
    assert aware.ratio(0.1) > agnostic.ratio(0.1)


def test_ratio_noise_and_critical_sigma():
    A = lc.Blur.gaussian(1.0, size=3)
    x, train = _images(2, (1, 5, 5), 6), _images(3, (1, 5, 5), 7)
    disc = discrimination(x, train, A, 3, lc.preinverse(A, "pinv"))
    sigma = disc.critical_sigma()
    assert disc.ratio(sigma) == pytest.approx(1.0, rel=1e-12)
    assert disc.ratio(2 * sigma) == pytest.approx(0.25, rel=1e-12)
    torch.testing.assert_close(disc.noise(0.5), 0.25 * disc.rank.double())
    expected = disc.signal + 0.04 * disc.rank.double()
    torch.testing.assert_close(disc.expected_distance(0.2), expected)
    with pytest.raises(ValueError, match="sigma"):
        disc.ratio(0.0)


def test_patch_grams_and_whitening():
    A = lc.Blur.gaussian(1.0, size=3)
    grams = patch_grams(lc.preinverse(A, "adjoint"), (1, 5, 6), 3)
    assert grams.shape == (30, 9, 9) and grams.dtype == F64
    torch.testing.assert_close(grams, grams[:1].expand_as(grams), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grams, grams.transpose(1, 2))
    basis = torch.randn(5, 3, generator=torch.Generator().manual_seed(8), dtype=F64)
    gram = basis @ basis.T  # rank 3
    white, basis, log_pdet = whitening(gram)
    assert white.shape == (3, 5) and basis.shape == (5, 3)
    torch.testing.assert_close(white.T @ white, torch.linalg.pinv(gram, hermitian=True))
    lam = torch.linalg.eigvalsh(gram)[-3:]
    assert log_pdet == pytest.approx(lam.log().sum().item(), rel=1e-10)
    empty, _, zero = whitening(torch.zeros(4, 4, dtype=F64))
    assert empty.shape == (0, 4) and zero == 0.0


class _Zero(lc.operators.LinearMap):
    """The zero map: every patch has rank 0."""

    def A(self, x):
        return torch.zeros_like(x)

    def adjoint(self, y):
        return torch.zeros_like(y)


def test_rejects_bad_input():
    A = lc.Denoising()
    x, train = _images(1, (1, 5, 5), 9), _images(2, (1, 5, 5), 10)
    with pytest.raises(ValueError, match="image shape"):
        discrimination(_images(1, (1, 5, 4), 0), train, A, 3)
    with pytest.raises(ValueError, match="locations"):
        discrimination(x, train, A, 3, locations=torch.tensor([25]))
    with pytest.raises(ValueError, match="patch_size"):
        discrimination(x, train, A, 4)
    with pytest.raises(ValueError, match="rank 0"):  # B = 0 (a zero mask is rejected)
        discrimination(x, train, A, 3, _Zero()).ratio(0.1)
