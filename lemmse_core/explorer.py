"""An ipywidgets explorer of the LE-MMSE (Thm. 3.8): noise level, patch size, operator,
pre-inverse and test image; each change recomputes the reconstruction.

``Explorer(train, truth, operators)`` in a notebook cell shows the controls, a message line
and the figure. A setting the estimator refuses (a patch larger than the image, a
pre-inverse the operator does not have) shows the reason in the message line, not a
traceback. ``explorer.images`` holds what the figure shows (``None`` after a refusal).
"""

from __future__ import annotations

import html

import ipywidgets as widgets
import matplotlib.pyplot as plt
import torch
from IPython.display import display

from .lemmse import LEMMSE
from .metrics import psnr
from .operators import PREINVERSES, ForwardOperator
from .plotting import show_images

_LAZY = {"continuous_update": False}


class Explorer:
    """Controls, message and figure of the LE-MMSE of ``truth[image]`` measured by an
    operator of ``operators`` (name → :class:`ForwardOperator`). Engines are cached per
    operator, pre-inverse and patch size; the noise is drawn once from ``seed``."""

    def __init__(
        self,
        train: torch.Tensor,
        truth: torch.Tensor,
        operators: dict[str, ForwardOperator],
        patch_sizes=(3, 5, 7, 9),
        patch_size: int = 5,
        sigma: float = 0.2,
        lam: float = 1e-2,
        seed: int = 0,
    ):
        if truth.ndim != 4 or len(truth) == 0:
            raise ValueError(f"truth must be a non-empty (N, C, H, W) batch, got {truth.shape}")
        if not operators:
            raise ValueError("operators must name at least one ForwardOperator")
        self.train, self.truth, self.operators, self.lam = train, truth, dict(operators), lam
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(truth.shape, generator=generator, dtype=truth.dtype)
        self.noise = noise.to(truth.device)
        self._engines: dict[tuple, LEMMSE] = {}
        self.images: tuple[torch.Tensor, ...] | None = None
        self.controls = self._controls(patch_sizes, patch_size, sigma)
        self.message = widgets.HTML()
        self.output = widgets.Output()
        for control in self.controls.values():
            control.observe(self.update, names="value")
        self.widget = widgets.VBox(
            [widgets.HBox(list(self.controls.values())), self.message, self.output]
        )
        self.update()

    def _controls(self, patch_sizes, patch_size, sigma) -> dict[str, widgets.Widget]:
        return {
            "sigma": widgets.FloatLogSlider(
                value=sigma, base=10, min=-2, max=0, step=0.1, description="σ", **_LAZY
            ),
            "patch_size": widgets.Dropdown(
                options=list(patch_sizes), value=patch_size, description="patch"
            ),
            "operator": widgets.Dropdown(options=list(self.operators), description="A"),
            "preinverse": widgets.Dropdown(options=list(PREINVERSES), description="B"),
            "image": widgets.IntSlider(
                value=0, min=0, max=len(self.truth) - 1, description="image", **_LAZY
            ),
        }

    def reconstruct(self, sigma, patch_size, operator, preinverse, image):
        """``(v = B y, LE-MMSE)`` of ``truth[image]``; raises ``ValueError`` on a refused
        setting."""
        key = (operator, preinverse, patch_size)
        if key not in self._engines:
            A = self.operators[operator]
            B = A.preinverse(preinverse, self.lam if preinverse == "tikhonov" else None)
            self._engines[key] = LEMMSE(self.train, A, patch_size, B)
        engine = self._engines[key]
        x = self.truth[image : image + 1]
        y = engine.A.A(x) + sigma * self.noise[image : image + 1]
        return engine.B.A(y), engine(y, sigma)

    def update(self, change=None) -> None:
        """Recompute from the controls' values; a refused setting goes to the message."""
        values = {name: control.value for name, control in self.controls.items()}
        try:
            v, estimate = self.reconstruct(**values)
        except (ValueError, TypeError) as err:
            self.images = None
            self.message.value = f"<b>Not computed:</b> {html.escape(str(err))}"
            self.output.clear_output()
            return
        truth = self.truth[values["image"]]
        self.images = (truth, v[0], estimate[0])
        self.message.value = ""
        score = psnr(estimate, truth[None]).item()
        titles = ["truth", "$v = By$", f"LE-MMSE, {score:.1f} dB"]
        with self.output:
            self.output.clear_output(wait=True)
            fig = show_images([truth, v[0].clamp(0, 1), estimate[0]], titles=titles, size=2.4)
            display(fig)
            plt.close(fig)

    def _ipython_display_(self) -> None:
        display(self.widget)
