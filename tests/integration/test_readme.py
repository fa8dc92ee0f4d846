"""README.md's code blocks run as written.

Every fenced block has a language: `sh` blocks run in a fresh bash at the repository's root, in
the environment of a new shell (no virtualenv active, no AWS or stack settings); `python` blocks
run with .venv's Python against a local stack (`ops local up`), as the README says; `text` blocks
are pictures. A block whose first line is a marker (`# needs ...`: AWS, a Django project;
`# not in CI: ...`) is parsed instead: Python compiled, shell checked by `bash -n`, each `make`
line by `make -n`, each ops line by the CLI's parser (OPS_PARSE_ONLY=1).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import wait_for

from pcelery import schema, store

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
VENV_PY = Path(sys.executable)
MARKERS = ("# needs ", "# not in CI")
LANGUAGES = ("sh", "python", "text")
BLOCK = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)

# What `make demo` prints when every expectation of the demo held (devstack/demo.py).
DEMO_LINES = (
    "ok    10 normal tasks succeeded with the right results",
    "ok    flaky task failed once, then succeeded on attempt 2",
    "ok    always-failing task ran 3 times, is dead",
    "ok    poison message (an id with no row) is in the DLQ; the worker kept serving",
    "ok    long task ran once: 1 attempt, 1 effect, its message received once",
    "worker-1 (pid",
    "ok    the killed worker's task completed on worker-2 (attempt 2, effect once)",
    "this run's tasks by state: ",
    " succeeded=13, failed=0, dead=1",
    "DLQ depth: pcelery-local-default-dlq=2, pcelery-local-long-dlq=0",
    "demo passed",
)


@dataclass(frozen=True)
class Block:
    language: str
    body: str
    line: int

    @property
    def marked(self) -> bool:
        first = self.body.lstrip().splitlines()[0] if self.body.strip() else ""
        return first.startswith(MARKERS)

    def __str__(self) -> str:
        return f"README.md:{self.line} ({self.language})"


def blocks() -> list[Block]:
    return [Block(m.group(1).strip(), m.group(2), README[:m.start()].count("\n") + 1) for m in BLOCK.finditer(README)]


def _ids(selected: list[Block]) -> list[str]:
    return [f"line{b.line}" for b in selected]


def shell_env(state: Path) -> dict[str, str]:
    """A new operator's shell: no virtualenv on PATH, nothing of AWS, a stack or the tests."""
    venv_bin = str(VENV_PY.parent)
    path = ":".join(p for p in os.environ["PATH"].split(":") if p != venv_bin)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "PCELERY_", "MAKE", "VIRTUAL_ENV")) and k not in (
               "DATABASE_URL", "PYTHONPATH", "MFLAGS")}
    env.update(PATH=path, PCELERY_LOCAL_DIR=str(state), AWS_EC2_METADATA_DISABLED="true")
    return env


def test_every_block_is_run_or_marked():
    found = blocks()
    assert len(found) >= 7, "the README lost its examples"
    for b in found:
        assert b.language in LANGUAGES, f"{b}: give the block a language ({', '.join(LANGUAGES)})"
        if b.language == "text":
            continue
        assert b.body.strip(), f"{b}: empty block"
    run = [b for b in found if b.language != "text" and not b.marked]
    assert {b.language for b in run} == {"sh", "python"}, "the README must show runnable shell and Python"


@pytest.mark.parametrize("block", [b for b in blocks() if b.language != "text" and b.marked],
                         ids=_ids([b for b in blocks() if b.language != "text" and b.marked]))
def test_marked_blocks_parse(block: Block, tmp_path: Path):
    if block.language == "python":
        compile(block.body, str(block), "exec")
        return
    check = subprocess.run(["bash", "-n", "-c", block.body], check=False, capture_output=True, text=True)
    assert check.returncode == 0, f"{block}: {check.stderr}"
    for line in block.body.splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("make "):
            dry = subprocess.run(["make", "-n", *line.split()[1:]], check=False, cwd=REPO, capture_output=True,
                                 text=True, timeout=60, env=shell_env(tmp_path / "local"))
            assert dry.returncode == 0, f"{block}: {line}: {dry.stderr}"
        elif "python -m ops" in line or "pcelery-ops" in line:
            env = {**shell_env(tmp_path / "local"), "OPS_PARSE_ONLY": "1",
                   "PATH": f"{VENV_PY.parent}:{os.environ['PATH']}"}
            parsed = subprocess.run(["bash", "-c", line], check=False, cwd=REPO, capture_output=True, text=True,
                                    timeout=60, env=env)
            assert parsed.returncode == 0, f"{block}: {line}: {parsed.stderr}"


SH_BLOCKS = [b for b in blocks() if b.language == "sh" and not b.marked]


@pytest.mark.parametrize("block", SH_BLOCKS, ids=_ids(SH_BLOCKS))
def test_shell_blocks_run_as_written(block: Block, tmp_path: Path):
    state = tmp_path / "local"
    env = shell_env(state)
    try:
        proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block.body], check=False, cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=280, stdin=subprocess.DEVNULL)
    finally:  # a block that starts the local stack and fails half-way must not leave it running
        subprocess.run([str(VENV_PY), "-m", "ops", "local", "down"], check=False, cwd=REPO, env=env,
                       capture_output=True, timeout=60)
    assert proc.returncode == 0, f"{block} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr
    if "make demo" in block.body:
        for line in DEMO_LINES:
            assert line in proc.stdout, f"missing {line!r} in:\n{proc.stdout}"
        assert "FAIL" not in proc.stdout
        version = subprocess.run(["npx", "--no-install", "cdk", "--version"], check=False, cwd=REPO,
                                 capture_output=True, text=True, timeout=120, env=env)
        assert version.returncode == 0 and version.stdout.startswith("2."), version.stderr
    if "local up" in block.body:
        assert "local stack: up" in proc.stdout and "TASK ID" in proc.stdout and "QUEUE" in proc.stdout
        stack = json.loads((state / "last-stack.json").read_text())
        assert all(not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
                   for pid in stack["pids"].values())


@pytest.fixture
def local_stack(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A running local stack and a shell environment pointing at it (its exports applied)."""
    env = shell_env(tmp_path / "local")
    up = subprocess.run([str(VENV_PY), "-m", "ops", "local", "up"], check=False, cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)
    assert up.returncode == 0, up.stderr
    exports = dict(line.removeprefix("export ").split("=", 1) for line in up.stdout.splitlines())
    try:
        yield {**env, **exports}
    finally:
        subprocess.run([str(VENV_PY), "-m", "ops", "local", "down"], check=False, cwd=REPO, env=env,
                       capture_output=True, timeout=60)


PY_BLOCKS = [b for b in blocks() if b.language == "python" and not b.marked]


def test_python_blocks_run_as_written_against_the_local_stack(local_stack, tmp_path):
    assert PY_BLOCKS
    for block in PY_BLOCKS:
        proc = subprocess.run([str(VENV_PY), "-c", block.body], check=False, cwd=tmp_path, env=local_stack,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{block} failed:\n{proc.stdout}\n{proc.stderr}"
    # What the submit example sent runs on the stack's worker, to success.
    engine = schema.make_engine(local_stack["DATABASE_URL"])
    try:
        def done() -> bool:
            rows = store.list_tasks(engine, limit=100)
            return bool(rows) and all(r.state == "succeeded" for r in rows)

        wait_for(done, timeout=90, interval=0.5, what="the README's submitted tasks to succeed")
        assert {r.task_name for r in store.list_tasks(engine, limit=100)} == {"demo.add", "demo.flaky"}
    finally:
        engine.dispose()


def test_make_installs_what_each_command_needs_and_says_so(tmp_path):
    """On a fresh checkout (no install stamps): `make demo` and `make setup` install .venv and
    node_modules (so `npx cdk` works after the demo) but not LocalStack's virtualenv, which only
    `make test` needs; each install says what it is doing before it starts."""
    for name in ("Makefile", "pyproject.toml", "package.json", "package-lock.json", "requirements.txt",
                 "requirements-dev.txt", "requirements-localstack.txt"):
        (tmp_path / name).write_bytes((REPO / name).read_bytes())
    env = shell_env(tmp_path / "local")

    def planned(target: str) -> str:
        dry = subprocess.run(["make", "-n", target], check=False, cwd=tmp_path, capture_output=True, text=True,
                             timeout=60, env=env)
        assert dry.returncode == 0, dry.stderr
        return dry.stdout

    for target in ("demo", "setup", "synth"):
        plan = planned(target)
        assert "npm ci" in plan and "pip install" in plan, (target, plan)
        assert ".venv-localstack" not in plan, (target, plan)
    assert "-m devstack.demo" in planned("demo") and "cdk synth" in planned("synth")
    plan = planned("test")
    assert ".venv-localstack" in plan and "npm ci" in plan and "-m pytest" in plan
    assert plan.count("echo \"==> ") >= 3  # a line before each install: .venv, node_modules, LocalStack's
