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

Keys are whitened and centred in float64 and stored in ``dtype``; queries likewise.
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
MASS_BIN = 0.01  # width in nats of the log-weight histogram used by ``mass_count``
_MASS_RANGE = 50.0  # weights below exp(-50) of the total share the last bin


@dataclass
class PatchDiagnostics:
    """Per-pixel diagnostics of the LE-MMSE, from the pass that computes it.

    - ``log_density`` ``(n, H, W)``: ``log (1/(N|Ω|)) Σ N(u; Q_nAx_k, σ²Q_nQ_nᵀ)`` over the
      contributing stratum (the LE-MMSE denominator, THEORY.md item 8).
    - ``rank`` ``(n, H, W)``: the stratum rank ``r(u)``.
    - ``top_weights`` ``(n, H, W, k)``, ``top_image`` and ``top_location`` (``(..., k, 2)``,
      the centre ``(i, j)`` of the training patch): the ``k`` heaviest terms; index 0 is
      the dominant source.
    - ``mass_count`` ``(n, H, W)``: the number of terms holding a fraction ``mass`` of the
      weight (relative error at most ``exp(MASS_BIN) - 1``), or ``None``.
    """

    log_density: torch.Tensor
    rank: torch.Tensor
    top_weights: torch.Tensor
    top_image: torch.Tensor
    top_location: torch.Tensor
    mass_count: torch.Tensor | None = None


@dataclass
class _Class:
    """Locations sharing one patch Gram matrix, with their whitened keys."""

    locations: torch.Tensor  # (L,) flat pixel indices
    whiten: torch.Tensor  # (r, P) float64
    basis: torch.Tensor  # (P, r) float64, orthonormal basis of Im G
    log_pdet: float
    centre: torch.Tensor | None = None  # (r,) float64
    keys: torch.Tensor | None = None  # (L·N, r), index l·N + k
    half_sq: torch.Tensor | None = None  # (L·N,) ½‖key‖²
    values: torch.Tensor | None = None  # (L·N, C) centre pixels

    @property
    def rank(self) -> int:
        return self.whiten.shape[0]


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
        device, n = self.train.device, self.n_train
        parts = {id(c): ([], []) for c in self.classes}
        step = max(1, 2**24 // (self.shape[1] * self.shape[2] * self.p**2 * self.shape[0]))
        total = torch.zeros(self.shape[1] * self.shape[2], self.p**2 * self.shape[0]).double()
        for k0 in tqdm(range(0, n, step), desc="LE-MMSE keys", disable=not progress):
            x = self.train[k0 : k0 + step].double()
            z = self.B.A(self.A.A(x))
            patches = extract_patches(z, self.p).cpu()  # (k, H·W, P)
            total += patches.sum(dim=0)
            centres = x.flatten(2).transpose(1, 2).cpu()  # (k, H·W, C)
            for cls in self.classes:
                parts[id(cls)][0].append(patches[:, cls.locations] @ cls.whiten.T)
                parts[id(cls)][1].append(centres[:, cls.locations])
        for cls in self.classes:
            keys = torch.cat(parts[id(cls)][0]).transpose(0, 1)  # (L, N, r)
            cls.centre = total[cls.locations].sum(dim=0) @ cls.whiten.T / keys.shape[:2].numel()
            keys = (keys - cls.centre).reshape(-1, cls.rank)
            cls.keys = keys.to(device=device, dtype=self.dtype)
            cls.half_sq = 0.5 * keys.pow(2).sum(dim=1).to(device=device, dtype=self.dtype)
            values = torch.cat(parts[id(cls)][1]).transpose(0, 1).reshape(-1, self.shape[0])
            cls.values = values.to(device=device, dtype=self.dtype)
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

    def _blocks(self, u, active, sigma, chunk_size, progress):
        """Yield ``(rows, cls, k0, k1, s, offset)``: logits ``s + offset[:, None]``."""
        max_block = 2**22  # logits per block (16 MiB in float32)
        key_block = chunk_size or max(256, min(65536, max_block // 64))
        inv_var = 1.0 / sigma**2
        work = [(c, torch.nonzero(active[:, i]).flatten()) for i, c in enumerate(self.classes)]
        bar = tqdm(total=sum(len(c.keys) for c, rows in work if len(rows)), disable=not progress)
        for cls, rows in work:
            if len(rows) == 0:
                continue
            q = u[rows] @ cls.whiten.T.to(u.device) - cls.centre
            offset = -0.5 * q.pow(2).sum(dim=1) * inv_var - 0.5 * cls.log_pdet
            q = q.to(self.dtype)
            query_block = max(1, max_block // key_block)
            for k0 in range(0, len(cls.keys), key_block):
                k1 = min(k0 + key_block, len(cls.keys))
                keys, half_sq = cls.keys[k0:k1], cls.half_sq[k0:k1]
                for q0 in range(0, len(rows), query_block):
                    sl = slice(q0, q0 + query_block)
                    s = (q[sl] @ keys.T - half_sq) * inv_var
                    yield rows[sl], cls, k0, k1, s, offset[sl]
                bar.update(k1 - k0)
        bar.close()

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
        """LE-MMSE of pre-inverted measurements ``v = B y`` ``(n, C, H, W)``."""
        sigma = check_sigma(sigma)
        if mass is not None and not 0 < mass <= 1:
            raise ValueError(f"mass must be in (0, 1], got {mass!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        n, (c, h, w) = v.shape[0], self.shape
        u = extract_patches(v.double(), self.p).reshape(n * h * w, -1)
        stratum, active = self._active(u)
        state = StreamingSoftmax(len(u), device=u.device)
        acc = torch.zeros(len(u), c, dtype=torch.float64, device=u.device)
        top = _TopK(len(u), top_k if diagnostics else 0, self.classes, u.device)
        for rows, cls, k0, k1, s, offset in self._blocks(u, active, sigma, chunk_size, progress):
            new, scale = state.update(s.max(dim=1).values.double() + offset, rows)
            p = torch.exp(s - (new - offset).to(s.dtype)[:, None])
            acc[rows] = acc[rows] * scale[:, None] + (p @ cls.values[k0:k1]).double()
            state.add(p.sum(dim=1), rows)
            top.update(rows, cls, k0, s, offset)
        out = (acc / state.sum[:, None]).reshape(n, h, w, c).permute(0, 3, 1, 2)
        out = out.to(self.dtype).contiguous()
        if not diagnostics:
            return out
        log_norm = state.log_normaliser()
        log_density = (
            log_norm
            - 0.5 * stratum.double() * math.log(2 * math.pi * sigma**2)
            - math.log(self.n_train * h * w)
        )
        weights, image, location = top.result(log_norm, self.n_train, w)
        counts = None
        if mass is not None:
            counts = self._mass_count(u, active, sigma, log_norm, mass, chunk_size)
            counts = counts.reshape(n, h, w)
        diag = PatchDiagnostics(
            log_density.reshape(n, h, w),
            stratum.reshape(n, h, w),
            weights.reshape(n, h, w, -1),
            image.reshape(n, h, w, -1),
            location.reshape(n, h, w, -1, 2),
            counts,
        )
        return out, diag

    def _mass_count(self, u, active, sigma, log_norm, mass, chunk_size) -> torch.Tensor:
        """Number of terms holding ``mass`` of the weight, from a log-weight histogram."""
        n_bins = int(_MASS_RANGE / MASS_BIN) + 1
        hist_mass = torch.zeros(len(u) * n_bins, dtype=torch.float64, device=u.device)
        hist_count = torch.zeros_like(hist_mass)
        for rows, _, _, _, s, offset in self._blocks(u, active, sigma, chunk_size, False):
            log_w = s.double() + (offset - log_norm[rows])[:, None]
            bins = (-log_w / MASS_BIN).floor().clamp(0, n_bins - 1).long()
            index = (rows[:, None] * n_bins + bins).flatten()
            hist_mass.index_add_(0, index, log_w.exp().flatten())
            hist_count.index_add_(0, index, torch.ones_like(log_w).flatten())
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
    """Running top-k logits and their key ids across blocks and classes."""

    def __init__(self, n: int, k: int, classes, device):
        self.k = k
        self.values = torch.full((n, k), -torch.inf, dtype=torch.float64, device=device)
        self.ids = torch.zeros((n, k), dtype=torch.long, device=device)
        self.offsets, start = {}, 0
        for cls in classes:
            self.offsets[id(cls)] = start
            start += len(cls.keys)
        self.classes = classes

    def update(self, rows, cls, k0, s, offset):
        if self.k == 0:
            return
        vals, idx = s.topk(min(self.k, s.shape[1]), dim=1)
        vals = torch.cat([self.values[rows], vals.double() + offset[:, None]], dim=1)
        ids = torch.cat([self.ids[rows], idx + k0 + self.offsets[id(cls)]], dim=1)
        best, pos = vals.topk(self.k, dim=1)
        self.values[rows], self.ids[rows] = best, ids.gather(1, pos)

    def result(self, log_norm, n_train, width):
        starts = torch.tensor(list(self.offsets.values()), device=self.ids.device)
        which = torch.searchsorted(starts, self.ids, right=True) - 1
        local = self.ids - starts[which]
        image = local % n_train
        loc_tables = [c.locations.to(self.ids.device) for c in self.classes]
        flat = torch.zeros_like(local)
        for i, table in enumerate(loc_tables):
            sel = which == i
            flat[sel] = table[local[sel] // n_train]
        weights = torch.exp(self.values - log_norm[:, None])
        location = torch.stack([flat // width, flat % width], dim=-1)
        return weights, image, location


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
