"""The experiment spec: everything that fixes one network-vs-formula comparison.

A :class:`Spec` is frozen plain data (JSON in and out). It splits into the training run of
the network (:meth:`Spec.train_config`, a :class:`lemmse_core.train.TrainConfig`) and the
formula part (:meth:`Spec.formula_fields`): data, task, pre-inverse, patch size and the
evaluation. Specs that differ only by their network share one formula evaluation.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

from .. import data, operators, train

#: Short task names of the operator specs (the rows of the paper's Table 2).
TASKS = {
    "denoising": "denoising",
    "inpainting_center": "inpainting",
    "inpainting_random": "random inpainting",
    "blur_gaussian": "deconvolution",
    "blur_defocus": "defocus deconvolution",
}
#: Fields of the training run only (the rest also determines the formula).
_NETWORK_FIELDS = ("arch", "preset", "steps", "batch_size", "lr", "lr_floor")
#: Fields that say what to compute, not what the outputs are.
_EXTRA_FIELDS = ("diagnostics",)


@dataclass(frozen=True)
class Spec:
    """One comparison: train ``arch`` on ``n_train`` images, compare it with the LE-MMSE.

    ``task`` is an operator spec as in :class:`~lemmse_core.train.TrainConfig`
    (``"denoising"``, ``"inpainting_center:<box>"``, ``"blur_gaussian:<std>"``, ...);
    ``preinverse`` one of ``identity`` (physics-agnostic), ``adjoint``, ``pinv``,
    ``tikhonov`` (with ``lam``). Evaluation: the first ``eval_train`` training images and
    the first ``eval_test`` test images, at every σ of ``sigmas``, with noise seeded by
    ``seed``. ``size=None`` keeps the native side; ``color`` picks 3 or 1 channels.

    ``eval_dataset``: take the test images from another dataset, at the training images'
    size and channels (out of distribution, paper Sec. 4.3); the training split stays the
    in-distribution reference. ``diagnostics``: also cache the formula's per-pixel
    diagnostics (:meth:`Result.diagnostics`: log-density, stratum rank and the dominant
    source); they do not change the outputs.
    """

    dataset: str = "fashionmnist"
    n_train: int = 1000
    size: int | None = None
    color: bool = False
    task: str = "denoising"
    preinverse: str = "identity"
    lam: float | None = None
    arch: str = "unet"
    patch_size: int = 5
    preset: str = "tiny"
    steps: int = 1000
    batch_size: int = 16
    lr: float = 2e-3
    lr_floor: float = 1e-5
    eval_train: int = 4
    eval_test: int = 4
    sigmas: tuple[float, ...] = (0.05, 0.1, 0.2, 0.5, 1.0)
    seed: int = 0
    eval_dataset: str | None = None
    diagnostics: bool = False

    def __post_init__(self):
        if self.dataset not in data.DATASETS:
            raise ValueError(f"dataset must be one of {data.DATASETS}, got {self.dataset!r}")
        if self.eval_dataset is not None and self.eval_dataset not in data.DATASETS:
            raise ValueError(
                f"eval_dataset must be None or one of {data.DATASETS}, got {self.eval_dataset!r}"
            )
        for name in ("color", "diagnostics"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.preinverse not in operators.PREINVERSES:
            raise ValueError(
                f"preinverse must be one of {operators.PREINVERSES}, got {self.preinverse!r}"
            )
        if (self.preinverse == "tikhonov") != (self.lam is not None):
            raise ValueError(f"lam is needed with preinverse='tikhonov' only, got {self.lam!r}")
        if self.lam is not None and not (math.isfinite(self.lam) and self.lam > 0):
            raise ValueError(f"lam must be finite and > 0, got {self.lam!r}")
        for name in ("eval_train", "eval_test", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.eval_train > self.n_train:
            raise ValueError(f"eval_train={self.eval_train} exceeds n_train={self.n_train}")
        sigmas = tuple(float(s) for s in self.sigmas)
        if not sigmas or any(not (math.isfinite(s) and s > 0) for s in sigmas):
            raise ValueError(f"sigmas must be finite values > 0, got {self.sigmas!r}")
        if len(set(sigmas)) != len(sigmas):
            raise ValueError(f"sigmas must be distinct, got {self.sigmas!r}")
        object.__setattr__(self, "sigmas", sigmas)
        self.train_config()  # validates the training fields and the operator

    @property
    def channels(self) -> int:
        return 3 if self.color else 1

    @property
    def task_name(self) -> str:
        """``denoising``, ``inpainting``, ``deconvolution``, ...: the task without values."""
        return TASKS[train.parse_operator(self.task)[0]]

    @property
    def name(self) -> str:
        """A readable label, e.g. ``cifar10rgb-inpainting_center15-adjoint-unet-p5-n1000``."""
        data_part = self.dataset + (f"{self.size}" if self.size else "")
        parts = [
            data_part + ("rgb" if self.color else ""),
            self.task.replace(":", ""),
            self.preinverse,
        ]
        if self.lam is not None:
            parts[-1] += f"{self.lam:g}"
        parts += [self.arch, f"p{self.patch_size}", f"n{self.n_train}"]
        if self.eval_dataset is not None:
            parts.append(f"on{self.eval_dataset}")
        return "-".join(parts)

    def train_config(self) -> train.TrainConfig:
        """The training run of the network."""
        return train.TrainConfig(
            net=self.arch,
            preset=self.preset,
            patch_size=self.patch_size,
            channels=self.channels,
            dataset=self.dataset,
            n_train=self.n_train,
            size=self.size,
            operator=self.task,
            preinverse=self.preinverse,
            lam=self.lam,
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            lr_floor=self.lr_floor,
            seed=self.seed,
        )

    def formula_fields(self) -> dict:
        """The fields that determine the formula's outputs (not the network's)."""
        skip = _NETWORK_FIELDS + _EXTRA_FIELDS
        return {k: v for k, v in self.to_dict().items() if k not in skip}

    def operators(self, shape) -> tuple:
        """``(A, B)`` for images of ``shape`` ``(C, H, W)``."""
        return train.build_operators(self.train_config(), shape)

    def replace(self, **changes) -> Spec:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["sigmas"] = list(self.sigmas)
        return values

    @classmethod
    def from_dict(cls, values: dict) -> Spec:
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown Spec fields: {sorted(unknown)}")
        return cls(**{**values, "sigmas": tuple(values.get("sigmas", cls.sigmas))})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Spec:
        return cls.from_dict(json.loads(text))
