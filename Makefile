# Two commands do all the set-up on a fresh machine (README.md): `make demo` and `make test`.
# Each installs what it needs first, from the lock files; installs are skipped when their inputs
# are unchanged. `make lock` re-pins the lock files from pyproject.toml and the *.in files.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
LSVENV := .venv-localstack
# pyenv's python3.13 shim refuses to run unless 3.13 is selected, so prefer the real binary.
PY313 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.13*/bin/python3.13) python3.13)
export JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION := 20

.PHONY: setup demo test test-fast lint typecheck lock synth bench example-wheel clean

setup: $(VENV)/.installed node_modules/.installed $(LSVENV)/.installed

# The locked runtime and dev dependencies, then the package itself, editable (no deps: the
# locks have them all).
$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt -r requirements-dev.txt
	$(VENV)/bin/pip install --quiet --no-deps -e .
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
	$(VENV)/bin/python -m devstack.demo

# What .ci/run runs: lint, type-check, then the whole suite (unit and integration tiers).
test: setup lint typecheck
	$(VENV)/bin/python -m pytest

# The unit tier alone: no subprocesses, well under 30 s.
test-fast: $(VENV)/.installed
	$(VENV)/bin/python -m pytest tests/unit -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

# mypy cannot follow setuptools' editable finder (app/ and ops/ are installed as pcelery and
# pcelery.ops), so it checks a tree of symlinks laid out as the wheel lays the package out, and
# the paths it reports are turned back into the repository's.
typecheck: $(VENV)/.installed
	rm -rf build/typecheck && mkdir -p build/typecheck
	cp -rs $(CURDIR)/app build/typecheck/pcelery
	cp -rs $(CURDIR)/ops build/typecheck/pcelery/ops
	cp -rs $(CURDIR)/devstack build/typecheck/devstack
	set -o pipefail; cd build/typecheck && ../../$(VENV)/bin/mypy --config-file ../../pyproject.toml \
	  -p pcelery -p devstack | sed -e 's#^pcelery/ops/#ops/#' -e 's#^pcelery/#app/#'

lock: $(VENV)/.installed
	$(VENV)/bin/uv pip compile pyproject.toml -o requirements.txt --python-version 3.11 --custom-compile-command "make lock" -q
	$(VENV)/bin/uv pip compile requirements-dev.in -o requirements-dev.txt --python-version 3.11 --custom-compile-command "make lock" -q
	$(VENV)/bin/uv pip compile requirements-localstack.in -o requirements-localstack.txt --python-version 3.13 --custom-compile-command "make lock" -q

synth: setup
	npx --no-install cdk synth --quiet

# Not part of `make test`: figures go to bench/RESULTS.md by hand, measured side by side.
bench: $(VENV)/.installed
	$(VENV)/bin/python -m bench.run

# The example project's image installs persistent-celery from its wheels/ folder (a team
# installs it from its own package index instead): build it before `cdk deploy` of dev/staging.
example-wheel: $(VENV)/.installed
	rm -f examples/django_shop/wheels/*.whl
	$(VENV)/bin/pip wheel --quiet --no-deps --wheel-dir examples/django_shop/wheels .

clean:
	rm -rf $(VENV) $(LSVENV) node_modules cdk.out var build *.egg-info
