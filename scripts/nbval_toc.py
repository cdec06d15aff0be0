"""Run every notebook of the book's table of contents as a test, with nbval.

The notebooks are MyST Markdown files. Each one is converted with jupytext into a fresh
``<name>.nbval.ipynb`` next to its source (so that it runs in the same folder as in the
book, and relative paths resolve the same way), all of them are run by one pytest call
(``--nbval-lax``: every cell must run without error; claims are ``assert`` cells), and the
generated files are deleted afterwards. Prints the time spent in each notebook.

Usage: python scripts/nbval_toc.py [--toc _toc.yml] [extra pytest arguments...]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import jupytext
import pytest
import yaml

SUFFIXES = (".md", ".ipynb", ".py", ".rst")
GENERATED = ".nbval.ipynb"


def toc_files(toc_path: Path) -> list[Path]:
    """Source files of the toc (root first, then in reading order), extensions resolved."""
    root_dir = toc_path.parent
    toc = yaml.safe_load(toc_path.read_text(encoding="utf-8"))
    names: list[str] = [toc["root"]]

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if "file" in node:
                names.append(node["file"])
            if "glob" in node:
                names.extend(
                    str(p.relative_to(root_dir).with_suffix(""))
                    for p in sorted(root_dir.glob(node["glob"]))
                    if p.suffix in SUFFIXES
                )
            for key in ("parts", "chapters", "sections", "subtrees", "entries"):
                walk(node.get(key))
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(toc)
    files = []
    for name in names:
        path = root_dir / name
        candidates = [path] if path.suffix in SUFFIXES else []
        candidates += [path.with_name(path.name + s) for s in SUFFIXES]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"{toc_path}: no file for toc entry {name!r}")
        if found not in files:
            files.append(found)
    return files


def front_matter(path: Path) -> dict:
    """The YAML front matter of a Markdown file ({} if none)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    end = next((i for i, line in enumerate(lines[1:], 1) if line.strip() == "---"), None)
    if end is None:
        return {}
    return yaml.safe_load("\n".join(lines[1:end])) or {}


def is_notebook(path: Path) -> bool:
    """A toc file is a notebook if it is an .ipynb, or a MyST file with a kernelspec."""
    if path.suffix == ".ipynb":
        return not path.name.endswith(GENERATED)
    return path.suffix == ".md" and "kernelspec" in front_matter(path)


def book_timeout(config_path: Path) -> int:
    """The per-cell timeout of the book build (``execute.timeout`` in ``_config.yml``)."""
    config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    return int(config["execute"]["timeout"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toc", type=Path, default=Path("_toc.yml"))
    parser.add_argument(
        "--cell-timeout",
        type=int,
        default=None,
        help="seconds per cell (default: execute.timeout of _config.yml, as the book build)",
    )
    args, pytest_extra = parser.parse_known_args()

    if args.cell_timeout is None:
        args.cell_timeout = book_timeout(args.toc.parent / "_config.yml")
    notebooks = [p for p in toc_files(args.toc) if is_notebook(p)]
    if not notebooks:
        print(f"nbval: no notebook in {args.toc}, nothing to run")
        return 0

    generated: list[Path] = []
    targets: dict[str, Path] = {}
    try:
        for source in notebooks:
            if source.suffix == ".ipynb":
                target = source
            else:
                target = source.with_name(source.stem + GENERATED)
                notebook = jupytext.read(source, fmt="md:myst")
                jupytext.write(notebook, target, fmt="ipynb")
                generated.append(target)
            targets[str(target)] = source

        durations: dict[str, float] = defaultdict(float)
        outcomes: dict[str, set[str]] = defaultdict(set)

        class NotebookTimes:
            """Adds up the duration of every cell (setup, call, teardown) per notebook."""

            rootpath = Path.cwd()

            def pytest_configure(self, config: pytest.Config) -> None:
                self.rootpath = config.rootpath

            def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
                name = str((self.rootpath / report.nodeid.split("::")[0]).resolve())
                durations[name] += report.duration
                if report.failed or report.when == "call":
                    outcomes[name].add(report.outcome)

        start = time.perf_counter()
        rc = pytest.main(
            [
                "--nbval-lax",
                "--nbval-current-env",
                f"--nbval-cell-timeout={args.cell_timeout}",
                "--durations=0",
                "-p",
                "no:cacheprovider",
                *pytest_extra,
                *targets,
            ],
            plugins=[NotebookTimes()],
        )
        total = time.perf_counter() - start
    finally:
        for path in generated:
            path.unlink(missing_ok=True)

    print("\nnbval: time per notebook")
    for target, source in targets.items():
        key = str(Path(target).resolve())
        ran = key in durations
        status = "FAILED" if "failed" in outcomes.get(key, ()) else "ok" if ran else "-"
        print(f"  {durations.get(key, 0.0):8.1f} s  {status:6}  {source}")
    print(f"  {total:8.1f} s  total")

    if rc == pytest.ExitCode.NO_TESTS_COLLECTED:
        # Notebooks without code cells give no test; that is not a failure.
        return 0
    return int(rc)


if __name__ == "__main__":
    sys.exit(main())
