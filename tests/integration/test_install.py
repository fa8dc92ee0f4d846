"""The distribution installs into a user's own environment: `pip install .` into a fresh venv
outside the repository gives working console scripts from any directory, the runtime imports
there without the dev harness, and the built wheel carries the package and nothing else."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = ("pcelery-worker", "pcelery-relay", "pcelery-migrate", "pcelery-ops")
RUNTIME = ("pcelery", "pcelery.catalog", "pcelery.settings", "pcelery.sqs", "pcelery.messages", "pcelery.schema",
           "pcelery.store", "pcelery.outbox", "pcelery.relay", "pcelery.worker", "pcelery.celery_internals",
           "pcelery.cli", "pcelery.ops", "pcelery.ops.cli")  # not celeryconfig: loading it looks up the queues


def _clean_env(**extra: str) -> dict[str, str]:
    """No trace of the repository or the dev venv: what a user's shell would have."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PCELERY_", "PYTHON", "VIRTUAL_ENV", "DATABASE_URL", "AWS_ENDPOINT"))}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if str(REPO) not in p)
    return {**env, **extra}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """The image's build context, copied: exactly what the .dockerignore allowlist lets through.
    Building from it proves the context suffices, and no stale build/ of the checkout gets in."""
    context = tmp_path_factory.mktemp("context")
    for name in ("pyproject.toml", "requirements.txt"):
        shutil.copy(REPO / name, context / name)
    for folder in ("app", "ops"):
        shutil.copytree(REPO / folder, context / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return context


@pytest.fixture(scope="module")
def installed(source, tmp_path_factory) -> Path:
    """A fresh venv outside the repository with `pip install .` in it (what a user runs)."""
    where = tmp_path_factory.mktemp("user-venv")
    venv.EnvBuilder(with_pip=True).create(where / "venv")
    python = where / "venv" / "bin" / "python"
    done = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                           "-r", "requirements.txt", "."],
                          cwd=source, env=_clean_env(), capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return where / "venv"


def test_console_scripts_answer_help_from_any_directory(installed, tmp_path):
    for script in SCRIPTS:
        done = subprocess.run([str(installed / "bin" / script), "--help"], cwd=tmp_path, env=_clean_env(),
                              capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, f"{script} --help: {done.stderr}"
        assert "usage:" in done.stdout and "Traceback" not in done.stderr, script


def test_the_runtime_imports_without_the_dev_harness(installed, tmp_path):
    probe = ("import importlib, sys\n"
             f"for name in {RUNTIME!r}: importlib.import_module(name)\n"
             "assert importlib.util.find_spec('devstack') is None, 'the dev harness is importable'\n"
             "for generic in ('app', 'ops', 'catalog'):\n"
             "    assert importlib.util.find_spec(generic) is None, f'{generic} was installed'\n"
             "print(sorted(m for m in sys.modules if m.startswith('pcelery')))\n")
    # Importing the worker module builds the Celery app but must not reach SQS or a database.
    done = subprocess.run([str(installed / "bin" / "python"), "-c", probe], cwd=tmp_path,
                          env=_clean_env(PCELERY_TASK_MODULES="json"), capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert "pcelery.worker" in done.stdout


def test_ops_local_outside_a_checkout_says_what_it_needs(installed, tmp_path):
    done = subprocess.run([str(installed / "bin" / "pcelery-ops"), "local", "status"], cwd=tmp_path,
                          env=_clean_env(), capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "ops: error: `ops local` runs the dev harness of the repository (devstack/): run it from a checkout of the "
        "repository after `make setup`")


def test_the_wheel_carries_the_package_and_nothing_else(source, tmp_path):
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(tmp_path),
                           str(source)], cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    [wheel] = tmp_path.glob("persistent_celery-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    files = {n for n in names if not n.split("/")[0].endswith(".dist-info")}
    expected = {f"pcelery/{p.relative_to(REPO / 'app')}" for p in (REPO / "app").rglob("*")
                if p.suffix == ".py" or p.name == "py.typed"}
    expected |= {f"pcelery/ops/{p.name}" for p in (REPO / "ops").glob("*.py")}
    assert files == expected
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    for script in SCRIPTS:
        assert f"{script} = " in entry_points
