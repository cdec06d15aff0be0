"""The local networks: receptive field exactly p, equivariance, σ conditioning, presets."""

from __future__ import annotations

import pytest
import torch

from lemmse_core import nets

SIZE = 14  # > 11, so that every p leaves pixels outside the window


def window(i: int, j: int, p: int) -> torch.Tensor:
    return nets.receptive_window(i, j, p, SIZE)


def input_gradient(net, i: int, j: int, channels: int = 1) -> torch.Tensor:
    return nets.input_gradient(net, i, j, SIZE, channels)


def test_receptive_window_wraps_around():
    mask = nets.receptive_window(0, 13, 3, SIZE)
    assert mask.sum() == 9
    assert mask[[13, 0, 1]][:, [12, 13, 0]].all()


def test_input_gradient_of_a_pointwise_map_is_one_pixel():
    grad = nets.input_gradient(lambda v, sigma: 2 * v, 3, 4, SIZE)
    assert grad[3, 4] == 2 * 3 and grad.sum() == 2 * 3


@pytest.mark.parametrize("p", nets.PATCH_SIZES)
@pytest.mark.parametrize("name", nets.LOCAL_NETS)
def test_receptive_field_is_exactly_p(name, p):
    torch.manual_seed(0)
    net = nets.build(name, p, 1, "tiny").double().eval()
    for i, j in [(0, 0), (SIZE // 2, SIZE // 2 - 1)]:  # a corner (wrap-around), the middle
        grad = input_gradient(net, i, j)
        inside = window(i, j, p)
        border = inside & ~window(i, j, p - 2)
        assert torch.all(grad[~inside] == 0), f"{name} p={p}: depends on pixels outside"
        assert torch.all(grad[border] > 0), f"{name} p={p}: blind on the window border"


@pytest.mark.parametrize("name", nets.LOCAL_NETS)
def test_receptive_field_without_preconditioning_and_in_color(name):
    torch.manual_seed(0)
    net = nets.build(name, 7, 3, "tiny", precondition=False).double().eval()
    grad = input_gradient(net, 2, SIZE - 1, channels=3)
    inside = window(2, SIZE - 1, 7)
    assert torch.all(grad[~inside] == 0) and torch.all(grad[inside & ~window(2, SIZE - 1, 5)] > 0)


def test_receptive_field_of_a_deeper_unet():
    torch.manual_seed(0)
    net = nets.build("unet", 9, 1, "tiny", layers_per_block=2, norm="layer").double().eval()
    grad = input_gradient(net, 5, 5)
    assert torch.all(grad[~window(5, 5, 9)] == 0) and torch.all(grad[window(5, 5, 9)] > 0)


@pytest.mark.parametrize("name", nets.LOCAL_NETS)
def test_translation_equivariance(name):
    torch.manual_seed(0)
    net = nets.build(name, 5, 3, "tiny").eval()
    v = torch.rand(2, 3, 12, 10)
    sigma = torch.tensor([0.1, 0.7])
    with torch.no_grad():
        out = net(v, sigma)
        for shift in [(1, 0), (0, 3), (5, -4)]:
            shifted = net(torch.roll(v, shift, dims=(2, 3)), sigma)
            err = (shifted - torch.roll(out, shift, dims=(2, 3))).abs().max().item()
            assert err < 1e-5, (name, shift, err)
    assert out.shape == v.shape and out.dtype == v.dtype


@pytest.mark.parametrize("name", nets.LOCAL_NETS)
def test_sigma_conditioning(name):
    torch.manual_seed(0)
    net = nets.build(name, 5, 1, "tiny", precondition=False).eval()
    v = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        low, high = net(v, 0.1), net(v, 0.6)
        mixed = net(v, torch.tensor([0.1, 0.6]))
    assert (low - high).abs().max() > 1e-3  # the raw body, too, depends on σ
    torch.testing.assert_close(mixed[0], low[0])
    torch.testing.assert_close(mixed[1], high[1])
    with pytest.raises(ValueError, match="sigma"):
        net(v, torch.tensor([0.1, 0.2, 0.3]))


def test_preconditioning_is_identity_at_zero_noise_and_mean_at_large_noise():
    net = nets.build("resnet", 5, 1, "tiny").eval()
    v = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(net(v, 0.0), v)  # c_skip(0) = 1, c_out(0) = 0


def test_parameter_counts_of_the_presets():
    counts = {}
    for name in nets.LOCAL_NETS:
        tiny, small, paper = (
            nets.count_parameters(nets.build(name, 5, 1, size)) for size in nets.PRESETS
        )
        counts[name] = (tiny, small, paper)
        assert tiny < small < paper, (name, tiny, small, paper)
        assert 3.0e6 <= paper <= 5.0e6, (name, paper)  # about 4M as in the paper (± 25 %)
        assert tiny <= 60_000, (name, tiny)  # trains in about a minute on a CPU
    print(counts)


def test_bad_arguments():
    with pytest.raises(ValueError, match="name"):
        nets.build("vit", 5)
    with pytest.raises(ValueError, match="preset"):
        nets.build("unet", 5, preset="huge")
    with pytest.raises(ValueError, match="patch_size"):
        nets.build("resnet", 4)
    with pytest.raises(ValueError, match="shape"):
        nets.build("patchmlp", 5, 1)(torch.rand(1, 3, 8, 8), 0.1)
    assert nets.preset("unet", "tiny") == nets._PRESETS["unet"]["tiny"]


def test_dncnn_field_is_p_in_the_interior_and_zero_padding_breaks_equivariance():
    torch.manual_seed(0)
    net = nets.build("dncnn", 7, 1, "tiny").double().eval()
    grad = input_gradient(net, SIZE // 2, SIZE // 2)
    inside = window(SIZE // 2, SIZE // 2, 7)
    assert torch.all(grad[~inside] == 0) and torch.all(
        grad[inside & ~window(SIZE // 2, SIZE // 2, 5)] > 0
    )
    corner = input_gradient(net, 0, 0)
    assert torch.all(corner[SIZE - 3 :, :] == 0)  # no wrap-around: zero padding


@pytest.mark.parametrize("name", nets.OTHER_NETS)
def test_other_nets_are_not_equivariant(name):
    torch.manual_seed(0)
    net = nets.build(name, 5, 3, "tiny").eval()
    v = torch.rand(2, 3, 13, 11)  # odd sides: the strided path rounds up and back
    with torch.no_grad():
        out = net(v, 0.2)
        shifted = net(torch.roll(v, (2, 2), dims=(2, 3)), 0.2)
    assert out.shape == v.shape
    assert (shifted - torch.roll(out, (2, 2), dims=(2, 3))).abs().max() > 1e-3


def test_strided_unet_reaches_beyond_p_with_parity_dependent_field():
    torch.manual_seed(0)
    net = nets.build("stridedunet", 5, 1, "tiny").double().eval()
    c = SIZE // 2
    grads = [torch.roll(input_gradient(net, i, i), (c - i, c - i), (0, 1)) for i in (c, c + 1)]
    assert all(int((g != 0).sum()) > 25 for g in grads)  # beyond the 5 × 5 window
    assert not torch.allclose(grads[0], grads[1])  # the field depends on the parity
