# Two entry points for a fresh machine: `make demo` (the main job) and `make test` (the tests).
# Each creates .venv and installs what it needs into it.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SHARED_DATA := $(abspath ../shared/data)
# The demo builds and evaluates GloVe 6B 50d (400k words, shipped by a PyPI package: no network
# needed), prints a phrase query, then does the same for MNIST. MNIST comes from its public mirrors,
# or here (no internet) from ../shared/data when it is beside the checkout; GROVE_MIRROR wins. When
# neither a mirror nor the public URLs deliver (checked in a few seconds by tasks/demo.py), the demo
# says so and runs mnist-small: the 10,000 MNIST test images installed with grove.
DEMO_MIRROR := $(or $(GROVE_MIRROR),$(if $(wildcard $(SHARED_DATA)/mnist),file://$(SHARED_DATA),))

.PHONY: demo demo-mnist test bench clean venv warm

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The cnn extra brings torch and torchvision (PyPI; torch>=2.14 with torchvision>=0.29).
$(VENV)/.installed: $(BIN)/python setup.cfg setup.py
	$(BIN)/python -m pip install --quiet -e '.[test,cnn]'
	touch $@

$(VENV)/.installed-bench: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	touch $@

venv: $(VENV)/.installed warm

# Compile every numba kernel a build and a query use into numba's cache (pipeline/warm.py), so the
# first `grove run` and the first `grove query` do not wait for the compiler (the query kernel alone
# takes seconds). A few seconds when the cache already holds them.
warm: $(VENV)/.installed
	$(BIN)/python -m pipeline.warm

demo: $(VENV)/.installed warm
	$(BIN)/grove run glove
	$(BIN)/grove query glove "chinese river" --search-k 10000
	@$(MAKE) --no-print-directory demo-mnist

# The MNIST half of the demo: the full mnist when a mirror or the public mirrors deliver its files,
# else (saying so on the terminal) mnist-small from the files installed with grove.
demo-mnist: $(VENV)/.installed
	@export GROVE_MIRROR='$(DEMO_MIRROR)'; \
	mnist=$$($(BIN)/python -m tasks.demo) || exit $$?; \
	echo "$(BIN)/grove run $$mnist" && $(BIN)/grove run $$mnist && \
	echo "$(BIN)/grove query $$mnist test/0" && $(BIN)/grove query $$mnist test/0

# pytest exits 5 when it collected no tests; that is a failure here too.
test: $(VENV)/.installed
	$(BIN)/python -m pytest; status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$status

bench: $(VENV)/.installed-bench
	$(BIN)/python benchmarks/ann.py

clean:
	rm -rf $(VENV) artifacts build *.egg-info
