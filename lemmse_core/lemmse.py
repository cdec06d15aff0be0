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

Keys are whitened in float64 and stored in ``dtype``. For float32 accuracy, each class is
split into groups of keys that are close along their first principal direction, and each
group is centred on its own mean before the dot products (queries shifted alike): a query's
heavy terms are then computed from small vectors, where rounding is smallest. The split is
exact: groups are merged through their log-sum-exp.
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
# PyTorch's fused CPU attention, which also returns the log-sum-exp (absent: blocked path).
_flash_attention = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
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
    index ``t = l·N + k`` names location ``locations[l]`` of training image ``k``.
    """

    locations: torch.Tensor  # (L,) flat pixel indices
    whiten: torch.Tensor  # (r, P) float64
    basis: torch.Tensor  # (P, r) float64, orthonormal basis of Im G
    log_pdet: float
    centre: torch.Tensor | None = None  # (r,) float64 mean of the keys
    keys: torch.Tensor | None = None  # (K, r) distinct keys, each centred on its group
    half_sq: torch.Tensor | None = None  # (K,) ½‖key‖²
    groups: list | None = None  # [(k0, k1, mean)]: keys k0:k1 minus mean (float64, (r,))
    values: torch.Tensor | None = None  # (K, C) centre pixels
    counts: torch.Tensor | None = None  # (K,) float64 number of identical terms
    log_counts: torch.Tensor | None = None  # (K,) their logs, in ``dtype``
    source: torch.Tensor | None = None  # (K,) first term index t of each key

    @property
    def rank(self) -> int:
        return self.whiten.shape[0]


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


def _group_keys(keys: torch.Tensor, rows: torch.Tensor, size: int = 16384, max_groups=32):
    """Order ``keys[rows]`` along their first principal direction; split into groups.

    Returns ``(order, [(k0, k1, mean)])``: ``rows[order]`` is the new key order and the
    float64 ``mean`` of each contiguous group of it.
    """
    n_groups = min(max_groups, -(-len(rows) // size)) if keys.shape[1] else 1
    if n_groups <= 1:
        return torch.arange(len(rows)), [(0, len(rows), keys[rows].double().mean(dim=0))]
    pick = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))[:size]
    sample = keys[rows[pick]].double()
    sample -= sample.mean(dim=0)
    direction = torch.linalg.eigh(sample.T @ sample)[1][:, -1].to(keys)
    proj = torch.cat([keys[rows[i : i + _ROWS]] @ direction for i in range(0, len(rows), _ROWS)])
    order = torch.argsort(proj)
    bounds = torch.linspace(0, len(rows), n_groups + 1).round().long().tolist()
    pairs = zip(bounds[:-1], bounds[1:], strict=True)
    groups = [(k0, k1, keys[rows[order[k0:k1]]].double().mean(dim=0)) for k0, k1 in pairs]
    return order, groups


def _centre_groups(keys: torch.Tensor, rows: torch.Tensor, groups) -> torch.Tensor:
    """``keys[rows]`` minus the mean of each group (in float64, stored in ``keys.dtype``)."""
    out = torch.empty(len(rows), keys.shape[1], dtype=keys.dtype, device=keys.device)
    for k0, k1, mean in groups:
        out[k0:k1] = (keys[rows[k0:k1]].double() - mean).to(keys.dtype)
    return out


class LEMMSE:
    """LE-MMSE estimator for one ``(train, A, B, patch_size)``, reusable across ``y`` and σ.

    Precomputes the location classes, whitening and keys once; ``__call__(y, sigma)``
    returns the estimate ``(n, C, H, W)``. ``B=None`` means ``B = I`` (physics-agnostic).
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
        progress: bool = False,
    ):
        self.B, self.y_shape = check_setup(train, A, B)
        self.A, self.train = A, train
        self.shape = tuple(train.shape[1:])
        self.p = check_patch_size(patch_size, self.shape)
        self.dtype = check_dtype(dtype)
        self.support_rtol = float(support_rtol)
        self.n_train = train.shape[0]
        self.classes = self._build_classes()
        self._build_keys(progress)

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
            order, cls.groups = _group_keys(keys, first)
            rows = first[order]
            cls.keys = _centre_groups(keys, rows, cls.groups).to(device)
            cls.values = values[rows].to(device)
            del keys, values
            cls.half_sq = 0.5 * cls.keys.double().pow(2).sum(dim=1).to(self.dtype)
            cls.counts, cls.source = counts[order].to(device), rows.to(device)
            cls.log_counts = cls.counts.log().to(self.dtype)
            cls.centre = cls.centre.to(device)
            cls.groups = [(k0, k1, mean.to(device)) for k0, k1, mean in cls.groups]

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

        ``q`` are the whitened queries minus the group mean, in ``dtype``; the log-weight of
        term ``(row, key)`` is ``(q·key - ½‖key‖²) / σ² + offset[row]`` (``offset`` float64).
        """
        for i, cls in enumerate(self.classes):
            rows = torch.nonzero(active[:, i]).flatten()
            if len(rows) == 0:
                continue
            whitened = u[rows] @ cls.whiten.T.to(u.device) - cls.centre
            for k0, k1, mean in cls.groups:
                q = whitened - mean
                offset = -0.5 * q.pow(2).sum(dim=1) / sigma**2 - 0.5 * cls.log_pdet
                yield rows, cls, k0, k1, q.to(self.dtype), offset

    def _blocks(self, u, active, sigma, chunk_size, progress):
        """Yield ``(rows, cls, k0, k1, s, offset)``: per-term logits ``s + offset[:, None]``."""
        max_block = 2**22  # logits per block (16 MiB in float32)
        key_block = chunk_size or 65536
        query_block = max(1, max_block // key_block)
        work = list(self._queries(u, active, sigma))
        bar = tqdm(total=sum(w[3] - w[2] for w in work), disable=not progress)
        for rows, cls, g0, g1, q, offset in work:
            for k0 in range(g0, g1, key_block):
                k1 = min(k0 + key_block, g1)
                keys, half_sq = cls.keys[k0:k1], cls.half_sq[k0:k1]
                for q0 in range(0, len(rows), query_block):
                    sl = slice(q0, q0 + query_block)
                    s = (q[sl] @ keys.T - half_sq) / sigma**2
                    yield rows[sl], cls, k0, k1, s, offset[sl]
                bar.update(k1 - k0)
        bar.close()

    def _attend(self, q, cls, sigma, k0, k1):
        """Fused attention of queries ``q`` over keys ``k0:k1`` of ``cls`` (CPU flash kernel).

        The key bias ``-½‖k‖² + σ² log count`` is folded into one extra dimension, so
        ``softmax(q'·k' / σ²)`` is exactly the softmax of the per-term logits plus the
        log counts. Returns ``(out (Q, C), log Σ exp)`` in float64, without ``offset``.
        """
        c = cls.values.shape[1]
        d = max(cls.rank + 1, c)
        bias = -cls.half_sq[k0:k1].double() + sigma**2 * cls.counts[k0:k1].log()
        keys = torch.zeros(k1 - k0, d, dtype=self.dtype, device=q.device)
        keys[:, : cls.rank], keys[:, cls.rank] = cls.keys[k0:k1], bias.to(self.dtype)
        query = torch.zeros(len(q), d, dtype=self.dtype, device=q.device)
        query[:, : cls.rank], query[:, cls.rank] = q, 1.0
        values = torch.zeros(k1 - k0, d, dtype=self.dtype, device=q.device)
        values[:, :c] = cls.values[k0:k1]
        out, lse = _flash_attention(
            query[None, None], keys[None, None], values[None, None], scale=1.0 / sigma**2
        )[:2]
        return out[0, 0, :, :c].double(), lse[0, 0].double()

    def _estimate_fused(self, u, active, sigma, chunk_size, progress):
        """Estimate through the fused attention kernel, merging classes and key chunks."""
        state = StreamingSoftmax(len(u), device=u.device)
        acc = torch.zeros(len(u), self.shape[0], dtype=torch.float64, device=u.device)
        work = list(self._queries(u, active, sigma))
        bar = tqdm(total=sum(w[3] - w[2] for w in work), disable=not progress)
        for rows, cls, g0, g1, q, offset in work:
            step = chunk_size or g1 - g0
            for k0 in range(g0, g1, step):
                k1 = min(k0 + step, g1)
                out, log_norm = self._attend(q, cls, sigma, k0, k1)
                block = log_norm + offset
                new, scale = state.update(block, rows)
                weight = torch.exp(block - new)
                acc[rows] = acc[rows] * scale[:, None] + weight[:, None] * out
                state.add(weight, rows)
                bar.update(k1 - k0)
        bar.close()
        return acc / state.sum[:, None]

    def _estimate_blocked(self, u, active, sigma, chunk_size, progress, top):
        """Estimate with explicit logit blocks (any device; feeds the diagnostics)."""
        state = StreamingSoftmax(len(u), device=u.device)
        acc = torch.zeros(len(u), self.shape[0], dtype=torch.float64, device=u.device)
        for rows, cls, k0, k1, s, offset in self._blocks(u, active, sigma, chunk_size, progress):
            s_c = s + cls.log_counts[k0:k1]
            new, scale = state.update(s_c.max(dim=1).values.double() + offset, rows)
            p = torch.exp(s_c.sub_((new - offset).to(s.dtype)[:, None]))
            acc[rows] = acc[rows] * scale[:, None] + (p @ cls.values[k0:k1]).double()
            state.add(p.sum(dim=1), rows)
            top.update(rows, cls, k0, s, offset)
        return acc / state.sum[:, None], state.log_normaliser()

    def estimate(
        self,
        v: torch.Tensor,
        sigma: float,
        *,
        chunk_size: int | None = None,
        diagnostics: bool = False,
        mass: float | None = None,
        top_k: int = 5,
        progress: bool = False,
    ):
        """LE-MMSE of pre-inverted measurements ``v = B y`` ``(n, C, H, W)``.

        Without diagnostics on the CPU, one fused attention kernel per class (and key
        chunk); otherwise explicit logit blocks of ``chunk_size`` keys.
        """
        sigma = check_sigma(sigma)
        if mass is not None and not 0 < mass <= 1:
            raise ValueError(f"mass must be in (0, 1], got {mass!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        n, (c, h, w) = v.shape[0], self.shape
        u = extract_patches(v.double(), self.p).reshape(n * h * w, -1)
        stratum, active = self._active(u)

        def image(flat):
            return flat.reshape(n, h, w, c).permute(0, 3, 1, 2).to(self.dtype).contiguous()

        if not diagnostics and _flash_attention is not None and u.device.type == "cpu":
            return image(self._estimate_fused(u, active, sigma, chunk_size, progress))
        top = _TopK(len(u), top_k if diagnostics else 0, self.classes, u.device)
        flat, log_norm = self._estimate_blocked(u, active, sigma, chunk_size, progress, top)
        if not diagnostics:
            return image(flat)
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
            log_w = s.double() + (offset - log_norm[rows])[:, None]
            bins = (-log_w / MASS_BIN).floor().clamp(0, n_bins - 1).long()
            index = (rows[:, None] * n_bins + bins).flatten()
            counts = cls.counts[k0:k1].expand_as(log_w)
            hist_mass.index_add_(0, index, (log_w.exp() * counts).flatten())
            hist_count.index_add_(0, index, counts.flatten())
        return _count_from_histogram(
            hist_mass.reshape(len(u), n_bins), hist_count.reshape(len(u), n_bins), mass
        )

    def __call__(self, y: torch.Tensor, sigma: float, **kwargs):
        """LE-MMSE of measurements ``y`` (see :meth:`estimate` for the keywords)."""
        y = check_measurement(y, self.train, self.y_shape)
        return self.estimate(self.B.A(y.double()), sigma, **kwargs)


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
    chunk_size: int | None = None,
    diagnostics: bool = False,
    mass: float | None = None,
    top_k: int = 5,
    progress: bool = False,
):
    """LE-MMSE estimate (Thm. 3.8, Prop. B.5) of ``y`` with patches of odd ``patch_size``.

    ``chunk_size`` keys per block (the result does not depend on it); ``diagnostics=True``
    returns ``(x_hat, PatchDiagnostics)``; ``mass=q`` adds the mass count (a second pass).
    For several ``y`` or σ with the same data, build one :class:`LEMMSE` and call it.
    """
    engine = LEMMSE(train, A, patch_size, B, dtype=dtype, progress=progress)
    return engine(
        y,
        sigma,
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
