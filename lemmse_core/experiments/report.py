"""Summaries of experiment tables: PSNR curves against σ, the paper's Table 2, and the
agreement between architectures trained on the same configuration."""

from __future__ import annotations

import itertools

import pandas as pd

from ..metrics import psnr
from .engine import SPLITS

_PSNRS = ["psnr_net_formula", "psnr_formula_truth", "psnr_net_truth", "psnr_input_truth"]
CONFIG = ["dataset", "task", "preinverse"]


def curves(table: pd.DataFrame) -> pd.DataFrame:
    """Mean PSNRs over the images, one row per configuration, architecture, split and σ."""
    keys = [*CONFIG, "arch", "split", "sigma"]
    return table.groupby(keys, sort=False)[_PSNRS].mean().reset_index()


def table2(table: pd.DataFrame, sigma_min: float | None = None, reduce: str = "mean"):
    """The paper's Table 2: PSNR(net, formula) averaged over the images at each σ, then
    the ``mean`` (or ``min``) over σ (from ``sigma_min`` on, if given); one row per
    dataset, task, pre-inverse and architecture, one column per split."""
    if reduce not in ("mean", "min"):
        raise ValueError(f"reduce must be 'mean' or 'min', got {reduce!r}")
    c = curves(table)
    if sigma_min is not None:
        c = c[c["sigma"] >= sigma_min]
    keys = [*CONFIG, "arch", "split"]
    out = c.groupby(keys, sort=False)["psnr_net_formula"].agg(reduce).unstack("split")
    return out[[s for s in SPLITS if s in out.columns]]


def architectures(results) -> pd.DataFrame:
    """For every pair of architectures evaluated on the same formula fields: per split and
    σ, the mean over images of PSNR(net a, net b) and of each network's PSNR to the truth
    (the paper's "different architectures converge to the same solution")."""
    groups: dict[str, list] = {}
    for r in results:
        key = repr(sorted(r.spec.formula_fields().items()))
        groups.setdefault(key, []).append(r)
    rows = []
    for members in groups.values():
        for a, b in itertools.combinations(members, 2):
            for split in SPLITS:
                for sigma in a.spec.sigmas:
                    oa, ob = a.outputs(split, sigma), b.outputs(split, sigma)
                    if not len(oa.x):
                        continue
                    rows.append(
                        {
                            **{k: a.table[k].iloc[0] for k in CONFIG},
                            "arch_a": a.spec.arch,
                            "arch_b": b.spec.arch,
                            "split": split,
                            "sigma": sigma,
                            "psnr_a_b": psnr(oa.net, ob.net).mean().item(),
                            "psnr_a_truth": psnr(oa.net, oa.x).mean().item(),
                            "psnr_b_truth": psnr(ob.net, ob.x).mean().item(),
                        }
                    )
    return pd.DataFrame(rows)
