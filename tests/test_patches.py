import pytest
import torch

from lemmse_core.patches import check_patch_size, extract_patches, patch_at


def test_extract_patches_matches_the_definition():
    x = torch.rand(2, 3, 5, 6, dtype=torch.float64)
    p, r = 3, 1
    patches = extract_patches(x, p)
    assert patches.shape == (2, 30, 27)
    for i in range(5):
        for j in range(6):
            expected = torch.stack(
                [
                    x[:, c, (i + a - r) % 5, (j + b - r) % 6]
                    for c in range(3)
                    for a in range(p)
                    for b in range(p)
                ],
                dim=1,
            )
            torch.testing.assert_close(patches[:, i * 6 + j], expected, rtol=0, atol=0)
            torch.testing.assert_close(patch_at(x, p, i, j), expected, rtol=0, atol=0)


@pytest.mark.parametrize(("size", "match"), [(4, "odd"), (0, "odd"), (7, "larger")])
def test_bad_patch_sizes(size, match):
    with pytest.raises(ValueError, match=match):
        check_patch_size(size, (1, 5, 6))
