"""Training of the local networks (paper App. C.3), with resumable runs keyed by their config.

The recipe: AdamW, a linear warm-up then one cosine decay of the learning rate to a floor
over the whole run, σ drawn uniformly in ``[0, sigma_max]`` per sample,
``y = A x + σ e`` on every measured pixel, input ``v = B y``, MSE loss against ``x``,
gradient-norm clipping, and an exponential moving average (EMA) of the weights, used for
evaluation. Everything random (data order, σ, noise) comes from generators seeded by
``(seed, step)``, so a run is a deterministic function of its config on a given device and
an interrupted run resumes exactly.

Runs live in ``<root>/<key>/`` with ``root`` = the ``run_root`` argument, else
``$LEMMSE_RUNS``, else ``<repo>/runs``, and ``key`` the first 12 hex digits of the SHA-1 of
``config.json`` (the config, a fingerprint of the training images and :data:`VERSION`).
The folder holds ``config.json``, ``checkpoint.pt`` (model, EMA, optimizer, step, loss
history, training seconds, config; written atomically every ``checkpoint_every`` steps and
at the end) and a ``done`` marker. :func:`fit` loads a finished run instead of training it
again, and resumes an unfinished one from its last checkpoint. Checkpoints hold only
tensors and plain containers and are loaded with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import nets, operators, runtime
from .data import load

# Bump when a change of the networks or of the training loop makes old runs stale.
VERSION = 3
CHECKPOINT = "checkpoint.pt"
DONE = "done"
CONFIG = "config.json"


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (and its run folder).

    ``operator``: ``"denoising"``, ``"inpainting_center:<box>"``,
    ``"inpainting_random:<fraction>"``, ``"blur_gaussian:<std>"`` or
    ``"blur_defocus:<radius>"``; ``preinverse``: ``"identity"``, ``"adjoint"``, ``"pinv"``
    or ``"tikhonov"`` (with ``lam``). ``ema_decay`` is reached progressively: the decay at
    step ``t`` is ``min(ema_decay, (1 + t) / (10 + t))``.
    """

    net: str = "unet"
    preset: str = "tiny"
    patch_size: int = 5
    channels: int = 1
    dataset: str = "fashionmnist"
    n_train: int = 1000
    size: int | None = None
    operator: str = "denoising"
    preinverse: str = "identity"
    lam: float | None = None
    steps: int = 1000
    batch_size: int = 32
    lr: float = 2e-3
    lr_floor: float = 1e-5
    warmup: int = 50
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    sigma_max: float = 1.0
    seed: int = 0

    def __post_init__(self):
        nets._check_name(self.net)
        nets._check_preset(self.preset)
        nets._check_patch_size(self.patch_size)
        positive_ints = ("channels", "n_train", "steps", "batch_size")
        if self.size is not None:
            positive_ints += ("size",)
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.warmup, int) or not 0 <= self.warmup < self.steps:
            raise ValueError(f"warmup must be an int in [0, steps), got {self.warmup!r}")
        if not 0 < self.lr_floor <= self.lr:
            raise ValueError(f"need 0 < lr_floor <= lr, got {self.lr_floor!r}, {self.lr!r}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if not self.grad_clip > 0 or not self.sigma_max > 0:
            raise ValueError("grad_clip and sigma_max must be > 0")
        parse_operator(self.operator)  # validates the spec

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        return cls(**values)


@dataclass
class TrainedRun:
    """A finished (or loaded) run; ``ema_model`` is the one to evaluate (eval mode)."""

    config: TrainConfig
    model: nn.Module
    ema_model: nn.Module
    history: list[float] = field(repr=False)
    seconds: float
    path: Path
    loaded: bool  # True if a finished run was loaded instead of trained

    @property
    def steps_per_second(self) -> float:
        return len(self.history) / self.seconds if self.seconds > 0 else math.nan


# ----------------------------------------------------------------------------- pieces


def parse_operator(spec: str) -> tuple[str, float | None]:
    """``"kind:value"`` -> ``(kind, value)``; checks the kind."""
    kinds = ("denoising", "inpainting_center", "inpainting_random", "blur_gaussian", "blur_defocus")
    kind, _, value = str(spec).partition(":")
    if kind not in kinds or (kind == "denoising") != (value == ""):
        raise ValueError(
            f"operator must be 'denoising' or '<kind>:<value>' with kind in {kinds[1:]}, "
            f"got {spec!r}"
        )
    return kind, (float(value) if value else None)


def build_operators(config: TrainConfig, shape) -> tuple:
    """The forward operator ``A`` and pre-inverse ``B`` of ``config`` for images ``shape``."""
    kind, value = parse_operator(config.operator)
    if kind == "denoising":
        A = operators.Denoising()
    elif kind == "inpainting_center":
        A = operators.Inpainting.center(shape, int(value))
    elif kind == "inpainting_random":
        A = operators.Inpainting.random(shape, value, seed=config.seed)
    elif kind == "blur_gaussian":
        A = operators.Blur.gaussian(value)
    else:
        A = operators.Blur.defocus(value)
    return A, operators.preinverse(A, config.preinverse, lam=config.lam)


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up over ``warmup`` steps, then one cosine decay to ``lr_floor``, reached
    at the last step."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    t = min(1.0, (step - config.warmup) / max(1, config.steps - config.warmup - 1))
    return config.lr_floor + 0.5 * (config.lr - config.lr_floor) * (1 + math.cos(math.pi * t))


def fingerprint(images: torch.Tensor) -> str:
    """SHA-1 of the training images (shape and float32 values)."""
    h = hashlib.sha1(str(tuple(images.shape)).encode())
    h.update(images.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def run_root(root: str | os.PathLike | None = None) -> Path:
    """``root``, else ``$LEMMSE_RUNS``, else ``<repo>/runs``."""
    if root is None:
        root = os.environ.get("LEMMSE_RUNS") or Path(__file__).resolve().parents[1] / "runs"
    return Path(root)


def config_json(config: TrainConfig, images: torch.Tensor) -> str:
    """The text of ``config.json``; its SHA-1 names the run folder."""
    content = {"config": config.to_dict(), "data": fingerprint(images), "version": VERSION}
    return json.dumps(content, sort_keys=True, indent=1)


def run_dir(config: TrainConfig, images: torch.Tensor, root=None) -> Path:
    """The folder of the run of ``config`` on ``images``."""
    key = hashlib.sha1(config_json(config, images).encode()).hexdigest()[:12]
    return run_root(root) / key


def _seed(seed: int, stream: int, index: int) -> int:
    return (seed * 4 + stream) * 2**40 + index


def _batch_indices(config: TrainConfig, step: int, n: int) -> torch.Tensor:
    """Indices of the images of ``step``: consecutive slices of per-epoch permutations."""
    b, start, parts = config.batch_size, step * config.batch_size, []
    while b > 0:
        epoch, offset = divmod(start, n)
        perm = torch.randperm(
            n, generator=torch.Generator().manual_seed(_seed(config.seed, 0, epoch))
        )
        take = min(b, n - offset)
        parts.append(perm[offset : offset + take])
        start, b = start + take, b - take
    return torch.cat(parts)


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@torch.no_grad()
def _update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """EMA of parameters and floating buffers (BatchNorm statistics); other buffers copied."""
    for e, m in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(m, 1.0 - decay)
    for e, m in zip(ema.buffers(), model.buffers(), strict=True):
        if e.is_floating_point():
            e.lerp_(m, 1.0 - decay)
        else:
            e.copy_(m)


def _build(config: TrainConfig, device) -> nn.Module:
    """The network of ``config``, initialised on the CPU from ``config.seed`` (the global
    random state is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        net = nets.build(config.net, config.patch_size, config.channels, config.preset)
    return net.to(device)


def load_checkpoint(path: Path, device=None) -> dict:
    """The checkpoint dict at ``path`` (``weights_only=True``)."""
    return torch.load(path, map_location=device or "cpu", weights_only=True)


# ------------------------------------------------------------------------------- fit


def fit(
    config: TrainConfig,
    train_images: torch.Tensor | None = None,
    device=None,
    run_root: str | os.PathLike | None = None,
    progress: bool = True,
    checkpoint_every: int = 500,
    callback: Callable[[int, float], None] | None = None,
) -> TrainedRun:
    """Train ``config`` on ``train_images`` (default: the first ``n_train`` images of
    ``config.dataset`` at side ``size``, in colour if ``channels == 3``), or load the
    finished run, or resume the unfinished one.

    Args:
        device: default :func:`lemmse_core.runtime.device` (CUDA when present).
        run_root: where run folders live (see the module docstring).
        progress: show a tqdm bar with the running loss.
        checkpoint_every: steps between checkpoints (not part of the config).
        callback: called as ``callback(step, loss)`` after every step (e.g. to stop).

    An exception (KeyboardInterrupt included) leaves the last checkpoint intact; calling
    ``fit`` again resumes from it.
    """
    if train_images is None:
        color = config.channels == 3
        train_images = load(config.dataset, n=config.n_train, size=config.size, color=color)
    if train_images.ndim != 4 or train_images.shape[:2] != (config.n_train, config.channels):
        raise ValueError(
            f"train_images must have shape ({config.n_train}, {config.channels}, H, W) as in "
            f"the config, got {tuple(train_images.shape)}"
        )
    device = torch.device(device) if device is not None else runtime.device()
    folder = run_dir(config, train_images, run_root)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / CONFIG).exists():
        _atomic_write_text(config_json(config, train_images), folder / CONFIG)
    checkpoint = folder / CHECKPOINT

    shape = tuple(train_images.shape[1:])
    A, B = build_operators(config, shape)
    A, B = A.to(device), B.to(device)
    model = _build(config, device)
    model.noise_gain.fill_(B.noise_gain(A.output_shape(shape)))
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    step, history, seconds = 0, [], 0.0
    if checkpoint.exists():
        state = load_checkpoint(checkpoint, device)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        step, history, seconds = state["step"], list(state["history"]), state["seconds"]
    if (folder / DONE).exists() and step == config.steps:
        return _finished(config, model, ema, history, seconds, folder, loaded=True)

    x_all = train_images.to(device, torch.float32)

    def save() -> float:
        total = seconds + time.perf_counter() - start
        state = {
            "model": model.state_dict(),
            "ema": ema.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": step,
            "history": history,
            "seconds": total,
            "config": config.to_dict(),
            "version": VERSION,
        }
        _atomic_save(state, checkpoint)
        return total

    start, total = time.perf_counter(), seconds
    running = history[-1] if history else None
    bar = runtime.progress_bar(
        total=config.steps,
        initial=step,
        disable=not progress,
        desc=f"{config.net} ({config.preset}, p={config.patch_size})",
    )
    model.train()
    try:
        while step < config.steps:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config, step)
            g = torch.Generator(device).manual_seed(_seed(config.seed, 1, step))
            x = x_all[_batch_indices(config, step, config.n_train).to(device)]
            sigma = config.sigma_max * torch.rand(len(x), generator=g, device=device)
            ax = A.A(x)
            noise = torch.randn(ax.shape, generator=g, device=device)
            v = B.A(ax + sigma[:, None, None, None] * noise)
            loss = torch.mean((model(v, sigma) - x) ** 2)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            _update_ema(ema, model, min(config.ema_decay, (1 + step) / (10 + step)))
            step += 1
            value = loss.item()
            history.append(value)
            running = value if running is None else 0.98 * running + 0.02 * value
            bar.update(1)
            bar.set_postfix(loss=f"{running:.2e}", refresh=False)
            if step % checkpoint_every == 0 or step == config.steps:
                total = save()
            if callback is not None:
                callback(step, value)
    finally:
        bar.close()
    (folder / DONE).write_text(f"{step} steps, {total:.1f} s\n", encoding="utf-8")
    return _finished(config, model, ema, history, total, folder, loaded=False)


def _finished(config, model, ema, history, seconds, folder, loaded) -> TrainedRun:
    model.eval()
    ema.eval()
    return TrainedRun(config, model, ema, history, seconds, folder, loaded)
