"""What the image needs stays in step with the package, and the runtime stands alone.

Read from the files themselves (no build, no subprocess): pyproject.toml's package-dir is what
the Dockerfile copies and what the .dockerignore allowlist lets into the build context (which the
CDK image asset reads too); every entry point the image and the CDK task definitions use is a
declared console script that resolves; the runtime imports nothing from the dev harness, the
tests or the CDK app; the lock pins every direct dependency within its range. The wheel itself is
built and installed into a fresh venv in tests/integration/test_install.py.
"""

from __future__ import annotations

import ast
import importlib
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PACKAGE_DIRS = PYPROJECT["tool"]["setuptools"]["package-dir"]  # {"pcelery": "app", "pcelery.ops": "ops"}
SCRIPTS = PYPROJECT["project"]["scripts"]
DOCKERFILE = (REPO / "Dockerfile").read_text()


def test_the_package_is_app_and_ops_under_distinctive_names():
    assert PACKAGE_DIRS == {"pcelery": "app", "pcelery.ops": "ops"}
    # Every folder with an __init__.py under app/ ships: a subpackage missing from this list would
    # be left out of the wheel without a word.
    subpackages = sorted(".".join(("pcelery", *init.parent.relative_to(REPO / "app").parts))
                         for init in (REPO / "app").rglob("__init__.py") if init.parent != REPO / "app")
    assert PYPROJECT["tool"]["setuptools"]["packages"] == ["pcelery", "pcelery.ops", *subpackages]
    assert subpackages == ["pcelery.django", "pcelery.django.management", "pcelery.django.management.commands",
                           "pcelery.django.migrations"]
    assert set(SCRIPTS) == {"pcelery-worker", "pcelery-relay", "pcelery-migrate", "pcelery-ops", "pcelery-scheduler"}


def test_every_console_script_resolves_to_a_callable():
    for name, target in SCRIPTS.items():
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), f"{name} -> {target}"


def _dockerfile_copies() -> set[str]:
    return {src.rstrip("/") for src in re.findall(r"^COPY\s+(?!--from)(\S+)\s+\S+", DOCKERFILE, re.MULTILINE)}


def test_the_dockerfile_builds_the_wheel_from_exactly_the_package_and_the_lock():
    assert _dockerfile_copies() == {"requirements.txt", "pyproject.toml", *PACKAGE_DIRS.values()}
    assert "pip install --no-cache-dir -r requirements.txt" in DOCKERFILE  # the lock, not the ranges
    assert re.search(r"pip wheel .*--no-deps .* \.", DOCKERFILE)
    [entrypoint] = re.findall(r'^ENTRYPOINT \["([^"]+)"\]$', DOCKERFILE, re.MULTILINE)
    assert entrypoint == "pcelery-worker" and entrypoint in SCRIPTS


def test_the_build_context_allowlist_is_what_the_dockerfile_copies():
    lines = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*", ".dockerignore must start by excluding everything (an allowlist)"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert allowed == {"Dockerfile", *_dockerfile_copies()}
    for never in ("devstack", "tests", "infra", "bench", ".venv", "var"):
        assert never not in allowed


def _constant(path: Path, name: str) -> object:
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{name} not found in {path}")


def test_the_cdk_task_definitions_run_declared_console_scripts():
    # Read without importing infra (aws_cdk starts a node process).
    commands = {
        "worker": _constant(REPO / "infra" / "workers.py", "WORKER_ENTRY_POINT"),
        "migrate": _constant(REPO / "infra" / "workers.py", "MIGRATE_COMMAND"),
        "relay": _constant(REPO / "infra" / "relay.py", "RELAY_COMMAND"),
        "ops": _constant(REPO / "infra" / "relay.py", "OPS_ENTRY_POINT"),
    }
    assert commands == {"worker": ["pcelery-worker"], "migrate": ["pcelery-migrate"], "relay": ["pcelery-relay"],
                        "ops": ["pcelery-ops"]}
    for command in commands.values():
        assert command[0] in SCRIPTS


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every import statement of a file."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, id(node) in top))
    return found


def test_the_runtime_imports_nothing_from_the_harness_the_tests_or_the_cdk_app():
    foreign = ("devstack", "tests", "conftest", "infra", "bench", "aws_cdk", "moto")
    generic = ("app", "ops", "catalog")  # the old top-level names, which would collide with a user's
    for path in sorted((REPO / "app").glob("*.py")):
        for module, _ in _imports(path):
            root = module.split(".")[0]
            assert root not in foreign + generic, f"{path.relative_to(REPO)} imports {module}"
    for path in sorted((REPO / "ops").glob("*.py")):
        for module, top_level in _imports(path):
            root = module.split(".")[0]
            assert root not in generic, f"{path.relative_to(REPO)} imports {module}"
            # `ops local` drives the dev harness, imported where the command runs (with a clear
            # error outside a checkout), never when the package is imported.
            assert root not in foreign or (root == "devstack" and not top_level), \
                f"{path.relative_to(REPO)} imports {module}"


def test_the_lock_pins_every_direct_dependency_within_its_range():
    pins = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", (REPO / "requirements.txt").read_text(), re.MULTILINE))
    pins = {name.lower().replace("_", "-"): version for name, version in pins.items()}
    for raw in PYPROJECT["project"]["dependencies"]:
        req = Requirement(raw)
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{name} is a dependency but requirements.txt does not pin it: run `make lock`"
        assert req.specifier.contains(pins[name]), f"requirements.txt pins {name}=={pins[name]} outside {req}"
        for extra in req.extras:  # celery[sqs]: what the extra brings is pinned too
            assert extra != "sqs" or {"pycurl", "boto3"} <= set(pins)
    dev_pins = (REPO / "requirements-dev.txt").read_text()
    for name, version in pins.items():
        if re.search(rf"^{re.escape(name)}==", dev_pins, re.MULTILINE | re.IGNORECASE):
            assert re.search(rf"^{re.escape(name)}=={re.escape(version)}$", dev_pins, re.MULTILINE | re.IGNORECASE), \
                f"requirements-dev.txt pins {name} differently from requirements.txt: run `make lock`"
