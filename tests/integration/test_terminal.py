"""The ops CLI on a real terminal (a pty, tests/terminal.py), as an on-call engineer sees it at
3 a.m.: tables that fit 80 to 120 columns, colour only on a terminal, `depth --watch` refreshing
the data on stdout, a progress bar with rate and ETA on long moves, and tab completion."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import LocalEnv, reset_moto
from terminal import ANSI, on_terminal, plain

from pcelery import store

REPO = Path(__file__).resolve().parents[2]
OPS = [sys.executable, "-m", "ops"]
LONG_ERROR = ("RuntimeError: the payment provider answered 503 Service Unavailable for order 123456 after 3 retries "
              "with backoff; see https://status.example.com/incidents/2026-11-30 for details")


@pytest.fixture
def stack(sqs_endpoint: str, tmp_path: Path) -> Iterator[LocalEnv]:
    reset_moto(sqs_endpoint)
    env = LocalEnv(sqs_endpoint, f"sqlite:///{tmp_path / 'tasks.sqlite3'}", "local", tmp_path).migrate()
    env.shell = {**os.environ, **env.environ, "AWS_EC2_METADATA_DISABLED": "true"}  # type: ignore[attr-defined]
    try:
        yield env
    finally:
        env.close()


def _rows(stack: LocalEnv) -> tuple[str, str]:
    """A dead row with a long error and a long task name, its message in the DLQ, and a succeeded
    row that failed once before."""
    dead = stack.dead_task("shop.payments.capture_card_payment_for_order", error=LONG_ERROR)
    ok = str(uuid.uuid4())
    with stack.engine.begin() as conn:
        store.insert_task(conn, task_id=ok, task_name="demo.flaky", queue="default", args=["k"], kwargs={})
    store.claim(stack.engine, ok, worker="w1", lease_seconds=30)
    store.finish_failure(stack.engine, ok, worker="w1", error=LONG_ERROR, final=False)
    store.claim(stack.engine, ok, worker="w1", lease_seconds=30)
    store.finish_success(stack.engine, ok, worker="w1", result=2)
    return dead, ok


@pytest.mark.parametrize("cols", [80, 120])
def test_tables_fit_the_terminal_and_have_colour_only_there(stack, cols):
    dead, ok = _rows(stack)
    for args in (["tasks"], ["peek", "default-dlq"], ["depth"]):
        run = on_terminal([*OPS, *args], env=stack.shell, cwd=REPO, cols=cols)
        assert run.returncode == 0, run.text
        lines = run.text.splitlines()
        assert max(len(ln) for ln in lines) <= cols, (args, run.text)
        assert ANSI.search(run.screen.replace("\r", "")), f"{args}: no colour on a terminal"
        # Task ids are never cut: they are what replay takes.
        if args[0] != "depth":
            assert dead in run.text
        # Piped, the same table has no colour codes at all, and keeps its full width.
        piped = subprocess.run([*OPS, *args], env=stack.shell, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert "\x1b[" not in piped.stdout + piped.stderr
        if args[0] == "tasks":
            assert LONG_ERROR in piped.stdout and f"(earlier attempt) {LONG_ERROR}" in piped.stdout
            assert ok in run.text and "(earlier attempt)" in run.text
            assert "…" in run.text  # the error was cut to fit, with an ellipsis


def test_depth_watch_refreshes_the_table_on_stdout(stack):
    stack.send(stack.url("default", dlq=True), "dead")
    run = on_terminal([*OPS, "depth", "--watch", "0.5"], env=stack.shell, cwd=REPO, cols=120, stderr_tty=False,
                      interrupt_after=4)
    assert run.returncode == 0, run.stderr
    assert "QUEUE" in run.text and "pcelery-local-default" in run.text and "Ctrl-C to stop" in run.text
    assert "QUEUE" not in run.stderr  # the data is on stdout, the terminal
    # Piped (to a file, to tee): one timestamped table after another, on stdout.
    proc = subprocess.Popen([*OPS, "depth", "--watch", "0.3"], env=stack.shell, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(3)
    proc.send_signal(2)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out.count("QUEUE") >= 2 and out.count("depth every 0.3s; Ctrl-C to stop") >= 2 and "QUEUE" not in err


def test_a_long_redrive_shows_a_progress_bar_with_rate_and_eta_and_its_result_once(stack):
    dlq = stack.url("default", dlq=True)
    for i in range(40):
        stack.send(dlq, f"m-{i}")
    run = on_terminal([*OPS, "redrive", "default-dlq", "--rate", "10", "--yes"], env=stack.shell, cwd=REPO,
                      cols=120, stdout_tty=False)
    assert run.returncode == 0, run.text
    screen = run.text
    assert "redrive pcelery-local-default-dlq" in screen and "msg/s" in screen and "eta" in screen
    assert "/40" in screen  # done of total
    assert "moved 40" not in screen  # the result is not said on the terminal's stderr...
    assert run.stdout.count("moved 40, failed 0, skipped 0") == 1  # ...but once, on stdout
    assert stack.counts(dlq) == (0, 0, 0)


def test_without_a_terminal_progress_is_a_line_now_and_then(stack):
    dlq = stack.url("default", dlq=True)
    for i in range(40):
        stack.send(dlq, f"m-{i}")
    proc = subprocess.run([*OPS, "redrive", "default-dlq", "--rate", "5", "--yes"], env=stack.shell, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    progress = [ln for ln in proc.stderr.splitlines() if "msg/s" in ln]
    assert 1 <= len(progress) <= 3, proc.stderr  # every 5 s of an 8 s move
    assert "of about 40" in progress[0] and "left)" in progress[0]
    assert proc.stdout.count("moved 40") == 1 and "moved 40" not in proc.stderr


# ------------------------------------------------------------------------------- completion


@functools.cache
def _completion_script() -> str:
    return subprocess.run([str(Path(sys.executable).parent / "pcelery-ops"), "completion", "bash"], check=True,
                          capture_output=True, text=True, timeout=60).stdout


def _complete(line: str) -> list[str]:
    """What TAB offers at the end of `line`, by the script `pcelery-ops completion bash` prints."""
    script = _completion_script()
    words = line.split(" ")
    probe = (f"{script}\nCOMP_WORDS=({' '.join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}\n"
             "_pcelery_ops; printf '%s\\n' \"${COMPREPLY[@]}\"")
    out = subprocess.run(["bash", "-c", probe], check=True, capture_output=True, text=True, timeout=30).stdout
    return sorted(w for w in out.splitlines() if w)


def test_tab_completion_knows_commands_options_values_and_queues(tmp_path):
    assert _complete("pcelery-ops re") == ["redrive", "replay"]
    assert _complete("pcelery-ops local ") == ["demo", "deploy", "down", "seed", "status", "up"]
    assert _complete("pcelery-ops local --") == ["--help"]
    assert _complete("pcelery-ops tasks --state d") == ["dead"]
    assert _complete("pcelery-ops redrive --mode ") == ["auto", "client", "native"]
    assert _complete("pcelery-ops depth --env p") == ["prod"]
    assert _complete("pcelery-ops peek ") == ["default-dlq", "long-dlq"]
    assert "default" in _complete("pcelery-ops depth ") and "long-dlq" in _complete("pcelery-ops depth ")
    assert _complete("pcelery-ops redrive default-dlq --task x --dry") == ["--dry-run"]
    assert _complete("pcelery-ops local seed --t") == ["--task"]
    assert "--endpoint-url" not in _complete("pcelery-ops local up --")


def test_tab_completion_in_an_interactive_shell(tmp_path):
    """In a real bash on a terminal: load the script the way the README says, type, press TAB."""
    rc = tmp_path / "bashrc"
    rc.write_text(f'export PATH="{Path(sys.executable).parent}:$PATH"\nPS1="$ "\n'
                  'eval "$(pcelery-ops completion bash)"\n')
    # Type, TAB twice, then turn the completed line into an `echo` of itself (Ctrl-A, "echo ") and run it.
    run = on_terminal(["bash", "--rcfile", str(rc), "-i"], env={**os.environ, "HOME": str(tmp_path)}, cwd=tmp_path,
                      keystrokes=((2.0, "pcelery-ops redr\t"), (0.5, "default-d\t"), (0.5, "--dry\t"),
                                  (0.5, "\x01echo \n"), (0.5, "exit\n")), timeout=30)
    assert "pcelery-ops redrive default-dlq --dry-run" in plain(run.screen).splitlines(), run.screen
