# tokensieve — set-up, main job and tests. Every target creates or reuses .venv and installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.stamp-deps

.PHONY: setup demo test lint typecheck imports unit integration eval-baseline bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): requirements.txt pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

## setup: virtual environment, pinned dependencies, editable install, embedded model (fetched and converted once),
##        and the Debian tools when missing (as root with apt-get, one update for all; else their tests skip):
##        those of the DAAM speech corpus, and Chromium with its driver for the report's browser test
SPEECH_TOOLS := espeak-ng sox bible-kjv bible-kjv-text
BROWSER_TOOLS := chromium chromium-driver
setup: $(STAMP)
	$(BIN)/tokensieve pull
	@missing=""; \
	if ! command -v espeak-ng >/dev/null || ! command -v sox >/dev/null || ! command -v bible >/dev/null; then \
	  missing="$(SPEECH_TOOLS)"; fi; \
	if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  missing="$$missing $(BROWSER_TOOLS)"; fi; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; } \
	      || echo "note: apt-get could not install $$missing; the tests that need them skip"; \
	  else echo "note: install $$missing (apt-get) for the DAAM speech corpus and the report's browser test; their" \
	    "tests skip without them"; fi; \
	fi

## demo: the main job — a long-context passkey question answered with the full cache and compressed caches
DEMO_BUDGET  ?= 0.1
demo: setup
	$(BIN)/tokensieve demo --budget $(DEMO_BUDGET)

## test: linter, type checker, import contract and the whole test suite (unit + integration on the embedded model)
test: setup lint typecheck imports
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests

typecheck: $(STAMP)
	$(BIN)/mypy

## imports: the layer contract of docs/ARCHITECTURE.md (import-linter; contracts in pyproject.toml)
imports: $(STAMP)
	$(BIN)/lint-imports

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

integration: setup
	$(BIN)/python -m pytest -q tests/integration

## eval-baseline: the embedded model's full-cache accuracy at 512-4K tokens (docs/EVALUATION.md; ~30 min)
eval-baseline: setup
	scripts/eval_baseline.sh

## bench: speed and memory against the full cache at 2K/4K/8K, batch 1 and 4, then the accuracy of the same
##        configurations at 2K, into one store and one report (docs/results/benchmarks.md; ~45 min: ~35 + ~10)
bench: setup
	scripts/bench.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache .hypothesis build dist src/*.egg-info
