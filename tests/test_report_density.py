"""Density and out-of-distribution summaries (report.spearman, pixels, density), on
synthetic results: no training, no formula."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from lemmse_core import experiments as ex
from lemmse_core.experiments import engine

SIGMAS = (0.1, 0.5)


def test_spearman_matches_a_worked_example_and_handles_ties():
    # Wikipedia's worked example (IQ against hours of TV a week): rho = -29/165.
    iq = [106, 100, 86, 101, 99, 103, 97, 113, 112, 110]
    tv = [7, 27, 2, 50, 28, 29, 20, 12, 6, 17]
    assert ex.spearman(iq, tv) == pytest.approx(-29 / 165, abs=1e-12)
    # Ties get their average rank: ranks (1, 2.5, 2.5, 4) and (1, 3, 2, 4).
    ra, rb = torch.tensor([1, 2.5, 2.5, 4]), torch.tensor([1.0, 3, 2, 4])
    ra, rb = ra - ra.mean(), rb - rb.mean()
    expected = float((ra * rb).sum() / (ra.norm() * rb.norm()))
    assert ex.spearman([1, 2, 2, 3], [10, 30, 20, 40]) == pytest.approx(expected)
    assert expected != pytest.approx(ex.spearman([1, 2, 3, 4], [10, 30, 20, 40]))


def test_spearman_is_rank_based_and_signed():
    x = torch.linspace(-3, 3, 50)
    assert ex.spearman(x, x.exp()) == pytest.approx(1.0)  # monotone, not linear
    assert ex.spearman(x, -(x**3)) == pytest.approx(-1.0)
    assert ex.spearman(pd.Series(x.numpy()), x.numpy()[:, None] ** 3) == pytest.approx(1.0)
    assert math.isnan(ex.spearman(x, torch.ones(50)))
    with pytest.raises(ValueError, match="same length"):
        ex.spearman(x, x[:-1])


def fake_result(spec, log_density, gap):
    """A Result whose formula is 0.5 everywhere and whose network differs from it by
    ``gap(split, sigma)`` ``(n, C, H, W)``, with diagnostics ``log_density(split, sigma)``."""
    images, outputs = {}, {"formula": {}, "net": {}, "diagnostics": {}}
    shape = (2, spec.channels, 3, 4)
    for split in ex.SPLITS:
        x = torch.full(shape, 0.5)
        images[split] = {k: (lambda s, x=x: x) for k in ("x", "y", "v")}
        for sigma in spec.sigmas:
            outputs["formula"][split, sigma] = torch.full(shape, 0.5)
            outputs["net"][split, sigma] = 0.5 + gap(split, sigma)
            density = log_density(split, sigma)
            zeros = torch.zeros_like(density)
            outputs["diagnostics"][split, sigma] = {
                "log_density": density,
                "rank": torch.full_like(density, 9.0),
                "top_weight": zeros,
                "top_image": zeros,
                "top_location": torch.zeros(*density.shape, 2),
            }
    table = engine._table(spec, images, outputs)
    return ex.Result(spec, None, table, {**images, **outputs})


def spec(**changes):
    values = {"sigmas": SIGMAS, "diagnostics": True, "eval_train": 2, "eval_test": 2}
    return ex.Spec(**{**values, **changes})


def ramp(split, sigma):
    """A log-density that differs at every pixel, lower on test images and at small σ."""
    base = torch.arange(24.0).reshape(2, 3, 4)
    return base - (100.0 if split == "test" else 0.0) + 10 * sigma


def test_pixels_aligns_density_and_disagreement_per_pixel():
    s = spec(color=True)
    gap = torch.zeros(2, 3, 3, 4)
    gap[1, :, 2, 3] = torch.tensor([0.3, -0.3, 0.0])  # mean of |.| over channels: 0.2
    result = fake_result(s, ramp, lambda split, sigma: gap)
    px = ex.pixels(result, "test", 0.5)
    assert len(px) == 24 and list(px.columns[:3]) == ["image", "row", "col"]
    hit = px[px.disagreement > 0]
    assert len(hit) == 1
    assert hit[["image", "row", "col"]].iloc[0].tolist() == [1, 2, 3]
    assert hit.disagreement.iloc[0] == pytest.approx(0.2)
    assert hit.log_density.iloc[0] == pytest.approx(23 - 100 + 5)
    # log p + (r/2) log(2πσ²) + log(N |Ω|), with r = 9, N = 1000 and |Ω| = 12 pixels.
    overlap = 23 - 100 + 5 + 4.5 * math.log(2 * math.pi * 0.25) + math.log(12000)
    assert hit.log_overlap.iloc[0] == pytest.approx(overlap)
    assert (px["rank"] == 9).all()


def test_density_gives_the_sign_of_the_relation_and_the_mean_density():
    s = spec()

    def falls(split, sigma):  # disagreement grows as the density falls: rho = -1
        return torch.exp(-ramp(split, sigma) / 10)[:, None] / 1e3

    def rises(split, sigma):
        return torch.exp(ramp(split, sigma) / 100)[:, None] / 1e3

    for gap, sign in ((falls, -1.0), (rises, 1.0)):
        table = ex.density([fake_result(s, ramp, gap)])
        assert len(table) == 2 * len(SIGMAS)
        assert table.spearman.to_numpy() == pytest.approx(sign)
    row = table[(table.split == "test") & (table.sigma == 0.1)].iloc[0]
    assert row.neg_log_density == pytest.approx(-(11.5 - 100 + 1))
    assert row.neg_log_density_median == pytest.approx(-(11.5 - 100 + 1))
    assert row.pixels == 24 and row.images == "fashionmnist"
    expected = fake_result(s, ramp, rises).table
    expected = expected[(expected.split == "test") & (expected.sigma == 0.1)]
    assert row.psnr_net_formula == pytest.approx(expected.psnr_net_formula.mean())


def test_density_labels_out_of_distribution_images_and_keeps_one_training_split():
    def gap(split, sigma):
        return torch.full((2, 1, 3, 4), 0.01 * sigma)

    inside = fake_result(spec(), ramp, gap)
    outside = fake_result(spec(eval_dataset="mnist"), ramp, gap)
    table = ex.density([inside, outside])
    counts = table.groupby(["split", "images"]).size().to_dict()
    assert counts == {
        ("test", "fashionmnist"): len(SIGMAS),
        ("test", "mnist"): len(SIGMAS),
        ("train", "fashionmnist"): len(SIGMAS),
    }
    # A different network (or patch size) keeps its own training split.
    other = fake_result(spec(patch_size=3), ramp, gap)
    assert len(ex.density([inside, other])) == 2 * 2 * len(SIGMAS)
    assert isinstance(table, pd.DataFrame) and table.spearman.isna().all()  # constant gap
