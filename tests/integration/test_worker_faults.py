"""The worker survives what SQS, the network and the store do, with tasks running throughout.

Faults go through real sockets: a FaultProxy (tests/faults.py) sits between the worker and moto
(HTTP 500/503, a hanging endpoint, refused connections) or between the worker and Postgres (the
store refusing connections for a minute). The test itself talks to both directly. Effects are
counted outside the worker: `demo.slow`/`demo.long`/`demo.effect` write a row in the task's own
transaction; `demo.append` appends to a file, which happens twice if a task ever runs twice.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path

import pytest
from conftest import REPO, LocalEnv, proxied_env, reset_moto, run_console_script, wait_for

from devstack import DEMO_CATALOG
from devstack.stack import create_queues, sqs_client
from devstack.tasks import effect_rows
from pcelery import store


@pytest.fixture
def proxied(moto_server, tmp_path):
    """Environment dev: the worker reaches SQS and Postgres through proxies of the test's."""
    with proxied_env(moto_server, "dev", tmp_path, db_prefix="pcelery_faults") as parts:
        yield parts


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _log(env: LocalEnv) -> str:
    return "\n".join(p.log.read_text(errors="replace") for p in env.processes)


def _all_effects_once(env: LocalEnv, keys: list[str]) -> dict[str, int]:
    return {k: n for k in keys if (n := len(effect_rows(env.engine, k))) != 1}


def test_sqs_errors_and_outages_never_stop_the_worker_and_nothing_runs_twice(proxied, tmp_path):
    env, sqs_proxy, _ = proxied
    worker = env.worker("sqs-faults", concurrency=2).wait_ready()
    pid = worker.proc.pid
    effects_file = tmp_path / "appended.txt"
    keys, lines, ids = [], [], []
    for mode, status in (("http", 500), ("http", 503), ("hang", 0), ("refuse", 0)):
        tag = f"{mode}{status}-{uuid.uuid4().hex[:6]}"
        batch_keys = [f"{tag}-{i}" for i in range(2)]
        batch = [env.submit("demo.slow", key, 1.5) for key in batch_keys]
        batch.append(env.submit("demo.append", str(effects_file), tag, 1.5))
        env.wait_rows(batch[:1], ("running", "succeeded"))  # tasks are running when SQS goes
        with sqs_proxy.fault(mode, status):
            time.sleep(6)  # receives, deletes and heartbeats all fail meanwhile
        keys += batch_keys
        lines.append(tag)
        ids += batch
    env.wait_rows(ids, "succeeded", timeout=120)

    assert worker.alive() and worker.proc.pid == pid, "an SQS fault stopped the worker"
    assert _all_effects_once(env, keys) == {}, "a task ran twice"
    assert sorted(_lines(effects_file)) == sorted(lines), "a non-transactional task ran twice (or never)"
    # Logged once per outage with its cause (four windows, two queues: a queue whose retries fell
    # into the next window logs one line for both), and every outage's end said once.
    failures = re.findall(r"ReceiveMessage on (\w+) failed: (HTTP \d+[^;]*)", _log(env))
    assert 4 <= len(failures) <= 8, failures
    assert {"HTTP 500 (Internal Server Error)", "HTTP 503 (Service Unavailable)"} <= {cause for _, cause in failures}
    wait_for(lambda: len(re.findall(r"ReceiveMessage on \w+ works again", _log(env))) == len(failures), timeout=60,
             what="a recovery line for every failure line", logs=env.logs())
    assert "Unrecoverable error" not in _log(env) and "Traceback" not in _log(env)


def test_a_store_outage_pauses_receiving_and_loses_doubles_or_dead_letters_nothing(proxied, tmp_path):
    env, _, pg_proxy = proxied
    worker = env.worker("store-outage", concurrency=2).wait_ready()
    pid = worker.proc.pid
    run = uuid.uuid4().hex[:6]
    effects_file = tmp_path / "appended.txt"
    longs = [env.submit("demo.long", f"long-{run}-{i}", 12.0, queue="long") for i in range(2)]
    before = [env.submit("demo.effect", f"before-{run}-{i}") for i in range(4)]
    appending = env.submit("demo.append", str(effects_file), f"append-{run}", 2.5)
    env.wait_rows(longs, "running")

    pg_proxy.set("refuse")  # the worker's store is gone; SQS and the submitters carry on
    during = [env.submit("demo.effect", f"during-{run}-{i}") for i in range(5)]
    time.sleep(60)
    pg_proxy.set("pass")

    ids = [*longs, *before, appending, *during]
    rows = env.wait_rows(ids, "succeeded", timeout=150)
    assert worker.alive() and worker.proc.pid == pid, "the store outage stopped the worker"
    keys = [*(f"long-{run}-{i}" for i in range(2)), *(f"before-{run}-{i}" for i in range(4)),
            *(f"during-{run}-{i}" for i in range(5))]
    assert _all_effects_once(env, keys) == {}, "a task ran twice"
    assert _lines(effects_file) == [f"append-{run}"], "the non-transactional task ran twice"
    assert env.depth("default", dlq=True) == 0 and env.depth("long", dlq=True) == 0, "a healthy task was dead-lettered"
    assert all(r.error is None for r in rows)
    # No receives burnt while the store was down: a task submitted during the outage was received
    # at most once before the breaker paused receiving, and once more to run.
    assert max(e["receive_count"] for k in keys if k.startswith("during") for e in effect_rows(env.engine, k)) <= 2
    log = _log(env)
    assert log.count("task store unreachable") == 1 and log.count("task store reachable again") == 1
    assert "Traceback" not in log


# --- start-up --------------------------------------------------------------------------------

def _environ(env: LocalEnv, **extra: str) -> dict[str, str]:
    return {**env.environ, "PCELERY_TASK_MODULES": "devstack.tasks", **extra}


def _one_error_line(done, prog: str) -> str:
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith(f"{prog}: "), done.stderr
    return lines[-1]


@pytest.mark.parametrize("prog", ["pcelery-worker", "pcelery-relay"])
def test_at_start_sqs_or_the_store_unreachable_is_waited_for_then_exit_4(proxied, prog, tmp_path):
    env, sqs_proxy, pg_proxy = proxied
    for proxy, what in ((sqs_proxy, "SQS"), (pg_proxy, "the task store")):
        with proxy.fault("refuse"):
            done = run_console_script(prog, env=_environ(env, PCELERY_STARTUP_TIMEOUT="3"), cwd=tmp_path)
        assert done.returncode == 4, done.stderr
        line = _one_error_line(done, prog)
        assert line.startswith(f"{prog}: error: ") and f"gave up waiting for {what} after 3 s" in line
        attempts = re.findall(rf"^{prog}: waiting for {what} \(attempt (\d+)\): .*; next try in \d+ s$",
                              done.stderr, re.MULTILINE)
        assert len(attempts) >= 2, done.stderr


def test_a_worker_started_while_sqs_is_down_serves_once_it_answers(proxied, tmp_path):
    env, sqs_proxy, _ = proxied
    sqs_proxy.set("refuse")
    worker = env.worker("late-sqs", concurrency=1)
    wait_for(lambda: "waiting for SQS (attempt 2)" in worker.log.read_text(errors="replace"), timeout=60,
             what="the worker waiting for SQS", logs=[worker.log])
    sqs_proxy.set("pass")
    worker.wait_ready()
    task_id = env.submit("demo.add", 2, 3)
    assert env.wait_rows([task_id], "succeeded")[0].result == 5


@pytest.mark.parametrize("prog, extra, expected", [
    ("pcelery-worker", {"PCELERY_TASK_MODULES": "no.such.module"},
     "pcelery-worker: error: PCELERY_TASK_MODULES: 'no.such.module' cannot be imported (ModuleNotFoundError: No "
     "module named 'no'): fix the module name, or install the code that declares the tasks into this environment"),
    ("pcelery-relay", {"DATABASE_URL": "postgresql://app:s3cret@db:port/tasks"},
     "pcelery-relay: error: DATABASE_URL='postgresql://app:***@db:port/tasks' is not a database URL: use "
     "postgresql://user:password@host:5432/name or sqlite:///path/to/file.sqlite3"),
    ("pcelery-worker", {"PCELERY_CONCURRENCY": "-1"}, "pcelery-worker: error: PCELERY_CONCURRENCY='-1' must be"),
    ("pcelery-relay", {"PCELERY_STARTUP_TIMEOUT": "a while"},
     "pcelery-relay: error: PCELERY_STARTUP_TIMEOUT='a while' is not a number of seconds"),
])
def test_a_bad_setting_is_one_line_naming_it_and_exit_2(tmp_path, prog, extra, expected):
    environ = {"PYTHONPATH": str(REPO), "PCELERY_CATALOG": "devstack:DEMO_CATALOG", "PCELERY_ENV": "dev",
               "PCELERY_TASK_MODULES": "devstack.tasks", **extra}
    done = run_console_script(prog, env=environ, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    line = _one_error_line(done, prog)
    assert line.startswith(expected), line
    assert "s3cret" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_ops_does_not_refuse_to_run_because_of_worker_only_variables(sqs_endpoint, tmp_path):
    create_queues(sqs_client(sqs_endpoint), DEMO_CATALOG, "staging")
    env = {"PCELERY_WORKER_QUEUES": "nope", "PCELERY_CONCURRENCY": "lots", "PCELERY_RESULT_BACKEND": "amqp://x",
           "PCELERY_TASK_MODULES": "no/such", "PCELERY_LOG_LEVEL": "chatty", "AWS_ENDPOINT_URL_SQS": sqs_endpoint,
           "PCELERY_ENV": "staging", "PCELERY_CATALOG": "devstack:DEMO_CATALOG", "PYTHONPATH": str(REPO)}
    # A deployed env on an emulator is named on the command line (a local endpoint in the
    # environment is refused for it); depth answers without the store.
    done = run_console_script("pcelery-ops", "depth", "-o", "json", "--endpoint-url", sqs_endpoint, env=env,
                              cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert [row["queue"] for row in json.loads(done.stdout)] == ["pcelery-staging-default", "pcelery-staging-long"]


def test_an_unregistered_task_is_recorded_on_its_row_and_dead_lettered(moto_server, tmp_path):
    reset_moto(moto_server.endpoint)
    env = LocalEnv(moto_server.endpoint, f"sqlite:///{tmp_path / 't.sqlite3'}", "staging", tmp_path).migrate()
    try:
        env.worker("unknown-task", concurrency=1).wait_ready()
        task_id = env.submit("demo.no_such_task", 1)  # this outbox does not know the declarations
        failed = env.wait_rows([task_id], "failed", timeout=60)[0]
        assert failed.error.startswith("NotRegistered: no worker of queue 'default' declares task "
                                       "'demo.no_such_task' (receive 1 of 3)")
        dead = env.wait_rows([task_id], "dead", timeout=120)[0]
        assert "(receive 3 of 3)" in dead.error and dead.attempts == 0
        wait_for(lambda: env.depth("default", dlq=True) == 1, timeout=60, what="its message in the DLQ",
                 logs=env.logs())
        assert store.get_task(env.engine, task_id).state == "dead"
    finally:
        env.close()
