"""A chapter in JupyterLab, used as a reader would: open it from the file browser, run its
setup cell, add a cell, save, and find the MyST source and its paired notebook in step.

The server runs on a free loopback port with a token, on a copy of ``book/`` (so that
saving does not touch the repository), with the settings that ``make lab`` installs; the
browser may reach nothing but that server.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import jupytext
import pytest
from conftest import ROOT, SCREENSHOTS, missing

CHAPTER = "estimators_tour"
NEW_CELL = "print(profiles.name(), sorted(settings))"
TIMEOUT_MS = 60_000
OVERRIDES = Path(sys.prefix) / "share" / "jupyter" / "lab" / "settings" / "overrides.json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(url: str, process: subprocess.Popen, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"JupyterLab did not answer {url} within {seconds} s")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """``(url, token, root)`` of a JupyterLab serving a copy of book/; shut down after."""
    pytest.importorskip("jupyterlab", reason="JupyterLab is not installed: make lab")
    if not OVERRIDES.is_file():
        missing(f"{OVERRIDES} is missing: `make lab` (or `make check-book`) installs it")
    tmp = tmp_path_factory.mktemp("lab")
    root = tmp / "book"
    shutil.copytree(ROOT / "book", root, ignore=shutil.ignore_patterns("_static", "*.ipynb"))
    port, token = _free_port(), secrets.token_hex(16)
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(tmp / "config"),
        "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(tmp / "user-settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(tmp / "workspaces"),
        "LEMMSE_PROGRESS": "0",
    }
    command = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--ip=127.0.0.1",
        f"--port={port}",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}",
        "--ServerApp.port_retries=0",
    ]
    if os.geteuid() == 0:
        command.append("--allow-root")
    log = open(tmp / "lab.log", "w")  # closed below
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for(f"{url}/api/status?token={token}", process)
        yield url, token, root
    finally:
        request = urllib.request.Request(f"{url}/api/shutdown?token={token}", method="POST")
        try:
            urllib.request.urlopen(request, timeout=5)
            process.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            process.kill()
            process.wait()
        log.close()


@pytest.mark.timeout(400)
def test_a_chapter_opens_runs_and_saves_as_a_paired_notebook(lab, browser):
    url, token, root = lab
    source = jupytext.read(root / f"{CHAPTER}.md")
    cells = [c for c in source.cells if c.cell_type == "code"]
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    outside: list[str] = []

    def guard(route):
        target = route.request.url
        if target.startswith((url, url.replace("http", "ws", 1), "data:", "blob:")):
            route.continue_()
        else:
            outside.append(target)
            route.abort()

    context.route("**/*", guard)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(f"{url}/lab?token={token}")

    try:
        shown = _open_and_run(page, len(cells))
        _save(page)
    except Exception:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / "lab-failure.png"))
        raise
    context.close()
    # Saved: the .md gained the cell, the paired .ipynb holds the outputs.
    paired = root / f"{CHAPTER}.ipynb"
    assert paired.is_file(), "saving wrote no paired .ipynb"
    saved = jupytext.read(root / f"{CHAPTER}.md")
    sources = [c.source for c in saved.cells if c.cell_type == "code"]
    assert sources == [cells[0].source, NEW_CELL] + [c.source for c in cells[1:]]
    notebook = json.loads(paired.read_text(encoding="utf-8"))
    ran = [c for c in notebook["cells"] if c["cell_type"] == "code" and c.get("outputs")]
    assert ran and "".join(ran[0]["outputs"][0]["text"]).startswith(shown.split()[0])
    assert shown not in (root / f"{CHAPTER}.md").read_text(), "outputs in the MyST source"
    ignored = subprocess.run(["git", "check-ignore", "-q", f"book/{CHAPTER}.ipynb"], cwd=ROOT)
    assert ignored.returncode == 0, "the paired notebook would be committed"
    assert not outside, f"requests beyond the server: {outside}"


def _open_and_run(page, n_cells: int) -> str:
    """Open the chapter from the file browser, run its setup cell, add and run a cell;
    returns what the added cell printed."""
    from playwright.sync_api import expect

    # A double click in the file browser opens the MyST chapter as a notebook.
    page.locator(".jp-DirListing-item", has_text=f"{CHAPTER}.md").dblclick()
    panel = page.locator(".jp-NotebookPanel:visible")
    panel.locator(".jp-CodeCell").first.wait_for()
    assert page.locator(".jp-FileEditor:visible").count() == 0, "opened in a text editor"
    expect(panel.locator(".jp-CodeCell")).to_have_count(n_cells)
    page.locator(".jp-StatusBar-Widget", has_text="| Idle").wait_for()

    # Run the setup cell, then add a cell below it that reads the profile, and run it.
    first = panel.locator(".jp-CodeCell").first
    first.locator(".cm-content").click()
    page.keyboard.press("Shift+Enter")
    first.locator(".jp-InputPrompt", has_text="[1]").wait_for()
    page.keyboard.press("Escape")
    page.keyboard.press("b")
    added = panel.locator(".jp-CodeCell").nth(1)
    added.locator(".cm-content").click()
    page.keyboard.type(NEW_CELL)
    page.keyboard.press("Shift+Enter")
    output = added.locator(".jp-OutputArea-output")
    output.first.wait_for()
    shown = output.first.inner_text()
    assert panel.locator("[data-mime-type='application/vnd.jupyter.stderr']").count() == 0
    assert shown.startswith(os.environ.get("LEMMSE_PROFILE", "quick")), shown

    return shown


def _save(page) -> None:
    """Save with the toolbar button and wait until the tab is no longer marked modified."""
    from playwright.sync_api import expect

    page.keyboard.press("Escape")
    page.locator("[data-command='docmanager:save']:visible").first.click()
    expect(page.locator(".lm-TabBar-tab.jp-mod-dirty")).to_have_count(0)
