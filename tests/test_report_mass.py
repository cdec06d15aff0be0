"""The smoothing and mass helpers of lemmse_core.experiments.report (synthetic, fast)."""

from __future__ import annotations

import math

import torch

from lemmse_core import experiments as ex
from lemmse_core.lemmse import PatchDiagnostics

F64 = torch.float64


def _diag(weights, counts, images):
    weights, counts = torch.tensor(weights, dtype=F64), torch.tensor(counts)
    images = torch.tensor(images)
    shape = weights.shape
    return PatchDiagnostics(
        log_density=torch.zeros(shape, dtype=F64),
        rank=torch.zeros(shape, dtype=torch.long),
        top_weights=weights[..., None],
        top_count=counts[..., None],
        top_image=images[..., None],
        top_location=torch.zeros(*shape, 1, 2, dtype=torch.long),
    )


def test_source_map_labels():
    diag = _diag(
        [[[0.9, 0.4, 0.3], [0.6, 0.1, 0.49]]],
        [[[1, 1, 3], [1, 4, 1]]],
        [[[5, 2, 7], [0, 3, 1]]],
    )
    expected = [[[5, ex.DIFFUSE, ex.SHARED], [0, ex.DIFFUSE, ex.DIFFUSE]]]
    assert ex.source_map(diag).tolist() == expected
    # The mass of a repeated patch is its weight times its count: 0.3 · 3 >= 0.5.
    assert ex.source_map(diag, threshold=0.95).tolist() == [
        [[ex.DIFFUSE, ex.DIFFUSE, ex.DIFFUSE], [ex.DIFFUSE, ex.DIFFUSE, ex.DIFFUSE]]
    ]
    assert diag.top_image[0, 0, 2, 0] == 7  # the input is not modified


def test_same_source_counts_held_neighbours_only():
    source = torch.tensor([[0, 0], [1, 1]])
    assert ex.same_source(source) == 0.5  # right: 2 of 2; down: 0 of 2
    source = torch.tensor([[[3, 3, ex.SHARED], [3, ex.DIFFUSE, 2]]])
    # pairs held on both sides: (3, 3) right and (3, 3) down; both the same
    assert ex.same_source(source) == 1.0
    assert ex.same_source(torch.tensor([[4, 5], [6, 7]])) == 0.0
    assert math.isnan(ex.same_source(torch.full((3, 3), ex.SHARED)))
