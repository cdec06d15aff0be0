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
        img = torch.as_tensor(images[i]).detach().float().cpu()
        img = img.permute(1, 2, 0).clamp(vmin, vmax) if img.shape[0] == 3 else img[0]
        ax.imshow(img, vmin=vmin, vmax=vmax, interpolation="nearest")
        if titles is not None:
            ax.set_title(titles[i])
    fig.tight_layout()
    return fig
