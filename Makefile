# The two README commands: `make demo` (set-up + quick-start federation) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist

.PHONY: setup data demo test test-fast bench-niid clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

# Fashion-MNIST comes from Debian's package when we are root with apt; otherwise say how.
data:
	@if [ ! -d "$(FMNIST_DIR)" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	      (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null); \
	  else \
	    echo "Fashion-MNIST not found in $(FMNIST_DIR): install Debian's dataset-fashion-mnist or set data.root"; \
	  fi; \
	fi

demo: setup data
	$(VENV)/bin/fedimb run experiments/quickstart.yaml --out runs/quickstart

# Two workers share the cores; a test that races a wall-clock round timeout waits for the cores to itself.
test: setup data
	$(PY) -m pytest -q -n 2 -m "not serial"
	$(PY) -m pytest -q -m serial

test-fast: setup
	$(PY) -m pytest -q -n 2 -m "not slow"

bench-niid: setup data
	$(PY) benchmarks/niid_bench.py

clean:
	rm -rf runs .pytest_cache
