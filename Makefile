# `make demo` and `make test` do all the set-up themselves (idempotent): a .venv at the repository root
# with the package and its test extras. On a machine without a GPU the CPU build of torch goes in first.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(VPY) -m pip install -q torch==2.13.0; fi
	$(VPY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: setup
	$(VPY) -m flotilla demo

test: setup
	$(VPY) -m pytest -q tests

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
