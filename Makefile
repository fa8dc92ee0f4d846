# Two commands do all the set-up on a fresh machine (README.md): `make demo` and `make test`.
# Each installs what it needs first; the installs are skipped when their inputs are unchanged.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
LSVENV := .venv-localstack
# pyenv's python3.13 shim refuses to run unless 3.13 is selected, so prefer the real binary.
PY313 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.13*/bin/python3.13) python3.13)
export JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION := 20

.PHONY: setup demo test lint synth bench clean

setup: $(VENV)/.installed node_modules/.installed $(LSVENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements-dev.txt
	touch $@

# The CDK CLI, pinned to v2 in package.json (npm's `latest` is a broken 3.0.0).
node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

# LocalStack needs Python 3.13; only the native-redrive tests use it.
$(LSVENV)/.installed: requirements-localstack.txt
	test -x $(LSVENV)/bin/python || $(PY313) -m venv $(LSVENV)
	$(LSVENV)/bin/pip install --quiet -r requirements-localstack.txt
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/python -m app.demo

test: setup
	$(VENV)/bin/python -m pytest

# Not part of `make test`: figures go to bench/RESULTS.md by hand, measured side by side.
bench: $(VENV)/.installed
	$(VENV)/bin/python -m bench.run

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

synth: setup
	npx cdk synth --quiet

clean:
	rm -rf $(VENV) $(LSVENV) node_modules cdk.out var
