"""The estimators of a training set sharded over the ranks of a ``torch.distributed`` group.

The MMSE and the E-MMSE are softmax averages over the training images, the LE-MMSE
(Thm. 3.8) one over their patches; a shard ``r`` gives an estimate ``f_r`` and the log of
its sum of unnormalised weights ``L_r`` (``-inf`` for an empty shard), and the estimate of
the union is ``Σ_r exp(L_r - L) f_r`` with ``L = log Σ_r exp(L_r)``: one all-reduce of the
maximum of the ``L_r``, one of the rescaled sums. It is the single-process estimate for any
split, up to the order of the sums.

Every rank calls the function with the same ``y``, ``sigma`` and options and its own shard
(e.g. ``data.load(..., shard=(rank, world_size))``) and gets the union's estimate. The σ
range is checked on every non-empty shard and the ranks agree before any reduction (the
union's range is the intersection of the shards'), so a bad argument raises on every rank
instead of leaving the others waiting. The reductions run on the shard's device: gloo
for CPU tensors (tested on 2 and 3 processes), NCCL for CUDA ones (not tested here).
Diagnostics (log-density, top-k sources, mass counts) are not sharded yet.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import estimators
from .checks import check_dtype, check_measurement, check_problem, check_sigma
from .lemmse import LEMMSE

__all__ = ["e_mmse", "le_mmse", "mmse"]


def mmse(y, train_shard, A, sigma, B=None, *, group=None, dtype=torch.float32):
    """The empirical MMSE (Prop. 2.1) of the union of the ranks' ``train_shard``
    (:func:`~lemmse_core.estimators.mmse`)."""
    dtype = check_dtype(dtype)

    def shard():
        B_ = check_problem(y, train_shard, A, B)
        logits = estimators.mmse_logits(y, train_shard, A, check_sigma(sigma), B_)
        log_norm = torch.logsumexp(logits, dim=1)
        weights = torch.exp(logits - log_norm[:, None])
        out = weights @ train_shard.double().flatten(1)
        return out.reshape(y.shape[0], *train_shard.shape[1:]), log_norm.reshape(-1, 1, 1, 1)

    return _merge(shard, train_shard, y.shape[0], group).to(dtype)


def e_mmse(y, train_shard, A, sigma, B=None, *, group=None, dtype=torch.float32):
    """The E-MMSE (Thm. 3.5) of the union of the ranks' ``train_shard``
    (:func:`~lemmse_core.estimators.e_mmse`)."""
    dtype = check_dtype(dtype)

    def shard():
        B_ = check_problem(y, train_shard, A, B)
        avg = estimators.e_mmse_average(y, train_shard, A, check_sigma(sigma), B_)
        out, _ = avg.result()
        return out, avg.state.log_normaliser().reshape(-1, 1, 1, 1)

    return _merge(shard, train_shard, y.shape[0], group).to(dtype)


def le_mmse(
    y, train_shard, A, sigma, patch_size, B=None, *, group=None, dtype=torch.float32, **options
):
    """The LE-MMSE (Thm. 3.8) of the union of the ranks' ``train_shard``, exact (``rtol=0``).

    ``options`` go to :class:`~lemmse_core.lemmse.LEMMSE` (``support_rtol``, ``group_size``,
    ``kernel``); ``dtype`` is the engine's (float64 for agreement to 1e-12)."""

    def shard():
        engine = LEMMSE(train_shard, A, patch_size, B, dtype=dtype, **options)
        v = engine.B.A(check_measurement(y, train_shard, engine.y_shape).double())
        checked, u, _, active = engine.queries(v, sigma)
        flat, _, log_norm = engine.engine.run(u, active, checked, 0.0, None, False)
        n, (c, h, w) = y.shape[0], engine.shape
        out = flat.reshape(n, h, w, c).permute(0, 3, 1, 2)
        return out, log_norm.reshape(n, 1, h, w)

    return _merge(shard, train_shard, y.shape[0], group).to(check_dtype(dtype)).contiguous()


def _merge(shard, train_shard, n: int, group) -> torch.Tensor:
    """``Σ_r exp(L_r - L) f_r`` over the ranks of ``group`` from this rank's ``shard()``
    ``(f_r, L_r)`` (not called for an empty ``train_shard``), float64 on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "lemmse_core.distributed needs an initialised process group: call "
            "torch.distributed.init_process_group() on every rank first"
        )
    if not isinstance(train_shard, torch.Tensor) or train_shard.ndim != 4:
        raise TypeError("train_shard must be a tensor (N, C, H, W); N may be 0")
    error, out, log_norm = None, None, None
    if train_shard.shape[0]:
        try:
            out, log_norm = shard()
        except Exception as exc:  # every rank must learn of it before any reduction
            error = exc
    flags = torch.tensor([error is not None, train_shard.shape[0]], dtype=torch.float64)
    flags = flags.to(train_shard.device)
    dist.all_reduce(flags, group=group)
    if error is not None:
        raise error
    if flags[0].item():
        raise RuntimeError("another rank's shard raised (see its error)")
    if not flags[1].item():
        raise ValueError("train_shard is empty on every rank: the union has no image")
    shape, device = (n, *train_shard.shape[1:]), train_shard.device
    if out is None:  # an empty shard: no weight
        out = torch.zeros(shape, dtype=torch.float64, device=device)
        log_norm = torch.full((n, 1, 1, 1), -torch.inf, dtype=torch.float64, device=device)
    out, log_norm = out.double(), log_norm.double().expand(shape)
    top = log_norm.clone()
    dist.all_reduce(top, dist.ReduceOp.MAX, group=group)
    weight = torch.exp(log_norm - top)
    sums = torch.stack([weight * out, weight])
    dist.all_reduce(sums, group=group)
    return sums[0] / sums[1]
