"""Streaming softmax: running log-sum-exp over blocks of logits, in bounded memory.

Every estimator of the paper is a softmax-weighted average ``Σ_i w_i value_i`` with
``w_i ∝ exp(ℓ_i)``. The state keeps, per query, the running maximum ``m`` and the rescaled
normaliser ``s = Σ exp(ℓ_i - m)``; callers keep their numerators and rescale them by the
factor :meth:`StreamingSoftmax.update` returns. Results do not depend on the block order
or size (up to rounding).
"""

import torch


class StreamingSoftmax:
    """Running max and normaliser for ``n`` queries (float64 state)."""

    def __init__(self, n: int, device=None):
        self.max = torch.full((n,), -torch.inf, dtype=torch.float64, device=device)
        self.sum = torch.zeros(n, dtype=torch.float64, device=device)

    def update(self, block_max: torch.Tensor, rows=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Fold in a block whose per-query max is ``block_max`` (for queries ``rows``).

        Returns ``(new_max, scale)``: the caller computes ``p = exp(ℓ - new_max)`` on the
        block, multiplies its numerators by ``scale``, adds ``p @ values``, and then calls
        :meth:`add` with ``p.sum(-1)``.
        """
        rows = slice(None) if rows is None else rows
        old = self.max[rows]
        new = torch.maximum(old, block_max.to(torch.float64))
        scale = torch.exp(old - new)
        scale = torch.where(torch.isneginf(new), torch.zeros_like(scale), scale)
        self.max[rows] = new
        self.sum[rows] = self.sum[rows] * scale
        return new, scale

    def add(self, block_sum: torch.Tensor, rows=None) -> None:
        rows = slice(None) if rows is None else rows
        self.sum[rows] += block_sum.to(torch.float64)

    def log_normaliser(self) -> torch.Tensor:
        """``log Σ_i exp(ℓ_i)`` per query."""
        return self.max + torch.log(self.sum)
