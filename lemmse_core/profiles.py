"""Run-size profiles of the book: ``quick`` (default, a 2-core CPU) and ``paper`` (a GPU).

Set ``LEMMSE_PROFILE=paper`` before starting Jupyter or building the book. Each notebook
reads its settings in a hidden setup cell: ``settings = profiles.current()``.
"""

import os
from types import MappingProxyType

PROFILES = MappingProxyType(
    {
        "quick": MappingProxyType(
            {
                "n_train": 500,  # training images for the closed forms
                "n_test": 4,  # test images per experiment
                "patch_size": 5,
                "sigmas": (0.05, 0.1, 0.2, 0.5, 1.0),
            }
        ),
        "paper": MappingProxyType(
            {
                "n_train": 10000,
                "n_test": 32,
                "patch_size": 5,
                "sigmas": (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0),
            }
        ),
    }
)


def name() -> str:
    """The active profile: ``LEMMSE_PROFILE`` if set, else ``quick``."""
    value = os.environ.get("LEMMSE_PROFILE", "quick").strip().lower() or "quick"
    if value not in PROFILES:
        raise ValueError(f"LEMMSE_PROFILE must be one of {sorted(PROFILES)}, got {value!r}")
    return value


def current() -> MappingProxyType:
    """Settings of the active profile (read-only mapping)."""
    return PROFILES[name()]
