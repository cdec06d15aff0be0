"""One matplotlib style for the book, and image grids."""

import matplotlib as mpl
import matplotlib.pyplot as plt
import torch

STYLE = {
    "figure.dpi": 110,
    "savefig.dpi": 110,
    "font.size": 10,
    "axes.titlesize": 10,
    "axes.labelsize": 10,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.frameon": False,
    "image.cmap": "gray",
}


def use_style() -> None:
    """Apply the book's matplotlib style."""
    mpl.rcParams.update(STYLE)


def _draw(ax, image, vmin=0.0, vmax=1.0) -> None:
    """Show a ``(C, H, W)`` tensor (1 or 3 channels) on ``ax``, clamped to ``[vmin, vmax]``."""
    img = torch.as_tensor(image).detach().float().cpu().clamp(vmin, vmax)
    img = img.permute(1, 2, 0) if img.shape[0] == 3 else img[0]
    ax.imshow(img.numpy(), vmin=vmin, vmax=vmax, interpolation="nearest")


def show_images(images, titles=None, ncols=None, size=1.6, vmin=0.0, vmax=1.0):
    """Plot ``(C, H, W)`` tensors (1 or 3 channels) side by side, ``None`` leaving a blank
    slot; returns the figure."""
    images = list(images)
    ncols = ncols or len(images)
    nrows = -(-len(images) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + 0.3))
    axes = [axes] if len(images) == 1 else list(getattr(axes, "flat", axes))
    for i, ax in enumerate(axes):
        ax.axis("off")
        if i >= len(images) or images[i] is None:
            continue
        _draw(ax, images[i], vmin, vmax)
        if titles is not None:
            ax.set_title(titles[i])
    fig.tight_layout()
    return fig


def sigma_axis(ax, sigmas, label: str | None = r"$\sigma$") -> None:
    """A logarithmic σ axis with one labelled tick per value of ``sigmas``, no minor ticks."""
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(sigmas, [f"{s:g}" for s in sigmas])
    if label is not None:
        ax.set_xlabel(label)


def image_grid(rows, row_names, col_names, size=1.3):
    """Images ``rows[i][j]`` (``(C, H, W)`` tensors in ``[0, 1]``, or None for a blank),
    the columns titled by ``col_names`` and the rows labelled by ``row_names``; returns the
    figure."""
    n_rows, n_cols = len(rows), len(rows[0])
    figsize = (size * n_cols + 0.8, size * n_rows + 0.4)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=figsize, squeeze=False)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
            ax.spines[:].set_visible(False)
            if image is not None:
                _draw(ax, image)
            if i == 0:
                ax.set_title(col_names[j])
            if j == 0:
                ax.set_ylabel(row_names[i])
    fig.tight_layout()
    return fig
