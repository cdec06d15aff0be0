"""Command line of the experiments: list, run and report the specs of a profile.

    python -m lemmse_core.experiments list --profile quick|paper [--json] [--only PATTERN]
    python -m lemmse_core.experiments run --profile quick|paper [--only PATTERN]
    python -m lemmse_core.experiments report --profile quick|paper [--only PATTERN]

``run`` trains and evaluates every spec with a progress bar per run, resumes after an
interruption, and writes the table to ``<runs>/tables/<profile>.csv``. Under
``torchrun --nproc-per-node=K -m lemmse_core.experiments run ...`` each rank runs its share
of the specs on its own device and rank 0 writes the table
(:mod:`~lemmse_core.experiments.distribute`). ``report`` prints
the paper's Table 2 of the specs already finished, computing nothing. PATTERN is a glob
on the spec names (a plain word matches any name that contains it); ``--study NAME``
keeps one study of :data:`~lemmse_core.experiments.STUDIES` (default: all of them).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys

import pandas as pd

from .. import profiles, train
from .distribute import run_grid
from .engine import run_one
from .grids import STUDIES, grid
from .report import table2


def _specs(args):
    specs = grid(args.profile, args.study)
    if args.only:
        pattern = args.only if any(c in args.only for c in "*?[") else f"*{args.only}*"
        specs = [s for s in specs if fnmatch.fnmatchcase(s.name, pattern)]
    if not specs:
        raise SystemExit(f"no spec of profile {args.profile!r} matches --only {args.only!r}")
    return specs


def _list(args) -> int:
    specs = _specs(args)
    if args.json:
        print(json.dumps([{"name": s.name, **s.to_dict()} for s in specs], indent=1))
    else:
        for s in specs:
            print(s.name)
        print(f"{len(specs)} specs in profile {args.profile!r}")
    return 0


def _table(results, args, name: str) -> None:
    table = pd.concat([r.table for r in results], ignore_index=True)
    folder = train.run_root(args.root) / "tables"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.csv"
    table.to_csv(path, index=False)
    rows = table[table["name"].isin({s.name for s in grid(args.profile, "table2")})]
    if len(rows):
        print("\nTable 2 (mean PSNR(net, formula) in dB over sigma and images):")
        print(table2(rows).round(1).to_string())
    print(f"\nthe table, one row per split, sigma and image: {path}")


def _run(args) -> int:
    specs = _specs(args)
    name = args.profile if not args.only else f"{args.profile}-only"
    try:
        return run_grid(
            specs, lambda results: _table(results, args, name), root=args.root, device=args.device
        )
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume", file=sys.stderr)
        return 130


def _report(args) -> int:
    specs = _specs(args)
    results = [r for s in specs if (r := run_one(s, root=args.root, finished_only=True))]
    print(f"{len(results)} of {len(specs)} specs finished")
    if results:
        _table(results, args, f"{args.profile}-report")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lemmse_core.experiments")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, doc in (
        ("list", "list the specs"),
        ("run", "train and evaluate"),
        ("report", "Table 2 of the finished specs"),
    ):
        sub = commands.add_parser(name, help=doc)
        sub.add_argument("--profile", choices=sorted(profiles.PROFILES), default=profiles.name())
        sub.add_argument("--only", metavar="PATTERN", help="glob on the spec names")
        sub.add_argument("--study", choices=["all", *STUDIES], default="all")
        sub.add_argument("--root", help="runs folder (default $LEMMSE_RUNS, else <repo>/runs)")
        if name == "list":
            sub.add_argument("--json", action="store_true", help="one JSON object per spec")
        if name == "run":
            sub.add_argument("--device", help="default: CUDA when present, else CPU")
    args = parser.parse_args(argv)
    return {"list": _list, "run": _run, "report": _report}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
