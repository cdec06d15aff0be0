"""Monte Carlo statistics: means with their standard errors, t statistics, rank correlation."""

import numpy as np
import pandas as pd
import torch


def mean_se(x: torch.Tensor, dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of the samples ``x`` along ``dim`` and its standard error ``std / sqrt(n)``."""
    return x.mean(dim=dim), x.std(dim=dim) / x.shape[dim] ** 0.5


def t_stat(x: torch.Tensor) -> float:
    """t statistic of the mean of the samples ``x`` (all entries): mean over standard error."""
    mean, se = mean_se(x.flatten())
    return (mean / se).item()


def spearman(a, b) -> float:
    """Spearman's rank correlation of two sequences of the same length: the Pearson
    correlation of their ranks, ties getting their average rank; NaN when either sequence
    is constant."""
    a, b = (pd.Series(np.asarray(s, dtype=np.float64).ravel()) for s in (a, b))
    if len(a) != len(b):
        raise ValueError(f"a and b must have the same length, got {len(a)} and {len(b)}")
    return float(a.rank().corr(b.rank()))
