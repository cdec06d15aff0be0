"""Monte Carlo statistics and image grids: small exact cases."""

import math

import matplotlib
import pytest
import torch

from lemmse_core import plotting, stats

matplotlib.use("Agg")


def test_mean_se_along_a_dimension():
    x = torch.tensor([[1.0, 10.0], [3.0, 10.0], [5.0, 10.0]], dtype=torch.float64)
    mean, se = stats.mean_se(x, dim=0)
    torch.testing.assert_close(mean, torch.tensor([3.0, 10.0], dtype=torch.float64))
    torch.testing.assert_close(se, torch.tensor([2 / math.sqrt(3), 0.0], dtype=torch.float64))


def test_t_stat_is_mean_over_standard_error():
    x = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64)
    assert stats.t_stat(x) == pytest.approx(3.0 / (x.std().item() / 2))
    assert stats.t_stat(x.reshape(2, 2)) == pytest.approx(stats.t_stat(x))


def test_spearman_ranks_with_ties_and_constant():
    assert stats.spearman([1, 2, 3, 4], [10, 20, 30, 100]) == pytest.approx(1.0)
    assert stats.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # ties get their average rank: ranks (1.5, 1.5, 3) against (1, 2, 3)
    assert stats.spearman([0, 0, 1], [1, 2, 3]) == pytest.approx(math.sqrt(3) / 2)
    assert math.isnan(stats.spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="same length"):
        stats.spearman([1, 2], [1, 2, 3])


def test_image_grid_labels_and_blanks():
    gray, colour = torch.rand(1, 4, 4), torch.rand(3, 4, 4)
    fig = plotting.image_grid([[gray, None], [colour, gray]], ["a", "b"], ["x", "y"])
    axes = fig.axes
    assert len(axes) == 4
    assert [ax.get_title() for ax in axes] == ["x", "y", "", ""]
    assert [ax.get_ylabel() for ax in axes] == ["a", "", "b", ""]
    assert [len(ax.images) for ax in axes] == [1, 0, 1, 1]
    assert axes[2].images[0].get_array().shape == (4, 4, 3)


def test_sigma_axis_ticks_every_sigma():
    fig, ax = matplotlib.pyplot.subplots()
    plotting.sigma_axis(ax, [0.05, 0.2, 1.0])
    assert ax.get_xscale() == "log" and ax.get_xlabel() == r"$\sigma$"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.05", "0.2", "1"]
    assert not ax.xaxis.get_minor_ticks()
    plotting.sigma_axis(ax, [0.1], label=None)
    assert list(ax.get_xticks()) == [0.1]
    matplotlib.pyplot.close(fig)
