"""Run specs: train the network (or load its run), evaluate it and the LE-MMSE, cache both.

For each split (``train``: the first ``eval_train`` training images, ``test``: the first
``eval_test`` test images) and each σ, ``y = A x + σ e`` with ``e`` drawn once per split
from a generator seeded by ``(seed, split)`` (the same ``e`` at every σ and for every
network), ``v = B y``, and the outputs of the network (EMA weights) and of the LE-MMSE of
the same training set, ``p`` and ``B`` (Thm. 3.8).

Caches, one file per split, written atomically after every σ (an interrupted evaluation
resumes), each keyed by the formula fields (:meth:`Spec.formula_fields`) that concern the
split, fingerprints of the training images and of the split's images, and :data:`VERSION`
(so an out-of-distribution spec shares its training split with the in-distribution one):

- ``<root>/formula/<key>.pt``: the formula's outputs, shared by every network of the same
  formula fields;
- ``<run folder>/eval-<key>.pt``: the network's outputs, beside its training run;
- ``<root>/formula/<key>-diagnostics.pt``: with ``spec.diagnostics``, the formula's
  per-pixel diagnostics (:class:`Diagnostics`), from the same pass as its outputs.

A non-finite output raises :class:`FloatingPointError` and is never cached. Cache files
carry a checksum, verified on load like the checkpoints (a damaged or non-finite file
raises :class:`lemmse_core.train.CheckpointError`; files from before checksums load
unverified), and the temporaries of killed writers are deleted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from .. import data, runtime, train
from ..lemmse import LEMMSE
from ..metrics import psnr
from .spec import Spec

# Bump when a change of the evaluation makes cached outputs stale.
VERSION = 4  # 2: grouped LE-MMSE keys; 3: exact strata (Prop. B.5); 4: a file per split
SPLITS = ("train", "test")
#: The weight fraction of the paper's mass maps (Figs. 20–24; ``LEMMSE.estimate(mass=)``).
MASS = 0.9
COLUMNS = (
    "dataset",
    "task",
    "preinverse",
    "arch",
    "patch_size",
    "split",
    "sigma",
    "image",
    "psnr_net_formula",
    "psnr_formula_truth",
    "psnr_net_truth",
    "psnr_input_truth",
    "n_train",
    "lam",
    "operator",
    "eval_dataset",
    "name",
)


def progress_enabled(progress: bool | None) -> bool:
    """``progress``, else ``$LEMMSE_PROGRESS`` (``0`` turns the bars off), else True."""
    if progress is not None:
        return bool(progress)
    return os.environ.get("LEMMSE_PROGRESS", "1").strip().lower() not in ("0", "false", "no")


@dataclass
class Outputs:
    """Images of one (split, σ), on the CPU: truth ``x``, measurement ``y``, network input
    ``v = B y``, the LE-MMSE ``formula`` and the network output ``net``."""

    x: torch.Tensor
    y: torch.Tensor
    v: torch.Tensor
    formula: torch.Tensor
    net: torch.Tensor


@dataclass
class Diagnostics:
    """Per-pixel diagnostics of the formula at one (split, σ), each ``(n, H, W)``:
    ``log_density`` (the LE-MMSE denominator, THEORY.md item 8), ``rank`` (the stratum),
    ``top_weight``, ``top_image`` and ``top_location`` (``(n, H, W, 2)``) of the dominant
    source. (Mass counts are left out: at large σ they cost 5× the estimate.)"""

    log_density: torch.Tensor
    rank: torch.Tensor
    top_weight: torch.Tensor
    top_image: torch.Tensor
    top_location: torch.Tensor

    @classmethod
    def of(cls, diag) -> Diagnostics:
        """From the LE-MMSE's :class:`~lemmse_core.lemmse.PatchDiagnostics` (top 1)."""
        return cls(
            diag.log_density,
            diag.rank,
            diag.top_weights[..., 0],
            diag.top_image[..., 0],
            diag.top_location[..., 0, :],
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Result:
    """One evaluated spec: ``table`` (one row per split, σ and image), ``run`` (the trained
    network, :class:`lemmse_core.train.TrainedRun`) and the images via :meth:`outputs`."""

    spec: Spec
    run: train.TrainedRun
    table: pd.DataFrame = field(repr=False)
    _images: dict = field(repr=False)
    computed: tuple[str, ...] = ()  # what this call computed: "training", "formula", "net"

    def outputs(self, split: str, sigma: float) -> Outputs:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if float(sigma) not in self.spec.sigmas:
            raise ValueError(f"sigma must be one of {self.spec.sigmas}, got {sigma!r}")
        x, y, v = (self._images[split][k](float(sigma)) for k in ("x", "y", "v"))
        formula, net = (self._images[k][split, float(sigma)] for k in ("formula", "net"))
        return Outputs(x, y, v, formula, net)

    def diagnostics(self, split: str, sigma: float) -> Diagnostics:
        """The formula's per-pixel diagnostics (specs with ``diagnostics=True``)."""
        self.outputs(split, sigma)  # checks split and sigma
        if not self.spec.diagnostics:
            raise ValueError(
                f"{self.spec.name} has no diagnostics: run spec.replace(diagnostics=True)"
            )
        return Diagnostics(**self._images["diagnostics"][split, float(sigma)])

    @property
    def summary(self) -> str:
        origin = "trained now" if "training" in self.computed else "loaded"
        evaluated = [k for k in ("formula", "net") if k in self.computed]
        evaluation = f"evaluated {' and '.join(evaluated)}" if evaluated else "cached"
        return f"{self.spec.name}: {origin} ({self.run.seconds:.0f} s of training), {evaluation}"


class Grid(Sequence):
    """Results of a list of specs, in order; ``table`` concatenates their tables."""

    def __init__(self, results: list[Result]):
        self.results = list(results)
        self.table = pd.concat([r.table for r in self.results], ignore_index=True)

    def __getitem__(self, index):
        return self.results[index]

    def __len__(self) -> int:
        return len(self.results)

    def summary(self) -> str:
        """One line: how many runs were trained or loaded, evaluated or cached."""
        trained = sum("training" in r.computed for r in self.results)
        evaluated = sum(bool({"formula", "net"} & set(r.computed)) for r in self.results)
        seconds = sum(r.run.seconds for r in self.results)
        return (
            f"{len(self)} runs: {trained} trained now, {len(self) - trained} loaded "
            f"({seconds:.0f} s of training in all); {evaluated} evaluated now, "
            f"{len(self) - evaluated} from the cache"
        )


# ------------------------------------------------------------------------------ caching


def _atomic_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    train._save_state(obj, path)


class _Cache:
    """A dict of tensors keyed by ``"split/sigma"`` in one file, saved after every update."""

    def __init__(self, path: Path, key: str):
        self.path, self.key, self.entries = path, key, {}
        if path.parent.is_dir():
            train._remove_stale_temporaries(path.parent, path.name)
        if path.exists():
            remedy = "delete it to compute these outputs again"
            state = train._load_state(path, ("key", "entries"), remedy)
            if state["key"] == key:
                self.entries = dict(state["entries"])

    def get(self, split, sigma):
        return self.entries.get(f"{split}/{sigma!r}")

    def put(self, split, sigma, value, what: str) -> None:
        """Cache a float tensor (stored in float32) or a dict of tensors (kept as is)."""
        parts = value if isinstance(value, dict) else {"": value}
        if not all(torch.isfinite(t).all() for t in parts.values()):
            raise FloatingPointError(
                f"{what} at sigma={sigma} ({split} images) has non-finite values; "
                "nothing was cached"
            )
        if isinstance(value, dict):
            value = {k: t.detach().cpu() for k, t in value.items()}
        else:
            value = value.detach().to("cpu", torch.float32)
        self.entries[f"{split}/{sigma!r}"] = value
        _atomic_save({"key": self.key, "entries": self.entries}, self.path)


class _Split:
    """The :class:`_Cache` of each split, read and written as one."""

    def __init__(self, caches: dict[str, _Cache]):
        self.caches = caches

    def get(self, split, sigma):
        return self.caches[split].get(split, sigma)

    def put(self, split, sigma, value, what: str) -> None:
        self.caches[split].put(split, sigma, value, what)


#: Formula fields that only concern the evaluation of the other split.
_OTHER_SPLIT = {"train": ("eval_test", "eval_dataset"), "test": ("eval_train",)}


def _keys(spec: Spec, train_images, eval_images) -> dict[str, str]:
    """The cache key of each split."""
    fields, keys = spec.formula_fields(), {}
    for split, x in eval_images.items():
        content = {
            "formula": {k: v for k, v in fields.items() if k not in _OTHER_SPLIT[split]},
            "split": split,
            "train": train.fingerprint(train_images),
            "eval": train.fingerprint(x),
            "version": VERSION,
        }
        digest = hashlib.sha1(json.dumps(content, sort_keys=True).encode()).hexdigest()
        keys[split] = digest[:16]
    return keys


# ---------------------------------------------------------------------------- evaluation


def _load_images(spec: Spec) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Training images and the evaluation images per split (``eval_dataset``: test
    images of that dataset at the training images' side)."""
    kwargs = {"size": spec.size, "color": spec.color}
    train_images = data.load(spec.dataset, n=spec.n_train, **kwargs)
    if spec.eval_dataset is None:
        test = data.load(spec.dataset, split="test", n=spec.eval_test, **kwargs)
    else:
        side = train_images.shape[-1]
        test = data.load(spec.eval_dataset, "test", spec.eval_test, side, spec.color)
    return train_images, {"train": train_images[: spec.eval_train], "test": test}


def _noise(spec: Spec, split: str, shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(train._seed(spec.seed, 3, SPLITS.index(split)))
    return torch.randn(shape, generator=g)


def _measurements(spec: Spec, A, B, eval_images) -> dict:
    """Per split, functions of σ giving ``x``, ``y`` and ``v`` (cheap, not cached)."""
    out = {}
    for split, x in eval_images.items():
        ax = A.A(x.double())
        e = _noise(spec, split, ax.shape).double()

        def y(sigma, ax=ax, e=e):
            return ax + sigma * e

        def v(sigma, y=y):
            return B.A(y(sigma))

        out[split] = {
            "x": lambda sigma, x=x: x,
            "y": lambda sigma, y=y: y(sigma).float(),
            "v": lambda sigma, v=v: v(sigma).float(),
            "v64": v,
        }
    return out


def _pending(cache: _Cache, spec: Spec, eval_images) -> list[tuple[str, float]]:
    return [
        (split, sigma)
        for sigma in spec.sigmas
        for split in SPLITS
        if len(eval_images[split]) and cache.get(split, sigma) is None
    ]


def _fill(cache, pending, compute, bar, what: str) -> None:
    bar.set_description(what)
    for split, sigma in pending:
        cache.put(split, sigma, compute(split, sigma), what)
        bar.update(1)


def _fill_formula(caches, pending, engine, v, bar, what: str) -> None:
    """The formula's outputs and, where ``caches`` has them, diagnostics (one pass)."""
    bar.set_description(what)
    for split, sigma in pending:
        if "diagnostics" not in caches or caches["diagnostics"].get(split, sigma) is not None:
            caches["formula"].put(split, sigma, engine.estimate(v(split, sigma), sigma), what)
        else:
            out, diag = engine.estimate(v(split, sigma), sigma, diagnostics=True, top_k=1)
            caches["diagnostics"].put(split, sigma, Diagnostics.of(diag).to_dict(), what)
            if caches["formula"].get(split, sigma) is None:
                caches["formula"].put(split, sigma, out, what)
        bar.update(1)


def _evaluate(spec, run, train_images, eval_images, root, device, progress, computed):
    A, B = spec.operators(tuple(train_images.shape[1:]))
    images = _measurements(spec, A, B, eval_images)
    caches = _caches(spec, run.path, root, _keys(spec, train_images, eval_images))
    pending = {what: _pending(cache, spec, eval_images) for what, cache in caches.items()}
    formula = sorted(set(pending["formula"]) | set(pending.get("diagnostics", ())))
    total = len(formula) + len(pending["net"])
    bar = runtime.progress_bar(total=total, disable=not progress or total == 0)
    with bar:
        if formula:
            engine = LEMMSE(train_images.to(device), A.to(device), spec.patch_size, B.to(device))
            _fill_formula(
                caches,
                formula,
                engine,
                lambda split, s: images[split]["v64"](s).to(device),
                bar,
                f"LE-MMSE of {spec.name}",
            )
            computed.append("formula")
        if pending["net"]:
            net = run.ema_model

            @torch.no_grad()
            def network(split, sigma):
                return net(images[split]["v"](sigma).to(device), sigma)

            _fill(caches["net"], pending["net"], network, bar, f"network of {spec.name}")
            computed.append("net")
    empty = {s: torch.zeros(0, *train_images.shape[1:]) for s in SPLITS}
    outputs = {
        what: {
            (split, s): cache.get(split, s) if len(eval_images[split]) else empty[split]
            for split in SPLITS
            for s in spec.sigmas
        }
        for what, cache in caches.items()
        if what != "diagnostics"
    }
    if "diagnostics" in caches:
        outputs["diagnostics"] = {
            (split, s): caches["diagnostics"].get(split, s)
            for split in SPLITS
            for s in spec.sigmas
            if len(eval_images[split])
        }
    return images, outputs


def _caches(spec: Spec, run_folder: Path, root, keys: dict[str, str]) -> dict:
    """``{what: _Split}``: the formula's and the network's outputs (and diagnostics)."""
    formula = train.run_root(root) / "formula"
    paths = {"formula": formula / "{}.pt", "net": run_folder / "eval-{}.pt"}
    if spec.diagnostics:
        paths["diagnostics"] = formula / "{}-diagnostics.pt"
    return {
        what: _Split({s: _Cache(Path(str(path).format(k)), k) for s, k in keys.items()})
        for what, path in paths.items()
    }


def _table(spec: Spec, images: dict, outputs: dict) -> pd.DataFrame:
    rows = []
    for split in SPLITS:
        for sigma in spec.sigmas:
            x = images[split]["x"](sigma)
            formula, net = outputs["formula"][split, sigma], outputs["net"][split, sigma]
            v = images[split]["v"](sigma)
            columns = {
                "psnr_net_formula": psnr(net, formula),
                "psnr_formula_truth": psnr(formula, x),
                "psnr_net_truth": psnr(net, x),
                "psnr_input_truth": psnr(v, x),
            }
            for i in range(len(x)):
                values = {k: float(c[i]) for k, c in columns.items()}
                rows.append({"split": split, "sigma": sigma, "image": i, **values})
    table = pd.DataFrame(rows)
    labels = {
        "dataset": spec.dataset,
        "task": spec.task_name,
        "preinverse": spec.preinverse,
        "arch": spec.arch,
        "patch_size": spec.patch_size,
        "n_train": spec.n_train,
        "lam": math.nan if spec.lam is None else spec.lam,
        "operator": spec.task,
        "eval_dataset": spec.eval_dataset or spec.dataset,
        "name": spec.name,
    }
    for column, value in labels.items():
        table[column] = value
    return table[list(COLUMNS)]


def run_one(
    spec: Spec,
    *,
    root: str | os.PathLike | None = None,
    device=None,
    progress: bool | None = None,
    finished_only: bool = False,
) -> Result | None:
    """Train (or load) and evaluate one spec; see the module docstring. With
    ``finished_only``, None unless the run is finished and its evaluation cached."""
    if not isinstance(spec, Spec):
        raise TypeError(f"spec must be an experiments.Spec, got {type(spec).__name__}")
    progress = progress_enabled(progress)
    device = torch.device(device) if device is not None else runtime.device()
    train_images, eval_images = _load_images(spec)
    config = spec.train_config()
    if finished_only and not _finished(spec, config, train_images, eval_images, root):
        return None
    trained = train.fit(config, train_images, device=device, root=root, progress=progress)
    computed = [] if trained.loaded else ["training"]
    images, outputs = _evaluate(
        spec, trained, train_images, eval_images, root, device, progress, computed
    )
    table = _table(spec, images, outputs)
    return Result(spec, trained, table, {**images, **outputs}, tuple(computed))


def _finished(spec, config, train_images, eval_images, root) -> bool:
    folder = train.run_dir(config, train_images, root)
    if not (folder / train.DONE).exists():
        return False
    caches = _caches(spec, folder, root, _keys(spec, train_images, eval_images))
    return not any(_pending(c, spec, eval_images) for c in caches.values())


def run(specs, *, root=None, device=None, progress: bool | None = None):
    """Run one :class:`Spec` (returns a :class:`Result`) or a list of them (a :class:`Grid`).

    Args:
        root: the runs folder (default ``$LEMMSE_RUNS``, else ``<repo>/runs``).
        device: default :func:`lemmse_core.runtime.device`.
        progress: tqdm bars (training steps, then evaluation); default
            ``$LEMMSE_PROGRESS`` (``0`` turns them off), else on.

    Finished runs and cached evaluations are loaded; interrupted ones resume.
    """
    if isinstance(specs, Spec):
        return run_one(specs, root=root, device=device, progress=progress)
    specs = list(specs)
    if not specs:
        raise ValueError("specs is empty: give a Spec or a non-empty list of them")
    return Grid([run_one(s, root=root, device=device, progress=progress) for s in specs])
