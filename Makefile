# lemmse: build the book, run the tests, open JupyterLab.
#
#   make book    set up .venv, fetch MathJax, build the book (executes the notebooks)
#   make test    ruff (package and chapters), unit tests, the experiment runs, every notebook
#   make runs    train and evaluate the experiment grid of the profile (cached in runs/)
#   make lab     JupyterLab on book/ (MyST .md notebooks open as notebooks)
#   make check-book  the built book in headless Chromium, and a chapter in JupyterLab
#   make clean   remove _build/
#
# Any torch >= 2.4 works: `make book TORCH='torch>=2.4'`. The default pins the CPU build
# that the development machines have as a local wheel.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
MATHJAX_VERSION ?= 3.2.2

BIN := $(VENV)/bin
PY := $(BIN)/python
PIP := $(PY) -m pip --quiet
STAMP := $(VENV)/.installed
LAB_STAMP := $(VENV)/.installed-lab
CHECK_STAMP := $(VENV)/.installed-check
MATHJAX_DIR := book/_static/mathjax
MATHJAX := $(MATHJAX_DIR)/tex-chtml.js
BOOK_INDEX := _build/html/index.html

# Tools of the venv first, so that kernels and subprocesses use the project's Python.
export PATH := $(abspath $(BIN)):$(PATH)
export VIRTUAL_ENV := $(abspath $(VENV))

.PHONY: help install book test lint unit runs nbval lab check-book clean mathjax FORCE

help:
	@echo "make book   build the book into _build/html and print its path"
	@echo "make test   lint, unit tests, the experiment runs and every notebook (nbval)"
	@echo "make runs   train and evaluate the experiment grid (runs/, reused by the book)"
	@echo "make lab    start JupyterLab on book/"
	@echo "make check-book  after make book: every page in headless Chromium, a chapter in JupyterLab"
	@echo "make clean  remove _build/"

$(PY):
	$(PYTHON) -m venv $(VENV)

# The TORCH requirement the venv was installed with; rewritten only when it changes, so that
# `make book TORCH=...` re-installs torch and everything else stays fast.
TORCH_SPEC := $(VENV)/.torch-spec
$(TORCH_SPEC): FORCE | $(PY)
	@[[ -f $@ && "$$(cat $@)" == '$(TORCH)' ]] || echo '$(TORCH)' > $@

# Re-install only when pyproject.toml or TORCH changes (delete the stamp to force it).
$(STAMP): pyproject.toml $(TORCH_SPEC)
	$(PIP) install "$(TORCH)"
	$(PIP) install -e ".[dev]"
	@touch $@

install: $(STAMP)

$(MATHJAX):
	bash scripts/fetch_mathjax.sh $(MATHJAX_VERSION) $(MATHJAX_DIR)

mathjax: $(MATHJAX)

# Notebooks run without progress bars (the pages show one-line summaries instead).
nbval book: export LEMMSE_PROGRESS = 0

book: $(STAMP) $(MATHJAX) runs
	$(BIN)/jupyter-book build . --warningiserror
	@index="$(CURDIR)/$(BOOK_INDEX)"; \
	echo ""; echo "The book: $$index"; \
	if [[ -z "$${CI:-}" && ( -n "$${DISPLAY:-}$${WAYLAND_DISPLAY:-}" || "$$(uname)" == Darwin ) ]]; then \
		$(PY) -m webbrowser -t "file://$$index" >/dev/null 2>&1 || true; \
	fi

# ruff on the package, tests and scripts, then on the code cells of the chapters.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(PY) scripts/lint_chapters.py

unit: $(STAMP)
	$(BIN)/pytest tests --ignore=tests/book --durations=10

# The networks of the book and their evaluations, trained once with a progress bar per run,
# before the notebooks (which then load them): `python -m lemmse_core.experiments run` under
# torchrun, one process per GPU, else RUNS_PROCS (default 2) processes sharing the cores:
# on a CPU two runs at once go faster than one on two threads (benchmarks/README.md).
RUNS_PROCS ?= 2

RUNS_LAYOUT = import os, torch; n = torch.cuda.device_count() or $(RUNS_PROCS); \
	print(n, max(1, (os.cpu_count() or 1) // n))

runs: $(STAMP)
	@read -r procs threads < <($(PY) -c '$(RUNS_LAYOUT)'); \
	echo "make runs: $$procs processes of $$threads threads"; \
	LEMMSE_PROGRESS=1 OMP_NUM_THREADS=$$threads $(BIN)/torchrun --standalone \
		--nproc-per-node=$$procs -m lemmse_core.experiments run

nbval: $(STAMP) runs
	$(PY) scripts/nbval_toc.py

test: lint unit runs nbval

# JupyterLab and jupytext's server extension; the settings override (in the venv only)
# makes a double click open the .md notebooks as notebooks.
LAB_SETTINGS := $(VENV)/share/jupyter/lab/settings/overrides.json

$(LAB_STAMP): pyproject.toml scripts/jupyterlab-overrides.json | $(STAMP)
	$(PIP) install -e ".[dev,lab]"
	mkdir -p $(dir $(LAB_SETTINGS))
	cp scripts/jupyterlab-overrides.json $(LAB_SETTINGS)
	@touch $@

# Jupyter refuses to run as root unless told.
LAB_ARGS ?= $(if $(filter 0,$(shell id -u)),--allow-root)

lab: $(LAB_STAMP)
	$(BIN)/jupyter lab --notebook-dir=book $(LAB_ARGS)

# The book as readers get it (tests/book): every page of _build/html in headless Chromium
# (Playwright driving the system Chromium; nothing is downloaded), and a chapter opened, run
# and saved in JupyterLab. Needs `make book` first; without Chromium the tests skip and say
# what to install (in CI they fail). Screenshots and a summary: _build/screenshots/.
$(CHECK_STAMP): pyproject.toml | $(LAB_STAMP)
	$(PIP) install -e ".[dev,lab,check]"
	@touch $@

check-book: $(CHECK_STAMP)
	$(BIN)/pytest tests/book -v --durations=5

clean:
	rm -rf _build

FORCE:
