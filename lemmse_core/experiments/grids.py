"""The experiment grids of the profiles (paper Sec. 4.2, Table 2, App. C.4).

``quick`` (this 2-core CPU): every task and pre-inverse kind on Fashion-MNIST with the
UNet2D, the three architectures on denoising for Fashion-MNIST and CIFAR-10 in colour, and
physics-aware centre inpainting on CIFAR-10. ``paper``: the full grid at the paper's
sizes (three datasets, three architectures, six task and pre-inverse pairs), for a GPU.
Every chapter picks its specs from :func:`grid` with :func:`select`, so a spec trained
for one chapter is the same run for all of them.

Besides ``table2`` (the grid above), :data:`STUDIES` name the specs of the paper's
Secs. 4.2–4.3 and App. D.3–D.7, which reuse its networks where they can: ``density``
(Figs. 6, 17: the formula's diagnostics on the denoisers), ``ood`` (Figs. 7, 25: test images
of another dataset), ``patch_size`` (Figs. 18, 19), ``dataset_size`` (Fig. 26) and
``resolution`` (Sec. 4.5, Figs. 9, 27: the three tasks on FFHQ faces at 64 × 64) and
``other_networks`` (networks outside Thm. 3.8's class: a zero-padded DnCNN with a large
field and the strided U-Net, same data and recipe as the U-Net denoiser).
``grid(study="all")`` is their union, one spec per run (what ``make runs`` computes).
"""

from __future__ import annotations

from .. import profiles
from .spec import Spec

ARCHS = ("unet", "resnet", "patchmlp")
# Paper App. C.4: a 15 × 15 centre square on 32 × 32 images; scaled to 13 on 28 × 28 and
# to 30 on 64 × 64.
BOX = {28: 13, 32: 15, 64: 30}
_SIDE = {"fashionmnist": 28, "mnist": 28, "cifar10": 32, "ffhq": 32}

_RECIPES = {
    # CPU budget: about a minute and a half per tiny network; steps per architecture set
    # for about the same time each (the ResNet's steps are the cheapest).
    "quick": {
        "common": {
            "preset": "tiny",
            "batch_size": 16,
            "lr": 2e-3,
            "lr_floor": 1e-5,
            "n_train": 1000,
            "eval_train": 4,
            "eval_test": 4,
            "sigmas": (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0),
        },
        "steps": {
            "unet": 1400,
            "resnet": 3500,
            "patchmlp": 2000,
            "dncnn": 1400,
            "stridedunet": 1400,
        },
    },
    "paper": {
        "common": {
            "preset": "paper",
            "batch_size": 256,
            "lr": 1e-3,
            "lr_floor": 1e-6,
            "n_train": 10000,
            "eval_train": 32,
            "eval_test": 32,
            "sigmas": (0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0),
        },
        "steps": {a: 25000 for a in ("unet", "resnet", "patchmlp", "dncnn", "stridedunet")},
    },
}


def tasks(
    dataset: str, kinds=("identity", "adjoint", "pinv", "tikhonov"), side: int | None = None
) -> list[dict]:
    """The paper's task and pre-inverse pairs for ``dataset`` (App. C.4) at ``side``
    (default: its native side): denoising; centre inpainting, agnostic (B = I) and aware
    (B = Aᵀ); Gaussian deconvolution (std 1, circular), agnostic and aware (B = A⁺,
    Tikhonov with λ = 0.01)."""
    inpainting = f"inpainting_center:{BOX[side or _SIDE[dataset]]}"
    pairs = [
        {"task": "denoising", "preinverse": "identity"},
        {"task": inpainting, "preinverse": "identity"},
        {"task": inpainting, "preinverse": "adjoint"},
        {"task": "blur_gaussian:1", "preinverse": "identity"},
        {"task": "blur_gaussian:1", "preinverse": "pinv"},
        {"task": "blur_gaussian:1", "preinverse": "tikhonov", "lam": 1e-2},
    ]
    return [p for p in pairs if p["preinverse"] in kinds]


def _spec(profile: str, arch: str, **fields) -> Spec:
    recipe = _RECIPES[profile]
    return Spec(**{**recipe["common"], "arch": arch, "steps": recipe["steps"][arch], **fields})


def _paper(profile: str) -> list[Spec]:
    data = {"fashionmnist": {}, "cifar10": {"color": True}, "ffhq": {"size": 32, "color": True}}
    return [
        _spec(profile, arch, dataset=name, **extra, **pair)
        for name, extra in data.items()
        for pair in tasks(name)
        for arch in ARCHS
    ]


def _quick(profile: str) -> list[Spec]:
    fashion, cifar = {"dataset": "fashionmnist"}, {"dataset": "cifar10", "color": True}
    specs = [_spec(profile, arch, **fashion) for arch in ARCHS]
    specs += [_spec(profile, "unet", **fashion, **pair) for pair in tasks("fashionmnist")[1:5]]
    specs += [_spec(profile, arch, **cifar) for arch in ARCHS]
    aware_inpainting = tasks("cifar10", kinds=("adjoint",))[0]
    return [*specs, _spec(profile, "unet", **cifar, **aware_inpainting)]


#: Per profile, the sweeps of the studies: the dataset, patch sizes, dataset sizes,
#: out-of-distribution pairs (training dataset, evaluation dataset), the datasets whose
#: denoiser gets diagnostics, and the 64 × 64 runs (changes to the recipe). The paper runs
#: the patch-size and dataset-size sweeps on FFHQ-32, which is not available at this scale;
#: at 64 × 64 the quick profile has the 12 FFHQ training faces stored here (batches of 4
#: hold as many pixels as 16 images of 32 × 32).
_SWEEPS = {
    "quick": {
        "data": {"dataset": "fashionmnist"},
        "patch_sizes": (3, 5, 7),
        "n_trains": (100, 1000, 3000),
        "ood": (("fashionmnist", "mnist"), ("cifar10", "ffhq")),
        "density": ("fashionmnist", "cifar10"),
        "resolution": {"n_train": 12, "batch_size": 4},
        # the DnCNN's field (the formula at p = 11 costs about 5x p = 5), its evaluation
        "dncnn": {"patch_size": 11, "sigmas": (0.1, 0.2, 0.5), "eval_train": 2, "eval_test": 2},
    },
    "paper": {
        "data": {"dataset": "ffhq", "size": 32, "color": True},
        "patch_sizes": (3, 5, 7, 9),
        "n_trains": (1000, 5000, 10000, 50000),
        "ood": (("fashionmnist", "mnist"), ("cifar10", "ffhq"), ("ffhq", "cifar10")),
        "density": ("fashionmnist", "cifar10", "ffhq"),
        # the paper's N at 64 × 64 is not in its text; 5000 faces: 2 · 10⁷ patches of 75
        "resolution": {"n_train": 5000, "batch_size": 64, "eval_train": 8, "eval_test": 8},
        "dncnn": {"patch_size": 17, "sigmas": (0.05, 0.1, 0.2, 0.5)},  # 8 layers on 32 × 32
    },
}
HIGH_RES = {"dataset": "ffhq", "size": 64, "color": True}  # the data of Sec. 4.5
_DATA = {
    "fashionmnist": {"dataset": "fashionmnist"},
    "cifar10": {"dataset": "cifar10", "color": True},
    "ffhq": {"dataset": "ffhq", "size": 32, "color": True},
}


def _denoiser(profile: str, **fields) -> Spec:
    return _spec(profile, "unet", **fields)


def _density(profile: str) -> list[Spec]:
    names = _SWEEPS[profile]["density"]
    return [_denoiser(profile, **_DATA[name], diagnostics=True) for name in names]


def _ood(profile: str) -> list[Spec]:
    return [
        _denoiser(profile, **_DATA[a], eval_dataset=b, diagnostics=True)
        for a, b in _SWEEPS[profile]["ood"]
    ]


def _patch_size(profile: str) -> list[Spec]:
    sweep = _SWEEPS[profile]
    return [
        _denoiser(profile, **sweep["data"], patch_size=p, diagnostics=True)
        for p in sweep["patch_sizes"]
    ]


def _dataset_size(profile: str) -> list[Spec]:
    sweep = _SWEEPS[profile]
    return [_denoiser(profile, **sweep["data"], n_train=n) for n in sweep["n_trains"]]


def _resolution(profile: str) -> list[Spec]:
    """Denoising, centre inpainting and deconvolution, physics-agnostic, at 64 × 64."""
    recipe = {**HIGH_RES, **_SWEEPS[profile]["resolution"]}
    pairs = tasks("ffhq", kinds=("identity",), side=HIGH_RES["size"])
    return [_spec(profile, "unet", **recipe, **pair) for pair in pairs]


def _other_networks(profile: str) -> list[Spec]:
    """The DnCNN (zero padding, field ``p``) and the strided U-Net (field 5 at full
    resolution, as the U-Net it is compared with) on the patch-size sweep's data."""
    data = _SWEEPS[profile]["data"]
    return [
        _spec(profile, "dncnn", **data, **_SWEEPS[profile]["dncnn"]),
        _spec(profile, "stridedunet", **data),
    ]


STUDIES = {
    "table2": lambda profile: {"quick": _quick, "paper": _paper}[profile](profile),
    "density": _density,
    "ood": _ood,
    "patch_size": _patch_size,
    "dataset_size": _dataset_size,
    "resolution": _resolution,
    "other_networks": _other_networks,
}


def _union(lists) -> list[Spec]:
    """One spec per run and evaluation, in first-seen order; diagnostics if any asks."""
    out: dict[str, Spec] = {}
    for spec in (s for specs in lists for s in specs):
        key = spec.replace(diagnostics=False).to_json()
        seen = out.get(key)
        out[key] = (
            spec if seen is None else seen.replace(diagnostics=seen.diagnostics or spec.diagnostics)
        )
    return list(out.values())


def grid(profile: str | None = None, study: str = "table2") -> list[Spec]:
    """The specs of ``study`` (one of :data:`STUDIES` or ``"all"``) in ``profile``
    (default: the active one, ``LEMMSE_PROFILE``)."""
    profile = profiles.name() if profile is None else profile
    if profile not in _RECIPES:
        raise ValueError(f"profile must be one of {sorted(_RECIPES)}, got {profile!r}")
    if study == "all":
        return _union(build(profile) for build in STUDIES.values())
    if study not in STUDIES:
        raise ValueError(f"study must be 'all' or one of {sorted(STUDIES)}, got {study!r}")
    return STUDIES[study](profile)


def select(specs, **fields) -> list[Spec]:
    """The specs whose attributes equal ``fields`` (``task_name`` works too)."""
    out = [s for s in specs if all(getattr(s, k) == v for k, v in fields.items())]
    if not out:
        raise ValueError(f"no spec matches {fields}")
    return out
