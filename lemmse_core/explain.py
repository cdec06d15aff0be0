"""Explain a trained network by the LE-MMSE (Thm. 3.8).

:func:`explain` checks the two hypotheses of Def. 3.2 on a network ``net`` (locality: its
receptive field ``p``, measured by input gradients; translation equivariance: its defect on
circular shifts), then compares it with the LE-MMSE at the measured ``p`` on noisy
measurements of given images, pixel by pixel, against the patch log-density (Sec. 4.2) and
the dominant training patch of each pixel (the patchwork, Sec. D.5)::

    report = explain(net.eval(), train, A, B, sigmas=(0.05, 0.2),
                     images={"train": train[:4], "test": x_test})
    report.receptive_field, report.equivariance_error, report.table
    report.plot(); report.save_html("explain.html")   # in a notebook: display(report)

``net`` is any callable (a ``torch.nn.Module`` in eval mode: BatchNorm in train mode mixes
the images of a batch) taking the pre-inverted measurement ``v = B y`` ``(n, C, H, W)`` as
``net(v)`` or ``net(v, sigma)`` (read from its signature; ``sigma`` is the noise level of
``y``, a float) and returning ``(n, C, H, W)``. It is fed float64 if it accepts it, else
float32. Any other signature: wrap it in a small module, e.g. for a model taking ``(x, t)``
with a tensor ``t``::

    class Wrapped(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, v, sigma):
            return self.model(v, torch.full((len(v),), sigma, device=v.device))
"""

from __future__ import annotations

import base64
import html
import inspect
import io
import math
import numbers
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from matplotlib.figure import Figure
from torch import nn

from .checks import check_dtype, check_images, check_int, check_setup, check_sigma
from .lemmse import LEMMSE
from .metrics import psnr
from .patches import check_patch_size

__all__ = [
    "Equivariance",
    "ExplainReport",
    "PixelMaps",
    "ReceptiveField",
    "explain",
    "measure_equivariance",
    "measure_receptive_field",
]

SHIFTS = ((1, 0), (0, 1), (3, 5), (2, 0), (0, 2), (2, 2))  # odd and even: stride aliasing
ENERGY = 0.99  # fraction of the input-gradient energy defining p when the support is global
_PARTS = ("error", "boundary", "interior")  # of the equivariance defect
_ERROR_FLOOR = 1e-12  # |net - LE-MMSE| shown on a log scale from here
# layers whose training mode mixes the images of a batch or is random
_TRAIN = {
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.Dropout,
    nn.Dropout2d,
}


# ----------------------------------------------------------------------------- the net


class _Net:
    """``net`` called as ``net(v, sigma)`` whatever its signature (``net(v)`` or
    ``net(v, sigma)``), on inputs of ``dtype``: float64 if it accepts ``v`` so, else float32."""

    def __init__(self, net, v: torch.Tensor, sigma: float):
        self.call = _caller(net)
        self.dtype = torch.float64
        try:
            with torch.no_grad():
                self(v[:1], sigma)
        except RuntimeError:  # e.g. float32 weights: "expected ... the same dtype"
            self.dtype = torch.float32

    def __call__(self, v: torch.Tensor, sigma: float) -> torch.Tensor:
        out = self.call(v.to(self.dtype), sigma)
        if not isinstance(out, torch.Tensor) or out.shape != v.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"net must map v {tuple(v.shape)} to the same shape, got {got}")
        return out


def _caller(net):
    """``(v, sigma) -> net(v, sigma)`` or ``net(v)``, from the signature of ``net``."""
    if not callable(net):
        raise TypeError(f"net must be a torch.nn.Module or a callable, got {type(net).__name__}")
    try:
        sig = inspect.signature(net.forward if isinstance(net, nn.Module) else net)
    except (TypeError, ValueError):  # no signature (some builtins): assume net(v, sigma)
        return net
    for args, call in (((0, 0), net), ((0,), lambda v, sigma: net(v))):
        try:
            sig.bind(*args)
            return call
        except TypeError:
            continue
    raise TypeError(
        f"net must be called as net(v) or net(v, sigma), its signature is {sig}: "
        "wrap it in a small nn.Module (see lemmse_core.explain)"
    )


def _wrap(net, v, sigma) -> _Net:
    return net if isinstance(net, _Net) else _Net(net, v, sigma)


# ------------------------------------------------------------------- receptive field


@dataclass
class ReceptiveField:
    """The receptive field ``p`` of a network, from its input gradients (Def. 3.2).

    ``exact``: ``p`` is the support of the gradients (every entry above a tolerance lies in
    the centred ``p × p`` window); otherwise the support reaches the image size and ``p`` is
    the smallest window holding ``ENERGY`` of their energy. ``curve``: odd ``p`` -> fraction
    of the energy in the window. ``gradient`` ``(H, W)``: mean ``|∂f(v)[m]/∂v|`` centred on
    ``m``.
    """

    p: int
    exact: bool
    curve: dict[int, float]
    gradient: torch.Tensor


def measure_receptive_field(net, v: torch.Tensor, sigma: float = 0.1) -> ReceptiveField:
    """Receptive field of ``net`` at inputs ``v`` ``(n, C, H, W)``: gradients of four output
    pixels around the centre (all parities, for strided nets), summed over channels,
    averaged over pixels and images. Entries above ``1e-7`` (float64 output) or ``1e-5``
    (else) of the largest count as support. Needs ``min(H, W) > p`` to see the field."""
    v = check_images(v, "v")
    sigma = check_sigma(sigma)
    net = _wrap(net, v, sigma)
    h, w = v.shape[-2:]
    pixels = [((h // 2 + a) % h, (w // 2 + b) % w) for a in (0, 1) for b in (0, 1)]
    magnitude, energy, dtype = _gradient_maps(net, v, sigma, pixels)
    dist = _distance(h, w)
    tol = (1e-7 if dtype == torch.float64 else 1e-5) * magnitude.max()
    support = dist[magnitude > tol]
    p = 2 * int(support.max()) + 1 if len(support) else 1
    total = float(energy.sum())
    radii = range((min(h, w) - 1) // 2 + 1)
    curve = {2 * r + 1: float(energy[dist <= r].sum()) / total if total else 1.0 for r in radii}
    if p < min(h, w):
        return ReceptiveField(p, True, curve, magnitude)
    p = next((q for q, part in curve.items() if part >= ENERGY), max(curve))
    return ReceptiveField(p, False, curve, magnitude)


def _gradient_maps(net: _Net, v, sigma, pixels):
    """Means over ``pixels`` m and images of ``|g|`` and ``g²`` summed over the input
    channels, ``g = ∂ Σ_c f(v)[c, m] / ∂v`` rolled so that m is at ``(H//2, W//2)``, and
    the output dtype."""
    h, w = v.shape[-2:]
    v = v.detach().to(net.dtype).requires_grad_(True)
    out = net(v, sigma)
    if not out.requires_grad:
        raise TypeError("net's output is not differentiable in v: gradients measure its field")
    magnitude = energy = 0
    for i, j in pixels:
        (g,) = torch.autograd.grad(out[:, :, i, j].sum(), v, retain_graph=True)
        g = torch.roll(g.double(), (h // 2 - i, w // 2 - j), dims=(-2, -1))
        magnitude = magnitude + g.abs().sum(dim=1).mean(dim=0) / len(pixels)
        energy = energy + g.pow(2).sum(dim=1).mean(dim=0) / len(pixels)
    return magnitude.cpu(), energy.cpu(), out.dtype


def _distance(h: int, w: int) -> torch.Tensor:
    """``(H, W)`` circular Chebyshev distance to ``(H//2, W//2)``: in the ``p × p`` window
    iff at most ``(p - 1) / 2``."""
    i, j = torch.arange(h) - h // 2, torch.arange(w) - w // 2
    di, dj = torch.minimum(i.abs(), h - i.abs()), torch.minimum(j.abs(), w - j.abs())
    return torch.maximum(di[:, None], dj[None, :])


# ----------------------------------------------------------------------- equivariance


@dataclass
class Equivariance:
    """Translation-equivariance defect ``‖f(T_g v) - T_g f(v)‖ / ‖f(v)‖`` (Def. 3.2).

    ``error``, ``boundary``, ``interior``: the largest over the shifts of the defect, of its
    part on the boundary band (pixels ``m`` with ``m`` or ``m - g`` within ``(p - 1)/2`` of
    the border, where zero padding acts) and of the rest (``boundary² + interior² =
    error²`` per shift). ``odd`` / ``even``: the largest over the shifts with an odd
    component / both even (NaN if none): a stride-2 network is equivariant to even shifts
    only. ``verdict``: one line. ``per_shift``: one row per shift; ``maps``: shift ->
    ``(H, W)`` RMS defect over images and channels.
    """

    error: float
    boundary: float
    interior: float
    odd: float
    even: float
    verdict: str
    per_shift: pd.DataFrame
    maps: dict[tuple[int, int], torch.Tensor]


def measure_equivariance(
    net, v: torch.Tensor, sigma: float = 0.1, patch_size: int = 1, shifts=SHIFTS
) -> Equivariance:
    """Equivariance defect of ``net`` at inputs ``v`` ``(n, C, H, W)`` over circular
    ``shifts`` ``(di, dj)``; ``patch_size``: the receptive field, which sets the band."""
    v = check_images(v, "v")
    sigma = check_sigma(sigma)
    r = check_patch_size(patch_size, v.shape[1:]) // 2
    shifts = _check_shifts(shifts)
    net = _wrap(net, v, sigma)
    rows, maps = [], {}
    with torch.no_grad():
        fv = net(v, sigma).double()
        norm = fv.norm().clamp(min=torch.finfo(torch.float64).tiny)
        for g in shifts:
            d = net(torch.roll(v, g, dims=(-2, -1)), sigma).double() - fv.roll(g, dims=(-2, -1))
            band = _band(v.shape[-2:], r, g).to(d.device)
            parity = "even" if g[0] % 2 == 0 and g[1] % 2 == 0 else "odd"
            parts = [d.norm(), d[..., band].norm(), d[..., ~band].norm()]
            relative = {k: float(x / norm) for k, x in zip(_PARTS, parts, strict=True)}
            rows.append({"shift": g, "parity": parity, **relative})
            maps[g] = d.pow(2).mean(dim=(0, 1)).sqrt().cpu()
    return _equivariance(pd.DataFrame(rows), maps, math.sqrt(torch.finfo(fv.dtype).eps))


def _band(shape, r: int, g) -> torch.Tensor:
    """``(H, W)`` mask of the pixels ``m`` with ``m`` or ``m - g`` within ``r`` of the border."""
    h, w = shape
    i, j = torch.arange(h)[:, None], torch.arange(w)[None, :]

    def near(i, j):
        return (i < r) | (i >= h - r) | (j < r) | (j >= w - r)

    return near(i, j) | near((i - g[0]) % h, (j - g[1]) % w)


def _equivariance(table: pd.DataFrame, maps, tol: float) -> Equivariance:
    """Summary of the per-shift defects; ``tol``: the defect of rounding."""
    worst = table[list(_PARTS)].max()
    by_parity = table.groupby("parity")["error"].max()
    odd, even = (float(by_parity.get(k, math.nan)) for k in ("odd", "even"))
    if worst["error"] <= tol:
        verdict = "equivariant (to rounding)"
    elif even <= tol:
        verdict = "equivariant to even shifts only: stride aliasing"
    elif worst["interior"] <= tol:
        verdict = "not equivariant: the defect is on the boundary band (padding)"
    else:
        verdict = "not equivariant, also in the interior"
    return Equivariance(*(float(worst[k]) for k in _PARTS), odd, even, verdict, table, maps)


def _check_shifts(shifts) -> tuple[tuple[int, int], ...]:
    try:
        shifts = [tuple(g) for g in shifts]
    except TypeError:
        raise TypeError(f"shifts must be a sequence of pairs (di, dj), got {shifts!r}") from None
    if not shifts or any(len(g) != 2 for g in shifts):
        raise ValueError(f"shifts must be a non-empty sequence of pairs (di, dj), got {shifts}")
    return tuple(tuple(check_int(x, "shifts entry") for x in g) for g in shifts)


# ----------------------------------------------------------------- LE-MMSE comparison


@dataclass
class PixelMaps:
    """Per-pixel maps ``(H, W)`` of one image at one σ: ``error`` the RMS over channels of
    ``net - LE-MMSE``; ``log_density`` of its patch (:class:`~lemmse_core.lemmse.PatchDiagnostics`);
    the dominant term: ``source_image`` (training image), ``source_location`` ``(H, W, 2)``
    (centre of its patch) and ``source_weight``."""

    error: torch.Tensor
    log_density: torch.Tensor
    source_image: torch.Tensor
    source_location: torch.Tensor
    source_weight: torch.Tensor


def _compare(net: _Net, engine: LEMMSE, images, sigmas, generator):
    """The PSNR table and the :class:`PixelMaps` of every (split, σ, image)."""
    rows, maps = [], {}
    for split, x in images.items():
        x = x.double()
        for sigma in sigmas:
            y = engine.A.measure(x, sigma, generator)
            with torch.no_grad():
                out = net(engine.B.A(y), sigma).double()
            formula, diag = engine(y, sigma, diagnostics=True, top_k=1)
            formula = formula.double()
            scores = zip(psnr(out, formula), psnr(formula, x), psnr(out, x), strict=True)
            error = (out - formula).pow(2).mean(dim=1).sqrt().cpu()
            for i, (nf, ft, nt) in enumerate(scores):
                rows.append(
                    {
                        "split": split,
                        "sigma": sigma,
                        "image": i,
                        "psnr_net_formula": float(nf),
                        "psnr_formula_truth": float(ft),
                        "psnr_net_truth": float(nt),
                        "log_density": float(diag.log_density[i].mean()),
                    }
                )
                maps[(split, sigma, i)] = _pixel_maps(error[i], diag, i)
    return pd.DataFrame(rows), maps


def _pixel_maps(error: torch.Tensor, diag, i: int) -> PixelMaps:
    """The maps of image ``i`` of a batch's ``PatchDiagnostics`` (top term 0)."""
    return PixelMaps(
        error,
        diag.log_density[i].cpu(),
        diag.top_image[i, ..., 0].cpu(),
        diag.top_location[i, ..., 0, :].cpu(),
        diag.top_weights[i, ..., 0].cpu(),
    )


# ------------------------------------------------------------------------- the report


@dataclass
class ExplainReport:
    """What :func:`explain` found. ``field``: :class:`ReceptiveField`; ``equivariance``:
    :class:`Equivariance`; ``patch_size``: the ``p`` of the LE-MMSE (the measured field
    unless given); ``table``: one row per split, σ and image with ``psnr_net_formula``,
    ``psnr_formula_truth``, ``psnr_net_truth`` (dB) and the mean patch ``log_density``;
    ``maps``: ``(split, σ, image)`` -> :class:`PixelMaps`."""

    field: ReceptiveField
    equivariance: Equivariance
    patch_size: int
    table: pd.DataFrame
    maps: dict[tuple[str, float, int], PixelMaps]

    @property
    def receptive_field(self) -> int:
        """The measured odd receptive field ``p``."""
        return self.field.p

    @property
    def receptive_field_curve(self) -> dict[int, float]:
        """Odd ``p`` -> fraction of the input-gradient energy in the ``p × p`` window."""
        return self.field.curve

    @property
    def equivariance_error(self) -> float:
        """The largest relative equivariance defect over the shifts."""
        return self.equivariance.error

    def summary(self) -> list[str]:
        """The findings, one line each."""
        energy = f"{ENERGY:.0%} of the input-gradient energy, the support reaches the image size"
        how = "support of the input gradients" if self.field.exact else energy
        eq = self.equivariance
        agree = self.table.groupby("split", sort=False)["psnr_net_formula"].median()
        return [
            f"receptive field p = {self.receptive_field} ({how})",
            f"equivariance defect {eq.error:.2e} (boundary {eq.boundary:.2e}, interior "
            f"{eq.interior:.2e}; odd shifts {eq.odd:.2e}, even {eq.even:.2e}): {eq.verdict}",
            f"LE-MMSE at p = {self.patch_size} (Thm. 3.8), median PSNR(net, formula): "
            + ", ".join(f"{split} {value:.1f} dB" for split, value in agree.items()),
        ]

    def plot(self, key: tuple[str, float, int] | None = None) -> Figure:
        """Gradient-energy curve, equivariance defect (worst shift), ``|net - LE-MMSE|``
        and log-density of image ``key = (split, σ, index)`` (default: the first), error vs
        log-density over all pixels, dominant source image map."""
        key = next(iter(self.maps)) if key is None else key
        if key not in self.maps:
            raise ValueError(f"key must be one of {list(self.maps)}, got {key!r}")
        fig = Figure(figsize=(13, 7.5), layout="constrained")
        axes = fig.subplots(2, 3)
        self._plot_curve(axes[0, 0])
        self._plot_defect(fig, axes[0, 1])
        maps, name = self.maps[key], f"{key[0]} {key[2]}, σ = {key[1]:g}"
        error = maps.error.clamp(min=_ERROR_FLOOR).log10()
        _image(fig, axes[0, 2], error, f"log10 |net − LE-MMSE|, {name}")
        _image(fig, axes[1, 0], maps.log_density, f"patch log-density, {name}")
        self._plot_scatter(axes[1, 1])
        _image(fig, axes[1, 2], maps.source_image, f"dominant source image, {name}", "tab20")
        return fig

    def _plot_curve(self, ax) -> None:
        ps, parts = zip(*self.receptive_field_curve.items(), strict=True)
        ax.plot(ps, parts, "o-")
        ax.axhline(ENERGY, ls="--", c="gray")
        ax.axvline(self.receptive_field, ls=":", c="C3", label=f"p = {self.receptive_field}")
        ax.set(xlabel="window p", ylabel="fraction of gradient energy", xticks=ps)
        ax.set_title("input-gradient energy in the p × p window")
        ax.legend()

    def _plot_defect(self, fig, ax) -> None:
        worst = self.equivariance.per_shift["error"].idxmax()
        g = self.equivariance.per_shift["shift"][worst]
        _image(fig, ax, self.equivariance.maps[g], f"|f(T_g v) − T_g f(v)|, g = {g}")

    def _plot_scatter(self, ax) -> None:
        for i, sigma in enumerate(sorted(set(self.table["sigma"]))):
            picked = [m for k, m in self.maps.items() if k[1] == sigma]
            density = torch.cat([m.log_density.flatten() for m in picked])
            error = torch.cat([m.error.flatten() for m in picked]).clamp(min=_ERROR_FLOOR)
            ax.scatter(density, error, s=4, c=f"C{i}", label=f"σ = {sigma:g}")
        ax.set(yscale="log", xlabel="patch log-density", ylabel="|net − LE-MMSE|")
        ax.set_title("agreement vs log-density (all pixels)")
        ax.legend()

    def _repr_html_(self) -> str:
        fig = self.plot()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=90)
        png = base64.b64encode(buffer.getvalue()).decode("ascii")
        items = "".join(f"<li>{html.escape(line)}</li>" for line in self.summary())
        table = self.table.to_html(index=False, float_format="{:.2f}".format)
        return (
            f"<div><h3>explain: the network vs the LE-MMSE</h3><ul>{items}</ul>{table}"
            f'<img src="data:image/png;base64,{png}" alt="explain figure"/></div>'
        )

    def save_html(self, path) -> Path:
        """Write the notebook display as a standalone HTML page; returns the path."""
        if not isinstance(path, str | os.PathLike):
            raise TypeError(f"path must be a str or a path, got {type(path).__name__}")
        path = Path(path)
        page = '<!DOCTYPE html><html><head><meta charset="utf-8"><title>explain</title>'
        path.write_text(f"{page}</head><body>{self._repr_html_()}</body></html>", "utf-8")
        return path


def _image(fig, ax, values: torch.Tensor, title: str, cmap: str = "viridis") -> None:
    im = ax.imshow(values.numpy(), cmap=cmap, interpolation="nearest")
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set_title(title)
    ax.set(xticks=[], yticks=[])
    ax.grid(False)


# ------------------------------------------------------------------------------ explain


def explain(
    net,
    train: torch.Tensor,
    A,
    B=None,
    *,
    sigmas=(0.05, 0.1, 0.2),
    images: Mapping[str, torch.Tensor] | None = None,
    patch_size: int | None = None,
    shifts=SHIFTS,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> ExplainReport:
    """Explain ``net`` by the LE-MMSE (Thm. 3.8) of ``(train, A, B)``: module doc.

    Args:
        net: ``net(v)`` or ``net(v, sigma)`` on ``v = B y`` (module doc), differentiable.
        train: training images ``(N, C, H, W)`` of the LE-MMSE.
        A, B: forward operator and pre-inverse (``None``: ``B = I``, physics-agnostic).
        sigmas: noise levels of ``y = A x + σ e`` (a float or a sequence).
        images: split name -> ground truths ``(n, C, H, W)``, e.g. ``{"train": train[:4],
            "test": x_test}`` (default: the first 4 training images as ``"train"``).
        patch_size: ``p`` of the LE-MMSE (default: the measured receptive field).
        shifts: circular shifts ``(di, dj)`` of the equivariance test.
        dtype: of the LE-MMSE engine (float32 as in the paper, or float64).
        seed: of the noise ``e`` (drawn split by split, σ by σ).

    The field and the equivariance are measured at the median σ on ``v`` of the first image
    of each split and on one uniform random image.
    """
    B, _ = check_setup(train, A, B)
    sigmas, images = _check_sigmas(sigmas), _check_images(images, train)
    shifts, dtype = _check_shifts(shifts), check_dtype(dtype)
    if patch_size is not None:
        check_patch_size(patch_size, train.shape[1:])
    generator = torch.Generator().manual_seed(check_int(seed, "seed"))
    sigma = sigmas[len(sigmas) // 2]
    probes = [B.A(A.measure(x[:1].double(), sigma, generator)) for x in images.values()]
    rand = torch.rand((1, *train.shape[1:]), generator=generator, dtype=torch.float64)
    v = torch.cat([*probes, rand.to(train.device)])
    if isinstance(net, nn.Module) and any(m.training for m in net.modules() if type(m) in _TRAIN):
        warnings.warn("net is in training mode (BatchNorm, Dropout): call net.eval()", stacklevel=2)
    net = _Net(net, v, sigma)
    field = measure_receptive_field(net, v, sigma)
    equivariance = measure_equivariance(net, v, sigma, field.p, shifts)
    p = field.p if patch_size is None else patch_size
    engine = LEMMSE(train, A, p, B, dtype=dtype)
    table, maps = _compare(net, engine, images, sigmas, generator)
    return ExplainReport(field, equivariance, p, table, maps)


def _check_sigmas(sigmas) -> tuple[float, ...]:
    if isinstance(sigmas, torch.Tensor):
        sigmas = sigmas.flatten().tolist()
    elif isinstance(sigmas, numbers.Real):
        sigmas = [sigmas]
    try:
        sigmas = list(sigmas)
    except TypeError:
        raise TypeError(f"sigmas must be a float or a sequence, got {sigmas!r}") from None
    if not sigmas:
        raise ValueError("sigmas must hold at least one noise level")
    return tuple(check_sigma(s, "sigmas entry") for s in sigmas)


def _check_images(images, train) -> dict[str, torch.Tensor]:
    """``images``: a non-empty mapping name -> images of ``train``'s shape and device."""
    if images is None:
        return {"train": train[:4]}
    if not isinstance(images, Mapping) or not images:
        raise TypeError(f"images must be a non-empty dict name -> tensor, got {images!r:.80}")
    out = {}
    for name, x in images.items():
        if not isinstance(name, str):
            raise TypeError(f"images keys must be split names (str), got {name!r}")
        x = check_images(x, f"images[{name!r}]")
        if x.shape[1:] != train.shape[1:] or x.device != train.device:
            raise ValueError(
                f"images[{name!r}] must have train's image shape {tuple(train.shape[1:])} and "
                f"device {train.device}, got {tuple(x.shape[1:])} on {x.device}"
            )
        out[name] = x
    return out
