# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Pinned for setup only: timm needs torchvision, and on the build machines the one torch/torchvision
# pair that imports together is 2.14.1/0.29.1 (pip finds both on local disk; a CUDA build, used on the CPU here).
TORCH  ?= torch==2.14.1 torchvision==0.29.1
DATA   ?= $(or $(SIMSEARCH_DATA),$(HOME)/.cache/simsearch-data)
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test test-deps setup weights clean

$(BIN)/simsearch: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[test]"
	@touch $@

setup: $(BIN)/simsearch

weights: setup
	$(BIN)/simsearch models --fetch

demo: weights
	$(BIN)/simsearch index examples/images --db demo.db
	$(BIN)/simsearch query examples/queries/cat_crop.jpg --db demo.db -k 5
	$(BIN)/simsearch query examples/images/gravel.jpg --db demo.db -k 3 --mode style
	$(BIN)/simsearch query examples/queries/cat_crop.jpg --db demo.db -k 3 --rerank

# What some tests need beyond pip: Debian's chromium (pages rendered in a real browser), the
# opencv-doc package's graf images (ground-truth homography for keypoint PCK) and the tuxpaint stamps
# (cut-out photos with alpha: co-segmentation ground truth), downloaded, not installed.
test-deps:
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; }
	@mkdir -p "$(DATA)/debs"
	@ls "$(DATA)"/debs/opencv-doc_*.deb >/dev/null 2>&1 || (cd "$(DATA)/debs" && apt-get download -qq opencv-doc)
	@ls "$(DATA)"/debs/tuxpaint-stamps-default_*.deb >/dev/null 2>&1 || (cd "$(DATA)/debs" && apt-get download -qq tuxpaint-stamps-default)

# Everything CI runs, nothing skipped for want of a download (SIMSEARCH_TEST_STRICT turns such skips into failures).
test: weights test-deps
	SIMSEARCH_TEST_STRICT=1 $(BIN)/python -m pytest -q --durations=10

clean:
	rm -rf demo.db .pytest_cache
