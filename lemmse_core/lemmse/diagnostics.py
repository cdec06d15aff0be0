"""Diagnostics of the LE-MMSE (:mod:`lemmse_core.lemmse`; THEORY.md items 8, 9): the
log-density, the heaviest terms and the mass counts, exact. One grouped pass of the query
engine records each group's weight; explicit per-term log-weights are then computed only
for the groups whose bounds let them matter."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..checks import _EPS64
from .engine import _BLOCK, QueryEngine
from .keys import _Class

MASS_BIN = 0.01  # width in nats of the log-weight histogram used by ``mass_count``
_MASS_RANGE = 50.0  # weights below exp(-50) of the total share the last bin
_N_BINS = int(_MASS_RANGE / MASS_BIN) + 1
_DIAG_QUERIES = 4096  # queries per diagnostics block (bounds the (queries, bins) histogram)
_BISECTIONS = 12  # steps of the search for the histogram's cap (51 nats / 4096)
_GUESS_BINS = 3  # margin of the guessed cap of the histogram (bins)


class Local:
    """The reductions of :meth:`Diagnostics.scan` in one process: none."""

    @staticmethod
    def max(t: torch.Tensor) -> torch.Tensor:
        return t

    @staticmethod
    def sum(t: torch.Tensor) -> torch.Tensor:
        return t


LOCAL = Local()


@dataclass
class PatchDiagnostics:
    """Per-pixel diagnostics of the LE-MMSE, from the pass that computes it.

    - ``log_density`` ``(n, H, W)``: ``log (1/(N|Ω|)) Σ N(u; Q_nAx_k, σ²Q_nQ_nᵀ)`` over the
      contributing stratum (the LE-MMSE denominator, THEORY.md item 8).
    - ``rank`` ``(n, H, W)``: the stratum rank ``r(u)``.
    - ``top_weights`` ``(n, H, W, k)``: the weights of the ``k`` heaviest distinct
      (location, image) terms; ``top_count``: how many identical terms share each (equal
      patches and centre pixels, e.g. blank background); ``top_image`` and
      ``top_location`` (``(..., k, 2)``, the centre ``(i, j)`` of the training patch):
      the first of them. Index 0 is the dominant source.
    - ``mass_count`` ``(n, H, W)``: the number of terms holding a fraction ``mass`` of the
      weight (relative error at most ``exp(MASS_BIN) - 1``), or ``None``.
    """

    log_density: torch.Tensor
    rank: torch.Tensor
    top_weights: torch.Tensor
    top_count: torch.Tensor
    top_image: torch.Tensor
    top_location: torch.Tensor
    mass_count: torch.Tensor | None = None


class Diagnostics:
    """The diagnostics pass over the classes of a :class:`~lemmse_core.lemmse.engine.QueryEngine`
    (``n_train`` training images)."""

    def __init__(self, engine: QueryEngine | None, n_train: int):
        self.engine, self.n_train = engine, n_train  # no engine: an empty shard's scan
        self.dtype = None if engine is None else engine.dtype

    def run(self, u, active, stratum, sigma, grid, chunk_size, progress, top_k, mass):
        """Estimate ``(Q, C)`` and :class:`PatchDiagnostics` of the queries ``u`` of an
        ``(n, H, W)`` ``grid``, with their active classes and stratum ranks."""
        flat, log_norm, terms, mass_count = self.terms(
            u, active, sigma, grid[2], chunk_size, progress, top_k, mass
        )
        diag = patch_diagnostics(grid, log_norm, stratum, sigma, self.n_train, terms, mass_count)
        return flat, diag

    def terms(self, u, active, sigma, width, chunk_size, progress, top_k, mass):
        """Estimate, log-normaliser, heaviest terms (weights, counts, images, locations, of
        :meth:`_TopK.result`) and mass counts (or ``None``) of the queries ``u`` of images of
        ``width`` columns."""
        top = _TopK(len(u), top_k, self.engine.classes, u.device)
        flat, log_norm, mass_count = self._diagnosed(
            u, active, sigma, chunk_size, progress, top, mass
        )
        return flat, log_norm, top.result(log_norm, self.n_train, width), mass_count

    def _diagnosed(self, u, active, sigma, chunk_size, progress, top, mass):
        """Estimate, log-normaliser and mass counts (``None`` without ``mass``); fills ``top``:
        one grouped pass (the plain estimate, recording each group's weight), then
        :meth:`scan`."""
        records = []
        flat, _, log_norm = self.engine.run(u, active, sigma, 0.0, chunk_size, progress, records)
        return flat, log_norm, self.scan(records, u, sigma, log_norm, top, mass, progress)

    def scan(self, records, u, sigma, log_norm, top, mass, progress, sync=LOCAL):
        """Fills ``top`` and returns the mass counts (``None`` without ``mass``) of the
        queries ``u``, from the ``records`` of the estimate pass and the log-normaliser
        ``log_norm``: explicit per-term log-weights only for the groups whose bounds let
        them matter (THEORY.md items 8, 9), the same values as if every term were listed.

        ``sync`` (:data:`LOCAL` by default: none) reduces the histogram caps (max) and sums
        (sum) over the shards of :mod:`lemmse_core.distributed`, where ``log_norm`` is that
        of the union and every shard, even an empty one (no records), calls this.
        """
        if top.k == 0 and mass is None:
            return None
        classes, top = _by_class(records), top if top.k else None
        counts = torch.zeros(len(log_norm), dtype=torch.long, device=log_norm.device)
        blocks = range(0, len(log_norm), _DIAG_QUERIES)
        for r0 in tqdm(blocks, desc="LE-MMSE diagnostics", disable=not progress):
            block = torch.arange(r0, min(r0 + _DIAG_QUERIES, len(log_norm)), device=counts.device)
            views = [self._view(cls, rows, m, block, u, sigma) for cls, rows, m in classes]
            views = [view for view in views if view is not None]
            hist = None
            if mass is not None:
                guess = sync.max(_mass_guess(views, block, mass, log_norm))
                hist = _MassHistogram(block, guess, log_norm)
            for view in views:
                self._scan_class(view, sigma, top, hist)
            if hist is not None:
                counts[block] = self._mass_counts(views, sigma, hist, mass, sync)
        return counts if mass is not None else None

    def _view(self, cls, rows, masses, block, u, sigma):
        """The queries of ``block`` (ascending) active in ``cls``, whitened, with the bounds
        of :meth:`_term_bounds`; ``None`` if there are none."""
        a, b = torch.searchsorted(rows, torch.stack([block[0], block[-1] + 1])).tolist()
        if a == b:
            return None
        w = u[rows[a:b]] @ cls.whiten.T.to(u.device) - cls.centre
        return _View(cls, rows[a:b], w, masses[a:b], self._term_bounds(cls, w, masses[a:b], sigma))

    def _term_bounds(self, cls, w, masses, sigma):
        """``(Q, G)`` upper bounds of the per-term log-weights of each group: the group's
        log-weight (the estimate pass) or the ball bound ``-(‖w - μ_g‖ - R_g)²/(2σ²) - ½ log
        pdet G`` (``R_g`` the group's radius), whichever is smaller, each widened by a bound
        on the rounding of the ``dtype`` dot products of both passes."""
        eps = torch.finfo(self.dtype).eps
        radius, size = _group_extent(cls)
        w2, m2 = w.pow(2).sum(dim=1, keepdim=True), cls.means.pow(2).sum(dim=1)
        sq, err = w2 + m2 - 2 * w @ cls.means.T, (cls.rank + 4) * _EPS64 * (w2 + m2)
        near = (sq - err).clamp_(min=0).sqrt_() - radius * (1 + 8 * eps)
        far = (sq + err).sqrt_() + radius
        slack = 8 * eps * ((cls.rank + 4) * far.pow_(2) / sigma**2 + size + cls.rank + 4)
        ball = -near.clamp_(min=0).pow_(2) / (2 * sigma**2) - 0.5 * cls.log_pdet
        return torch.minimum(masses + slack, ball) + slack

    def _scan_class(self, view, sigma, top, hist):
        """Explicit terms of one class: the seed group (nearest mean), the groups whose bound
        reaches the histogram's floor (every term it could keep), then, by decreasing
        bound in rounds of doubling size, those whose bound beats the k-th weight so far
        (it only grows, so a group skipped then cannot enter the top k)."""
        rows = view.rows
        done = torch.zeros(view.bound.shape, dtype=torch.bool, device=rows.device)
        if top is not None:
            seed = torch.argmin(torch.cdist(view.w, view.cls.means), dim=1)
            done[torch.arange(len(rows), device=rows.device), seed] = True
            self._scan(view, done, None if hist is None else done, sigma, top, hist)
        if hist is not None:
            need = (view.bound > hist.floor_at(rows)[:, None]) & ~done
            beats = None if top is None else need & (view.bound > top.values[rows, -1:])
            self._scan(view, beats, need, sigma, top, hist)
            done |= need
        width = 1
        while top is not None:
            left = torch.where(done, -torch.inf, view.bound)
            left[left <= top.values[rows, -1:]] = -torch.inf
            best, pick = left.topk(min(width, left.shape[1]), dim=1)
            need = torch.zeros_like(done).scatter_(1, pick, best > -torch.inf)
            if not bool(need.any()):
                return
            self._scan(view, need, None, sigma, top, None)
            done |= need
            width *= 2

    def _scan(self, view, need_top, need_hist, sigma, top, hist):
        """Per-term log-weights of the ``(query, group)`` pairs needed by the top-k and the
        histogram (``(Q, G)`` masks, or ``None``), in blocks of at most ``_BLOCK``."""
        uses = [(m, sink) for m, sink in ((need_top, top), (need_hist, hist)) if m is not None]
        if not uses:
            return
        cls, need = view.cls, uses[0][0] | uses[-1][0]
        for g in torch.nonzero(need.any(dim=0)).flatten().tolist():
            (k0, k1), sel = cls.bounds[g], torch.nonzero(need[:, g]).flatten()
            step = max(1, _BLOCK // (k1 - k0))
            for q0 in range(0, len(sel), step):
                part = sel[q0 : q0 + step]
                s, offset = self._term_logits(cls, g, view.w[part], sigma)
                for mask, sink in uses:
                    pick = mask[part, g]
                    if bool(pick.all()):
                        sink.update(view.rows[part], cls, k0, s, offset)
                    elif bool(pick.any()):
                        sink.update(view.rows[part[pick]], cls, k0, s[pick], offset[pick])

    def _term_logits(self, cls, g, w, sigma):
        """Per-term log-weights ``s + offset[:, None]`` of group ``g`` (counts left out):
        ``s`` ``(Q, K_g)`` in ``dtype``, ``offset`` of :meth:`_Class.centred`."""
        (k0, k1), r = cls.bounds[g], cls.rank
        q, offset = cls.centred(g, w, sigma)
        ext = cls.keys_ext[k0:k1]
        s = torch.addmm(ext[:, r] / sigma**2, (q / sigma**2).to(self.dtype), ext[:, :r].T)
        return s, offset

    def _mass_counts(self, views, sigma, hist, mass, sync):
        """Mass counts of a block of queries. Where the guessed cap proved too tight, the
        histogram is redone up to the cap of :func:`_mass_cap`, then in full."""
        counts, exact = hist.counts(mass, sync)
        block, log_norm = hist.rows, hist.log_norm
        for fallback in (_mass_cap, _full_cap):
            if bool(exact.all()):
                break
            redo = block[~exact]
            views = [view.select(torch.isin(view.rows, redo)) for view in views]
            views = [view for view in views if len(view.rows)]
            hist = _MassHistogram(redo, fallback(views, redo, mass, log_norm, sync), log_norm)
            for view in views:
                self._scan_class(view, sigma, None, hist)
            counts[~exact], exact[~exact] = hist.counts(mass, sync)
        return counts


def patch_diagnostics(grid, log_norm, stratum, sigma, n_train, terms, mass_count):
    """:class:`PatchDiagnostics` on an ``(n, H, W)`` ``grid`` from the log-normaliser
    over ``n_train`` images, the stratum ranks, the heaviest ``terms`` and the mass counts."""
    n, h, w = grid
    log_density = (
        log_norm
        - 0.5 * stratum.double() * math.log(2 * math.pi * sigma**2)
        - math.log(n_train * h * w)
    )
    weights, counts, sources, location = terms
    if mass_count is not None:
        mass_count = mass_count.reshape(n, h, w)
    return PatchDiagnostics(
        log_density.reshape(n, h, w),
        stratum.reshape(n, h, w),
        weights.reshape(n, h, w, -1),
        counts.reshape(n, h, w, -1),
        sources.reshape(n, h, w, -1),
        location.reshape(n, h, w, -1, 2),
        mass_count,
    )


def _by_class(records):
    """``[(cls, rows, masses)]`` per class from the estimate's blocks (rows ascending)."""
    parts = {}
    for cls, rows, masses in records:
        parts.setdefault(id(cls), (cls, [], []))
        parts[id(cls)][1].append(rows)
        parts[id(cls)][2].append(masses)
    return [(cls, torch.cat(rows), torch.cat(masses)) for cls, rows, masses in parts.values()]


def _group_extent(cls):
    """Per group: the largest ``‖key - μ_g‖`` and the number of keys (float64, cached)."""
    if cls.extent is None:
        half = cls.keys_ext[:, cls.rank].double()  # -½‖key - μ_g‖²
        radius = [(-2 * half[k0:k1].min()).clamp(min=0).sqrt() for k0, k1 in cls.bounds]
        size = [k1 - k0 for k0, k1 in cls.bounds]
        cls.extent = torch.stack(radius), torch.tensor(size).to(half)
    return cls.extent


@dataclass
class _View:
    """Queries of one block active in one class: global ``rows``, whitened ``w``, the
    groups' log-weights ``masses`` and per-term bounds ``bound`` ``(Q, G)``."""

    cls: _Class
    rows: torch.Tensor
    w: torch.Tensor
    masses: torch.Tensor
    bound: torch.Tensor

    def select(self, keep: torch.Tensor) -> _View:
        return _View(self.cls, self.rows[keep], self.w[keep], self.masses[keep], self.bound[keep])


class _MassHistogram:
    """Per query of ``rows`` (ascending): the log-weight histogram of ``mass_count`` (bins of
    ``MASS_BIN`` nats of the per-term weight relative to the total; mass and count), exact
    only up to bin ``cap`` (lighter terms are dropped; a last column collects stray ones),
    which is all the count reads where the bins up to ``cap`` hold the mass."""

    def __init__(self, rows, cap, log_norm):
        self.rows, self.cap, self.log_norm = rows, cap, log_norm
        self.width = min(int(cap.max()) + 2, _N_BINS) if len(cap) else 1
        self.mass = torch.zeros(len(rows), self.width, dtype=torch.float64, device=rows.device)
        self.count = torch.zeros_like(self.mass)
        # relative log-weight a term must exceed to land in a bin <= cap (the last: all)
        self.floor = torch.where(cap < _N_BINS - 1, -(cap + 1) * MASS_BIN, -torch.inf)

    def floor_at(self, rows):
        """Absolute per-term log-weight a term of ``rows`` must exceed to be needed."""
        return self.floor[torch.searchsorted(self.rows, rows)] + self.log_norm[rows]

    def update(self, rows, cls, k0, s, offset):
        """Terms ``s + offset[:, None]`` (``(Q, K)``, ``s`` in ``dtype``) of keys ``k0:``."""
        slot = torch.searchsorted(self.rows, rows)
        rel = offset - self.log_norm[rows]  # log-weight relative to the total: s + rel
        kept = s > _lowered(self.floor[slot], rel, s.dtype)[:, None]
        qi, ki = torch.nonzero(kept, as_tuple=True)
        log_w = s[qi, ki].double().add_(rel[qi])
        weight = log_w.exp()
        index = log_w.div_(-MASS_BIN).floor_().clamp_(0, self.width - 1).long()
        index += (slot * self.width)[qi]
        counts = cls.counts[k0 : k0 + s.shape[1]]
        if bool((counts == 1).all()):
            counts = torch.ones_like(weight)
        else:
            counts = counts[ki]
            weight *= counts
        self.mass.view(-1).scatter_add_(0, index, weight)
        self.count.view(-1).scatter_add_(0, index, counts)

    def counts(self, mass: float, sync):
        """``(mass counts, exact)`` of the histograms summed by ``sync``: exact where the
        bins up to ``cap`` hold ``mass``."""
        total, count = sync.sum(self.mass), sync.sum(self.count)
        counts, reached = _count_from_histogram(total, count, mass)
        return counts, (reached <= self.cap) | (self.cap == _N_BINS - 1)


def _lowered(bar, shift, dtype):
    """``bar - shift`` (float64) cast to ``dtype`` and lowered by the rounding of both, so
    that ``s > result`` holds wherever ``s + shift > bar`` does (``s`` in ``dtype``)."""
    out = bar - shift
    out -= 4 * torch.finfo(dtype).eps * out.abs() + 64 * _EPS64 * (bar.abs() + shift.abs())
    return out.to(dtype)


def _mass_guess(views, rows, mass, log_norm):
    """A cap for the histogram of each query of ``rows``: the bin (plus ``_GUESS_BINS``) of
    the mean per-term weight of the group where the groups, by decreasing mean, reach
    ``mass`` of each class's weight (checked afterwards, see :meth:`Diagnostics._mass_counts`)."""
    guess = torch.zeros(len(rows), dtype=torch.long, device=rows.device)
    for view in views:
        log_w = view.masses - log_norm[view.rows, None]
        mean, order = (log_w - view.cls.log_mass).sort(dim=1, descending=True)
        cum = log_w.exp().gather(1, order).cumsum(dim=1)
        at = (cum < mass * cum[:, -1:]).sum(dim=1, keepdim=True).clamp_(max=cum.shape[1] - 1)
        bins = (-mean.gather(1, at)[:, 0] / MASS_BIN).floor().long() + _GUESS_BINS
        slot = torch.searchsorted(rows, view.rows)
        guess[slot] = torch.maximum(guess[slot], bins)
    return guess.clamp_(0, _N_BINS - 1)


def _full_cap(views, rows, mass, log_norm, sync=LOCAL):
    """The last bin for every query: the whole histogram."""
    return torch.full_like(rows, _N_BINS - 1)


def _mass_cap(views, rows, mass, log_norm, sync=LOCAL):
    """Per query of ``rows``: a bin ``cap`` such that the terms in bins ``<= cap`` provably
    hold ``(1 + mass)/2 >= mass`` of the weight (the last bin where none is found).

    Bisection in ``log t`` of ``Σ_g max(0, W_g - C_g t)`` (group weights ``W_g``, relative,
    and counts ``C_g``; summed over the shards by ``sync``), a lower bound on the weight
    of the terms of weight ``>= t``.
    """
    target = (1 + mass) / 2
    parts = [
        (torch.searchsorted(rows, v.rows), torch.exp(v.masses - log_norm[v.rows, None]))
        for v in views
    ]
    lo = torch.full((len(rows),), -_MASS_RANGE - 2 * MASS_BIN, dtype=torch.float64)
    lo, hi = lo.to(rows.device), torch.zeros_like(lo, device=rows.device)
    for _ in range(_BISECTIONS):
        mid, held = (lo + hi) / 2, torch.zeros_like(lo)
        for (slot, weight), view in zip(parts, views, strict=True):
            count = view.cls.log_mass.exp()
            held.index_add_(0, slot, (weight - count * mid[slot, None].exp()).clamp_(min=0).sum(1))
        ok = sync.sum(held) >= target
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    return (-lo / MASS_BIN).floor().long().clamp_(max=_N_BINS - 1)


def _count_from_histogram(hist_mass, hist_count, mass: float):
    """Mass counts from per-query histograms, and the first bin where the cumulated mass
    reaches ``mass`` (the number of bins where it does not)."""
    cum_mass = hist_mass.cumsum(dim=1)
    cum_count = hist_count.cumsum(dim=1)
    reached = torch.searchsorted(cum_mass, torch.full_like(cum_mass[:, :1], mass * (1 - 1e-12)))
    b = reached.clamp(max=hist_mass.shape[1] - 1)
    prev_mass = torch.where(b > 0, cum_mass.gather(1, (b - 1).clamp(min=0)), 0.0)
    prev_count = torch.where(b > 0, cum_count.gather(1, (b - 1).clamp(min=0)), 0.0)
    bin_mass, bin_count = hist_mass.gather(1, b), hist_count.gather(1, b)
    mean_weight = bin_mass / bin_count.clamp(min=1)
    needed = torch.ceil(((mass - prev_mass) / mean_weight).clamp(min=1) - 1e-9)
    return (prev_count + torch.minimum(needed, bin_count)).flatten().long(), reached[:, 0]


class _TopK:
    """Running top-k per-term logits and their (class, key) across blocks."""

    def __init__(self, n: int, k: int, classes, device):
        self.k, self.classes = k, classes
        self.values = torch.full((n, k), -torch.inf, dtype=torch.float64, device=device)
        self.ids = torch.zeros((n, k), dtype=torch.long, device=device)
        self.starts = torch.tensor([0] + [len(c.keys) for c in classes]).cumsum(0)[:-1]
        self.starts = self.starts.to(device)
        self.index = {id(c): i for i, c in enumerate(classes)}

    def update(self, rows, cls, k0, s, offset):
        if self.k == 0:
            return
        if self.k == 1:  # the common case: a max is cheaper than a top-k
            vals, idx = s.max(dim=1, keepdim=True)
        else:  # the rows with a term above their k-th so far (rounding-safe), if any
            hit = s.amax(dim=1) > _lowered(self.values[rows, -1], offset, s.dtype)
            if not bool(hit.any()):
                return
            rows, s, offset = rows[hit], s[hit], offset[hit]
            vals, idx = s.topk(min(self.k, s.shape[1]), dim=1)
        vals = torch.cat([self.values[rows], vals.double() + offset[:, None]], dim=1)
        ids = idx + k0 + self.starts[self.index[id(cls)]]
        ids = torch.cat([self.ids[rows], ids], dim=1)
        best, pos = vals.topk(self.k, dim=1)
        self.values[rows], self.ids[rows] = best, ids.gather(1, pos)

    def result(self, log_norm, n_train, width):
        """Per-term weights, counts of identical terms, source image and location."""
        which = torch.searchsorted(self.starts, self.ids, right=True) - 1
        key = self.ids - self.starts[which]
        counts = torch.zeros_like(self.values)
        term = torch.zeros_like(self.ids)
        flat = torch.zeros_like(self.ids)
        for i, cls in enumerate(self.classes):
            sel = which == i
            counts[sel] = cls.counts[key[sel]]
            term[sel] = cls.source[key[sel]]
            flat[sel] = cls.locations.to(flat.device)[term[sel] // n_train]
        weights = torch.exp(self.values - log_norm[:, None])
        location = torch.stack([flat // width, flat % width], dim=-1)
        return weights, counts.long(), term % n_train, location
