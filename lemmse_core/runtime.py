"""Where and how computations run: the device, the seeds and seeded noise."""

import random
import sys

import numpy as np
import torch
from tqdm.auto import tqdm


def device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and PyTorch; return a CPU generator seeded with ``seed``."""
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 (seeds code that uses the legacy global state)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def noise(shape, generator: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard Gaussian noise of ``shape``, drawn on the CPU from ``generator`` (the same
    draws on every device) and moved to :func:`device`."""
    return torch.randn(shape, generator=generator, dtype=dtype).to(device())


def progress_bar(**kwargs):
    """A tqdm bar (``tqdm.auto``: a widget in Jupyter); in a log (stderr not a terminal) it
    is redrawn every 15 s instead of continuously."""
    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", 15.0)
    return tqdm(**kwargs)
