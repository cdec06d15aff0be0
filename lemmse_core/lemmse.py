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
stratification (Prop. B.5): a query ``u`` only uses the classes with ``u ∈ Im G`` of the
smallest rank among those. Membership is exact where the structure of ``B`` gives the image
(:meth:`LinearMap.image_support`: identity, diagonal ``B``, e.g. a 0/1 mask): ``u`` must
vanish exactly where ``Q_n`` does, with no tolerance. Otherwise (super-resolution, general
``B``) the distance ``‖(I - UUᵀ) u‖`` to the image, ``U`` the left singular vectors of
``Q_n``, is compared with the bound on its rounding
(:func:`~lemmse_core.operators.image_rounding`): ``8 (eps · P · (s_1 ‖S⁻¹Uᵀu‖ + ‖u‖) +
eps(v) · sqrt(P) · max|v|)``, which follows the preimage of ``u`` rather than a fixed
fraction of ``‖u‖`` (``support_rtol`` adds a relative slack; default 0). One class (``B = I``,
circulant ``B``) needs no test.

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

from .checks import (
    check_bool,
    check_dtype,
    check_int,
    check_lemmse_options,
    check_lemmse_sigma,
    check_measurement,
    check_real,
    check_setup,
    check_sigma,
    measurement_norm,
)
from .operators import LinearMap, image_rounding
from .patches import check_patch_size, extract_patches, patch_at, whitening
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
_N_BINS = int(_MASS_RANGE / MASS_BIN) + 1
_DIAG_QUERIES = 4096  # queries per diagnostics block (bounds the (queries, bins) histogram)
_BISECTIONS = 12  # steps of the search for the histogram's cap (51 nats / 4096)
_GUESS_BINS = 3  # margin of the guessed cap of the histogram (bins)
_UNDERFLOW = 700.0  # a float64 group sum that underflowed is below exp(-745) of its shift


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
    # membership u ∈ Im G (see :meth:`admits`): exact coordinates, or a singular basis
    support: torch.Tensor | None = None  # (P,) bool: Im G = span of these coordinates
    image: torch.Tensor | None = None  # (P, r) float64 left singular vectors of Q_n
    singular: torch.Tensor | None = None  # (r,) float64 its singular values s_1 >= ... >= s_r
    lead: float = 0.0  # s_1, the largest singular value of Q_n
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
    extent: tuple | None = None  # per group: largest ‖key - μ_g‖, number of keys (diagnostics)

    @property
    def rank(self) -> int:
        return self.whiten.shape[0]

    def set_image(self, rows: torch.Tensor, support: torch.Tensor | None) -> None:
        """Membership data from ``Q_n`` (``rows``, ``(P, M)``) and, where ``B`` gives it
        (:meth:`LinearMap.image_support`), the patch coordinates ``(P,)`` spanning its image.

        The coordinates are used when their number is the rank (a diagonal ``B`` with
        entries below the eigenvalue cut is not, and gets the singular basis).
        """
        if support is not None and int(support.sum()) == self.rank:
            self.support = support
            return
        u, s, _ = torch.linalg.svd(rows.reshape(rows.shape[0], -1), full_matrices=False)
        self.image, self.singular = u[:, : self.rank].contiguous(), s[: self.rank]
        self.lead = float(s[0])

    def admits(self, u: torch.Tensor, rtol: float, rounding) -> torch.Tensor:
        """``u ∈ Im G`` for each query ``(Q, P)`` (Prop. B.5), ``(Q,)`` bool.

        With a coordinate ``support``: ``u`` vanishes exactly off it (``rtol = 0``), or its
        part off it is at most ``rtol ‖u‖``. Otherwise the distance ``‖u - UUᵀu‖`` to the
        singular basis of ``Q_n`` is at most ``rtol ‖u‖`` plus the rounding bound
        :func:`~lemmse_core.operators.image_rounding`, ``rounding`` being the absolute
        rounding already in the queries (``(Q,)`` or a number).
        """
        if self.support is not None:
            off = u[:, ~self.support.to(u.device)]
            if rtol == 0:
                return ~(off != 0).any(dim=1)
            return off.norm(dim=1) <= rtol * u.norm(dim=1)
        image = self.image.to(u.device)
        coef = u @ image
        distance = (u - coef @ image.T).norm(dim=1)
        norm = u.norm(dim=1)
        preimage = (coef / self.singular.to(u.device)).norm(dim=1)  # ‖S⁻¹Uᵀu‖
        bound = image_rounding(u.shape[1], self.lead, preimage, norm, rounding)
        return distance <= rtol * norm + bound

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


def _patch_gram(B: LinearMap, shape, p: int, location: int):
    """``(G_n, rows)`` at one location, from ``P`` impulses (float64): ``G_n = Π_n B Bᵀ Π_nᵀ``
    and ``rows = Bᵀ Π_nᵀ`` (``(P, C', H', W')``, the rows of ``Q_n = Π_n B``)."""
    c, h, w = shape
    i, j = divmod(location, w)
    size = c * p * p
    impulses = torch.zeros(size, c, h, w, dtype=torch.float64)
    r = p // 2
    for idx in range(size):
        ch, rest = divmod(idx, p * p)
        a, b = divmod(rest, p)
        impulses[idx, ch, (i + a - r) % h, (j + b - r) % w] = 1.0
    rows = B.adjoint(impulses)
    return patch_at(B.A(rows), p, i, j).T, rows  # column idx = G e_idx; symmetric


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

    ``support_rtol``: relative slack of the membership test ``u ∈ Im Q_n`` of the rank
    stratification (Prop. B.5, module doc). The default 0 is exact: exact zeros for a
    structured ``B`` (mask), the rounding bound alone otherwise. A positive value also
    accepts a query whose distance to the image is at most ``support_rtol ‖u‖`` (for a
    mask: whose entries off the pattern have at most that norm); 1e-6 reproduces the
    former fixed tolerance, 1e-4 that of the paper's code. It does not matter with one
    class (``B = I``, circulant ``B``).
    """

    def __init__(
        self,
        train: torch.Tensor,
        A,
        patch_size: int,
        B: LinearMap | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        support_rtol: float = 0.0,
        group_size: int = 4096,
        kernel: str = "auto",
        progress: bool = False,
    ):
        self.B, self.y_shape = check_setup(train, A, B)
        self.A, self.train = A, train
        self.shape = tuple(train.shape[1:])
        self.p = check_patch_size(patch_size, self.shape)
        self.dtype = check_dtype(dtype)
        self.support_rtol = check_real(support_rtol, "support_rtol", 0, 1, high_open=True)
        self.group_size = check_int(group_size, "group_size", low=1)
        if kernel not in ("auto", "fused", "gemm"):
            raise ValueError(f"kernel must be 'auto', 'fused' or 'gemm', got {kernel!r}")
        if kernel == "fused" and _flash_attention is None:
            raise ValueError("kernel='fused' needs PyTorch's fused CPU attention")
        self.kernel = kernel
        progress = check_bool(progress, "progress")
        self._key_norm = measurement_norm(train, A, self.dtype)  # σ range: checks.lemmse_scale
        self.n_train = train.shape[0]
        self.classes = self._build_classes()
        self._build_keys(progress)
        span = train.double().amax(dim=(0, 2, 3)) - train.double().amin(dim=(0, 2, 3))
        self._value_range = span.to(train.device)  # per channel: bounds |x_k[n] - estimate|

    # ------------------------------------------------------------------ precomputation

    def _build_classes(self) -> list[_Class]:
        labels = _class_labels(self.B, self.shape, self.p)
        support = self.B.image_support(self.y_shape)  # the coordinates of Im B, if exact
        if support is not None:
            support = extract_patches(support[None].double().cpu(), self.p)[0] != 0
        classes = []
        for label in torch.unique(labels):
            locations = torch.nonzero(labels == label).flatten()
            gram, rows = _patch_gram(self.B, self.shape, self.p, int(locations[0]))
            whiten, basis, log_pdet = whitening(gram)
            cls = _Class(locations, whiten, basis, log_pdet)
            cls.set_image(rows, None if support is None else support[locations[0]])
            classes.append(cls)
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

    def _active(self, u: torch.Tensor, rounding=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per query: the stratum rank and the active mask ``(Q, n_classes)`` (Prop. B.5).

        Membership by :meth:`_Class.admits` (module doc). ``rounding``: absolute rounding
        already in the queries, ``(Q,)`` or a number, for the classes without exact
        structure; default ``eps64 · sqrt(P) · max|u|`` (queries computed in float64).
        """
        ranks = torch.tensor([c.rank for c in self.classes], device=u.device)
        if len(self.classes) == 1:
            return ranks.expand(u.shape[0]), torch.ones(
                u.shape[0], 1, dtype=torch.bool, device=u.device
            )
        if rounding is None:
            rounding = _EPS64 * math.sqrt(u.shape[1]) * float(u.abs().max()) if len(u) else 0.0
        admissible = torch.stack(
            [c.admits(u, self.support_rtol, rounding) for c in self.classes], dim=1
        )
        if not admissible.any(dim=1).all():
            raise ValueError("a query patch lies in no Im Q_n: v is not a valid B y")
        big = torch.iinfo(ranks.dtype).max
        stratum = torch.where(admissible, ranks, big).min(dim=1).values
        return stratum, admissible & (ranks[None] == stratum[:, None])

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

    def _estimate_grouped(self, u, active, sigma, rtol, chunk_size, progress, records=None):
        """Estimate, bound on the skipped weight and log-normaliser, class by class (module
        doc). ``records``, if a list, receives ``(cls, rows, masses)`` per block of queries
        (the groups' log-weights, see :meth:`_attend_class`)."""
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
        bound = torch.exp(skipped - log_norm)[:, None] * self._value_range
        return acc / state.sum[:, None], bound, log_norm

    # ------------------------------------------------------------------- diagnostics

    def _diagnosed(self, u, active, sigma, chunk_size, progress, top, mass):
        """Estimate, log-normaliser and mass counts (``None`` without ``mass``); fills ``top``.

        One grouped pass (the plain estimate, recording each group's weight), then explicit
        per-term log-weights only for the groups whose bounds let them matter (THEORY.md
        items 8, 9): the same values as if every term were listed.
        """
        records = []
        flat, _, log_norm = self._estimate_grouped(
            u, active, sigma, 0.0, chunk_size, progress, records
        )
        if top.k == 0 and mass is None:
            return flat, log_norm, None
        classes, top = _by_class(records), top if top.k else None
        counts = torch.zeros(len(u), dtype=torch.long, device=u.device)
        blocks = range(0, len(u), _DIAG_QUERIES)
        for r0 in tqdm(blocks, desc="LE-MMSE diagnostics", disable=not progress):
            block = torch.arange(r0, min(r0 + _DIAG_QUERIES, len(u)), device=u.device)
            views = [self._view(cls, rows, m, block, u, sigma) for cls, rows, m in classes]
            views = [view for view in views if view is not None]
            hist = None
            if mass is not None:
                guess = _mass_guess(views, block, mass, log_norm)
                hist = _MassHistogram(block, guess, log_norm)
            for view in views:
                self._scan_class(view, sigma, top, hist)
            if hist is not None:
                counts[block] = self._mass_counts(views, sigma, hist, mass)
        return flat, log_norm, counts if mass is not None else None

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
        ``s`` ``(Q, K_g)`` in ``dtype``, ``offset`` of :func:`_centred`."""
        (k0, k1), r = cls.bounds[g], cls.rank
        q, offset = _centred(cls, g, w, sigma)
        ext = cls.keys_ext[k0:k1]
        s = torch.addmm(ext[:, r] / sigma**2, (q / sigma**2).to(self.dtype), ext[:, :r].T)
        return s, offset

    def _mass_counts(self, views, sigma, hist, mass):
        """Mass counts of a block of queries. Where the guessed cap proved too tight, the
        histogram is redone up to the cap of :func:`_mass_cap`, then in full."""
        counts, exact = hist.counts(mass)
        block, log_norm = hist.rows, hist.log_norm
        for fallback in (_mass_cap, _full_cap):
            if bool(exact.all()):
                break
            redo = block[~exact]
            views = [view.select(torch.isin(view.rows, redo)) for view in views]
            views = [view for view in views if len(view.rows)]
            hist = _MassHistogram(redo, fallback(views, redo, mass, log_norm), log_norm)
            for view in views:
                self._scan_class(view, sigma, None, hist)
            counts[~exact], exact[~exact] = hist.counts(mass)
        return counts

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
        top_k: int | None = None,
        progress: bool = False,
    ):
        """LE-MMSE of pre-inverted measurements ``v = B y`` ``(n, C, H, W)``.

        ``rtol`` in ``[0, 1)``: ``rtol > 0`` skips groups of keys holding provably at most
        ``rtol`` of the weight (module doc); ``error_bound=True`` also returns the guaranteed
        bound ``(n, C, H, W)`` on ``|estimate - exact|`` (zero when nothing is skipped;
        rounding aside). ``chunk_size``: keys per block, a positive int or ``None`` (the
        result does not depend on it). Diagnostics use explicit log-weight blocks and the
        exact computation; ``mass`` in ``(0, 1]`` and ``top_k >= 0`` (default 5) need them.

        ``sigma`` is accepted in ``[σ_min, σ_max]`` (:func:`~lemmse_core.checks.sigma_range`,
        ``f = torch.finfo(dtype)``): ``σ_max = 1/(4 sqrt(f.tiny))`` (float32 2.3e18, float64
        1.7e153), ``σ_min = 4 max(R, 1)/sqrt(f.max)`` (float32 ``2.2e-19 max(R, 1)``, float64
        ``3.0e-154 max(R, 1)``), and with diagnostics ``σ >= 4 R sqrt(eps64/ln(1/f.tiny))``
        (float32 ``6.4e-9 R``, float64 ``2.2e-9 R``), where ``R = ‖W‖ max_n ‖Π_n v‖ + 3 max_k
        ‖A x_k‖`` (:func:`~lemmse_core.checks.lemmse_scale`); outside, a ``ValueError``
        states the range.
        """
        rtol, error_bound, chunk_size, diagnostics, mass, top_k, progress = check_lemmse_options(
            rtol, error_bound, chunk_size, diagnostics, mass, top_k, progress
        )
        v = check_measurement(v, self.train, self.shape, "v", f"B y has shape {self.shape}")
        sigma = check_lemmse_sigma(self, v, sigma, diagnostics)
        n, (c, h, w) = v.shape[0], self.shape
        u = extract_patches(v.double(), self.p).reshape(n * h * w, -1)
        stratum, active = self._active(u, _query_rounding(v, self.p))

        def image(flat, dtype=self.dtype):
            return flat.reshape(n, h, w, c).permute(0, 3, 1, 2).to(dtype).contiguous()

        if not diagnostics:
            flat, bound, _ = self._estimate_grouped(u, active, sigma, rtol, chunk_size, progress)
            return (image(flat), image(bound, torch.float64)) if error_bound else image(flat)
        top = _TopK(len(u), top_k, self.classes, u.device)
        flat, log_norm, mass_count = self._diagnosed(
            u, active, sigma, chunk_size, progress, top, mass
        )
        log_density = (
            log_norm
            - 0.5 * stratum.double() * math.log(2 * math.pi * sigma**2)
            - math.log(self.n_train * h * w)
        )
        weights, counts, sources, location = top.result(log_norm, self.n_train, w)
        if mass_count is not None:
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

    def __call__(self, y: torch.Tensor, sigma: float, **kwargs):
        """LE-MMSE of measurements ``y`` (see :meth:`estimate` for the keywords)."""
        y = check_measurement(y, self.train, self.y_shape)
        return self.estimate(self.B.A(y.double()), sigma, **kwargs)

    def smoothed(
        self,
        v: torch.Tensor,
        sigma: float,
        eps: float,
        samples: int,
        generator: torch.Generator | None = None,
        *,
        chunk_size: int | None = None,
    ) -> torch.Tensor:
        """Smoothed LE-MMSE ``E_z f(v + eps z)`` (Sec. 4.4) of network inputs ``v``, by
        Monte Carlo over ``samples`` draws of ``z`` (one ``v``-shaped draw after the other
        from ``generator``), all estimated in one call with the precomputed keys."""
        eps = check_sigma(eps, "eps")
        samples = check_int(samples, "samples", low=1)
        v = v.double()
        z = [torch.randn(v.shape, generator=generator, dtype=v.dtype) for _ in range(samples)]
        queries = (v[None] + eps * torch.stack(z).to(v.device)).flatten(0, 1)
        out = self.estimate(queries, sigma, chunk_size=chunk_size).double()
        return out.reshape(samples, *v.shape).mean(dim=0).to(self.dtype)


def _query_rounding(v: torch.Tensor, p: int) -> torch.Tensor:
    """Per query patch of ``v (n, C, H, W)``: ``eps(v.dtype) · sqrt(P) · max|v|`` over its
    image, the size of the rounding errors of ``v = B y`` computed in ``v``'s precision (by
    FFT for a circulant or downsampling ``B``) on a patch of ``P = C p²`` entries."""
    n, c, h, w = v.shape
    scale = v.detach().abs().flatten(1).amax(dim=1).double() if v.numel() else v.new_zeros(n)
    scale = torch.finfo(v.dtype).eps * math.sqrt(c * p * p) * scale
    return scale.repeat_interleave(h * w)


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

    def counts(self, mass: float):
        """``(mass counts, exact)``: exact where the bins up to ``cap`` hold ``mass``."""
        counts, reached = _count_from_histogram(self.mass, self.count, mass)
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
    ``mass`` of each class's weight (checked afterwards, see :meth:`LEMMSE._mass_counts`)."""
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


def _full_cap(views, rows, mass, log_norm):
    """The last bin for every query: the whole histogram."""
    return torch.full_like(rows, _N_BINS - 1)


def _mass_cap(views, rows, mass, log_norm):
    """Per query of ``rows``: a bin ``cap`` such that the terms in bins ``<= cap`` provably
    hold ``(1 + mass)/2 >= mass`` of the weight (the last bin where none is found).

    Bisection in ``log t`` of ``Σ_g max(0, W_g - C_g t)`` (group weights ``W_g``, relative,
    and counts ``C_g``), a lower bound on the weight of the terms of weight ``>= t``.
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
        ok = held >= target
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
    top_k: int | None = None,
    progress: bool = False,
):
    """LE-MMSE estimate (Thm. 3.8, Prop. B.5) of ``y`` with patches of odd ``patch_size``.

    ``rtol``: certified pruning (see :meth:`LEMMSE.estimate`); ``chunk_size`` keys per
    block (the result does not depend on it); ``diagnostics=True`` returns
    ``(x_hat, PatchDiagnostics)``; ``mass=q`` adds the mass count (a second pass), ``top_k``
    the number of heaviest terms (default 5). The accepted σ range is that of
    :meth:`LEMMSE.estimate`; the options and the data-independent part of the range are
    checked before the engine is built.
    For several ``y`` or σ with the same data, build one :class:`LEMMSE` and call it.
    """
    check_sigma(sigma, dtype=check_dtype(dtype))
    check_lemmse_options(rtol, False, chunk_size, diagnostics, mass, top_k, progress)
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
    B: LinearMap | None = None,
    *,
    eps: float,
    samples: int,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    chunk_size: int | None = None,
):
    """Smoothed LE-MMSE ``E_z f(v + eps z)`` (Sec. 4.4) of ``y``, ``v = B y``, by Monte
    Carlo over ``samples`` draws of ``z`` (:meth:`LEMMSE.smoothed`); the arguments before
    ``eps`` are those of :func:`le_mmse`."""
    check_sigma(sigma, dtype=check_dtype(dtype))  # the rest of its range: by estimate
    check_sigma(eps, "eps")
    check_int(samples, "samples", low=1)
    check_lemmse_options(chunk_size=chunk_size)
    engine = LEMMSE(train, A, patch_size, B, dtype=dtype)
    v = engine.B.A(check_measurement(y, train, engine.y_shape).double())
    return engine.smoothed(v, sigma, eps, samples, generator, chunk_size=chunk_size)
