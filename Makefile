# Set-up and entry points. `make demo` and `make test` work on a fresh machine with Python 3.10+.
VENV ?= .venv
PY := $(VENV)/bin/python
# Pin the CPU build of PyTorch: an unpinned `torch` pulls a multi-GB CUDA build.
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=

.PHONY: setup demo test bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# The main job on the built-in workload: train the model zoo once (~6 min on 2 cores, cached in demo-output/zoo),
# then hybridize its long chain-of-thought model and compare teacher and hybrid.
demo: setup
	test -f demo-output/zoo/zoo.json || $(VENV)/bin/suture workload build demo-output/zoo --force
	$(VENV)/bin/suture demo demo-output/hybrid-demo --teacher demo-output/zoo/long --force

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/bench_scan.py --quick
	$(PY) benchmarks/bench_decode.py --quick

clean:
	rm -rf $(VENV) demo-output benchmarks/results .pytest_cache
