# `make demo` and `make test` work on a fresh clone: they create .venv with the pinned stack.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_PORT ?= 8000
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast drills bench clean

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

# The reliability drills (issue 17), RUNS times in a row; each prints its figure as a JSON line.
RUNS ?= 1
DRILLS := tests/drills tests/search/test_tune.py \
	tests/serve/test_app.py::test_sigkilled_replica_fails_no_client_call_and_is_replaced \
	tests/cluster/test_local_cluster.py::test_worker_node_loss_during_a_search \
	tests/cluster/test_local_cluster.py::test_worker_node_loss_during_training
drills: setup
	mkdir -p runs
	for run in $$(seq $(RUNS)); do \
		echo "drills: run $$run of $(RUNS) (log: runs/drills-$$run.log)"; \
		$(PY) -m pytest -q -s -p no:cacheprovider $(DRILLS) >runs/drills-$$run.log 2>&1; code=$$?; \
		grep -oE '\{"drill".*\}|[0-9]+ (passed|failed).*' runs/drills-$$run.log; \
		[ $$code -eq 0 ] || exit 1; \
	done

bench: setup
	$(PY) benchmarks/train_throughput.py

clean:
	rm -rf runs .pytest_cache
