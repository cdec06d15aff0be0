"""Run-size profiles of the book: ``quick`` (default, a 2-core CPU) and ``paper`` (a GPU).

Set ``LEMMSE_PROFILE=paper`` before starting Jupyter or building the book. Each notebook
reads its settings in a hidden setup cell: ``settings = profiles.settings("mmse")``. Every
chapter has one entry per profile, with the same keys in both.
"""

import os
from types import MappingProxyType

_QUICK = {
    "tour": {"n_train": 500, "patch_size": 5},
    "preinverses": {"ffhq_size": 32, "dense_size": 8, "noise_samples": 2000},
    "mmse": {
        "n_train": 200,
        "n_test": 4,
        "size": 16,
        "patch_size": 5,
        "mc_samples": 100,
        "le_samples": 1,
    },
    "equivariance": {
        "n_train": 100,
        "n_test": 4,
        "size": 16,
        "box": 7,
        "mc_samples": 4,
        "threads": 1,
    },
    "locality": {
        "n_train": 300,
        "n_test": 4,
        "patch_size": 5,
        "n_patchwork": 100,
        "box": 13,
        "mc_samples": 300,
        "opt_samples": 100,
        "threads": 1,
    },
    "physics": {
        "n_train": 300,
        "n_test": 4,
        "patch_size": 5,
        "size": 20,
        "box": 9,
        "sigmas": (0.01, 0.03, 0.1, 0.3, 1.0),
        "lambdas": (1e-3, 1e-2, 1e-1),
        "dnr_train": 300,
        "mass_train": 100,
        "mass_test": 1,
    },
    "degenerate": {"mc_samples": 200000, "posterior_draws": 20000},
    # Smoothed LE-MMSE (σ and images of the grid's evaluation) and mass maps.
    "smoothing": {
        "sigmas": (0.1, 0.3, 0.7),
        "eps_ratios": (0.5, 1.0),
        "samples": 3,
        "images": 1,
        "mass_train": 100,
        "mass_sigmas": (0.01, 0.05, 0.2),
    },
    # The networks and their evaluation: lemmse_core.experiments.grid(profile).
    "cnn": {"check_images": 16},
    # Patch size and dataset size: the runs are ex.grid(study="patch_size" / "dataset_size").
    "sizes": {"shown_sigmas": (0.1, 0.7), "low_sigma": 0.2},
    "resolution": {"shown_sigmas": (0.2,)},
    # training images of the rate measurement (gray, colour) and the explained images
    "scale": {"rate_train": (200, 100)},
    "other_networks": {"sigma": 0.2, "images": 1},
}
_PAPER = {
    "tour": {"n_train": 10000, "patch_size": 5},
    "preinverses": {"ffhq_size": 64, "dense_size": 12, "noise_samples": 20000},
    "mmse": {
        "n_train": 2000,
        "n_test": 32,
        "size": 28,
        "patch_size": 5,
        "mc_samples": 500,
        "le_samples": 4,
    },
    "equivariance": {
        "n_train": 2000,
        "n_test": 32,
        "size": 28,
        "box": 13,
        "mc_samples": 32,
        "threads": 0,
    },
    "locality": {
        "n_train": 10000,
        "n_test": 32,
        "patch_size": 5,
        "n_patchwork": 2000,
        "box": 13,
        "mc_samples": 3000,
        "opt_samples": 1000,
        "threads": 0,
    },
    "physics": {
        "n_train": 10000,
        "n_test": 32,
        "patch_size": 5,
        "size": 28,
        "box": 13,
        "sigmas": (0.003, 0.01, 0.03, 0.1, 0.3, 1.0),
        "lambdas": (1e-4, 1e-3, 1e-2, 1e-1, 1.0),
        "dnr_train": 2000,
        "mass_train": 2000,
        "mass_test": 4,
    },
    "degenerate": {"mc_samples": 2000000, "posterior_draws": 200000},
    "smoothing": {
        "sigmas": (0.05, 0.1, 0.3, 0.7),
        "eps_ratios": (0.25, 0.5, 1.0),
        "samples": 32,
        "images": 8,
        "mass_train": 1000,
        "mass_sigmas": (0.01, 0.05, 0.2, 0.5),
    },
    "cnn": {"check_images": 128},
    "sizes": {"shown_sigmas": (0.1, 0.7), "low_sigma": 0.2},
    "resolution": {"shown_sigmas": (0.2,)},
    "scale": {"rate_train": (10000, 2000)},
    "other_networks": {"sigma": 0.2, "images": 4},
}


def _freeze(table):
    return MappingProxyType({k: MappingProxyType(v) for k, v in table.items()})


PROFILES = MappingProxyType({"quick": _freeze(_QUICK), "paper": _freeze(_PAPER)})


def name() -> str:
    """The active profile: ``LEMMSE_PROFILE`` if set, else ``quick``."""
    value = os.environ.get("LEMMSE_PROFILE", "quick").strip().lower() or "quick"
    if value not in PROFILES:
        raise ValueError(f"LEMMSE_PROFILE must be one of {sorted(PROFILES)}, got {value!r}")
    return value


def settings(chapter: str) -> MappingProxyType:
    """Settings of ``chapter`` in the active profile (read-only mapping)."""
    table = PROFILES[name()]
    if chapter not in table:
        raise ValueError(f"chapter must be one of {sorted(table)}, got {chapter!r}")
    return table[chapter]
