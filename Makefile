# Two commands do all the set-up on a fresh machine (README.md): `make demo` and `make test`.
# Each installs what it needs first, from the lock files, and says so as it goes; installs are
# skipped when their inputs are unchanged. `make setup` is what the demo, ops and `npx cdk` need
# (.venv and node_modules); `make test` adds LocalStack's virtualenv, which only its
# native-redrive tests use. `make lock` re-pins the lock files from pyproject.toml and the *.in
# files.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
LSVENV := .venv-localstack
# uv installs the locks (into both virtualenvs) in seconds, with progress; pip only installs uv.
UV := $(VENV)/bin/uv
# pyenv's python3.13 shim refuses to run unless 3.13 is selected, so prefer the real binary.
PY313 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.13*/bin/python3.13) python3.13)
export JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION := 20

.PHONY: setup setup-localstack demo test test-fast lint typecheck lock synth bench example-wheel clean

setup: $(VENV)/.installed node_modules/.installed
	@echo "make setup: done. Run ops with .venv/bin/pcelery-ops (or '. .venv/bin/activate', then pcelery-ops or" \
	  "python -m ops); the CDK CLI is npx cdk."

setup-localstack: $(LSVENV)/.installed

# The locked runtime and dev dependencies, then the package itself, editable (no deps: the
# locks have them all).
$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	@echo "==> $(VENV): Python 3.11 virtualenv with the locked dependencies and this package, editable" \
	  "(about 15 s; a minute or two on a cold download cache)"
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet "$$(grep -m1 '^uv==' requirements-dev.txt)"
	$(UV) pip install --python $(VENV)/bin/python -r requirements.txt -r requirements-dev.txt
	$(UV) pip install --python $(VENV)/bin/python --no-deps -e .
	touch $@

# The CDK CLI, pinned to v2 in package.json (npm's `latest` is a broken 3.0.0).
node_modules/.installed: package.json package-lock.json
	@echo "==> node_modules: the CDK CLI pinned in package-lock.json, for npx cdk (a few seconds)"
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

# LocalStack needs Python 3.13; only the native-redrive tests (and bench) use it.
$(LSVENV)/.installed: requirements-localstack.txt | $(VENV)/.installed
	@echo "==> $(LSVENV): LocalStack's Python 3.13 virtualenv, for the native-redrive tests (about 15 s)"
	test -x $(LSVENV)/bin/python || $(PY313) -m venv $(LSVENV)
	$(UV) pip install --python $(LSVENV)/bin/python -r requirements-localstack.txt
	touch $@

demo: setup
	$(VENV)/bin/python -m devstack.demo

# What .ci/run runs: lint, type-check, then the whole suite (unit and integration tiers).
# Both tiers, a test file per worker process on two cores (-n 2): the integration tier mostly
# waits on its processes. A file stays on one worker, so its module fixtures are shared as written.
test: setup $(LSVENV)/.installed lint typecheck
	$(VENV)/bin/python -m pytest -n 2 --dist loadfile

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

synth: $(VENV)/.installed node_modules/.installed
	npx --no-install cdk synth --quiet

# Not part of `make test`: plain Celery against the product side by side on LocalStack (about 7
# minutes on 2 cores); prints the tables and writes bench/RESULTS.md. ARGS=... passes options on.
bench: $(VENV)/.installed
	$(MAKE) --no-print-directory $(LSVENV)/.installed
	$(VENV)/bin/python -m bench.run $(ARGS)

# The example project's image installs persistent-celery from its wheels/ folder (a team
# installs it from its own package index instead): build it before `cdk deploy` of dev/staging.
example-wheel: $(VENV)/.installed
	rm -f examples/django_shop/wheels/*.whl
	$(VENV)/bin/pip wheel --quiet --no-deps --wheel-dir examples/django_shop/wheels .

clean:
	rm -rf $(VENV) $(LSVENV) node_modules cdk.out var build *.egg-info
