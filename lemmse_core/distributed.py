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

The LE-MMSE's diagnostics (:class:`~lemmse_core.lemmse.PatchDiagnostics`) merge as exactly:
the log-density is the union's log-normaliser; each shard scans its own terms against it,
so the mass-count histograms add up (one all-reduce per block of queries, and one per step
of the certified cap where the guessed one is too tight); the heaviest terms are the
heaviest of the shards' own top-k lists (all-gathered), where the same term in several
shards (equal patches ``Π_n B A x_k``, centre pixels and class) is one term whose count is
the sum, with global image indices: the shards in rank order are the training set in
index order, as ``data.load(..., shard=(rank, world_size))`` splits it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import estimators
from .checks import (
    check_dtype,
    check_lemmse_options,
    check_measurement,
    check_problem,
    check_sigma,
)
from .lemmse import LEMMSE
from .lemmse.diagnostics import Diagnostics, _TopK, patch_diagnostics
from .patches import extract_patches

_IMAGES = 64  # training images per block of the fingerprints of the top terms
_PAIRS = 2**24  # (query, term, term, fingerprint entry) comparisons per block of the merge

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

    return _merge(shard, train_shard, y.shape[0], group)[0].to(dtype)


def e_mmse(y, train_shard, A, sigma, B=None, *, group=None, dtype=torch.float32):
    """The E-MMSE (Thm. 3.5) of the union of the ranks' ``train_shard``
    (:func:`~lemmse_core.estimators.e_mmse`)."""
    dtype = check_dtype(dtype)

    def shard():
        B_ = check_problem(y, train_shard, A, B)
        avg = estimators.e_mmse_average(y, train_shard, A, check_sigma(sigma), B_)
        out, _ = avg.result()
        return out, avg.state.log_normaliser().reshape(-1, 1, 1, 1)

    return _merge(shard, train_shard, y.shape[0], group)[0].to(dtype)


def le_mmse(
    y,
    train_shard,
    A,
    sigma,
    patch_size,
    B=None,
    *,
    group=None,
    dtype=torch.float32,
    diagnostics=False,
    mass=None,
    top_k=None,
    **options,
):
    """The LE-MMSE (Thm. 3.8) of the union of the ranks' ``train_shard``, exact (``rtol=0``).

    ``options`` go to :class:`~lemmse_core.lemmse.LEMMSE` (``support_rtol``, ``group_size``,
    ``kernel``); ``dtype`` is the engine's (float64 for agreement to 1e-12).
    ``diagnostics``, ``mass`` and ``top_k`` are those of :func:`~lemmse_core.lemmse.le_mmse`:
    ``(x_hat, PatchDiagnostics)`` of the union (module doc), on every rank."""
    _, _, _, diagnostics, mass, top_k, _ = check_lemmse_options(
        diagnostics=diagnostics, mass=mass, top_k=top_k
    )
    local = {}

    def shard():
        engine = LEMMSE(train_shard, A, patch_size, B, dtype=dtype, **options)
        v = engine.B.A(check_measurement(y, train_shard, engine.y_shape).double())
        checked, u, stratum, active = engine.queries(v, sigma, diagnostics)
        records = [] if diagnostics else None
        flat, _, log_norm = engine.engine.run(u, active, checked, 0.0, None, False, records)
        local.update(engine=engine, u=u, stratum=stratum, sigma=checked, records=records)
        n, (c, h, w) = y.shape[0], engine.shape
        out = flat.reshape(n, h, w, c).permute(0, 3, 1, 2)
        return out, log_norm.reshape(n, 1, h, w)

    out, log_norm = _merge(shard, train_shard, y.shape[0], group)
    out = out.to(check_dtype(dtype)).contiguous()
    if not diagnostics:
        return out
    log_norm = log_norm[:, 0].flatten()  # per query, row-major pixels
    return out, _diagnostics(local, train_shard, A, patch_size, sigma, log_norm, top_k, mass, group)


def _diagnostics(local, train_shard, A, p, sigma, log_norm, top_k, mass, group):
    """:class:`PatchDiagnostics` of the union from this rank's estimate pass (``local``,
    empty for an empty shard) and the union's per-query ``log_norm`` (module doc)."""
    sync, engine, device = _Reductions(group), local.get("engine"), log_norm.device
    (_, h, w), queries = train_shard.shape[1:], len(log_norm)
    sizes = _sizes(train_shard.shape[0], group, device)
    n_train, offset = int(sizes.sum()), int(sizes[: dist.get_rank(group)].sum())
    sigma = local.get("sigma", float(sigma))
    if engine is None:  # no terms: the collectives only
        scanner, top = Diagnostics(None, 0), _TopK(queries, 0, [], device)
        stratum = torch.zeros(queries, dtype=torch.long, device=device)
    else:
        scanner, stratum = engine.diagnostics, local["stratum"]
        top = _TopK(queries, top_k, engine.classes, device)
    counts = scanner.scan(
        local.get("records", []), local.get("u"), sigma, log_norm, top, mass, False, sync
    )
    found = _found_terms(top, top_k, log_norm, offset, local, train_shard, A, p)
    terms = _distinct_top([_gather(t, group) for t in found], top_k, n_train, w)
    grid = (queries // (h * w), h, w)
    return patch_diagnostics(grid, log_norm, sync.max(stratum), sigma, n_train, terms, counts)


def _found_terms(top, k, log_norm, offset, local, train_shard, A, p):
    """This shard's ``k`` heaviest terms per query: log-weights relative to the union
    (``-inf``: none), counts, global image indices, flat locations and fingerprints."""
    queries, (c, _, w) = len(log_norm), train_shard.shape[1:]
    log_w = torch.full((queries, k), -torch.inf, dtype=torch.float64, device=log_norm.device)
    counts, image, flat = (torch.zeros_like(log_w, dtype=torch.long) for _ in range(3))
    fp = torch.zeros((queries, k, 1 + c * p * p + c), dtype=torch.float64, device=log_w.device)
    if top.k:
        log_w = top.values - log_norm[:, None]
        _, counts, image, location = top.result(log_norm, train_shard.shape[0], w)
        flat = location[..., 0] * w + location[..., 1]
        fp = _fingerprints(train_shard, A, local["engine"], p, image, flat, log_w > -torch.inf)
        image = image + offset
    return log_w, counts, image, flat, fp


def _fingerprints(train, A, engine, p, image, flat, found):
    """``(Q, k, 1 + C p² + C)``: the class (of ``engine``), the patch ``Π_n B A x_k`` and the
    centre pixel ``x_k[n]`` of each term ``found`` (zeros elsewhere): equal rows, one term."""
    c, B = train.shape[1], engine.B
    labels = torch.zeros(train.shape[-2] * train.shape[-1], dtype=torch.float64)
    for i, cls in enumerate(engine.classes):
        labels[cls.locations.cpu()] = i
    labels = labels.to(train.device)
    out = torch.zeros((*image.shape, 1 + c * p * p + c), dtype=torch.float64, device=train.device)
    qi, ki = torch.nonzero(found, as_tuple=True)
    which, inverse = torch.unique(image[qi, ki], return_inverse=True)
    for i0 in range(0, len(which), _IMAGES):
        x = train[which[i0 : i0 + _IMAGES]].double()
        patches, centres = extract_patches(B.A(A.A(x)), p), x.flatten(2).transpose(1, 2)
        sel = (inverse >= i0) & (inverse < i0 + _IMAGES)
        j, loc = inverse[sel] - i0, flat[qi[sel], ki[sel]]
        out[qi[sel], ki[sel]] = torch.cat(
            [labels[loc, None], patches[j, loc], centres[j, loc]], dim=1
        )
    return out


def _distinct_top(found, k, n_train, width):
    """The ``(weights, counts, images, locations)`` of the ``k`` heaviest distinct terms
    per query among the shards' (``found``, concatenated): rows of equal fingerprints are
    one term (counts summed, the first ``(location, image)`` kept, the largest log-weight:
    they differ by rounding only); missing terms have weight and count 0."""
    log_w, counts, image, flat, fp = found
    parts = [(log_w[:0, :k], counts[:0, :k], counts[:0, :k])]  # (0, k), also for k = 0
    step = max(1, _PAIRS // max(1, fp.shape[1] ** 2 * fp.shape[2]))
    for q0 in range(0, len(log_w) if k else 0, step):
        q = slice(q0, q0 + step)
        real = log_w[q] > -torch.inf
        same = (fp[q, :, None] == fp[q, None, :]).all(dim=-1)
        same &= real[:, :, None] & real[:, None, :]
        m = torch.arange(same.shape[-1], device=same.device)
        leader = real & (torch.where(same, m, len(m)).min(dim=2).values == m)
        key = (flat[q] * n_train + image[q])[:, None]  # the order of the term indices
        first = torch.where(same, key, torch.iinfo(key.dtype).max).min(dim=2).values
        best = torch.where(same, log_w[q, None], -torch.inf).amax(dim=2)
        total = (same * counts[q, None]).sum(dim=2)
        score, pick = torch.where(leader, best, -torch.inf).topk(k, dim=1)
        kept = score > -torch.inf
        parts.append((score, total.gather(1, pick) * kept, first.gather(1, pick) * kept))
    score, total, first = (torch.cat(t) for t in zip(*parts, strict=True))
    flat, image = first // n_train, first % n_train
    return score.exp(), total, image, torch.stack([flat // width, flat % width], dim=-1)


def _sizes(n: int, group, device) -> torch.Tensor:
    """The shard sizes of every rank of ``group``, in rank order."""
    sizes = torch.zeros(dist.get_world_size(group), dtype=torch.long, device=device)
    sizes[dist.get_rank(group)] = n
    dist.all_reduce(sizes, group=group)
    return sizes


def _gather(t: torch.Tensor, group) -> torch.Tensor:
    """``t`` ``(Q, k, ...)`` of every rank, concatenated along ``k`` in rank order."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=1)


class _Reductions:
    """All-reduces over ``group``: the ``sync`` of :meth:`Diagnostics.scan`."""

    def __init__(self, group):
        self.group = group

    def max(self, t: torch.Tensor) -> torch.Tensor:
        return self._reduce(t, dist.ReduceOp.MAX)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return self._reduce(t, dist.ReduceOp.SUM)

    def _reduce(self, t, op):
        t = t.clone()
        dist.all_reduce(t, op, group=self.group)
        return t


def _merge(shard, train_shard, n: int, group) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ_r exp(L_r - L) f_r, L)`` over the ranks of ``group`` from this rank's
    ``shard()`` ``(f_r, L_r)`` (not called for an empty ``train_shard``), float64 on every
    rank, ``L`` expanded to the shape of the estimate."""
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
    return sums[0] / sums[1], top + torch.log(sums[1])
