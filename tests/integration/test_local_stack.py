"""The local practice stack (`python -m ops local ...`, devstack.practice) as an operator's shell
uses it: `eval "$(... local up)"`, status, seed, `eval "$(... local down)"`; and what it says
when one of its processes dies. Every test has a state directory of its own (PCELERY_LOCAL_DIR)
and stops what it started."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import wait_for

from pcelery import schema, store

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
STACK_VARS = ("AWS_ENDPOINT_URL_SQS", "PCELERY_ENV", "PCELERY_CATALOG", "DATABASE_URL", "PYTHONPATH",
              "PCELERY_LOCAL_STACK")


def _shell_env(state: Path) -> dict[str, str]:
    """An operator's shell: the repository's virtualenv on PATH, no AWS or stack settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_ENDPOINT", "PCELERY_"))
           and k not in ("DATABASE_URL", "PYTHONPATH", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    env.update(PCELERY_LOCAL_DIR=str(state), PATH=f"{VENV_BIN}:{os.environ['PATH']}", AWS_EC2_METADATA_DISABLED="true")
    return env


def bash(script: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", f"set -u\n{script}"], check=False, cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def ops(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ops", *args], check=False, env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)


@pytest.fixture
def shell(tmp_path: Path) -> Iterator[dict[str, str]]:
    env = _shell_env(tmp_path / "local")
    yield env
    ops(env, "local", "down")  # whatever a test left running


def _stack(env: dict[str, str]) -> dict:
    return json.loads((Path(env["PCELERY_LOCAL_DIR"]) / "stack.json").read_text())


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] == "Z"
    except OSError:
        return True


def test_up_exports_and_down_gives_the_shell_back_what_it_had(shell):
    """`eval "$(... local up)"` points the shell at the stack; `eval "$(... local down)"` stops it
    and unsets (or restores) every variable up set, so nothing aimed at AWS runs against moto."""
    state = Path(shell["PCELERY_LOCAL_DIR"])
    assert ops(shell, "local", "status").returncode == 4
    script = """
export PYTHONPATH=/opt/mine
eval "$(python -m ops local up)"
VARS='^(AWS_ENDPOINT_URL_SQS|PCELERY_ENV|PCELERY_CATALOG|DATABASE_URL|PYTHONPATH|PCELERY_LOCAL_STACK)='
echo "--- up"; env | grep -E "$VARS" | sort
echo "--- status"; python -m ops local status; echo "status exit $?"
echo "--- again"; python -m ops local up
echo "--- down"; eval "$(python -m ops local down)"
env | grep -E "$VARS" | sort
echo "--- prod"; python -m ops depth --env prod --region eu-west-1; echo "prod exit $?"
"""
    proc = bash(script, {**shell, "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"})
    out = proc.stdout
    sections = dict(part.split("\n", 1) for part in out.split("--- ")[1:])
    exported = dict(line.split("=", 1) for line in sections["up"].split("\n") if "=" in line)
    assert exported["PCELERY_ENV"] == "local" and exported["PCELERY_CATALOG"] == "devstack:DEMO_CATALOG"
    assert exported["AWS_ENDPOINT_URL_SQS"].startswith("http://127.0.0.1:")
    assert exported["DATABASE_URL"] == f"sqlite:///{state / 'tasks.sqlite3'}"
    assert exported["PYTHONPATH"] == f"{REPO}:/opt/mine" and exported["PCELERY_LOCAL_STACK"] == str(state)
    assert "AWS_ACCESS_KEY_ID" not in sections["up"]  # the endpoint gets the emulators' keys by itself
    status = sections["status"]
    assert status.startswith("local stack: up\n") and "status exit 0" in status
    for name in ("moto", "worker", "relay"):
        assert f"{state / (name + '.log')}" in status and "running" in status
    assert f"state  {state} (PCELERY_LOCAL_DIR" in status
    assert "already up" in proc.stderr  # the second up: same stack
    # down gave back PYTHONPATH and unset the rest; the shell now talks to AWS, not moto.
    assert sections["down"].strip() == "PYTHONPATH=/opt/mine"
    assert "local stack down: stopped worker, relay, moto" in proc.stderr
    assert "prod exit 5" in sections["prod"] and "no AWS credentials" in proc.stderr
    assert "local stack" not in proc.stderr.split("local stack down")[-1]  # not refused as local any more
    stack = json.loads((state / "last-stack.json").read_text())
    assert all(_gone(pid) for pid in stack["pids"].values())

    # A down in a shell that never saw its eval prints the lines too (from the last stack's record).
    endpoint = exported["AWS_ENDPOINT_URL_SQS"]
    again = bash(f"export AWS_ENDPOINT_URL_SQS={endpoint} PCELERY_ENV=local\npython -m ops local down", shell)
    assert again.stdout.splitlines() == ["unset AWS_ENDPOINT_URL_SQS", "unset PCELERY_ENV"]
    assert "local stack is not up: nothing to stop" in again.stderr


def test_seed_says_which_task_each_id_is_and_what_to_expect(shell):
    up = ops(shell, "local", "up")
    assert up.returncode == 0, up.stderr
    seeded = ops(shell, "local", "seed")
    assert seeded.returncode == 0, seeded.stderr
    lines = seeded.stdout.splitlines()
    assert lines[0].split() == ["TASK", "ID", "TASK", "EXPECT"]
    rows = [ln.split(None, 2) for ln in lines[1:11]]
    assert [r[1] for r in rows] == ["demo.add"] * 5 + ["demo.always_fail"] * 3 + ["demo.flaky"] * 2
    assert rows[0][2] == "succeeds" and rows[5][2] == "fails 3 times, then its message is in the DLQ"
    assert rows[8][2] == "fails once, then succeeds on attempt 2"
    assert "submitted 10 tasks; the failing ones reach the DLQ in about 30 s" in seeded.stdout
    as_json = json.loads(ops(shell, "local", "seed", "--task", "demo.add", "--count", "3", "-o", "json").stdout)
    assert [t["task"] for t in as_json["tasks"]] == ["demo.add"] * 3
    # The stack's own worker runs them.
    engine = schema.make_engine(_stack(shell)["database_url"])
    try:
        wait_for(lambda: store.count_by_state(engine)["succeeded"] >= 8, timeout=90, interval=0.5,
                 what="the seeded adds to succeed")
    finally:
        engine.dispose()
    bad = ops(shell, "local", "seed", "--task", "demo.nope")
    assert bad.returncode == 2 and "it knows demo.add, demo.always_fail" in bad.stderr


def test_status_and_down_name_the_process_that_died_how_and_when(shell):
    up = ops(shell, "local", "up")
    assert up.returncode == 0, up.stderr
    state = Path(shell["PCELERY_LOCAL_DIR"])
    supervisor = _stack(shell)["pids"]["worker"]
    [worker] = [int(p) for p in Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()]
    os.kill(worker, signal.SIGKILL)  # the worker dies (an OOM kill, say)
    wait_for(lambda: (state / "worker.exit.json").exists(), timeout=30, what="the worker's exit record")

    status = ops(shell, "local", "status")
    assert status.returncode == 4
    assert status.stdout.startswith("local stack: partly down: worker not running (its log says why)\n")
    [worker_line] = [ln for ln in status.stdout.splitlines() if ln.startswith("worker ")]
    assert "killed by SIGKILL at " in worker_line and worker_line.rstrip().endswith(str(state / "worker.log"))
    assert 'restart it: eval "$(python -m ops local down)"; eval "$(python -m ops local up)"' in status.stdout
    data = json.loads(ops(shell, "local", "status", "-o", "json").stdout)
    worker_status = data["processes"]["worker"]
    assert worker_status["alive"] is False and worker_status["exit"]["signal"] == "SIGKILL"
    assert worker_status["exit"]["exit_code"] == -9 and worker_status["exit"]["exited_at"].endswith("Z")
    assert data["processes"]["relay"]["alive"] and data["processes"]["relay"]["exit"] is None
    # No process of the worker's (its pool) is left behind.
    assert _gone(worker) and _gone(supervisor)

    down = ops(shell, "local", "down")
    assert down.returncode == 0
    assert ("local stack down: stopped relay, moto; worker had already died (killed by SIGKILL at "
            in down.stderr) and f"its log: {state / 'worker.log'})" in down.stderr


def test_local_help_shows_only_what_applies_and_where_the_state_lives(shell):
    for args in (["local", "--help"], ["local", "up", "--help"], ["local", "status", "--help"]):
        proc = ops(shell, *args)
        assert proc.returncode == 0
        for absent in ("--endpoint-url", "--profile", "--region", "--env", "--catalog"):
            assert absent not in proc.stdout, (args, absent)
        assert "$PCELERY_LOCAL_DIR (default: var/local in the repository" in " ".join(proc.stdout.split())
    assert "--output" in ops(shell, "local", "up", "--help").stdout


def test_a_nul_byte_in_a_task_never_makes_the_worker_log_binary(shell):
    """grep must keep reading the worker's log after a task with a NUL byte in its arguments, its
    error and its id ran."""
    up = ops(shell, "local", "up")
    assert up.returncode == 0, up.stderr
    stack = _stack(shell)
    submit = ("from pcelery.outbox import Outbox\nfrom pcelery.settings import Settings\n"
              "box = Outbox.from_settings(Settings.from_env())\n"
              "with box.transaction() as conn:\n"
              "    print(box.submit(conn, 'demo.always_fail', 'bad\\x00reason'))\n"
              "    print(box.submit(conn, 'demo.add', 'a\\x00', 'b'))\n")
    proc = subprocess.run([sys.executable, "-c", submit], check=False, cwd=REPO, capture_output=True, text=True,
                          env={**shell, **stack["shell"]}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    failing, adding = proc.stdout.split()
    engine = schema.make_engine(stack["database_url"])
    try:
        wait_for(lambda: (store.get_task(engine, adding).state == "succeeded"
                          and store.get_task(engine, failing).attempts >= 1), timeout=60, what="both tasks to run")
    finally:
        engine.dispose()
    time.sleep(1)
    log = (Path(shell["PCELERY_LOCAL_DIR"]) / "worker.log").read_bytes()
    grep = subprocess.run(["grep", "-c", "demo.add", str(Path(shell["PCELERY_LOCAL_DIR"]) / "worker.log")],
                          check=False, capture_output=True, text=True)
    assert b"\0" not in log and "binary file" not in (grep.stdout + grep.stderr).lower()
