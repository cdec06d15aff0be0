"""Sphinx extension of the lemmse book (loaded through ``local_extensions`` in _config.yml).

- The profile the book is built with (``LEMMSE_PROFILE``) is a config value that
  invalidates the environment, and the notebook cache is kept per profile, so that a
  ``paper`` build never reuses the outputs of a ``quick`` one.
- ``{{ build_profile }}`` and ``{{ build_date }}`` are MyST substitutions for the index page,
  which is re-read on every build so that its date is the build's.
- No sphinx-thebe (see :func:`_without_thebe`).
- One line per notebook as it is read: its name, its seconds, and whether it was executed
  now or taken from the cache.
- Each notebook page offers its notebook for download as ``.ipynb`` (read from the MyST
  source, with the outputs of its execution) beside the ``.md`` source.
"""

from __future__ import annotations

import datetime
import sys
import time
from pathlib import Path

import nbformat
from jupyter_cache import get_cache
from myst_nb.core.read import read_myst_markdown_notebook
from myst_nb.sphinx_ import NbMetadataCollector
from sphinx.application import Sphinx

from lemmse_core import profiles


def _configure(app: Sphinx, config) -> None:
    config.lemmse_profile = profiles.name()
    cache = Path(config.nb_execution_cache_path or Path(app.outdir).parent / ".jupyter_cache")
    config.nb_execution_cache_path = str(cache / config.lemmse_profile)
    config.myst_substitutions = {
        **(config.myst_substitutions or {}),
        "build_profile": config.lemmse_profile,
        "build_date": datetime.date.today().isoformat(),
    }
    # Without a default, the theme logs "invalid theme mode" on every page read from disk.
    config.html_context = {"default_mode": "light", **(config.html_context or {})}
    app.lemmse_started = time.time()


def _reread_root(app: Sphinx, env, added, changed, removed) -> list[str]:
    return [app.config.root_doc]


def _report(app: Sphinx, doctree) -> None:
    """One line per notebook: name, seconds, executed now or cached."""
    docname = app.env.docname
    data = NbMetadataCollector.get_exec_data(app.env, docname)
    if not data:
        return
    seconds = f"{data['runtime']:.1f} s" if data["runtime"] is not None else "? s"
    if data["mtime"] >= app.lemmse_started:
        how = f"executed in {seconds}"
    else:
        when = datetime.datetime.fromtimestamp(data["mtime"]).strftime("%Y-%m-%d %H:%M")
        how = f"cached (executed in {seconds} on {when})"
    state = "" if data["succeeded"] else f", FAILED ({data['error']})"
    print(f"[notebook] {docname}: {how}{state}", file=sys.stderr, flush=True)


def _executed_notebook(app: Sphinx, pagename: str) -> nbformat.NotebookNode:
    """The notebook of a MyST page, with the outputs of its execution in the cache."""
    source = Path(app.env.doc2path(pagename))
    notebook = read_myst_markdown_notebook(source.read_text(encoding="utf-8"), path=source)
    try:
        _, notebook = get_cache(app.config.nb_execution_cache_path).merge_match_into_notebook(
            notebook
        )
    except KeyError as err:
        raise RuntimeError(f"{pagename}: no executed notebook in the cache") from err
    return notebook


def _offer_notebook(app: Sphinx, pagename, templatename, context, doctree) -> None:
    """Write the executed notebook of a MyST page to _sources, for the download button."""
    if doctree is None or "kernelspec" not in app.env.metadata.get(pagename, {}):
        return
    target = Path(app.outdir) / "_sources" / f"{pagename}.ipynb"
    target.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(_executed_notebook(app, pagename), target)
    context["ipynb_source"] = f"{pagename}.ipynb"


def _without_thebe(app: Sphinx) -> None:
    """Take out sphinx-thebe, which Jupyter Book always loads: the book is read offline
    (no launch buttons), and its inline script names an unpkg URL, twice (a script error
    on every page)."""
    for listeners in app.events.listeners.values():
        listeners[:] = [
            listener
            for listener in listeners
            if getattr(listener.handler, "__module__", "") != "sphinx_thebe"
        ]
    app.registry.css_files[:] = [f for f in app.registry.css_files if "thebe" not in f[0]]


def setup(app: Sphinx) -> dict:
    _without_thebe(app)
    app.add_config_value("lemmse_profile", profiles.name(), "env")
    app.connect("config-inited", _configure, priority=900)
    app.connect("env-get-outdated", _reread_root)
    app.connect("doctree-read", _report)
    app.connect("html-page-context", _offer_notebook, priority=400)
    return {"parallel_read_safe": False, "parallel_write_safe": True}
