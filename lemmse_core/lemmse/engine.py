"""The query engine of the LE-MMSE (:mod:`lemmse_core.lemmse`): per class and group of
keys, the sums ``Σ_k exp(ℓ - shift) [x_k[n], 1]`` by GEMM + ``exp`` + GEMM or by PyTorch's
fused CPU attention, from a float64 seed group per query; certified pruning with
``rtol > 0``; the streaming softmax across classes."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ..streaming import StreamingSoftmax

_BLOCK = 1 << 19  # log-weights per block (2 MiB in float32: cache resident)
# PyTorch's fused CPU attention, which also returns the log-sum-exp (absent: GEMM path).
_flash_attention = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FUSED_MAX_RANK = 48  # below, the fused kernel beats GEMM + exp + GEMM (benchmarks/)
_DENSE = 0.8  # a group needed by more than this fraction of the queries is run on all
# terms below exp(floor) of the shift count as exp(floor): subnormal floats are slow (x86),
# and the bias is at most (terms)·exp(floor) of the weight (< 1e-19 here)
_FLOOR = {torch.float32: -60.0, torch.float64: -600.0}
_SAFE = 1e30  # largest group sum trusted in float32 (overflow at 3.4e38)
_QUERIES = 8192  # queries per pass over a class (bounds the (queries, groups) bounds)
_UNDERFLOW = 700.0  # a float64 group sum that underflowed is below exp(-745) of its shift


def check_kernel(kernel: str) -> str:
    """``"auto"``, ``"fused"`` (needs PyTorch's fused CPU attention) or ``"gemm"``."""
    if kernel not in ("auto", "fused", "gemm"):
        raise ValueError(f"kernel must be 'auto', 'fused' or 'gemm', got {kernel!r}")
    if kernel == "fused" and _flash_attention is None:
        raise ValueError("kernel='fused' needs PyTorch's fused CPU attention")
    return kernel


class QueryEngine:
    """The estimate over the classes of a :class:`~lemmse_core.lemmse.keys.KeyStore`
    (module doc of :mod:`lemmse_core.lemmse`); ``kernel`` as checked by :func:`check_kernel`,
    ``group_size`` the default number of keys per block."""

    def __init__(self, classes, train: torch.Tensor, dtype, kernel: str, group_size: int):
        self.classes, self.dtype = classes, dtype
        self.kernel, self.group_size = kernel, group_size
        span = train.double().amax(dim=(0, 2, 3)) - train.double().amin(dim=(0, 2, 3))
        self.value_range = span.to(train.device)  # per channel: bounds |x_k[n] - estimate|

    def run(self, u, active, sigma, rtol, chunk_size, progress, records=None):
        """Estimate, bound on the skipped weight and log-normaliser, class by class (module
        doc). ``records``, if a list, receives ``(cls, rows, masses)`` per block of queries
        (the groups' log-weights, see :meth:`_attend_class`)."""
        n_values = len(self.value_range)  # C
        state = StreamingSoftmax(len(u), device=u.device)
        acc = torch.zeros(len(u), n_values, dtype=torch.float64, device=u.device)
        skipped = torch.full((len(u),), -torch.inf, dtype=torch.float64, device=u.device)
        key_block = chunk_size or self.group_size
        work = [(cls, torch.nonzero(active[:, i]).flatten()) for i, cls in enumerate(self.classes)]
        chunks = [
            (cls, rows[r0 : r0 + _QUERIES])
            for cls, rows in work
            for r0 in range(0, len(rows), _QUERIES)
        ]
        for cls, rows in tqdm(chunks, desc="LE-MMSE", disable=not progress):
            w = u[rows] @ cls.whiten.T.to(u.device) - cls.centre
            masses = None
            if records is not None:
                shape = (len(w), len(cls.bounds))
                masses = torch.full(shape, torch.inf, dtype=w.dtype, device=w.device)
                records.append((cls, rows, masses))
            out, lse, skip = self._attend_class(cls, w, sigma, rtol, key_block, masses)
            new, scale = state.update(lse, rows)
            weight = torch.exp(lse - new)
            acc[rows] = acc[rows] * scale[:, None] + weight[:, None] * out
            state.add(weight, rows)
            skipped[rows] = torch.logaddexp(skipped[rows], skip)
        log_norm = state.log_normaliser()
        bound = torch.exp(skipped - log_norm)[:, None] * self.value_range
        return acc / state.sum[:, None], bound, log_norm

    def _attend_class(self, cls, w, sigma, rtol, key_block, masses=None):
        """Softmax over the keys of one class: ``(out (Q, C), lse, skipped)`` in float64.

        ``skipped``: log of the bound on the weight of the groups left out (``-inf`` if none).
        ``masses`` ``(Q, G)``, if given, receives each group's log-weight (diagnostics); a
        sum that underflowed is recorded as ``exp(-_UNDERFLOW)`` of the final shift.
        """
        seed = torch.argmin(torch.cdist(w, cls.means), dim=1)
        sums = torch.empty(len(w), cls.values_t.shape[0], dtype=torch.float64, device=w.device)
        shift = torch.empty(len(w), dtype=torch.float64, device=w.device)
        for g in torch.unique(seed).tolist():
            rows = torch.nonzero(seed == g).flatten()
            sums[rows], shift[rows] = self._group_sums(cls, g, w[rows], sigma, None, key_block)
            if masses is not None:
                masses[rows, g] = shift[rows] + sums[rows, -1].log()
        needed = torch.ones(len(w), len(cls.bounds), dtype=torch.bool, device=w.device)
        needed[torch.arange(len(w)), seed] = False
        skipped = torch.full_like(shift, -torch.inf)
        if rtol > 0:
            log_bound = cls.log_mass - _box_gap2(w, cls) / (2 * sigma**2) - 0.5 * cls.log_pdet
            # skip the lightest bounds while their sum is at most rtol of the seed's weight
            bound, order = torch.where(needed, log_bound, -torch.inf).sort(dim=1)
            total = torch.logcumsumexp(bound, dim=1)
            light = (total <= (shift + sums[:, -1].log() + math.log(rtol))[:, None]) & (
                bound > -torch.inf
            )
            needed.scatter_(1, order, ~light & needed.gather(1, order))
            skipped = torch.where(light, total, -torch.inf).max(dim=1).values
        every, counts = torch.arange(len(w), device=w.device), needed.sum(dim=0).tolist()
        for g in range(len(cls.bounds)):
            if counts[g] == 0:
                continue
            # most queries need g: all of them, the others discarded (cheaper than a gather)
            dense = counts[g] > _DENSE * len(w)
            rows = every if dense else torch.nonzero(needed[:, g]).flatten()
            part = self._shifted_sums(
                cls, g, w if dense else w[rows], sigma, shift, rows, sums, key_block
            )
            part[~needed[rows, g]] = 0
            if masses is not None:
                kept = needed[rows, g]
                masses[rows[kept], g] = shift[rows[kept]] + part[kept, -1].log()
            sums[rows] += part  # after the call: it may rescale sums[rows]
        if masses is not None:
            torch.maximum(masses, (shift - _UNDERFLOW)[:, None], out=masses)
        return sums[:, :-1] / sums[:, -1:], shift + sums[:, -1].log(), skipped

    def _shifted_sums(self, cls, g, w, sigma, shift, rows, sums, key_block):
        """Group ``g``'s sums at the queries' shift; where a term exceeds it by more than
        the float range allows, the group is redone at its own maximum, which becomes the
        new shift (``shift`` and ``sums`` rescaled in place)."""
        part = self._group_sums(cls, g, w, sigma, shift[rows], key_block)[0]
        hot = ~(part[:, -1] < _SAFE)  # near overflow, or overflowed
        if hot.any():
            at = rows[hot]
            redo, top = self._group_sums(cls, g, w[hot], sigma, None, key_block)
            new = torch.maximum(shift[at], top)
            sums[at] *= torch.exp(shift[at] - new)[:, None]
            part[hot] = redo * torch.exp(top - new)[:, None]
            shift[at] = new
        return part

    def _group_sums(self, cls, g, w, sigma, shift, key_block):
        """``Σ_k exp(ℓ(w, k) - shift) [x_k[n], 1]`` over group ``g`` (float64 ``(Q, C+1)``).

        ``w``: whitened queries of the class; ``shift`` float64 ``(Q,)``, or ``None`` for the
        largest log-weight of the group per query (then returned as the second output).
        """
        if self._fused(cls):
            return self._group_sums_fused(cls, g, w, sigma, shift, key_block)
        return self._group_sums_gemm(cls, g, w, sigma, shift, key_block)

    def _fused(self, cls) -> bool:
        if self.kernel == "auto":
            return (
                _flash_attention is not None
                and cls.keys_ext.device.type == "cpu"
                and (cls.rank < _FUSED_MAX_RANK)
            )
        return self.kernel == "fused"

    def _group_sums_gemm(self, cls, g, w, sigma, shift, key_block):
        """GEMM, in-place ``exp``, GEMM with the ``C + 1`` values; terms are computed
        transposed, ``(keys, queries)``, so that the values are the small left factor."""
        (k0, k1), r = cls.bounds[g], cls.rank
        q, offset = cls.centred(g, w, sigma)
        seed = shift is None  # the seed group, where the heaviest terms are: in float64
        dtype = torch.float64 if seed else self.dtype
        query = torch.empty(len(w), r + 3, dtype=dtype, device=w.device)
        query[:, :r], query[:, r], query[:, r + 1] = q / sigma**2, 1 / sigma**2, 1.0
        query[:, r + 2] = offset if seed else offset - shift
        keys, values = cls.keys_ext[k0:k1].to(dtype), cls.values_t[:, k0:k1].to(dtype)
        if seed:
            s = keys @ query.T
            top = s.max(dim=0).values
            return (values @ s.sub_(top).clamp_(min=_FLOOR[dtype]).exp_()).T, top
        sums = torch.zeros(values.shape[0], len(w), dtype=dtype, device=w.device)
        step = max(1, _BLOCK // min(key_block, k1 - k0))
        for j0 in range(0, k1 - k0, key_block):
            kb, vb = keys[j0 : j0 + key_block], values[:, j0 : j0 + key_block]
            for q0 in range(0, len(w), step):
                s = (kb @ query[q0 : q0 + step].T).clamp_(min=_FLOOR[dtype]).exp_()
                sums[:, q0 : q0 + step].addmm_(vb, s)
        return sums.T.double(), shift

    def _group_sums_fused(self, cls, g, w, sigma, shift, key_block):
        """PyTorch's fused CPU attention (it returns the log-sum-exp): the key bias
        ``-½‖k‖² + σ² log count`` is one extra dimension, values are padded to the key
        dimension. Cheaper than the GEMM path for small patch dimensions."""
        (k0, k1), r = cls.bounds[g], cls.rank
        c, d = cls.values_t.shape[0] - 1, max(cls.rank + 1, cls.values_t.shape[0] - 1)
        q, offset = cls.centred(g, w, sigma)
        dtype = torch.float64 if shift is None else self.dtype  # the seed group: float64
        query = torch.zeros(len(w), d, dtype=dtype, device=w.device)
        query[:, :r], query[:, r] = q, 1.0
        lse, outs = [], []
        for j0 in range(k0, k1, key_block):
            j1 = min(j0 + key_block, k1)
            ext = cls.keys_ext[j0:j1]
            keys = torch.zeros(j1 - j0, d, dtype=dtype, device=w.device)
            keys[:, :r], keys[:, r] = ext[:, :r], ext[:, r] + sigma**2 * ext[:, r + 1]
            values = torch.zeros(j1 - j0, d, dtype=dtype, device=w.device)
            values[:, :c] = cls.values_t[:c, j0:j1].T
            out, log_norm = _flash_attention(
                query[None, None], keys[None, None], values[None, None], scale=1 / sigma**2
            )[:2]
            outs.append(out[0, 0, :, :c].double())
            lse.append(log_norm[0, 0].double() + offset)
        lse = torch.stack(lse)
        top = lse.max(dim=0).values if shift is None else shift
        weight = torch.exp(lse - top)  # float64: no overflow for any shift in use
        sums = torch.ones(len(w), c + 1, dtype=torch.float64, device=w.device)
        sums[:, :c] = torch.einsum("bq,bqc->qc", weight, torch.stack(outs))
        sums[:, c] = weight.sum(dim=0)
        return sums, top


def _box_gap2(w: torch.Tensor, cls) -> torch.Tensor:
    """``(Q, G)`` lower bounds of ``min_k ‖w - key‖²`` over each group's keys: the squared
    distance from ``w`` to the group's box in the principal frame (less a 1e-9 margin)."""
    rotated = w @ cls.frame
    out = torch.empty(len(w), len(cls.low), dtype=torch.float64, device=w.device)
    step = max(1, _BLOCK // (len(cls.low) * max(cls.rank, 1)))
    for q0 in range(0, len(w), step):
        x = rotated[q0 : q0 + step, None]
        gap = (cls.low - x).clamp_(min=0) + (x - cls.high).clamp_(min=0)
        out[q0 : q0 + step] = gap.pow_(2).sum(dim=2)
    corner = torch.maximum(cls.low.abs(), cls.high.abs()).pow(2).sum(dim=1)
    scale = rotated.pow(2).sum(dim=1)[:, None] + corner
    return (out - 1e-9 * scale).clamp_(min=0)
