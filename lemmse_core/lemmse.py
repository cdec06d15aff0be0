"""The LE-MMSE: the MMSE over local, translation-equivariant maps (Thm. 3.8, Prop. B.5).

``f(v)[m] = φ*(Π_m v)``, ``φ*(u) = Σ_{n,k} w_{n,k}(u) x_k[n]`` with
``w_{n,k}(u) ∝ N(u; Q_n A x_k, σ² Q_n Q_nᵀ)`` and ``Q_n = Π_n B`` (THEORY.md).

Locations ``n`` sharing the patch Gram matrix ``G_n = Q_n Q_nᵀ`` form a *class*: one class
for ``B = I`` or a circulant ``B``, one per mask pattern for a diagonal ``B``, one per
residue modulo the period for super-resolution, one per location otherwise. Per class,
``G = U Λ Uᵀ`` keeps the eigenvalues above ``P · eps(float64) · λ_max`` (the default cut
of ``torch.linalg.pinv``), and whitening ``W = Λ^{-1/2} Uᵀ`` turns the log-weight into

``ℓ_{n,k}(u) = -‖W u - W Π_n B A x_k‖² / (2σ²) - ½ log pdet G``,

a GEMM between whitened queries and precomputed keys plus a streaming softmax. Rank
stratification (Prop. B.5): a query ``u`` only uses the classes with ``u ∈ Im G``
(``‖(I - UUᵀ) u‖ <= support_rtol ‖u‖``) of the smallest rank among those.

Keys are whitened in float64 and stored in ``dtype``. Each class is split into *groups* of
at most ``group_size`` nearby keys (recursive bisection at the median of the principal
direction); each group is centred on its own mean before the dot products (queries shifted
alike), so a query's heavy terms are computed from small vectors, where rounding is
smallest. Per group, its total count ``C_g`` and the box of its keys in the principal
axes of the class bound its weight for any query ``u``: ``log C_g - d²(u, box) / (2σ²)
- ½ log pdet G``. With ``rtol > 0`` the groups whose bounds sum to at most ``rtol`` times
the weight of the query's nearest group (by mean) are skipped (certified pruning): the
skipped weight is at most ``rtol`` of the total, and the output error at most ``rtol``
times the range of the pixel values (the exact bound is returned on request).

Per group and block of queries the estimate is one GEMM (the key bias, log counts and a
per-query shift are folded into three extra dimensions), an in-place ``exp`` and a GEMM with
the ``C + 1`` columns ``[x_k[n], 1]``: the cost of the values does not grow with the patch
dimension. The shift is the largest term of the query's nearest group, found first and
in float64 (it holds the heaviest terms, whose rounding matters most at small σ); a group
with a term above the shift by more than the float range is redone at its own maximum.
Below 48 dimensions PyTorch's fused CPU attention is faster and is used per group instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .checks import check_dtype, check_measurement, check_setup, check_sigma
from .operators import LinearMap
from .patches import check_patch_size, extract_patches, patch_at
from .streaming import StreamingSoftmax

_EPS64 = torch.finfo(torch.float64).eps
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
MASS_BIN = 0.01  # width in nats of the log-weight histogram used by ``mass_count``
_MASS_RANGE = 50.0  # weights below exp(-50) of the total share the last bin


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


@dataclass
class _Class:
    """Locations sharing one patch Gram matrix, with their whitened keys.

    Identical (key, value) rows are merged into one key with a count (exact): a term
    index ``t = l·N + k`` names location ``locations[l]`` of training image ``k``. Keys are
    stored by group (contiguous rows ``bounds[g]``), each centred on its group mean.
    """

    locations: torch.Tensor  # (L,) flat pixel indices
    whiten: torch.Tensor  # (r, P) float64
    basis: torch.Tensor  # (P, r) float64, orthonormal basis of Im G
    log_pdet: float
    centre: torch.Tensor | None = None  # (r,) float64 mean of the keys
    keys_ext: torch.Tensor | None = None  # (K, r + 3): [key - μ_g, -½‖key - μ_g‖², log count, 1]
    values_t: torch.Tensor | None = None  # (C + 1, K): [centre pixels, 1], transposed
    bounds: list | None = None  # [(k0, k1)] rows of each group
    means: torch.Tensor | None = None  # (G, r) float64 group means μ_g
    frame: torch.Tensor | None = None  # (r, r) float64 principal axes of the keys
    low: torch.Tensor | None = None  # (G, r) float64 box of each group's keys in ``frame``
    high: torch.Tensor | None = None
    log_mass: torch.Tensor | None = None  # (G,) float64 log of the group's total count
    counts: torch.Tensor | None = None  # (K,) float64 number of identical terms
    source: torch.Tensor | None = None  # (K,) first term index t of each key

    @property
    def rank(self) -> int:
        return self.whiten.shape[0]

    @property
    def keys(self) -> torch.Tensor:
        return self.keys_ext[:, : self.rank]

    @property
    def values(self) -> torch.Tensor:
        return self.values_t[:-1].T


_ROWS = 1 << 17  # rows per chunk when preprocessing keys (bounds the temporaries)


def _merge_duplicates(keys: torch.Tensor, values: torch.Tensor):
    """Exact merge of identical rows of ``[keys, values]``: ``(first, counts)``.

    Rows are sorted by a random projection (a hash); equal neighbours are merged, so a
    hash collision only costs a missed merge, never a wrong one.
    """
    gen = torch.Generator().manual_seed(0)
    hash_k = torch.randn(keys.shape[1], generator=gen).to(keys)
    hash_v = torch.randn(values.shape[1], generator=gen).to(values)
    order = torch.argsort(keys @ hash_k + values @ hash_v, stable=True)
    starts = torch.ones(len(keys), dtype=torch.bool, device=keys.device)
    for i0 in range(1, len(keys), _ROWS):
        cur = order[i0 : i0 + _ROWS]
        prev = order[i0 - 1 : i0 - 1 + len(cur)]
        differs = (keys[cur] != keys[prev]).any(dim=1) | (values[cur] != values[prev]).any(dim=1)
        starts[i0 : i0 + _ROWS] = differs
    group = torch.cumsum(starts, dim=0) - 1
    counts = torch.bincount(group, minlength=int(starts.sum())).double()
    return order[starts], counts


def _class_labels(B: LinearMap, shape, p: int) -> torch.Tensor:
    """Class label of every location ``(H·W,)``: equal labels share ``G_n``."""
    c, h, w = shape
    if B.structure in ("identity", "circulant"):
        return torch.zeros(h * w, dtype=torch.long)
    if B.structure == "diagonal":
        sq = B.diagonal(shape).double().cpu()[None] ** 2
        return torch.unique(extract_patches(sq, p)[0], dim=0, return_inverse=True)[1]
    if B.period is None:
        return torch.arange(h * w)
    si, sj = B.period
    i, j = torch.arange(h)[:, None], torch.arange(w)[None, :]
    return ((i % si) * sj + (j % sj)).reshape(-1)


def _patch_gram(B: LinearMap, shape, p: int, location: int) -> torch.Tensor:
    """``G_n = Π_n B Bᵀ Π_nᵀ`` at one location, from ``P`` impulses (float64)."""
    c, h, w = shape
    i, j = divmod(location, w)
    size = c * p * p
    impulses = torch.zeros(size, c, h, w, dtype=torch.float64)
    r = p // 2
    for idx in range(size):
        ch, rest = divmod(idx, p * p)
        a, b = divmod(rest, p)
        impulses[idx, ch, (i + a - r) % h, (j + b - r) % w] = 1.0
    bbt = B.A(B.adjoint(impulses))
    return patch_at(bbt, p, i, j).T  # column idx = G e_idx; symmetric


def _whitening(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(W, U_r, log pdet)`` of a PSD matrix, cut at ``size · eps · λ_max``."""
    lam, vec = torch.linalg.eigh(gram)
    cut = max(lam.max().item(), 0.0) * gram.shape[0] * _EPS64
    keep = lam > cut if lam.max() > 0 else torch.zeros_like(lam, dtype=torch.bool)
    lam, vec = lam[keep], vec[:, keep]
    return (vec / lam.sqrt()).T.contiguous(), vec, float(lam.log().sum())


def _tree_groups(keys: torch.Tensor, rows: torch.Tensor, size: int):
    """Groups of at most ``size`` of ``keys[rows]``: recursive bisection at the median of
    the principal direction. Returns ``(order, bounds)``: ``rows[order]`` lists the groups
    contiguously, at rows ``bounds = [(k0, k1)]``.
    """
    order, todo, bounds = torch.arange(len(rows)), [(0, len(rows))], []
    gen = torch.Generator().manual_seed(0)
    while todo:
        k0, k1 = todo.pop()
        if k1 - k0 <= size or keys.shape[1] == 0:
            bounds.append((k0, k1))
            continue
        idx = order[k0:k1]
        sample = keys[rows[idx[torch.randint(len(idx), (4096,), generator=gen)]]]
        direction = _principal_axes(sample)[:, -1].to(keys)
        parts = [keys[rows[idx[i : i + _ROWS]]] @ direction for i in range(0, len(idx), _ROWS)]
        order[k0:k1] = idx[torch.argsort(torch.cat(parts), stable=True)]
        mid = (k0 + k1) // 2
        todo += [(mid, k1), (k0, mid)]
    return order, sorted(bounds)


def _grouped_keys(keys, values, counts, rows, bounds, frame, dtype):
    """Per group: ``keys_ext``, ``values_t`` (see :class:`_Class`), means, log masses and
    the box of the keys in ``frame``."""
    r, c = keys.shape[1], values.shape[1]
    keys_ext = torch.empty(len(rows), r + 3, dtype=dtype)
    values_t = torch.ones(c + 1, len(rows), dtype=dtype)
    means = torch.zeros(len(bounds), r, dtype=torch.float64)
    low, high = torch.zeros(2, len(bounds), r, dtype=torch.float64)
    log_mass = torch.zeros(len(bounds), dtype=torch.float64)
    for g, (k0, k1) in enumerate(bounds):
        block = keys[rows[k0:k1]].double()
        rotated = block @ frame
        low[g], high[g] = rotated.amin(dim=0), rotated.amax(dim=0)
        means[g] = block.mean(dim=0)
        block -= means[g]
        log_mass[g] = counts[k0:k1].sum().log()
        keys_ext[k0:k1, :r] = block.to(dtype)
        keys_ext[k0:k1, r] = (-0.5 * block.pow(2).sum(dim=1)).to(dtype)
        keys_ext[k0:k1, r + 1], keys_ext[k0:k1, r + 2] = counts[k0:k1].log().to(dtype), 1.0
        values_t[:c, k0:k1] = values[rows[k0:k1]].T
    return keys_ext, values_t, means, log_mass, low, high


def _principal_axes(sample: torch.Tensor) -> torch.Tensor:
    """Principal axes ``(r, r)`` of the rows of ``sample`` (float64, ascending variance)."""
    sample = sample.double()
    sample -= sample.mean(dim=0)
    return torch.linalg.eigh(sample.T @ sample)[1]


def _principal_frame(keys: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Principal axes ``(r, r)`` of ``keys[rows]`` (from a sample)."""
    if keys.shape[1] == 0:
        return torch.zeros(0, 0, dtype=torch.float64)
    pick = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))[:65536]
    return _principal_axes(keys[rows[pick]])


def _centred(cls, g: int, w: torch.Tensor, sigma: float):
    """Queries ``w`` minus the mean of group ``g`` and their log-weight offsets (float64):
    the log-weight of term ``(row, key)`` is ``(q·key - ½‖key‖²) / σ² + log count +
    offset[row]``."""
    q = w - cls.means[g]
    return q, -0.5 * q.pow(2).sum(dim=1) / sigma**2 - 0.5 * cls.log_pdet


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


class LEMMSE:
    """LE-MMSE estimator for one ``(train, A, B, patch_size)``, reusable across ``y`` and σ.

    Precomputes the location classes, whitening and keys once; ``__call__(y, sigma)``
    returns the estimate ``(n, C, H, W)``. ``B=None`` means ``B = I`` (physics-agnostic).
    ``group_size``: keys per group (the unit of centring and of pruning); ``kernel``:
    ``"fused"`` (PyTorch's CPU flash attention), ``"gemm"`` (GEMM + exp + GEMM, any
    device) or ``"auto"`` (fused on the CPU for patch ranks below 48).
    """

    def __init__(
        self,
        train: torch.Tensor,
        A,
        patch_size: int,
        B: LinearMap | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        support_rtol: float = 1e-6,
        group_size: int = 4096,
        kernel: str = "auto",
        progress: bool = False,
    ):
        self.B, self.y_shape = check_setup(train, A, B)
        self.A, self.train = A, train
        self.shape = tuple(train.shape[1:])
        self.p = check_patch_size(patch_size, self.shape)
        self.dtype = check_dtype(dtype)
        self.support_rtol = float(support_rtol)
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        self.group_size = group_size
        if kernel not in ("auto", "fused", "gemm"):
            raise ValueError(f"kernel must be 'auto', 'fused' or 'gemm', got {kernel!r}")
        if kernel == "fused" and _flash_attention is None:
            raise ValueError("kernel='fused' needs PyTorch's fused CPU attention")
        self.kernel = kernel
        self.n_train = train.shape[0]
        self.classes = self._build_classes()
        self._build_keys(progress)
        span = train.double().amax(dim=(0, 2, 3)) - train.double().amin(dim=(0, 2, 3))
        self._value_range = span.to(train.device)  # per channel: bounds |x_k[n] - estimate|

    # ------------------------------------------------------------------ precomputation

    def _build_classes(self) -> list[_Class]:
        labels = _class_labels(self.B, self.shape, self.p)
        classes = []
        for label in torch.unique(labels):
            locations = torch.nonzero(labels == label).flatten()
            gram = _patch_gram(self.B, self.shape, self.p, int(locations[0]))
            whiten, basis, log_pdet = _whitening(gram)
            classes.append(_Class(locations, whiten, basis, log_pdet))
        return classes

    def _build_keys(self, progress: bool) -> None:
        """Whitened, centred keys ``W Π_n B A x_k`` and centre pixels, per class."""
        device, n, step = self.train.device, self.n_train, 256
        mean_image = sum(
            self.B.A(self.A.A(self.train[k0 : k0 + step].double())).sum(dim=0)
            for k0 in range(0, n, step)
        )
        mean_patches = extract_patches(mean_image[None] / n, self.p)[0].cpu()
        c = self.shape[0]
        store = {}
        for cls in self.classes:
            cls.centre = mean_patches[cls.locations].mean(dim=0) @ cls.whiten.T
            locs = len(cls.locations)
            store[id(cls)] = (
                torch.empty(locs, n, cls.rank, dtype=self.dtype),
                torch.empty(locs, n, c, dtype=self.dtype),
            )
        for k0 in tqdm(range(0, n, step), desc="LE-MMSE keys", disable=not progress):
            x = self.train[k0 : k0 + step].double()
            patches = extract_patches(self.B.A(self.A.A(x)), self.p).cpu()  # (k, H·W, P)
            centres = x.flatten(2).transpose(1, 2).cpu()  # (k, H·W, C)
            for cls in self.classes:
                keys, values = store[id(cls)]
                whitened = patches[:, cls.locations] @ cls.whiten.T - cls.centre
                keys[:, k0 : k0 + step] = whitened.transpose(0, 1)
                values[:, k0 : k0 + step] = centres[:, cls.locations].transpose(0, 1)
        for cls in self.classes:
            keys, values = (t.flatten(0, 1) for t in store.pop(id(cls)))
            first, counts = _merge_duplicates(keys, values)
            order, cls.bounds = _tree_groups(keys, first, self.group_size)
            rows, counts = first[order], counts[order]
            cls.frame = _principal_frame(keys, rows)
            grouped = _grouped_keys(keys, values, counts, rows, cls.bounds, cls.frame, self.dtype)
            del keys, values
            cls.keys_ext, cls.values_t, cls.means, cls.log_mass, cls.low, cls.high = (
                t.to(device) for t in grouped
            )
            cls.frame = cls.frame.to(device)
            cls.counts, cls.source = counts.to(device), rows.to(device)
            cls.centre = cls.centre.to(device)

    # ----------------------------------------------------------------------- queries

    def _active(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per query: the stratum rank and the active mask ``(Q, n_classes)`` (Prop. B.5)."""
        ranks = torch.tensor([c.rank for c in self.classes], device=u.device)
        if len(self.classes) == 1:
            return ranks.expand(u.shape[0]), torch.ones(
                u.shape[0], 1, dtype=torch.bool, device=u.device
            )
        norm = u.norm(dim=1)
        admissible = torch.stack(
            [
                (u - (u @ c.basis.to(u.device)) @ c.basis.T.to(u.device)).norm(dim=1)
                <= self.support_rtol * norm
                for c in self.classes
            ],
            dim=1,
        )
        if not admissible.any(dim=1).all():
            raise ValueError("a query patch lies in no Im Q_n: v is not a valid B y")
        big = torch.iinfo(ranks.dtype).max
        stratum = torch.where(admissible, ranks, big).min(dim=1).values
        return stratum, admissible & (ranks[None] == stratum[:, None])

    def _queries(self, u, active, sigma):
        """Per class and key group: ``(rows, cls, k0, k1, q, offset)``.

        ``q``, ``offset``: see :func:`_centred` (``q`` in ``dtype``).
        """
        for i, cls in enumerate(self.classes):
            rows = torch.nonzero(active[:, i]).flatten()
            if len(rows) == 0:
                continue
            whitened = u[rows] @ cls.whiten.T.to(u.device) - cls.centre
            for g, (k0, k1) in enumerate(cls.bounds):
                q, offset = _centred(cls, g, whitened, sigma)
                yield rows, cls, k0, k1, q.to(self.dtype), offset

    def _blocks(self, u, active, sigma, chunk_size, progress):
        """Yield ``(rows, cls, k0, k1, s, offset)``: log-weights ``s + offset[:, None]`` of
        the merged keys ``k0:k1`` (log counts included)."""
        work = list(self._queries(u, active, sigma))
        bar = tqdm(total=sum(w[3] - w[2] for w in work), disable=not progress)
        for rows, cls, g0, g1, q, offset in work:
            for k0 in range(g0, g1, chunk_size or g1 - g0):
                k1 = min(k0 + (chunk_size or g1 - g0), g1)
                keys, step = cls.keys_ext[k0:k1], max(1, _BLOCK // (k1 - k0))
                for q0 in range(0, len(rows), step):
                    sl = slice(q0, q0 + step)
                    s = q[sl] @ keys[:, : cls.rank].T / sigma**2
                    s += keys[:, cls.rank] / sigma**2 + keys[:, cls.rank + 1]
                    yield rows[sl], cls, k0, k1, s, offset[sl]
                bar.update(k1 - k0)
        bar.close()

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
        q, offset = _centred(cls, g, w, sigma)
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
        q, offset = _centred(cls, g, w, sigma)
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

    def _attend_class(self, cls, w, sigma, rtol, key_block):
        """Softmax over the keys of one class: ``(out (Q, C), lse, skipped)`` in float64.

        ``skipped``: log of the bound on the weight of the groups left out (``-inf`` if none).
        """
        seed = torch.argmin(torch.cdist(w, cls.means), dim=1)
        sums = torch.empty(len(w), cls.values_t.shape[0], dtype=torch.float64, device=w.device)
        shift = torch.empty(len(w), dtype=torch.float64, device=w.device)
        for g in torch.unique(seed).tolist():
            rows = torch.nonzero(seed == g).flatten()
            sums[rows], shift[rows] = self._group_sums(cls, g, w[rows], sigma, None, key_block)
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
            sums[rows] += part  # after the call: it may rescale sums[rows]
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

    def _estimate_grouped(self, u, active, sigma, rtol, chunk_size, progress):
        """Estimate and the bound on the skipped weight, class by class (see module doc)."""
        n_values = self.shape[0]
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
            out, lse, skip = self._attend_class(cls, w, sigma, rtol, key_block)
            new, scale = state.update(lse, rows)
            weight = torch.exp(lse - new)
            acc[rows] = acc[rows] * scale[:, None] + weight[:, None] * out
            state.add(weight, rows)
            skipped[rows] = torch.logaddexp(skipped[rows], skip)
        log_norm = state.log_normaliser()
        bound = torch.exp(skipped - log_norm)[:, None] * self._value_range
        return acc / state.sum[:, None], bound

    def _estimate_blocked(self, u, active, sigma, chunk_size, progress, top):
        """Estimate with explicit log-weight blocks (feeds the diagnostics)."""
        state = StreamingSoftmax(len(u), device=u.device)
        acc = torch.zeros(len(u), self.shape[0], dtype=torch.float64, device=u.device)
        for rows, cls, k0, k1, s, offset in self._blocks(u, active, sigma, chunk_size, progress):
            top.update(rows, cls, k0, s - cls.keys_ext[k0:k1, cls.rank + 1], offset)
            new, scale = state.update(s.max(dim=1).values.double() + offset, rows)
            p = torch.exp(s.sub_((new - offset).to(s.dtype)[:, None]))
            acc[rows] = acc[rows] * scale[:, None] + (p @ cls.values[k0:k1]).double()
            state.add(p.sum(dim=1), rows)
        return acc / state.sum[:, None], state.log_normaliser()

    def estimate(
        self,
        v: torch.Tensor,
        sigma: float,
        *,
        rtol: float = 0.0,
        error_bound: bool = False,
        chunk_size: int | None = None,
        diagnostics: bool = False,
        mass: float | None = None,
        top_k: int = 5,
        progress: bool = False,
    ):
        """LE-MMSE of pre-inverted measurements ``v = B y`` ``(n, C, H, W)``.

        ``rtol > 0`` skips groups of keys holding provably at most ``rtol`` of the weight
        (module doc); ``error_bound=True`` also returns the guaranteed bound ``(n, C, H, W)``
        on ``|estimate - exact|`` (zero when nothing is skipped; rounding aside).
        ``chunk_size``: keys per block (the result does not depend on it). Diagnostics use
        explicit log-weight blocks and the exact computation.
        """
        sigma = check_sigma(sigma)
        rtol = _check_rtol(rtol)
        if mass is not None and not 0 < mass <= 1:
            raise ValueError(f"mass must be in (0, 1], got {mass!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        if diagnostics and (rtol > 0 or error_bound):
            raise ValueError("diagnostics are exact: use rtol=0 and error_bound=False with them")
        n, (c, h, w) = v.shape[0], self.shape
        u = extract_patches(v.double(), self.p).reshape(n * h * w, -1)
        stratum, active = self._active(u)

        def image(flat, dtype=self.dtype):
            return flat.reshape(n, h, w, c).permute(0, 3, 1, 2).to(dtype).contiguous()

        if not diagnostics:
            flat, bound = self._estimate_grouped(u, active, sigma, rtol, chunk_size, progress)
            return (image(flat), image(bound, torch.float64)) if error_bound else image(flat)
        top = _TopK(len(u), top_k, self.classes, u.device)
        flat, log_norm = self._estimate_blocked(u, active, sigma, chunk_size, progress, top)
        log_density = (
            log_norm
            - 0.5 * stratum.double() * math.log(2 * math.pi * sigma**2)
            - math.log(self.n_train * h * w)
        )
        weights, counts, sources, location = top.result(log_norm, self.n_train, w)
        mass_count = None
        if mass is not None:
            mass_count = self._mass_count(u, active, sigma, log_norm, mass, chunk_size)
            mass_count = mass_count.reshape(n, h, w)
        diag = PatchDiagnostics(
            log_density.reshape(n, h, w),
            stratum.reshape(n, h, w),
            weights.reshape(n, h, w, -1),
            counts.reshape(n, h, w, -1),
            sources.reshape(n, h, w, -1),
            location.reshape(n, h, w, -1, 2),
            mass_count,
        )
        return image(flat), diag

    def _mass_count(self, u, active, sigma, log_norm, mass, chunk_size) -> torch.Tensor:
        """Number of terms holding ``mass`` of the weight, from a log-weight histogram."""
        n_bins = int(_MASS_RANGE / MASS_BIN) + 1
        hist_mass = torch.zeros(len(u) * n_bins, dtype=torch.float64, device=u.device)
        hist_count = torch.zeros_like(hist_mass)
        for rows, cls, k0, k1, s, offset in self._blocks(u, active, sigma, chunk_size, False):
            log_w = s.double() + (offset - log_norm[rows])[:, None]  # merged keys
            counts = cls.counts[k0:k1].expand_as(log_w)
            bins = (-(log_w - counts.log()) / MASS_BIN).floor().clamp(0, n_bins - 1).long()
            index = (rows[:, None] * n_bins + bins).flatten()
            hist_mass.index_add_(0, index, log_w.exp().flatten())
            hist_count.index_add_(0, index, counts.flatten())
        return _count_from_histogram(
            hist_mass.reshape(len(u), n_bins), hist_count.reshape(len(u), n_bins), mass
        )

    def __call__(self, y: torch.Tensor, sigma: float, **kwargs):
        """LE-MMSE of measurements ``y`` (see :meth:`estimate` for the keywords)."""
        y = check_measurement(y, self.train, self.y_shape)
        return self.estimate(self.B.A(y.double()), sigma, **kwargs)


def _check_rtol(rtol) -> float:
    if isinstance(rtol, bool) or not isinstance(rtol, int | float) or not 0 <= rtol < 1:
        raise ValueError(f"rtol must be a float in [0, 1), got {rtol!r}")
    return float(rtol)


def _count_from_histogram(hist_mass, hist_count, mass: float) -> torch.Tensor:
    cum_mass = hist_mass.cumsum(dim=1)
    cum_count = hist_count.cumsum(dim=1)
    b = torch.searchsorted(cum_mass, torch.full_like(cum_mass[:, :1], mass * (1 - 1e-12)))
    b = b.clamp(max=hist_mass.shape[1] - 1)
    prev_mass = torch.where(b > 0, cum_mass.gather(1, (b - 1).clamp(min=0)), 0.0)
    prev_count = torch.where(b > 0, cum_count.gather(1, (b - 1).clamp(min=0)), 0.0)
    bin_mass, bin_count = hist_mass.gather(1, b), hist_count.gather(1, b)
    mean_weight = bin_mass / bin_count.clamp(min=1)
    needed = torch.ceil(((mass - prev_mass) / mean_weight).clamp(min=1) - 1e-9)
    return (prev_count + torch.minimum(needed, bin_count)).flatten().long()


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


def le_mmse(
    y: torch.Tensor,
    train: torch.Tensor,
    A,
    sigma: float,
    patch_size: int,
    B: LinearMap | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    rtol: float = 0.0,
    chunk_size: int | None = None,
    diagnostics: bool = False,
    mass: float | None = None,
    top_k: int = 5,
    progress: bool = False,
):
    """LE-MMSE estimate (Thm. 3.8, Prop. B.5) of ``y`` with patches of odd ``patch_size``.

    ``rtol``: certified pruning (see :meth:`LEMMSE.estimate`); ``chunk_size`` keys per
    block (the result does not depend on it); ``diagnostics=True`` returns
    ``(x_hat, PatchDiagnostics)``; ``mass=q`` adds the mass count (a second pass).
    For several ``y`` or σ with the same data, build one :class:`LEMMSE` and call it.
    """
    engine = LEMMSE(train, A, patch_size, B, dtype=dtype, progress=progress)
    return engine(
        y,
        sigma,
        rtol=rtol,
        chunk_size=chunk_size,
        diagnostics=diagnostics,
        mass=mass,
        top_k=top_k,
        progress=progress,
    )


def smoothed_le_mmse(
    y: torch.Tensor,
    train: torch.Tensor,
    A,
    sigma: float,
    patch_size: int,
    eps: float,
    samples: int,
    B: LinearMap | None = None,
    generator: torch.Generator | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    chunk_size: int | None = None,
):
    """Smoothed LE-MMSE ``E_z f(v + eps z)`` (Sec. 4.4) by Monte Carlo over ``samples`` z."""
    eps = check_sigma(eps, "eps")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive int, got {samples!r}")
    engine = LEMMSE(train, A, patch_size, B, dtype=dtype)
    v = engine.B.A(check_measurement(y, train, engine.y_shape).double())
    total = torch.zeros_like(v)
    for _ in range(samples):
        z = torch.randn(v.shape, generator=generator, dtype=v.dtype).to(v.device)
        total += engine.estimate(v + eps * z, sigma, chunk_size=chunk_size).double()
    return (total / samples).to(dtype)
