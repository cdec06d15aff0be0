"""Lint and format-check the code cells of the book's chapters with ruff.

Each MyST chapter (a Markdown file with a jupytext header) is converted with jupytext into a
notebook in a temporary folder; ``ruff check`` and ``ruff format --diff`` run on the
notebooks with the project's configuration (pyproject.toml) but 88 columns, so that no code
cell scrolls sideways on the rendered page (book/_static/lemmse.css), and every finding is
reported at its line in the chapter. Exits with status 1 if there is any.

Usage: python scripts/lint_chapters.py [chapter.md ...]   (default: book/*.md)
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import jupytext

ROOT = Path(__file__).resolve().parents[1]
RUFF = [sys.executable, "-m", "ruff"]
LINE_LENGTH = "88"  # the width of a code cell on the page, see book/_static/lemmse.css
CONFIG = ["--config", str(ROOT / "pyproject.toml"), "--line-length", LINE_LENGTH, "--no-cache"]
FENCE = re.compile(r"^```\{code-cell\}")
DIFF_CELL = re.compile(r"^--- .*:cell (\d+)$")
HUNK = re.compile(r"^@@ -(\d+)")


def is_chapter(path: Path) -> bool:
    """A MyST notebook: its front matter has a kernelspec (as scripts/nbval_toc.py)."""
    head = path.read_text(encoding="utf-8").split("\n---", 1)[0]
    return head.startswith("---") and "kernelspec:" in head


def cell_lines(path: Path, notebook) -> dict[int, int]:
    """Chapter line (1-based) of the first source line of each code cell, by ruff's cell
    number (1-based over all cells)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    starts, at = {}, 0
    for number, cell in enumerate(notebook.cells, start=1):
        if cell.cell_type != "code":
            continue
        at = next(i for i in range(at, len(lines)) if FENCE.match(lines[i])) + 1
        first = cell.source.splitlines()[0] if cell.source else None
        body = next((i for i in range(at, len(lines)) if lines[i] == first), at)
        starts[number] = body + 1
    return starts


def check(notebooks: dict[Path, tuple[Path, dict[int, int]]]) -> list[str]:
    """``ruff check`` findings as ``chapter:line:column: CODE message``."""
    out = subprocess.run(
        [*RUFF, "check", *CONFIG, "--output-format", "json", *map(str, notebooks)],
        capture_output=True,
        text=True,
        check=False,
    )
    findings = []
    for item in json.loads(out.stdout or "[]"):
        chapter, starts = notebooks[Path(item["filename"]).resolve()]
        row, col = item["location"]["row"], item["location"]["column"]
        line = starts[item["cell"]] + row - 1 if item.get("cell") else row
        findings.append(f"{chapter}:{line}:{col}: {item['code']} {item['message']}")
    return findings


def check_format(notebooks: dict[Path, tuple[Path, dict[int, int]]]) -> list[str]:
    """``ruff format`` changes as ``chapter:line: would reformat`` and the diff."""
    findings = []
    for notebook, (chapter, starts) in notebooks.items():
        out = subprocess.run(
            [*RUFF, "format", *CONFIG, "--diff", str(notebook)],
            capture_output=True,
            text=True,
            check=False,
        )
        cell = None
        for text in out.stdout.splitlines():
            if match := DIFF_CELL.match(text):
                cell = int(match.group(1))
            elif (match := HUNK.match(text)) and cell is not None:
                line = starts[cell] + int(match.group(1)) - 1
                findings.append(f"{chapter}:{line}: ruff format would change this cell:")
            elif cell is not None and text[:1] in " +-" and not text.startswith("+++"):
                findings.append(f"    {text}")
    return findings


def main(paths: list[str]) -> int:
    chapters = [Path(p) for p in paths] or sorted((ROOT / "book").glob("*.md"))
    chapters = [c.resolve() for c in chapters if is_chapter(c)]
    with tempfile.TemporaryDirectory() as tmp:
        notebooks = {}
        for chapter in chapters:
            notebook = jupytext.read(chapter)
            notebook.metadata["language_info"] = {"name": "python"}  # else ruff skips it
            target = (Path(tmp) / f"{chapter.stem}.ipynb").resolve()
            jupytext.write(notebook, target)
            name = chapter.relative_to(ROOT) if chapter.is_relative_to(ROOT) else chapter
            notebooks[target] = (name, cell_lines(chapter, notebook))
        findings = check(notebooks) + check_format(notebooks)
    print("\n".join(findings) if findings else f"{len(chapters)} chapters: ruff finds nothing")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
