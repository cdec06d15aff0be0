"""Experiments: trained networks against the LE-MMSE, one engine for every comparison.

A :class:`Spec` fixes the data, task, pre-inverse, network and evaluation; :func:`run`
trains the network through :func:`lemmse_core.train.fit` (finished runs are reused),
evaluates it and the formula (Thm. 3.8) on training and test images over a σ grid, caches
both, and returns a :class:`Result` (``.table``, ``.outputs(split, sigma)``) or, for a list
of specs, a :class:`Grid`. :func:`grid` gives the specs of a profile; the command line is
``python -m lemmse_core.experiments list|run|report --profile quick|paper``.
"""

from .engine import (
    COLUMNS,
    MASS,
    SPLITS,
    Diagnostics,
    Grid,
    Outputs,
    Result,
    progress_enabled,
    run,
)
from .grids import ARCHS, STUDIES, grid, select, tasks
from .report import (
    AGREEMENT_FLOORS,
    CONFIG,
    DIFFUSE,
    SHARED,
    architectures,
    best_of_sweep,
    curves,
    density,
    pixels,
    same_source,
    source_map,
    spearman,
    sweep,
    sweep_difference,
    table2,
)
from .spec import Spec

__all__ = [
    "AGREEMENT_FLOORS",
    "ARCHS",
    "COLUMNS",
    "MASS",
    "STUDIES",
    "Diagnostics",
    "CONFIG",
    "DIFFUSE",
    "SHARED",
    "SPLITS",
    "Grid",
    "Outputs",
    "Result",
    "Spec",
    "architectures",
    "best_of_sweep",
    "curves",
    "density",
    "grid",
    "pixels",
    "progress_enabled",
    "run",
    "same_source",
    "select",
    "source_map",
    "spearman",
    "sweep",
    "sweep_difference",
    "table2",
    "tasks",
]
