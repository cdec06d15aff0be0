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
    "mmse": {"n_train": 200, "n_test": 4, "size": 16, "mc_samples": 200},
    "equivariance": {"n_train": 100, "n_test": 4, "size": 16},
    "locality": {"n_train": 300, "n_test": 4, "patch_size": 5},
    "physics": {"n_train": 300, "n_test": 4, "patch_size": 5},
    "degenerate": {"mc_samples": 200000},
    "cnn": {"n_train": 1000, "n_test": 4, "patch_size": 5, "preset": "tiny", "steps": 1500},
}
_PAPER = {
    "tour": {"n_train": 10000, "patch_size": 5},
    "preinverses": {"ffhq_size": 64, "dense_size": 12, "noise_samples": 20000},
    "mmse": {"n_train": 10000, "n_test": 32, "size": 28, "mc_samples": 2000},
    "equivariance": {"n_train": 2000, "n_test": 32, "size": 28},
    "locality": {"n_train": 10000, "n_test": 32, "patch_size": 5},
    "physics": {"n_train": 10000, "n_test": 32, "patch_size": 5},
    "degenerate": {"mc_samples": 2000000},
    "cnn": {"n_train": 50000, "n_test": 32, "patch_size": 5, "preset": "paper", "steps": 100000},
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
