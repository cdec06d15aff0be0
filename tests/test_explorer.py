"""The LE-MMSE explorer, driven through the widget API (no kernel, no browser)."""

import pytest
import torch

import lemmse_core as lc
from lemmse_core.explorer import Explorer
from lemmse_core.reference import ref_le_mmse

pytest.importorskip("ipywidgets")


@pytest.fixture
def explorer():
    g = torch.Generator().manual_seed(0)
    train = torch.rand(12, 1, 8, 8, generator=g, dtype=torch.float64)
    truth = torch.rand(2, 1, 8, 8, generator=g, dtype=torch.float64)
    operators = {
        "denoising": lc.Denoising(),
        "blur": lc.Blur.gaussian(1.0),
        "downsampling": lc.Downsampling(2),
    }
    return Explorer(train, truth, operators, patch_sizes=(3, 5, 9), patch_size=3)


def test_first_setting_is_the_le_mmse(explorer):
    truth, v, x = explorer.images
    y = truth[None] + 0.2 * explorer.noise[:1]
    assert torch.equal(v, y[0])
    expected = ref_le_mmse(y, explorer.train, lc.Denoising(), 0.2, 3).x_hat
    assert torch.allclose(x.double(), expected[0], atol=1e-5)  # the engine runs in float32
    assert explorer.message.value == ""


@pytest.mark.parametrize(
    "control, value",
    [("sigma", 0.05), ("patch_size", 5), ("operator", "blur"), ("image", 1)],
)
def test_changing_a_control_recomputes(explorer, control, value):
    before = [t.clone() for t in explorer.images]
    explorer.controls[control].value = value
    after = explorer.images
    assert after is not None and explorer.message.value == ""
    assert not torch.equal(before[2], after[2]), f"{control}: the estimate did not change"


def test_refused_settings_show_a_message(explorer):
    explorer.controls["patch_size"].value = 9  # larger than the 8 × 8 images
    assert explorer.images is None
    assert "larger than the image" in explorer.message.value
    explorer.controls["patch_size"].value = 3  # back to a valid setting
    assert explorer.images is not None and explorer.message.value == ""
    explorer.controls["operator"].value = "downsampling"  # with B = I
    assert explorer.images is None
    assert "keeps the image size" in explorer.message.value


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="truth"):
        Explorer(torch.rand(3, 1, 8, 8), torch.rand(1, 8, 8), {"d": lc.Denoising()})
    with pytest.raises(ValueError, match="operators"):
        Explorer(torch.rand(3, 1, 8, 8), torch.rand(1, 1, 8, 8), {})
