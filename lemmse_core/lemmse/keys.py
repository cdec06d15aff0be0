"""Key building of the LE-MMSE (:mod:`lemmse_core.lemmse`): the classes of locations that
share a patch Gram matrix, with their whitening and membership test (Prop. B.5), and their
whitened keys and centre pixels, identical terms merged, grouped by recursive bisection."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..checks import _EPS64
from ..operators import LinearMap, image_rounding
from ..patches import extract_patches, patch_at, whitening

_ROWS = 1 << 17  # rows per chunk when preprocessing keys (bounds the temporaries)
_STEP = 256  # training images per block when computing the keys


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

    def centred(self, g: int, w: torch.Tensor, sigma: float):
        """Queries ``w`` minus the mean of group ``g`` and their log-weight offsets (float64):
        the log-weight of term ``(row, key)`` is ``(q·key - ½‖key‖²) / σ² + log count +
        offset[row]``."""
        q = w - self.means[g]
        return q, -0.5 * q.pow(2).sum(dim=1) / sigma**2 - 0.5 * self.log_pdet

    @property
    def keys(self) -> torch.Tensor:
        return self.keys_ext[:, : self.rank]

    @property
    def values(self) -> torch.Tensor:
        return self.values_t[:-1].T


class KeyStore:
    """The classes of one ``(train, A, B, p)`` with their grouped keys, built once;
    :meth:`active` assigns each query patch to its stratum (Prop. B.5), with the relative
    slack ``support_rtol`` (:class:`~lemmse_core.lemmse.LEMMSE`)."""

    def __init__(self, train, A, B, y_shape, p, dtype, group_size, support_rtol, progress):
        self.support_rtol = support_rtol
        self.classes = _classes(B, y_shape, tuple(train.shape[1:]), p)
        raw = _raw_keys(self.classes, train, A, B, p, dtype, progress)
        for cls in self.classes:
            _store_keys(cls, *raw.pop(id(cls)), group_size, dtype, train.device)

    def active(self, u: torch.Tensor, rounding=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per query: the stratum rank and the active mask ``(Q, n_classes)`` (Prop. B.5).

        Membership by :meth:`_Class.admits` (module doc of :mod:`lemmse_core.lemmse`).
        ``rounding``: absolute rounding already in the queries, ``(Q,)`` or a number, for
        the classes without exact structure; default ``eps64 · sqrt(P) · max|u|`` (queries
        computed in float64).
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


def _query_rounding(v: torch.Tensor, p: int) -> torch.Tensor:
    """Per query patch of ``v (n, C, H, W)``: ``eps(v.dtype) · sqrt(P) · max|v|`` over its
    image, the size of the rounding errors of ``v = B y`` computed in ``v``'s precision (by
    FFT for a circulant or downsampling ``B``) on a patch of ``P = C p²`` entries."""
    n, c, h, w = v.shape
    scale = v.detach().abs().flatten(1).amax(dim=1).double() if v.numel() else v.new_zeros(n)
    scale = torch.finfo(v.dtype).eps * math.sqrt(c * p * p) * scale
    return scale.repeat_interleave(h * w)


def _classes(B: LinearMap, y_shape, shape, p: int) -> list[_Class]:
    """One class per label of :meth:`~lemmse_core.operators.LinearMap.patch_classes`, with
    the whitening of its patch Gram matrix and its membership data."""
    labels = B.patch_classes(shape, p)
    support = B.image_support(y_shape)  # the coordinates of Im B, if exact
    if support is not None:
        support = extract_patches(support[None].double().cpu(), p)[0] != 0
    classes = []
    for label in torch.unique(labels):
        locations = torch.nonzero(labels == label).flatten()
        gram, rows = _patch_gram(B, shape, p, int(locations[0]))
        whiten, basis, log_pdet = whitening(gram)
        cls = _Class(locations, whiten, basis, log_pdet)
        cls.set_image(rows, None if support is None else support[locations[0]])
        classes.append(cls)
    return classes


def _raw_keys(classes, train, A, B, p: int, dtype, progress: bool) -> dict:
    """Per class (by ``id``): whitened keys ``W Π_n B A x_k`` less the class centre (set on
    the class), ``(L, N, r)``, and centre pixels ``x_k[n]``, ``(L, N, C)``, in ``dtype``."""
    n, c = train.shape[:2]
    mean_image = sum(
        B.A(A.A(train[k0 : k0 + _STEP].double())).sum(dim=0) for k0 in range(0, n, _STEP)
    )
    mean_patches = extract_patches(mean_image[None] / n, p)[0].cpu()
    store = {}
    for cls in classes:
        cls.centre = mean_patches[cls.locations].mean(dim=0) @ cls.whiten.T
        locs = len(cls.locations)
        store[id(cls)] = (
            torch.empty(locs, n, cls.rank, dtype=dtype),
            torch.empty(locs, n, c, dtype=dtype),
        )
    for k0 in tqdm(range(0, n, _STEP), desc="LE-MMSE keys", disable=not progress):
        x = train[k0 : k0 + _STEP].double()
        patches = extract_patches(B.A(A.A(x)), p).cpu()  # (k, H·W, P)
        centres = x.flatten(2).transpose(1, 2).cpu()  # (k, H·W, C)
        for cls in classes:
            keys, values = store[id(cls)]
            whitened = patches[:, cls.locations] @ cls.whiten.T - cls.centre
            keys[:, k0 : k0 + _STEP] = whitened.transpose(0, 1)
            values[:, k0 : k0 + _STEP] = centres[:, cls.locations].transpose(0, 1)
    return store


def _store_keys(cls: _Class, keys, values, group_size: int, dtype, device) -> None:
    """Merge the identical terms of one class, group its keys and store them on ``cls``."""
    keys, values = keys.flatten(0, 1), values.flatten(0, 1)
    first, counts = _merge_duplicates(keys, values)
    order, cls.bounds = _tree_groups(keys, first, group_size)
    rows, counts = first[order], counts[order]
    cls.frame = _principal_frame(keys, rows)
    grouped = _grouped_keys(keys, values, counts, rows, cls.bounds, cls.frame, dtype)
    cls.keys_ext, cls.values_t, cls.means, cls.log_mass, cls.low, cls.high = (
        t.to(device) for t in grouped
    )
    cls.frame = cls.frame.to(device)
    cls.counts, cls.source = counts.to(device), rows.to(device)
    cls.centre = cls.centre.to(device)


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
