# `make demo` and `make test` work on a fresh clone: they create .venv with the pinned stack.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_PORT ?= 8000
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	rm -rf runs/demo
	$(PY) examples/demo_data.py runs/demo/pang_lee_polarity.txt
	$(VENV)/bin/tl-ray tune examples/minilm-sentiment.yaml --space search_spaces/minilm-sentiment.yaml
	$(VENV)/bin/tl-ray report runs/demo
	examples/serve_demo.sh runs/demo $(DEMO_PORT)

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) benchmarks/train_throughput.py

clean:
	rm -rf runs .pytest_cache
