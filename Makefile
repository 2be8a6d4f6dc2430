# Set-up and the two everyday commands. `make run` and `make test` each create .venv first if needed.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test docs clean-venv

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "$(PYTHON) not found; set PYTHON=python3.x (>= 3.10)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# the CPU wheel of torch for development and CI; with a GPU, install your own torch first
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# The main job: meta-train MAML on the built-in glyphs data (5-way 1-shot), test it on 600 held-out
# tasks beside the scratch and pre-training baselines. CPU, no download, a few minutes.
run: $(STAMP)
	$(VENV)/bin/metaphi run maml --out runs/demo

test: $(STAMP)
	$(PY) -m pytest

# The API reference, generated from the docstrings into build/docs (open build/docs/index.html).
# CI builds it on every change, so a module that no longer imports or documents fails the build.
docs: $(STAMP)
	$(PY) -m pdoc metaphi -o build/docs

clean-venv:
	rm -rf $(VENV)
