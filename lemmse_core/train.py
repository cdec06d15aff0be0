"""Training of the local networks (paper App. C.3), with resumable runs keyed by their config.

The recipe: AdamW, a linear warm-up then one cosine decay of the learning rate to a floor
over the whole run, σ drawn uniformly in ``[0, sigma_max]`` per sample,
``y = A x + σ e`` on every measured pixel, input ``v = B y``, MSE loss against ``x``,
gradient-norm clipping, and an exponential moving average (EMA) of the weights, used for
evaluation. Everything random (data order, σ, noise) comes from generators seeded by
``(seed, step)``, so a run is a deterministic function of its config on a given device and
an interrupted run resumes exactly.

Runs live in ``<root>/<key>/`` with ``root`` = the ``root`` argument, else
``$LEMMSE_RUNS``, else ``<repo>/runs``, and ``key`` the first 12 hex digits of the SHA-1 of
``config.json`` (the config, a fingerprint of the training images and :data:`VERSION`).
The folder holds ``config.json``, ``checkpoint.pt`` (model, EMA, optimizer, step, loss
history, training seconds, config; written atomically every ``checkpoint_every`` steps and
at the end) and a ``done`` marker. :func:`fit` loads a finished run instead of training it
again, and resumes an unfinished one from its last checkpoint. Checkpoints hold only
tensors and plain containers and are loaded with ``torch.load(..., weights_only=True)``.

Nothing silent: a checkpoint stores a SHA-256 of its values (``"checksum"``), verified on
load with its keys and the finiteness of every value; a damaged, truncated or foreign file
raises :class:`CheckpointError`, naming the file and what to delete. Checkpoints written
before checksums existed are loaded unverified (only keys and finiteness are checked).
A non-finite loss or state stops training with :class:`FloatingPointError` before anything
of it is saved. Temporaries ``.<file>.<pid>.tmp`` left by killed processes are deleted when
a run starts (runs take no lock: those of live processes are kept).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import pickle
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from . import checks, nets, operators, runtime
from .data import load
from .patches import check_patch_size

# Bump when a change of the networks or of the training loop makes old runs stale.
VERSION = 3
CHECKPOINT = "checkpoint.pt"
DONE = "done"
CONFIG = "config.json"
_CHECKPOINT_KEYS = ("model", "ema", "optimizer", "step", "history", "seconds", "config", "version")
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.tmp")


class CheckpointError(RuntimeError):
    """A checkpoint (or cached result) that cannot be trusted; the message names the file
    and what to delete."""


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
        _check_choice("net", self.net, nets.NETS)
        _check_choice("preset", self.preset, nets.PRESETS)
        check_patch_size(self.patch_size, low=3)
        if not isinstance(self.dataset, str):
            raise TypeError(f"dataset must be a str, got {self.dataset!r}")
        if not self.dataset:
            raise ValueError("dataset must be a non-empty str, got ''")
        for name in ("channels", "n_train", "steps", "batch_size"):
            _check_int(name, getattr(self, name), 1)
        if self.size is not None:
            _check_int("size", self.size, 1)
        _check_int("warmup", self.warmup, 0, self.steps)
        _check_int("seed", self.seed, 0, 2**20)  # _seed() stays below 2**63
        parse_operator(self.operator)  # validates the spec and its value
        self._check_preinverse()
        _check_real("lr", self.lr, lambda v: v > 0, "> 0")
        _check_real("lr_floor", self.lr_floor, lambda v: 0 < v <= self.lr, "in (0, lr]")
        _check_real("weight_decay", self.weight_decay, lambda v: v >= 0, ">= 0")
        _check_real("ema_decay", self.ema_decay, lambda v: 0 <= v < 1, "in [0, 1)")
        _check_real("grad_clip", self.grad_clip, lambda v: v > 0, "> 0")
        _check_real("sigma_max", self.sigma_max, lambda v: v > 0, "> 0")

    def _check_preinverse(self) -> None:
        _check_choice("preinverse", self.preinverse, operators.PREINVERSES)
        if self.preinverse == "tikhonov":
            _check_real("lam", self.lam, lambda v: v > 0, "> 0 (with preinverse='tikhonov')")
        elif self.lam is not None:
            raise ValueError(f"lam is used with preinverse='tikhonov' only, got {self.lam!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        return cls(**values)


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_int(name: str, value, low: int, high: int | None = None) -> None:
    """An int in ``[low, high)`` (``high=None``: no bound)."""
    expected = f"an int >= {low}" if high is None else f"an int in [{low}, {high})"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be {expected}, got {value!r}")
    if value < low or (high is not None and value >= high):
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def _check_real(name: str, value, ok: Callable[[float], bool], expected: str) -> None:
    """A finite int or float for which ``ok`` holds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a finite number {expected}, got {value!r}")
    if not (math.isfinite(value) and ok(value)):
        raise ValueError(f"{name} must be a finite number {expected}, got {value!r}")


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


# The value of each operator kind: its name, the test it must pass, what is expected.
_OPERATOR_VALUES = {
    "inpainting_center": ("box", lambda v: v >= 1 and v == int(v), "an int >= 1"),
    "inpainting_random": ("fraction", lambda v: 0 < v < 1, "in (0, 1)"),
    "blur_gaussian": ("std", lambda v: v > 0, "> 0"),
    "blur_defocus": ("radius", lambda v: v > 0, "> 0"),
}


def parse_operator(spec: str) -> tuple[str, float | None]:
    """``"kind:value"`` -> ``(kind, value)``; checks the kind and the value."""
    kinds = ("denoising", *_OPERATOR_VALUES)
    kind, _, value = str(spec).partition(":")
    if not isinstance(spec, str) or kind not in kinds or (kind == "denoising") != (value == ""):
        raise ValueError(
            f"operator must be 'denoising' or '<kind>:<value>' with kind in {kinds[1:]}, "
            f"got {spec!r}"
        )
    if kind == "denoising":
        return kind, None
    name, ok, expected = _OPERATOR_VALUES[kind]
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not (math.isfinite(number) and ok(number)):
        raise ValueError(f"operator {spec!r}: the {name} must be {expected}, got {value!r}")
    return kind, number


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


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (True where that cannot be told)."""
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):
        return True
    return True


def _remove_stale_temporaries(folder: Path, name: str = "*") -> None:
    """Delete the ``.<name>.<pid>.tmp`` files in ``folder`` of processes that are gone."""
    for tmp in folder.glob(f".{name}.*.tmp"):
        match = _TEMPORARY.fullmatch(tmp.name)
        if match and not _pid_alive(int(match["pid"])):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def _hash_into(h, obj) -> None:
    """Feed ``obj`` to ``h``: tensors by dtype, shape and bytes, containers item by item,
    anything else by type and ``repr``."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for key, value in obj.items():
            _hash_into(h, key)
            _hash_into(h, value)
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for value in obj:
            _hash_into(h, value)
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def _digest(obj) -> str:
    """``"sha256:<hex>"`` of the values of ``obj`` (see :func:`_hash_into`)."""
    h = hashlib.sha256()
    _hash_into(h, obj)
    return f"sha256:{h.hexdigest()}"


def _finite(obj) -> bool:
    """Whether every float and floating tensor in ``obj`` (nested containers) is finite."""
    if isinstance(obj, torch.Tensor):
        return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(_finite(v) for v in obj)
    return True


def _save_state(state: dict, path: Path) -> None:
    """Write ``state`` atomically with its checksum, for :func:`_load_state`."""
    _atomic_save({**state, "checksum": _digest(state)}, path)


def _load_state(path: Path, keys, remedy: str, device=None) -> dict:
    """The dict of ``keys`` that :func:`_save_state` wrote at ``path``, verified: readable,
    these keys, its checksum (files written before checksums have none: accepted
    unverified) and finite values; else :class:`CheckpointError` ending with ``remedy``."""

    def error(reason: str) -> CheckpointError:
        return CheckpointError(f"{path} {reason}; {remedy}")

    if path.is_file() and path.stat().st_size == 0:
        raise error("is empty")
    try:
        state = torch.load(path, map_location=device or "cpu", weights_only=True)
    except OSError:
        raise
    except pickle.UnpicklingError as err:  # torch's text advises weights_only=False: no
        raise error("is not a checkpoint of tensors and plain containers") from err
    except Exception as err:
        raise error(f"cannot be read ({_reason(err)})") from err
    if not isinstance(state, dict):
        raise error(f"holds a {type(state).__name__}, not a dict of {sorted(keys)}")
    checksum = state.pop("checksum", None)
    if set(state) != set(keys):
        raise error(f"has the keys {sorted(map(str, state))}, expected {sorted(keys)}")
    if checksum is not None and checksum != _digest(state):
        raise error("does not match its checksum: it was damaged")
    if not _finite(state):
        raise error("holds NaN or infinite values")
    return state


def _reason(err: Exception, limit: int = 200) -> str:
    """``err`` on one line, cut at ``limit`` characters."""
    text = " ".join(str(err).split())
    text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _restart(path: Path) -> str:
    return f"delete it (or the run folder {path.parent}) to train the run again from step 0"


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
    """The checkpoint dict at ``path`` (``weights_only=True``), verified (its checksum,
    keys and finite values); raises :class:`CheckpointError`."""
    path = Path(path)
    return _load_state(path, _CHECKPOINT_KEYS, _restart(path), device)


def _restore(path: Path, state: dict, config, modules) -> tuple[int, list, float]:
    """Load ``state`` into ``modules`` (model, EMA, optimizer); its step, history, seconds."""
    step, history = state["step"], list(state["history"])
    try:
        for module, key in zip(modules, ("model", "ema", "optimizer"), strict=True):
            module.load_state_dict(state[key])
        if not (isinstance(step, int) and len(history) == step <= config.steps):
            raise ValueError(f"step {step!r} with {len(history)} losses")
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as err:
        raise CheckpointError(
            f"{path} does not fit the run of its config ({_reason(err)}); {_restart(path)}"
        ) from err
    return step, history, state["seconds"]


def _diverged(config: TrainConfig, step: int, what: str) -> str:
    return (
        f"{what} at step {step} of {config.steps}: training stopped without saving this "
        "state (no checkpoint or done marker written for it). Check the training images "
        f"(finite, of moderate size), the learning rate (lr={config.lr}) and the noise "
        f"range (sigma_max={config.sigma_max})"
    )


# ------------------------------------------------------------------------------- fit


def fit(
    config: TrainConfig,
    train_images: torch.Tensor | None = None,
    device=None,
    root: str | os.PathLike | None = None,
    progress: bool = True,
    checkpoint_every: int = 500,
    callback: Callable[[int, float], None] | None = None,
    distributed: bool = False,
) -> TrainedRun:
    """Train ``config`` on ``train_images`` (default: the first ``n_train`` images of
    ``config.dataset`` at side ``size``, in colour if ``channels == 3``), or load the
    finished run, or resume the unfinished one.

    Args:
        device: default :func:`lemmse_core.runtime.device` (CUDA when present).
        root: where run folders live (:func:`run_root`, see the module docstring).
        progress: show a tqdm bar with the running loss.
        checkpoint_every: steps between checkpoints (not part of the config).
        callback: called as ``callback(step, loss)`` after every step (e.g. to stop).
        distributed: train with :class:`~torch.nn.parallel.DistributedDataParallel` over
            the ranks of the initialised default process group (e.g. under ``torchrun``),
            every rank calling ``fit`` with the same arguments and its own ``device``
            (on CUDA, set it with ``torch.cuda.set_device`` first); see :func:`_ranks`.
            An execution option: the run folder is that of the single-process run.

    An exception (KeyboardInterrupt included) leaves the last checkpoint intact; calling
    ``fit`` again resumes from it. Raises :class:`CheckpointError` for a checkpoint that
    cannot be trusted and :class:`FloatingPointError` on a non-finite loss or state.
    """
    train_images = _training_images(config, train_images)
    shape = tuple(train_images.shape[1:])
    A, B = build_operators(config, shape)
    device = torch.device(device) if device is not None else runtime.device()
    group = _process_group(config, distributed)
    folder = _open_run(config, train_images, root, group)
    checkpoint = folder / CHECKPOINT

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
        step, history, seconds = _restore(checkpoint, state, config, (model, ema, optimizer))
    finished = (folder / DONE).exists() and step == config.steps
    _barrier(group)  # every rank has read the folder before rank 0 writes to it again
    if finished:
        return _finished(config, model, ema, history, seconds, folder, loaded=True)

    x_all = train_images.to(device, torch.float32)
    modules = (model, ema, optimizer)
    ranks = _ranks(config, model, group)
    writer = group is None or dist.get_rank(group) == 0
    start, total = time.perf_counter(), seconds
    running = history[-1] if history else None
    bar = runtime.progress_bar(
        total=config.steps,
        initial=step,
        disable=not (progress and writer),
        desc=f"{config.net} ({config.preset}, p={config.patch_size})",
    )
    model.train()
    try:
        while step < config.steps:
            value = _train_step(config, step, x_all, A, B, modules, ranks)
            step += 1
            if not math.isfinite(value):
                raise FloatingPointError(_diverged(config, step, f"the loss is {value}"))
            history.append(value)
            running = value if running is None else 0.98 * running + 0.02 * value
            bar.update(1)
            bar.set_postfix(loss=f"{running:.2e}", refresh=False)
            if step % checkpoint_every == 0 or step == config.steps:
                total = seconds + time.perf_counter() - start
                if writer:
                    _save_checkpoint(config, modules, step, history, total, checkpoint)
            if callback is not None:
                callback(step, value)
    finally:
        bar.close()
    if writer:
        (folder / DONE).write_text(f"{step} steps, {total:.1f} s\n", encoding="utf-8")
    _barrier(group)
    return _finished(config, model, ema, history, total, folder, loaded=False)


def _training_images(config: TrainConfig, images: torch.Tensor | None) -> torch.Tensor:
    """The training images of ``config`` (loaded when ``images`` is None), checked."""
    if images is None:
        color = config.channels == 3
        images = load(config.dataset, n=config.n_train, size=config.size, color=color)
    checks.check_images(images, "train_images")
    if images.shape[:2] != (config.n_train, config.channels):
        raise ValueError(
            f"train_images must have shape ({config.n_train}, {config.channels}, H, W) as in "
            f"the config, got {tuple(images.shape)}"
        )
    return images


def _open_run(config: TrainConfig, images: torch.Tensor, root, group=None) -> Path:
    """The run folder, created with its ``config.json`` (by rank 0 of ``group``); stale
    temporaries removed."""
    folder = run_dir(config, images, root)
    if group is None or dist.get_rank(group) == 0:
        folder.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(folder)
        if not (folder / CONFIG).exists():
            _atomic_write_text(config_json(config, images), folder / CONFIG)
    _barrier(group)
    return folder


# ------------------------------------------------------------------------ distributed


def _process_group(config: TrainConfig, distributed: bool):
    """The default process group with ``distributed`` (None without); checks it."""
    if not isinstance(distributed, bool):
        raise TypeError(f"distributed must be a bool, got {distributed!r}")
    if not distributed:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "distributed=True needs an initialised torch.distributed process group: "
            "run under torchrun and call torch.distributed.init_process_group() first"
        )
    world = dist.get_world_size()
    if config.batch_size % world:
        raise ValueError(
            f"batch_size ({config.batch_size}) must be a multiple of the world size "
            f"({world}) with distributed=True"
        )
    return dist.group.WORLD


def _barrier(group) -> None:
    if group is not None:
        dist.barrier(group)


@dataclass(frozen=True)
class _Ranks:
    """Where a step's work goes: ``forward`` (the model or its DDP wrapper), the ``rows``
    of the global batch that this rank computes, and the ``group`` averaging the loss."""

    forward: nn.Module
    rows: slice
    group: object = None

    def loss(self, loss: torch.Tensor) -> float:
        """The global batch's loss (the mean of the ranks' equal-sized slices)."""
        if self.group is None:
            return loss.item()
        value = loss.detach().clone()
        dist.all_reduce(value, group=self.group)
        return value.item() / dist.get_world_size(self.group)


def _ranks(config: TrainConfig, model: nn.Module, group) -> _Ranks:
    """The single process (``group`` None), or this rank's slice of every global batch
    and ``model`` under DDP, its gradients averaged over the ranks (by DDP), so that each
    step is the single-process step up to the order of floating-point sums.

    Measured (``tests/test_train_distributed.py``, 2 gloo processes, PatchMLP ``tiny``,
    8 steps): parameters within 1.2e-6 of the single-process run (largest difference:
    Adam's normalisation amplifies the different order of the gradient sums)."""
    if group is None:
        return _Ranks(model, slice(None))
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        if next(model.parameters()).device.type != "cuda":
            raise ValueError(
                f"net={config.net!r} has BatchNorm, whose batch statistics need "
                "SyncBatchNorm with distributed=True, and SyncBatchNorm needs CUDA: train it "
                "on CUDA devices or in one process"
            )
        sync = nn.SyncBatchNorm.convert_sync_batchnorm(model, group)  # shares the tensors
        forward = nn.parallel.DistributedDataParallel(sync, process_group=group)
    else:
        forward = nn.parallel.DistributedDataParallel(model, process_group=group)
    rank, size = dist.get_rank(group), config.batch_size // dist.get_world_size(group)
    return _Ranks(forward, slice(rank * size, (rank + 1) * size), group)


def _train_step(config: TrainConfig, step: int, x_all, A, B, modules, ranks: _Ranks) -> float:
    """One step of App. C.3's loss on a batch drawn from ``step``'s seed (this rank's rows
    of it, see :func:`_ranks`); the loss of the whole batch."""
    model, ema, optimizer = modules
    device = x_all.device
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(config, step)
    g = torch.Generator(device).manual_seed(_seed(config.seed, 1, step))
    x = x_all[_batch_indices(config, step, config.n_train).to(device)]
    sigma = config.sigma_max * torch.rand(len(x), generator=g, device=device)
    ax = A.A(x)
    noise = torch.randn(ax.shape, generator=g, device=device)
    v = B.A(ax + sigma[:, None, None, None] * noise)
    v, sigma, x = v[ranks.rows], sigma[ranks.rows], x[ranks.rows]
    loss = torch.mean((ranks.forward(v, sigma) - x) ** 2)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    optimizer.step()
    _update_ema(ema, model, min(config.ema_decay, (1 + step) / (10 + step)))
    return ranks.loss(loss)


def _save_checkpoint(config, modules, step: int, history, seconds: float, path: Path) -> None:
    """Save the run's state at ``step``, unless it is non-finite (then raise)."""
    model, ema, optimizer = modules
    state = {
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "history": history,
        "seconds": seconds,
        "config": config.to_dict(),
        "version": VERSION,
    }
    if not _finite(state):
        raise FloatingPointError(_diverged(config, step, "the weights are non-finite"))
    _save_state(state, path)


def _finished(config, model, ema, history, seconds, folder, loaded) -> TrainedRun:
    model.eval()
    ema.eval()
    return TrainedRun(config, model, ema, history, seconds, folder, loaded)
