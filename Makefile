# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch 2.13.0 is pinned for setup only: on the build machines pip finds its CPU wheel locally.
TORCH  ?= torch==2.13.0

.PHONY: demo test setup weights clean

$(BIN)/simsearch: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	@touch $@

setup: $(BIN)/simsearch

weights: setup
	$(BIN)/simsearch models --fetch

demo: weights
	$(BIN)/simsearch index examples/images --db demo.db
	$(BIN)/simsearch query examples/queries/cat_crop.jpg --db demo.db -k 5
	$(BIN)/simsearch query examples/images/gravel.jpg --db demo.db -k 3 --mode style

test: weights
	$(BIN)/python -m pytest -q --durations=10

clean:
	rm -rf demo.db .pytest_cache
