"""The built book in headless Chromium, page by page, as a reader opens it from disk.

Every page of ``_build/html/book/`` is opened once from ``file://`` (the ``pages`` fixture)
with every request recorded and every non-local one blocked; the tests then check what the
page showed. A screenshot of each page and a summary (``report.json``) go to
``_build/screenshots/``.
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from conftest import HTML, ROOT, SCREENSHOTS, missing

LOCAL = ("file", "data", "blob", "about")
VIEWPORT = {"width": 1440, "height": 900}

# Formulas left as TeX in the text that MathJax was meant to typeset.
RAW_TEX = re.compile(
    r"\\\(|\\\)|\\\[|\\\]|\$\$|\\begin\{|\\(frac|mathbb|mathcal|operatorname|sigma|sum)\b"
)
# A theorem-like title names the paper's result, or says the result is the book's own.
PAPER_NUMBER = re.compile(
    r"\b(Theorem|Proposition|Definition|Lemma|Corollary|Remark|Section|Sec\.)\s+([A-D]\.)?\d+"
    r"|definition of this book"
)

WAIT_MATHJAX = """async () => {
  const mj = window.MathJax;
  if (mj && mj.startup && mj.startup.promise) await mj.startup.promise;
  await Promise.all([...document.images].map(img => img.complete ? null :
    new Promise(done => { img.onload = img.onerror = done; })));
  return Boolean(mj && mj.version);
}"""

INSPECT = """() => {
  const text = el => (el.innerText || el.textContent || '').trim();
  const main = document.querySelector('main') || document.body;
  const prose = main.cloneNode(true);
  prose.querySelectorAll('pre, code, script, style, textarea, mjx-container, .sig')
    .forEach(el => el.remove());
  const kinds = ['theorem', 'proposition', 'definition', 'lemma', 'corollary', 'remark'];
  const outputs = [...main.querySelectorAll('.cell_output .output, .cell_output pre')];
  return {
    math: [...main.querySelectorAll('.math')].map(el => ({
      typeset: el.querySelector('mjx-container') !== null,
      error: el.querySelector('mjx-merror, [data-mjx-error]') !== null,
      tex: el.querySelector('mjx-container') ? '' : text(el).slice(0, 80),
    })),
    prose: prose.textContent,
    images: [...document.images].map(img => ({
      src: img.currentSrc || img.src, width: img.naturalWidth})),
    links: [...document.querySelectorAll('a[href]')].map(a => a.href),
    ids: [...document.querySelectorAll('[id]')].map(el => el.id),
    errors: outputs.filter(el => el.matches('.traceback, .error')
        || /Traceback \\(most recent call last\\)|^\\w+Error: /m.test(text(el)))
      .map(el => text(el).slice(0, 300)),
    stderr: [...main.querySelectorAll('.cell_output .stderr')].map(el => text(el).slice(0, 300)),
    wide: [...main.querySelectorAll('pre')]
      .filter(el => el.offsetParent !== null && el.scrollWidth > el.clientWidth + 1)
      .map(el => ({start: text(el).slice(0, 60), scroll: el.scrollWidth, width: el.clientWidth})),
    titles: [...main.querySelectorAll('div.proof')]
      .filter(el => kinds.some(k => el.classList.contains(k)))
      .map(el => text(el.querySelector('.admonition-title'))),
    downloads: [...document.querySelectorAll('.dropdown-download-buttons a[href]')]
      .map(a => a.href),
    notebook: document.querySelector('.cell') !== null,
  };
}"""


def _book_pages() -> list[Path]:
    return sorted((HTML / "book").glob("*.html")) if HTML.is_dir() else []


def _name(path: Path) -> str:
    return path.relative_to(HTML).with_suffix("").as_posix()


@pytest.fixture(scope="session")
def pages(browser) -> dict[str, dict]:
    """What every page of the book showed in the browser, by page name."""
    book = _book_pages()
    if not book:
        missing(f"the book is not built ({HTML} has no pages): run `make book` first")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport=VIEWPORT)
    blocked: list[str] = []

    def guard(route):
        url = route.request.url
        if url.split(":", 1)[0] in LOCAL:
            route.continue_()
        else:
            blocked.append(url)
            route.abort()

    context.route("**/*", guard)
    reports = {}
    for path in book:
        reports[_name(path)] = _visit(context, path, blocked)
    context.close()
    summary = {name: _summary(r) for name, r in reports.items()}
    (SCREENSHOTS / "report.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return reports


def _visit(context, path: Path, blocked: list[str]) -> dict:
    page = context.new_page()
    requests, problems = [], []
    page.on("request", lambda request: requests.append(request.url))
    page.on("pageerror", lambda error: problems.append(f"script error: {error}"))
    page.on(
        "console",
        lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None,
    )
    first_blocked = len(blocked)
    page.goto(path.as_uri(), wait_until="load")
    has_mathjax = page.evaluate(WAIT_MATHJAX)
    report = page.evaluate(INSPECT)
    shot = SCREENSHOTS / f"{path.stem}.png"
    page.screenshot(path=str(shot), full_page=True)
    page.close()
    network = [u for u in requests if u.split(":", 1)[0] not in LOCAL]
    report.update(
        requests=len(requests),
        network=sorted(set(network + blocked[first_blocked:])),
        problems=problems,
        mathjax=has_mathjax,
        screenshot=str(shot),
    )
    return report


def _summary(report: dict) -> dict:
    return {
        "requests": report["requests"],
        "network requests": len(report["network"]),
        "formulas": len(report["math"]),
        "formulas typeset": sum(m["typeset"] for m in report["math"]),
        "images": len(report["images"]),
        "links": len(report["links"]),
        "theorem titles": report["titles"],
        "error outputs": len(report["errors"]),
        "stderr outputs": len(report["stderr"]),
        "code blocks scrolling sideways": len(report["wide"]),
        "notebook download": any(u.endswith(".ipynb") for u in report["downloads"]),
        "screenshot": report["screenshot"],
    }


def _failures(pages: dict[str, dict], check) -> list[str]:
    return [f"{name}: {problem}" for name, report in pages.items() for problem in check(report)]


def _assert_none(pages, check, what: str) -> None:
    failures = _failures(pages, check)
    assert not failures, f"{what}:\n" + "\n".join(failures[:40])


def test_every_page_was_opened(pages):
    names = {name.split("/")[-1] for name in pages}
    toc = re.findall(r"file:\s*book/(\w+)", (ROOT / "_toc.yml").read_text(encoding="utf-8"))
    assert set(toc) | {"intro"} <= names


def test_no_request_leaves_the_machine(pages):
    _assert_none(pages, lambda r: r["network"], "requests to the network")


def test_no_script_or_console_error(pages):
    _assert_none(pages, lambda r: r["problems"], "script or console errors")


def test_mathjax_typesets_every_formula(pages):
    def check(report):
        if report["math"] and not report["mathjax"]:
            yield "MathJax did not load"
        for m in report["math"]:
            if m["error"]:
                yield "MathJax error in a formula"
            elif not m["typeset"]:
                yield f"formula not typeset: {m['tex']!r}"

    _assert_none(pages, check, "formulas")
    assert sum(len(r["math"]) for r in pages.values()) > 100, "too few formulas: wrong selector?"


def test_no_raw_tex_left_in_the_text(pages):
    def check(report):
        for match in RAW_TEX.finditer(report["prose"]):
            start = max(match.start() - 40, 0)
            yield f"raw TeX: {report['prose'][start : match.end() + 40]!r}"

    _assert_none(pages, check, "raw TeX in the text")


def test_every_image_loaded(pages):
    def check(report):
        return [f"image not loaded: {i['src'][:120]}" for i in report["images"] if not i["width"]]

    _assert_none(pages, check, "images")
    assert sum(len(r["images"]) for r in pages.values()) > 20


class _Ids(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids = set()

    def handle_starttag(self, tag, attrs):
        self.ids.update(value for key, value in attrs if key == "id" and value)


def _ids_of(path: Path, pages: dict[str, dict]) -> set[str]:
    name = _name(path) if path.is_relative_to(HTML) else None
    if name in pages:
        return set(pages[name]["ids"])
    parser = _Ids()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser.ids


def test_every_internal_link_resolves(pages):
    """Links, ``{prf:ref}`` and ``{eq}`` references: the file exists, and so does the
    anchor."""
    cache: dict[Path, set[str]] = {}

    def check(report):
        for url in sorted(set(report["links"])):
            parts = urlsplit(url)
            if parts.scheme != "file":
                continue
            target = Path(unquote(parts.path))
            if not target.exists():
                yield f"missing file: {url}"
            elif parts.fragment and target.suffix == ".html":
                if target not in cache:
                    cache[target] = _ids_of(target, pages)
                if unquote(parts.fragment) not in cache[target]:
                    yield f"missing anchor: {url}"

    _assert_none(pages, check, "internal links")


def test_no_error_in_any_output(pages):
    _assert_none(pages, lambda r: r["errors"], "error outputs")
    _assert_none(pages, lambda r: r["stderr"], "stderr outputs")


def test_no_code_block_scrolls_sideways(pages):
    def check(report):
        return [f"{w['scroll']} px wide in {w['width']} px: {w['start']!r}" for w in report["wide"]]

    _assert_none(pages, check, f"code blocks wider than the page at {VIEWPORT['width']} px")


def test_theorem_titles_carry_the_papers_numbers(pages):
    def check(report):
        return [
            f"title without the paper's number: {t!r}"
            for t in report["titles"]
            if not PAPER_NUMBER.search(t)
        ]

    _assert_none(pages, check, "theorem titles")
    assert sum(len(r["titles"]) for r in pages.values()) >= 20


def test_each_notebook_page_offers_its_ipynb(pages):
    def check(report):
        if not report["notebook"]:
            return
        links = [u for u in report["downloads"] if u.endswith(".ipynb")]
        if not links:
            yield "no .ipynb download"
            return
        notebook = json.loads(Path(unquote(urlsplit(links[0]).path)).read_text("utf-8"))
        code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
        if not code or not any(c.get("outputs") for c in code):
            yield f"{links[0]}: not an executed notebook"
        if not any(u.endswith(".md") for u in report["downloads"]):
            yield "no .md source download"

    _assert_none(pages, check, "notebook downloads")
    assert sum(r["notebook"] for r in pages.values()) >= 10


def test_index_states_the_profile_and_the_date(pages):
    prose = pages["book/intro"]["prose"]
    assert re.search(r"Built on \d{4}-\d\d-\d\d with the (quick|paper) profile", prose), prose[:600]


def test_a_screenshot_per_page(pages):
    for report in pages.values():
        shot = Path(report["screenshot"])
        assert shot.stat().st_size > 10_000, shot
