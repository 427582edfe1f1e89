# Two entry points for a fresh machine: `make demo` (the main job) and `make test` (the tests).
# Each creates .venv and installs what it needs into it.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SHARED_DATA := $(abspath ../shared/data)
# Here (no internet) the demo reads the official MNIST files from ../shared/data; elsewhere the
# configs' public mirrors are used. An explicit GROVE_MIRROR always wins.
DEMO_MIRROR := $(or $(GROVE_MIRROR),$(if $(wildcard $(SHARED_DATA)/mnist),file://$(SHARED_DATA),))

.PHONY: demo test bench clean venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python setup.cfg setup.py
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

$(VENV)/.installed-bench: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	GROVE_MIRROR=$(DEMO_MIRROR) $(BIN)/grove run mnist

# pytest exits 5 when it collected no tests; that is a failure here too.
test: $(VENV)/.installed
	$(BIN)/python -m pytest; status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$status

bench: $(VENV)/.installed-bench
	$(BIN)/python benchmarks/ann.py

clean:
	rm -rf $(VENV) artifacts build *.egg-info
