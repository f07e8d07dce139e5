# `make demo` and `make test` do all the set-up themselves (idempotent): a .venv at the repository root
# with the package and its test extras. On a machine without a GPU the CPU build of torch goes in first:
# from PyTorch's CPU index where it is reachable (a plain `pip install torch` would bring the CUDA build and
# several GB), else the plain pin (machines whose pip is set up with a local CPU wheel, as here).
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: setup demo test test-unit test-e2e lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then \
	  $(VPY) -m pip install -q --timeout 15 --retries 0 --index-url $(TORCH_CPU_INDEX) torch==$(TORCH_VERSION) 2>/dev/null || \
	  $(VPY) -m pip install -q torch==$(TORCH_VERSION); fi
	$(VPY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: setup
	$(VPY) -m flotilla demo

# the whole suite, unit and end-to-end (the README's one command). Two pytest-xdist workers even on the 2-core CI
# machine: most end-to-end time is waiting (process starts, heartbeats, Ray), not CPU (560-580 s on a 2-core machine,
# 2026-12-07; three workers took 599 s). --dist loadfile keeps each module in one worker, so its module-scoped
# engines and Ray cluster are built once. The slowest tests are listed at the end, so a slower run says where.
# TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: setup
	$(VPY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 tests

# fast unit tests only: fakes, no processes, no engines (tests/conftest.py marks the rest `e2e`)
test-unit: setup
	$(VPY) -m pytest -q -m "not e2e" tests

test-e2e: setup
	$(VPY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m e2e tests

# ruff and mypy over the package, configured in pyproject.toml
lint: setup
	$(VPY) -m ruff check flotilla
	$(VPY) -m mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
