# Set-up and entry points. `make demo` and `make test` work on a fresh machine with Python 3.11+.
VENV ?= .venv
PY := $(VENV)/bin/python
# Pin the CPU build of PyTorch: an unpinned `torch` pulls a multi-GB CUDA build.
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=
# The exact versions `make setup` installs; `make lock` regenerates the file.
CONSTRAINTS := constraints.txt
# The model / cache / generation / export / merge-parity tests that `make test-compat` runs at both ends of the
# transformers range declared in pyproject.toml.
COMPAT_TESTS ?= tests/test_generation.py tests/test_hybrid_model.py tests/test_mixers.py tests/test_config.py \
	tests/test_export.py tests/test_hybridize.py tests/test_merge_engine.py tests/test_lora.py tests/test_layer_kinds.py \
	tests/test_packing.py tests/test_sambay.py tests/test_decode_capture.py
TRANSFORMERS_FLOOR = $(shell sed -n 's/^ *"transformers>=\([0-9.]*\),.*/\1/p' pyproject.toml)

.PHONY: setup demo test test-compat test-compat-oldest test-compat-newest lock bench clean

# The gpu extra brings triton (no CUDA torch: triton depends on nothing), so `make test` runs suture's Triton kernels
# in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 when there is no GPU).
$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e ".[dev,gpu]"
	touch $@

setup: $(VENV)/.installed

# The main job on the built-in workload: train the zoo's base and long chain-of-thought models once (~8 min on 2
# cores, cached in demo-output/zoo; the benchmarks that need the zoo's other models add them), then hybridize the
# long model (half of its layers become Mamba: those the MMR probe ranks most replaceable), distil the hybrid with the default recipe cut to DEMO_BUDGET of its steps (a few minutes), and
# compare teacher, fresh hybrid and distilled hybrid.
DEMO_BUDGET ?= 0.4
demo: setup
	test -f demo-output/zoo/zoo.json || $(VENV)/bin/suture workload build demo-output/zoo --models long --force
	$(VENV)/bin/suture demo demo-output/hybrid-demo --teacher demo-output/zoo/long --force \
		--ratio 0.5 --probe mmr --distill default --distill-budget $(DEMO_BUDGET)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Both ends of the declared transformers range, each in its own venv with the pinned CPU torch: the oldest release
# the range allows (everything else from the lock), and the newest of everything the ranges allow today, so that a
# new upstream release that breaks suture turns CI red.
test-compat: test-compat-oldest test-compat-newest

test-compat-oldest:
	python3 -m venv .venv-oldest
	.venv-oldest/bin/python -m pip install --quiet torch==$(TORCH_VERSION)
	grep -v '^transformers==' $(CONSTRAINTS) > .venv-oldest/constraints.txt
	.venv-oldest/bin/python -m pip install --quiet -c .venv-oldest/constraints.txt -e ".[dev]" \
		"transformers==$(TRANSFORMERS_FLOOR)"
	.venv-oldest/bin/python -c "import transformers as t; print('transformers', t.__version__)"
	.venv-oldest/bin/python -m pytest -q -p no:cacheprovider $(COMPAT_TESTS) $(PYTEST_ARGS)

test-compat-newest:
	python3 -m venv .venv-newest
	.venv-newest/bin/python -m pip install --quiet torch==$(TORCH_VERSION)
	echo "torch==$(TORCH_VERSION)" > .venv-newest/torch.txt
	.venv-newest/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -c .venv-newest/torch.txt \
		-e ".[dev]"
	.venv-newest/bin/python -c "import transformers as t; print('transformers', t.__version__)"
	.venv-newest/bin/python -m pytest -q -p no:cacheprovider $(COMPAT_TESTS) $(PYTEST_ARGS)

# Regenerate constraints.txt from a fresh venv holding the newest versions the ranges in pyproject.toml allow.
lock:
	rm -rf .venv-lock
	python3 -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet torch==$(TORCH_VERSION)
	.venv-lock/bin/python -m pip install --quiet -e ".[dev,gpu]"
	{ echo "# Exact versions that \`make setup\` installs (pip constraints; Python 3.11, CPU build of PyTorch)."; \
	  echo "# Regenerate with \`make lock\` after changing the dependencies in pyproject.toml."; \
	  .venv-lock/bin/python -m pip freeze --exclude-editable | sed 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/'; \
	} > $(CONSTRAINTS)
	rm -rf .venv-lock

bench: setup
	$(PY) benchmarks/bench_scan.py --quick
	$(PY) benchmarks/bench_decode.py --quick

clean:
	rm -rf $(VENV) .venv-oldest .venv-newest .venv-lock demo-output benchmarks/results .pytest_cache
