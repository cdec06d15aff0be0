import math

import pytest
import torch

from lemmse_core.metrics import mse, psnr


def test_psnr_and_mse_per_image():
    ref = torch.zeros(2, 1, 4, 4)
    x = ref.clone()
    x[0] += 0.1
    x[1, 0, 0, 0] = 1.0
    torch.testing.assert_close(mse(x, ref), torch.tensor([0.01, 1 / 16]))
    torch.testing.assert_close(psnr(x, ref), torch.tensor([20.0, 10 * math.log10(16)]))
    assert psnr(ref, ref).isinf().all()
    assert psnr(x, ref, peak=2.0)[0] == pytest.approx(20 + 20 * math.log10(2), rel=1e-6)


def test_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        mse(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 3))
    with pytest.raises(ValueError, match="peak"):
        psnr(torch.zeros(1, 4), torch.ones(1, 4), peak=0)
