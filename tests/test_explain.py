"""lemmse_core.explain: receptive field, equivariance defect, agreement with the LE-MMSE."""

from __future__ import annotations

import pytest
import torch
from matplotlib.figure import Figure
from torch import nn

from lemmse_core import LEMMSE, Denoising, nets
from lemmse_core.explain import (
    ExplainReport,
    explain,
    measure_equivariance,
    measure_receptive_field,
)

SIZE = 12


def images(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, SIZE, SIZE, generator=gen, dtype=torch.float64)


def stack(p: int, padding_mode: str = "circular") -> nn.Module:
    """``(p - 1)/2`` 3 × 3 convolutions with tanh in between: receptive field ``p``."""
    torch.manual_seed(p)
    layers = []
    for _ in range(p // 2):
        layers += [nn.Conv2d(1, 2, 3, padding=1, padding_mode=padding_mode), nn.Tanh()]
        layers += [nn.Conv2d(2, 1, 1)]
    return nn.Sequential(*layers).double()


def strided() -> nn.Module:
    """Circular stride-2 convolution, nearest upsampling, circular convolution."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1, padding_mode="circular"),
        nn.Tanh(),
        nn.Upsample(scale_factor=2),
        nn.Conv2d(4, 1, 3, padding=1, padding_mode="circular"),
    ).double()


class Formula(nn.Module):
    """The LE-MMSE of denoising as a network ``net(v, sigma)`` (B = I: v = y)."""

    def __init__(self, engine: LEMMSE):
        super().__init__()
        self.engine = engine

    def forward(self, v, sigma):
        return self.engine(v, sigma)


TRAIN = images(12, 0)


@pytest.fixture(scope="module")
def report() -> ExplainReport:
    net = Formula(LEMMSE(TRAIN, Denoising(), 5))
    split = {"train": TRAIN[:2], "test": images(2, 1)}
    return explain(net, TRAIN, Denoising(), sigmas=(0.1, 0.3), images=split)


@pytest.mark.parametrize("p", [3, 5, 7])
def test_receptive_field_of_circular_stacks_is_exact(p):
    field = measure_receptive_field(stack(p), images(3, 2))
    assert field.p == p and field.exact
    assert field.curve[p] == pytest.approx(1.0) and field.curve[p - 2] < 0.99


@pytest.mark.parametrize(("name", "p"), [("resnet", 5), ("patchmlp", 7)])
def test_receptive_field_of_the_package_nets_in_float32(name, p):
    torch.manual_seed(0)
    net = nets.build(name, p, width=8, **({"hidden": 8} if name == "patchmlp" else {})).eval()
    field = measure_receptive_field(net, images(2, 3).float(), sigma=0.2)
    assert field.p == p and field.exact


class Coupled(nn.Module):
    """A 3 × 3 convolution plus a weak global term: support everywhere, energy in 3 × 3."""

    def __init__(self):
        super().__init__()
        self.conv = stack(3)

    def forward(self, v):
        return self.conv(v) + 1e-3 * v.mean(dim=(2, 3), keepdim=True)


def test_a_global_receptive_field_is_read_from_the_energy():
    field = measure_receptive_field(Coupled(), images(2, 4))
    assert field.p == 3 and not field.exact and field.curve[3] >= 0.99 > field.curve[1]
    wide = measure_receptive_field(stack(15), images(2, 4))  # 15 > 12: wraps around
    assert not wide.exact and wide.p == 11 and wide.curve[11] < 0.99  # the largest window


def test_circular_nets_are_equivariant_zero_padding_only_on_the_boundary():
    v = images(3, 5)
    assert measure_equivariance(stack(5), v, patch_size=5).error < 1e-12
    padded = measure_equivariance(stack(5, "zeros"), v, patch_size=5)
    assert padded.error > 0.05 and padded.interior < 1e-12
    assert padded.boundary == pytest.approx(padded.error)
    assert "boundary" in padded.verdict


def test_a_strided_net_is_equivariant_to_even_shifts_only():
    eq = measure_equivariance(strided(), images(3, 6), patch_size=7)
    assert eq.odd > 0.05 and eq.even < 1e-12 and "stride aliasing" in eq.verdict
    assert set(eq.per_shift["parity"]) == {"odd", "even"}


def test_explain_a_one_argument_zero_padded_net():
    out = explain(stack(3, "zeros"), TRAIN, Denoising(), sigmas=0.2, images={"test": images(2, 7)})
    assert out.receptive_field == 3 and out.patch_size == 3
    assert out.equivariance_error > 0.01 and out.equivariance.interior < 1e-12
    assert list(out.table["split"]) == ["test", "test"] and len(out.maps) == 2


@pytest.mark.parametrize("name", nets.NETS)
def test_explain_every_package_net(name):
    """The report of each network of the package (tiny preset, untrained, float32 as
    trained): the book's are local at their p and equivariant; the chapter's are not."""
    torch.manual_seed(0)
    net = nets.build(name, 5).eval()
    out = explain(net, TRAIN.float(), Denoising(), sigmas=0.2, images={"test": images(1, 8)})
    assert out.field.exact and out.patch_size == out.receptive_field
    assert len(out.table) == 1 and out.table.notna().all(axis=None)
    if name in nets.LOCAL_NETS:
        assert out.receptive_field == 5
        assert out.equivariance.verdict == "equivariant (to rounding)"
    else:
        assert out.receptive_field > 5 if name == "stridedunet" else out.receptive_field == 5
        assert not out.equivariance.verdict.startswith("equivariant (to")


def test_the_formula_as_a_network_is_explained_exactly(report):
    assert report.receptive_field == 5 and report.field.exact
    assert report.equivariance_error < 1e-4
    assert (report.table["psnr_net_formula"] > 80).all()
    assert len(report.table) == 2 * 2 * 2  # splits, σ, images
    maps = report.maps[("test", 0.3, 1)]
    assert maps.error.shape == maps.log_density.shape == maps.source_image.shape == (SIZE, SIZE)
    assert int(maps.source_image.max()) < len(TRAIN) and maps.source_location.shape[-1] == 2
    # a training image at low noise is its own dominant source
    assert (report.maps[("train", 0.1, 1)].source_image == 1).all()


def test_plot_html_and_save(report, tmp_path):
    assert isinstance(report.plot(("test", 0.1, 0)), Figure)
    page = report._repr_html_()
    assert "<table" in page and "data:image/png;base64," in page
    path = report.save_html(tmp_path / "explain.html")
    assert "<table" in path.read_text("utf-8")
    with pytest.raises(ValueError, match="key"):
        report.plot(("nope", 0.1, 0))


def three_args(v, sigma, extra):
    return v


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"net": 3}, TypeError, "net"),
        ({"net": three_args}, TypeError, "net"),
        ({"sigmas": ()}, ValueError, "sigmas"),
        ({"sigmas": (0.1, -1.0)}, ValueError, "sigmas"),
        ({"images": {"test": torch.rand(1, 1, 8, 8)}}, ValueError, "images"),
        ({"images": [TRAIN]}, TypeError, "images"),
        ({"patch_size": 4}, ValueError, "patch_size"),
        ({"shifts": [(1, 0, 2)]}, ValueError, "shifts"),
        ({"train": TRAIN[0]}, ValueError, "train"),
    ],
)
def test_bad_inputs_name_the_argument(kwargs, error, name):
    args = {"net": stack(3), "train": TRAIN, "A": Denoising(), "sigmas": 0.1, **kwargs}
    with pytest.raises(error, match=name):
        explain(**args)
