"""Tests of the book as readers get it: the built HTML in a browser, JupyterLab.

Run by ``make check-book`` after ``make book``. They need Playwright's Python package
(``pip install -e .[check]``) and a system Chromium (Debian: ``apt-get install chromium``;
no browser is downloaded). Where either is missing they skip and say what to install,
except under ``CI`` or ``LEMMSE_CHECK_BOOK=1`` (set by ``make check-book``), where that is
a failure. ``LEMMSE_BOOK_HTML`` points them at another build than ``_build/html``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HTML = Path(os.environ.get("LEMMSE_BOOK_HTML", ROOT / "_build" / "html")).resolve()
SCREENSHOTS = HTML.parent / "screenshots"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def strict() -> bool:
    """Missing tools fail instead of skipping (CI and ``make check-book``)."""
    return bool(os.environ.get("CI")) or os.environ.get("LEMMSE_CHECK_BOOK") == "1"


def missing(what: str):
    """Skip with the message, or fail with it in strict mode."""
    if strict():
        pytest.fail(what, pytrace=False)
    pytest.skip(what)


@pytest.fixture(scope="session")
def chromium() -> str:
    """Path of the system Chromium (``LEMMSE_CHROMIUM`` overrides the search)."""
    path = os.environ.get("LEMMSE_CHROMIUM") or next(
        (p for p in map(shutil.which, BROWSERS) if p), None
    )
    if not path:
        missing("no Chromium: install it (Debian: apt-get install chromium) or set LEMMSE_CHROMIUM")
    return path


@pytest.fixture(scope="session")
def playwright():
    """A running Playwright driver."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("Playwright is not installed: pip install -e '.[check]'")
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="session")
def browser(playwright, chromium):
    """Headless Chromium with no network access besides loopback (see ``guard``)."""
    browser = playwright.chromium.launch(executable_path=chromium, headless=True)
    yield browser
    browser.close()
