# gobo developer entry points. `make test` on a fresh checkout sets everything up first.
#
#   make setup   .venv with the package (editable, C routines compiled) and the benchmark corpus
#   make test    the test suite, offline
#   make demo    the end-to-end demo
#   make clean   build artefacts (keeps .venv)

VENV    ?= .venv
PY      ?= $(VENV)/bin/python
PIP     ?= $(PY) -m pip
PYTEST  ?= $(PY) -m pytest
GOBO    ?= $(VENV)/bin/gobo
# the interpreter that creates the venv: python3.11 where there is one, else python3
BOOTSTRAP_PY ?= $(shell command -v python3.11 2>/dev/null || command -v python3)

# Rebuild the venv's install when the packaging or the C sources change.
STAMP   := $(VENV)/.gobo-setup
# Headless Chromium for the report's page test, tried once per venv (`make browser` tries again)
BROWSER_STAMP := $(VENV)/.gobo-browser
INSTALL_INPUTS := pyproject.toml setup.py $(wildcard src/gobo/csrc/*)

# The corpus lives in gobo's cache ($GOBO_CACHE, else ~/.cache/gobo; see gobo.assets), so a
# new cache gets its copy even when the venv is up to date.
CORPUS  := $(or $(GOBO_CACHE),$(HOME)/.cache/gobo)/data/rotten_tomatoes_corpus_full.csv.bz2

# Everything that runs python here stays off the model hub.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup test demo clean browser

setup: $(STAMP) $(CORPUS) $(BROWSER_STAMP)

$(PY):
	$(BOOTSTRAP_PY) -m venv $(VENV)

$(STAMP): $(INSTALL_INPUTS) | $(PY)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0
	$(PIP) install 'setuptools>=77' wheel
	$(PIP) install --no-build-isolation -e '.[dev]'
	touch $@

$(CORPUS): | $(STAMP)
	$(PY) -c 'from gobo.assets import fetch_dataset; fetch_dataset()'

# The report test opens the page in headless Chromium; where it cannot be installed (no
# apt-get, no root or password-less sudo, no network) set-up goes on and that test skips.
$(BROWSER_STAMP): | $(PY)
	@$(MAKE) --no-print-directory browser
	@touch $@

browser:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  SUDO=; [ "$$(id -u)" = 0 ] || SUDO="sudo -n"; \
	  { $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
	    || echo "chromium could not be installed: the browser test of the report will skip"; \
	else echo "no apt-get here: install chromium to run the browser test of the report"; fi

test: setup
	$(PYTEST) -q

demo: setup
	$(GOBO) demo

# The stamp goes too: the editable install needs its compiled routines rebuilt.
clean:
	rm -rf build dist src/*.egg-info .pytest_cache
	rm -f src/gobo/_native*.so
	find src tests -name __pycache__ -type d -prune -exec rm -rf {} +
	rm -f $(STAMP)
