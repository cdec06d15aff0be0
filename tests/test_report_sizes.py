"""Sweep summaries of experiment tables (patch size, dataset size): synthetic tables."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from lemmse_core import experiments as ex

SIGMAS = (0.1, 0.5)


def table(values, by="patch_size") -> pd.DataFrame:
    """Rows of one configuration: ``values[(by value, split, sigma)]`` lists one PSNR per
    image, used for psnr_formula_truth; psnr_net_formula is 100 minus it."""
    rows = []
    for (value, split, sigma), psnrs in values.items():
        for image, v in enumerate(psnrs):
            row = {c: math.nan for c in ex.COLUMNS}
            row.update(
                dataset="fashionmnist",
                task="denoising",
                preinverse="identity",
                arch="unet",
                patch_size=5,
                n_train=1000,
                split=split,
                sigma=sigma,
                image=image,
                psnr_formula_truth=v,
                psnr_net_formula=100.0 - v,
                psnr_net_truth=0.0,
                psnr_input_truth=0.0,
            )
            row[by] = value
            rows.append(row)
    return pd.DataFrame(rows, columns=list(ex.COLUMNS))


def test_sweep_averages_per_value_and_gives_the_spread():
    t = table({(7, "test", 0.5): [10.0, 14.0], (3, "test", 0.5): [20.0, 20.0]})
    c = ex.sweep(t, "patch_size")
    assert list(c.patch_size) == [3, 7]  # sorted by the swept value
    assert list(c.psnr_formula_truth) == [20.0, 12.0]
    assert list(c.psnr_net_formula) == [80.0, 88.0]
    assert c.psnr_formula_truth_std.iloc[1] == pytest.approx(2**0.5 * 2)
    assert c.psnr_formula_truth_std.iloc[0] == 0.0
    # ex.curves would mix the two patch sizes; the sweep keeps them apart
    assert len(ex.curves(t)) == 1 and len(c) == 2


def test_best_of_sweep_follows_sigma_and_gives_the_margin():
    t = table(
        {
            (3, "test", 0.1): [30.0, 32.0],
            (5, "test", 0.1): [28.0, 28.0],
            (7, "test", 0.1): [25.0, 25.0],
            (3, "test", 0.5): [18.0, 18.0],
            (5, "test", 0.5): [19.0, 19.0],
            (7, "test", 0.5): [20.0, 21.0],
        }
    )
    best = ex.best_of_sweep(t, "patch_size")
    assert list(best.sigma) == list(SIGMAS)
    assert list(best.patch_size) == [3, 7]
    assert list(best.psnr_formula_truth) == [31.0, 20.5]
    assert list(best.margin) == [3.0, 1.5]
    # on another column the order reverses (psnr_net_formula = 100 - psnr_formula_truth)
    other = ex.best_of_sweep(t, "patch_size", column="psnr_net_formula")
    assert list(other.patch_size) == [7, 3]


def test_best_of_sweep_with_one_value_has_no_margin():
    best = ex.best_of_sweep(table({(100, "train", 0.1): [5.0]}, by="n_train"), "n_train")
    assert list(best.n_train) == [100] and math.isnan(best.margin.iloc[0])


def test_sweep_difference_pairs_the_images():
    t = table(
        {
            (100, "test", 0.1): [10.0, 20.0, 30.0],
            (3000, "test", 0.1): [11.0, 22.0, 33.0],
            (300, "test", 0.1): [0.0, 0.0, 0.0],
        },
        by="n_train",
    )
    d = ex.sweep_difference(t, "n_train", 100, 3000, column="psnr_formula_truth")
    assert len(d) == 1
    assert d["mean"].iloc[0] == pytest.approx(2.0)  # differences 1, 2, 3 image by image
    assert d["std"].iloc[0] == pytest.approx(1.0)
    assert d["count"].iloc[0] == 3
    with pytest.raises(ValueError, match="n_train == 10"):
        ex.sweep_difference(t, "n_train", 10, 3000)
    doubled = pd.concat([t, t], ignore_index=True)
    with pytest.raises(ValueError, match="several rows"):
        ex.sweep_difference(doubled, "n_train", 100, 3000)
