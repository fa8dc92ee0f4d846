"""The ops CLI, driven through its real entry point (`python -m ops ...` subprocesses) against
the moto server of the `sqs_endpoint` fixture and a migrated SQLite claim-check store (conftest's
LocalEnv), and the native redrive path against LocalStack. (The library functions in-process are
tests/unit/test_ops_lib.py.)
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import LocalEnv, reset_moto, wait_for

from devstack import DEMO_CATALOG
from devstack.stack import create_queues, free_port, sqs_client
from pcelery import schema, store
from pcelery.messages import encode_body

REPO = Path(__file__).resolve().parents[2]
LOCALSTACK_PY = REPO / ".venv-localstack" / "bin" / "python"


# ------------------------------------------------------------------------------ the stack


class OpsEnv(LocalEnv):
    """conftest's LocalEnv (env `local`, migrated store) with the ops CLI run against it, and
    every message sent through `send`, to compare with what arrives."""

    def __init__(self, endpoint: str, tmp: Path):
        super().__init__(endpoint, f"sqlite:///{tmp / 'tasks.sqlite3'}", "local", tmp)
        self.migrate()
        self.env = {**os.environ, **self.environ, "AWS_EC2_METADATA_DISABLED": "true"}
        self.env.pop("AWS_PROFILE", None)
        self.sent: dict[str, dict[str, Any] | None] = {}  # body -> message attributes as SQS gives them back

    def ops(self, *args: str, env: dict[str, str] | None = None, timeout: float = 60,
            stdin: Any = subprocess.DEVNULL) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ops", *args], check=False, env={**self.env, **(env or {})},
                              cwd=REPO, capture_output=True, text=True, timeout=timeout, stdin=stdin)

    def ops_prod(self, *args: str, **kw: Any) -> subprocess.CompletedProcess:
        """ops --env prod on this moto server. Named on purpose (--endpoint-url): a local endpoint or
        a SQLite store taken from the environment is refused for a deployed env."""
        return self.ops(*args, "--env", "prod", "--endpoint-url", self.endpoint,
                        env={"DATABASE_URL": "", **kw.pop("env", {})}, **kw)

    def ops_json(self, *args: str, **kw: Any) -> Any:
        proc = self.ops(*args, "--output", "json", **kw)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def send(self, url: str, body: str, **attrs: str) -> None:
        super().send(url, body, **attrs)
        self.sent[body] = {k: {"DataType": "String", "StringValue": str(v)} for k, v in attrs.items()} or None

    def dead_task(self, task_name: str, queue: str = "default", error: str = "ValueError: boom",
                  **attrs: str) -> str:
        """A dead row and its message (attribute origin=test) in the queue's DLQ."""
        return super().dead_task(task_name, queue, error, **{"origin": "test", **attrs})


def _ops_env(endpoint: str, tmp: Path) -> Iterator[OpsEnv]:
    e = OpsEnv(endpoint, tmp)
    try:
        yield e
    finally:
        e.close()


@pytest.fixture
def stack(sqs_endpoint: str, tmp_path: Path) -> Iterator[OpsEnv]:
    reset_moto(sqs_endpoint)  # every test starts from empty queues
    yield from _ops_env(sqs_endpoint, tmp_path)


def _error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert lines and lines[-1].startswith("ops: error:"), proc.stderr
    return lines[-1]


# ----------------------------------------------------------------------------------- depth


def test_depth_reports_exact_counts_for_every_catalog_queue_and_its_dlq(stack):
    for i in range(3):
        stack.send(stack.url("default"), f"visible-{i}")
    stack.sqs.send_message(QueueUrl=stack.url("long"), MessageBody="later", DelaySeconds=300)
    stack.send(stack.url("default"), "in-flight")
    # A message held by a consumer counts as in flight.
    got = stack.sqs.receive_message(QueueUrl=stack.url("default"), MaxNumberOfMessages=1, VisibilityTimeout=300)
    assert len(got["Messages"]) == 1
    stack.dead_task("app.demo_tasks.flaky")
    stack.dead_task("app.demo_tasks.flaky")

    rows = stack.ops_json("depth")

    by_name = {r["queue"]: r for r in rows}
    assert set(by_name) == {"pcelery-local-default", "pcelery-local-long"}
    d, lg = by_name["pcelery-local-default"], by_name["pcelery-local-long"]
    assert (d["visible"], d["in_flight"], d["delayed"]) == (3, 1, 0)
    assert (lg["visible"], lg["in_flight"], lg["delayed"]) == (0, 0, 1)
    assert d["oldest_age_seconds"] is None  # local endpoint: CloudWatch cannot tell
    assert d["dlq"] == {"queue": "pcelery-local-default-dlq", "url": stack.url("default", dlq=True),
                        "visible": 2, "in_flight": 0, "delayed": 0}
    assert d["tasks"]["dead"] == 2 and d["tasks"]["pending"] == 0
    assert lg["tasks"] == {}

    # The table names the same numbers, and a single queue can be asked for by URL or SQS name.
    table = stack.ops("depth", stack.url("default"))
    assert table.returncode == 0
    assert "pcelery-local-default" in table.stdout and "dead=2" in table.stdout
    assert [r["queue"] for r in stack.ops_json("depth", "pcelery-local-long")] == ["pcelery-local-long"]


def test_depth_without_database_still_answers_and_says_why(stack):
    stack.send(stack.url("default"), "x")
    proc = stack.ops("depth", "default", "-o", "json",
                     env={"DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/nope"})
    assert proc.returncode == 0, proc.stderr
    [row] = json.loads(proc.stdout)
    assert row["visible"] == 1 and row["tasks"] is None
    assert "unreachable" in proc.stderr and "DATABASE_URL" in proc.stderr


def test_depth_watch_refreshes_until_interrupted(stack):
    proc = subprocess.Popen([sys.executable, "-m", "ops", "depth", "default", "--watch", "0.2", "-o", "json"],
                            env=stack.env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = json.loads(proc.stdout.readline())
        stack.send(stack.url("default"), "arrives-while-watching")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if json.loads(proc.stdout.readline())[0]["visible"] == 1:
                break
        else:
            pytest.fail("depth --watch never showed the new message")
        assert first[0]["visible"] == 0
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        proc.wait()


# ------------------------------------------------------------------------------------ peek


def test_peek_shows_messages_with_their_rows_and_consumes_nothing(stack):
    tid = stack.dead_task("app.demo_tasks.always_fails", error="RuntimeError: payment API down")
    stack.send(stack.url("default", dlq=True), "not a celery message", source="hand")
    # A Celery envelope whose inner body is not the JSON its content type says: the headers still
    # name the task, which is what the on-call engineer needs.
    damaged_id = str(uuid.uuid4())
    envelope = json.loads(base64.b64decode(encode_body(damaged_id, "app.demo_tasks.add", queue="default")))
    envelope["body"] = base64.b64encode(b"[[1, 2], {").decode()
    stack.send(stack.url("default", dlq=True), base64.b64encode(json.dumps(envelope).encode()).decode())
    before = (stack.counts(stack.url("default", dlq=True)), stack.counts(stack.url("default")))

    messages = stack.ops_json("peek", "default-dlq", "--limit", "10")

    after = (stack.counts(stack.url("default", dlq=True)), stack.counts(stack.url("default")))
    assert before == after == ((3, 0, 0), (0, 0, 0))  # nothing consumed, nothing left in flight
    assert len(messages) == 3
    celery = next(m for m in messages if m["task_id"] == tid)
    raw = next(m for m in messages if not m["task_id"])
    damaged = next(m for m in messages if m["task_id"] == damaged_id)
    assert damaged["task"] == "app.demo_tasks.add" and damaged["task_row"] is None
    assert set(celery) == {"message_id", "task", "task_id", "receive_count", "sent_at", "attributes", "body",
                           "task_row", "problem", "why"}
    assert celery["task"] == "app.demo_tasks.always_fails" and celery["task_id"] == tid
    assert celery["receive_count"] == 1 and celery["sent_at"].endswith("Z")
    assert celery["attributes"] == {"origin": "test"}
    assert celery["task_row"]["state"] == "dead"
    assert celery["task_row"]["attempts"] == 1
    assert celery["task_row"]["last_error"] == "RuntimeError: payment API down"
    assert raw["task"] is None and raw["body"] == "not a celery message" and raw["task_row"] is None
    # Why each cannot run: what the row recorded, what is wrong with the body.
    assert celery["problem"] is None and celery["why"] == "RuntimeError: payment API down"
    assert raw["why"] == raw["problem"] and raw["why"].startswith("the envelope is not JSON")
    assert damaged["why"].startswith("the body is not JSON (Expecting property name")

    # --limit bounds it; a second peek sees the same messages again (receive count grows).
    [one] = stack.ops_json("peek", "default-dlq", "--limit", "1")
    assert one["receive_count"] == 2
    # The table: a row per message with its task, row and why; a summary by task under it.
    table = stack.ops("peek", "default-dlq")
    header, *lines = table.stdout.splitlines()
    assert header.split() == ["TASK", "ID", "TASK", "SENT", "ROW", "WHY"]
    by_id = {ln.split()[0]: ln for ln in lines[:3]}
    assert "app.demo_tasks.always_fails" in by_id[tid] and "dead/1" in by_id[tid]
    assert "RuntimeError: payment API down" in by_id[tid]
    assert "app.demo_tasks.add" in by_id[damaged_id] and "no row" in by_id[damaged_id]
    assert "the body is not JSON" in by_id[damaged_id]
    assert "(not Celery)" in by_id["-"] and "the envelope is not JSON" in by_id["-"]
    assert ("pcelery-local-default-dlq: 3 messages shown, none consumed; by task: (not Celery) 1, "
            "app.demo_tasks.add 1, app.demo_tasks.always_fails 1") in table.stdout
    assert stack.counts(stack.url("default", dlq=True)) == (3, 0, 0)


def test_peek_refuses_a_work_queue_because_receives_count_toward_the_dlq(stack):
    stack.send(stack.url("default"), "live")
    proc = stack.ops("peek", "default")
    assert proc.returncode == 6
    assert "work queue" in _error_line(proc)
    assert stack.counts(stack.url("default")) == (1, 0, 0)


# --------------------------------------------------------------------------------- redrive


def test_redrive_moves_everything_preserving_bodies_and_attributes_and_requeues_rows(stack):
    dlq = stack.url("default", dlq=True)
    tids = [stack.dead_task("app.demo_tasks.flaky") for _ in range(3)]
    for i in range(9):
        stack.send(dlq, f"raw-{i}", n=str(i), kind="raw")
    originals = dict(stack.sent)
    assert len(originals) == 12

    dry = stack.ops_json("redrive", "default-dlq", "--dry-run")
    assert dry["dry_run"] is True and dry["moved"] == 0 and dry["would_move"] == 12
    assert stack.counts(dlq) == (12, 0, 0) and stack.counts(stack.url("default")) == (0, 0, 0)

    summary = stack.ops_json("redrive", "default-dlq", "--yes")

    assert {k: summary[k] for k in ("source", "destination", "mode", "moved", "failed", "skipped", "dry_run")} == {
        "source": "pcelery-local-default-dlq", "destination": "pcelery-local-default", "mode": "client",
        "moved": 12, "failed": 0, "skipped": 0, "dry_run": False}
    assert summary["tasks_requeued"] == 3
    assert stack.counts(dlq) == (0, 0, 0)
    moved = stack.sqs.receive_message(QueueUrl=stack.url("default"), MaxNumberOfMessages=10,
                                      MessageAttributeNames=["All"])["Messages"]
    moved += stack.sqs.receive_message(QueueUrl=stack.url("default"), MaxNumberOfMessages=10,
                                       MessageAttributeNames=["All"])["Messages"]
    assert {m["Body"]: m.get("MessageAttributes") for m in moved} == originals
    assert {store.get_task(stack.engine, t).state for t in tids} == {"queued"}


def test_redrive_task_filter_moves_only_that_task_and_leaves_the_rest_visible(stack):
    dlq = stack.url("default", dlq=True)
    wanted = [stack.dead_task("app.demo_tasks.flaky") for _ in range(4)]
    others = [stack.dead_task("app.demo_tasks.always_fails") for _ in range(3)]
    stack.send(dlq, "garbage")

    dry = stack.ops_json("redrive", "default-dlq", "--task", "app.demo_tasks.flaky", "--dry-run")
    assert dry["would_move"] == 4 and dry["moved"] == 0
    assert stack.counts(dlq) == (8, 0, 0)

    summary = stack.ops_json("redrive", "default-dlq", "--task", "app.demo_tasks.flaky", "--yes")

    assert (summary["mode"], summary["moved"], summary["skipped"], summary["failed"]) == ("client", 4, 4, 0)
    assert stack.counts(dlq) == (4, 0, 0)  # the others are visible again at once
    assert stack.counts(stack.url("default"))[0] == 4
    assert {store.get_task(stack.engine, t).state for t in wanted} == {"queued"}
    assert {store.get_task(stack.engine, t).state for t in others} == {"dead"}

    limited = stack.ops_json("redrive", "default-dlq", "--limit", "2", "--yes")
    assert limited["moved"] == 2 and stack.counts(dlq) == (2, 0, 0)


def test_killed_client_redrive_loses_no_message(stack):
    dlq, dest = stack.url("default", dlq=True), stack.url("default")
    originals = {f"message-{i:02d}" for i in range(30)}
    for body in originals:
        stack.send(dlq, body)
    proc = subprocess.Popen([sys.executable, "-m", "ops", "redrive", "default-dlq", "--yes", "--mode", "client",
                             "--rate", "3", "--hold-seconds", "2"], env=stack.env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: stack.counts(dest)[0] >= 4, timeout=60, what="the redrive to get going (4 moved)",
                 interval=0.1)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    moved_before_kill = stack.counts(dest)[0]
    assert moved_before_kill < 30, "the redrive finished before it could be killed: lower --rate"

    # Whatever the kill interrupted comes back to the DLQ when its hold runs out.
    in_dlq = stack.drain_bodies(dlq, 30 - moved_before_kill)
    in_dest = stack.drain_bodies(dest, moved_before_kill)
    assert len(in_dlq) + len(in_dest) >= 30
    assert originals <= set(in_dlq) | set(in_dest)


def test_redrive_refusals_and_errors_have_their_exit_codes(stack):
    stack.send(stack.url("default", dlq=True), "x")

    proc = stack.ops("redrive", "default-dlq")  # stdin is not a terminal, no --yes
    assert proc.returncode == 7 and "--yes" in _error_line(proc)

    proc = stack.ops("redrive", "default", "--yes")
    assert proc.returncode == 6 and "not a DLQ" in _error_line(proc)

    proc = stack.ops("redrive", "default-dlq", "--to", "long", "--yes")
    assert proc.returncode == 6 and "not a source queue" in _error_line(proc)

    proc = stack.ops("redrive", "default-dlq", "--mode", "native", "--task", "x", "--yes")
    assert proc.returncode == 6 and "--mode client" in _error_line(proc)

    proc = stack.ops("redrive", "default-dlq", "--mode", "native", "--yes")  # moto lacks the move-task API
    assert proc.returncode == 4 and "ListMessageMoveTasks answered HTTP 500" in _error_line(proc)
    assert "use --mode client" in _error_line(proc)

    proc = stack.ops("redrive", "nope-dlq", "--yes")
    assert proc.returncode == 3 and "not found" in _error_line(proc)

    # A plain queue nobody dead-letters into is not a DLQ either.
    stack.sqs.create_queue(QueueName="orphan")
    stack.send(stack.sqs.get_queue_url(QueueName="orphan")["QueueUrl"], "y")
    proc = stack.ops("redrive", "orphan", "--yes")
    assert proc.returncode == 6 and "not a DLQ" in _error_line(proc)
    # ... unless forced, with an explicit destination.
    forced = stack.ops_json("redrive", "orphan", "--to", "long", "--force", "--yes")
    assert forced["moved"] == 1 and stack.counts(stack.url("long"))[0] == 1

    # Two queues dead-letter into the same DLQ: the destination is ambiguous.
    dlq_arn = stack.queues["default"]["dlq_arn"]
    stack.sqs.create_queue(QueueName="second-source", Attributes={
        "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": 3})})
    proc = stack.ops("redrive", "default-dlq", "--yes")
    assert proc.returncode == 6 and "--to" in _error_line(proc)
    ok = stack.ops_json("redrive", "default-dlq", "--to", "second-source", "--yes")
    assert ok["moved"] == 1 and ok["destination"] == "second-source"

    # Auto mode on moto picks client, and its plan says so before anything moves.
    stack.send(stack.url("default", dlq=True), "z")
    proc = stack.ops("redrive", "default-dlq", "--to", "default", "--yes")
    assert proc.returncode == 0 and "mode client" in proc.stderr and "no native move task" in proc.stderr


# ------------------------------------------------------------------------------ errors


def test_unknown_queue_unreachable_endpoint_and_missing_credentials(stack, tmp_path):
    proc = stack.ops("depth", "nope")
    assert proc.returncode == 3 and "catalog queues are default, long" in _error_line(proc)

    proc = stack.ops("depth", env={"AWS_ENDPOINT_URL_SQS": f"http://127.0.0.1:{free_port()}"})
    assert proc.returncode == 4 and "cannot reach the SQS endpoint" in _error_line(proc)

    # Real AWS (no endpoint) and no credentials anywhere.
    bare = {k: v for k, v in stack.env.items()
            if (not k.startswith("AWS_") or k in ("AWS_REGION", "AWS_EC2_METADATA_DISABLED")) and k != "DATABASE_URL"}
    bare.update(AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"))
    proc = subprocess.run([sys.executable, "-m", "ops", "depth", "--env", "prod"], check=False, env=bare, cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 5 and "no AWS credentials" in _error_line(proc)
    proc = subprocess.run([sys.executable, "-m", "ops", "depth", "--env", "prod"], check=False, cwd=REPO,
                          capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in bare.items() if k != "AWS_REGION"})
    assert proc.returncode == 5 and "no AWS region" in _error_line(proc)

    proc = stack.ops("depth", "--profile", "no-such-profile")
    assert proc.returncode == 5 and "no-such-profile" in _error_line(proc)


# ------------------------------------------------------------------------------- tasks


def test_tasks_lists_rows_by_state_age_and_stuck(stack):
    dead = stack.dead_task("app.demo_tasks.flaky")
    stuck = str(uuid.uuid4())
    with stack.engine.begin() as conn:
        store.insert_task(conn, task_id=stuck, task_name="app.demo_tasks.slow", queue="long", args=[], kwargs={})
    assert store.claim(stack.engine, stuck, worker="gone", lease_seconds=0).outcome == "run"

    rows = stack.ops_json("tasks", "--state", "dead")
    assert [r["id"] for r in rows] == [dead] and rows[0]["error"] == "ValueError: boom"
    assert [r["id"] for r in stack.ops_json("tasks", "--stuck")] == [stuck]
    assert stack.ops_json("tasks", "--older-than", "1h") == []
    assert len(stack.ops_json("tasks", "--older-than", "0s")) == 2
    assert [r["id"] for r in stack.ops_json("tasks", "--task", "app.demo_tasks.slow")] == [stuck]
    table = stack.ops("tasks")
    assert dead in table.stdout and "running" in table.stdout

    proc = stack.ops("tasks", "--older-than", "ten minutes")
    assert proc.returncode == 2 and "90s, 15m, 2h or 1d" in proc.stderr
    proc = stack.ops("tasks", "--state", "zombie")
    assert proc.returncode == 2 and "argument --state: invalid choice: 'zombie'" in proc.stderr
    proc = stack.ops("tasks", env={"DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/nope"})
    assert proc.returncode == 9 and "unreachable" in _error_line(proc)
    # A store behind the code (its rows lack columns ops reads): told to migrate, not a traceback.
    old_store = f"sqlite:///{stack.db_url.removeprefix('sqlite:///')}.v1"
    old_engine = schema.make_engine(old_store)
    schema.migrate(old_engine, up_to=1)
    old_engine.dispose()
    proc = stack.ops("tasks", env={"DATABASE_URL": old_store})
    assert proc.returncode == 9
    assert "has schema version 1, this code needs" in _error_line(proc)
    assert "run `pcelery-migrate`" in _error_line(proc)


# ------------------------------------------------------------------------------ replay


def test_replay_resets_rows_and_publishes_them_through_the_outbox(stack):
    from pcelery.messages import decode_body

    dead = [stack.dead_task("app.demo_tasks.flaky") for _ in range(2)]
    other = stack.dead_task("app.demo_tasks.always_fails")
    live = str(uuid.uuid4())
    with stack.engine.begin() as conn:
        store.insert_task(conn, task_id=live, task_name="app.demo_tasks.flaky", queue="default", args=[], kwargs={})
    assert store.claim(stack.engine, live, worker="w2", lease_seconds=300).outcome == "run"

    dry = stack.ops_json("replay", "--state", "dead", "--task", "app.demo_tasks.flaky", "--dry-run")
    assert sorted(dry["would_replay"]) == sorted(dead)
    assert {store.get_task(stack.engine, t).state for t in dead} == {"dead"}
    assert stack.counts(stack.url("default")) == (0, 0, 0)

    proc = stack.ops("replay", "--state", "dead")
    assert proc.returncode == 7  # no terminal, no --yes

    result = stack.ops_json("replay", "--state", "dead", "--task", "app.demo_tasks.flaky", "--yes")
    assert sorted(result["reset"]) == sorted(dead) == sorted(result["published"])
    assert {store.get_task(stack.engine, t).state for t in dead} == {"queued"}
    assert store.get_task(stack.engine, other).state == "dead"
    msgs = stack.sqs.receive_message(QueueUrl=stack.url("default"), MaxNumberOfMessages=10)["Messages"]
    assert sorted(decode_body(m["Body"]).task_id for m in msgs) == sorted(dead)

    # By id: a running row with a live lease is not touched; an unknown id is an error.
    result = stack.ops_json("replay", other, live, "--yes")
    assert result["reset"] == [other] and result["skipped_running"] == [live]
    assert store.get_task(stack.engine, live).state == "running"
    proc = stack.ops("replay", "no-such-id", "--yes")
    assert proc.returncode == 3 and "no-such-id" in _error_line(proc)
    proc = stack.ops("replay", "--yes")
    assert proc.returncode == 2


# ------------------------------------------------------------------------------- purge


def test_purge_asks_and_empties_and_guards_prod(stack):
    for i in range(4):
        stack.send(stack.url("default", dlq=True), f"m{i}")
    proc = stack.ops("purge", "default-dlq")
    assert proc.returncode == 7 and stack.counts(stack.url("default", dlq=True)) == (4, 0, 0)
    dry = stack.ops_json("purge", "default-dlq", "--dry-run")
    assert dry["would_purge_approximately"] == 4 and stack.counts(stack.url("default", dlq=True)) == (4, 0, 0)
    done = stack.ops_json("purge", "default-dlq", "--yes")
    assert done["purged_approximately"] == 4
    assert stack.counts(stack.url("default", dlq=True)) == (0, 0, 0)

    prod = create_queues(stack.sqs, DEMO_CATALOG, "prod")
    stack.send(prod["default"]["url"], "live prod task")
    stack.send(prod["default"]["dlq_url"], "dead prod task")
    proc = stack.ops_prod("purge", "default", "--yes", "--confirm-name", "pcelery-prod-default")
    assert proc.returncode == 6 and "work queue in prod" in _error_line(proc)
    proc = stack.ops_prod("purge", "default-dlq", "--yes")  # --yes is not enough in prod
    assert proc.returncode == 7
    assert _error_line(proc) == ("ops: error: purging 'pcelery-prod-default-dlq' in prod needs its name typed back: "
                                 "pass --confirm-name pcelery-prod-default-dlq (--yes is not enough in prod) after a "
                                 "--dry-run; nothing was purged")
    proc = stack.ops_prod("purge", "default-dlq", "--confirm-name", "pcelery-prod-default")
    assert proc.returncode == 7 and "is not the queue's name" in _error_line(proc)
    assert stack.counts(prod["default"]["dlq_url"]) == (1, 0, 0)
    proc = stack.ops_prod("purge", "default-dlq", "--confirm-name", "pcelery-prod-default-dlq")
    assert proc.returncode == 0
    assert stack.counts(prod["default"]["dlq_url"]) == (0, 0, 0)
    assert stack.counts(prod["default"]["url"]) == (1, 0, 0)
    forced = stack.ops_prod("purge", prod["default"]["url"], "--force", "--confirm-name", "pcelery-prod-default")
    assert forced.returncode == 0 and stack.counts(prod["default"]["url"]) == (0, 0, 0)


# ------------------------------------------------- what the on-call engineer is told (issue 13)


def test_redrive_says_the_mode_it_will_use_before_and_the_result_once(stack):
    """The dry run names the mode the real run uses and why; the real run says its plan once on
    stderr, makes no fall-back note and prints its result once, on stdout."""
    for _ in range(3):
        stack.dead_task("demo.always_fail")
    dry = stack.ops("redrive", "default-dlq", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert ("dry run of redrive pcelery-local-default-dlq -> pcelery-local-default (3 visible); mode client: receive, "
            "send, delete from here: this endpoint has no native move task (ListMessageMoveTasks answered HTTP 500)"
            ) in dry.stderr
    assert "mode auto" not in dry.stderr + dry.stdout
    assert dry.stdout.startswith("dry run: would move 3 messages from pcelery-local-default-dlq to "
                                 "pcelery-local-default (mode client); nothing moved")
    assert dry.stdout.count("\n") == 1

    real = stack.ops("redrive", "default-dlq", "--yes")
    assert real.returncode == 0, real.stderr
    assert "mode client: receive, send, delete from here" in real.stderr
    assert "client-side" not in real.stderr and "falls back" not in real.stderr
    assert real.stderr.count("HTTP 500") == 1  # the plan's reason, said once
    result_line = "moved 3, failed 0, skipped 0: pcelery-local-default-dlq -> pcelery-local-default (mode client)"
    assert (real.stdout + real.stderr).count("moved 3") == 1 and result_line in real.stdout


def test_redrive_says_what_became_of_each_moved_message_s_row(stack):
    """Rows dead -> queued; messages without a row are named as such (never "claimed by a worker");
    messages that are no Celery message at all too."""
    dead = [stack.dead_task("demo.always_fail") for _ in range(2)]
    for _ in range(3):  # Celery messages whose ids have no row (poison)
        stack.send(stack.url("default", dlq=True), encode_body(str(uuid.uuid4()), "demo.add", queue="default"))
    stack.send(stack.url("default", dlq=True), "not a celery message")

    proc = stack.ops("redrive", "default-dlq", "--yes")

    assert proc.returncode == 0, proc.stderr
    assert ("task rows: 2 dead -> queued; 3 messages with no task row (poison: see `peek` on the queue, "
            "RUNBOOK.md#poison-task); 1 message that are not Celery messages") in proc.stdout
    assert "claimed" not in proc.stdout and "already taken" not in proc.stdout
    assert {store.get_task(stack.engine, t).state for t in dead} == {"queued"}

    # Only poison: no "0 of 3", no word about workers.
    for _ in range(2):
        stack.send(stack.url("default", dlq=True), encode_body(str(uuid.uuid4()), "demo.add", queue="default"))
    summary = stack.ops_json("redrive", "default-dlq", "--yes")
    assert summary["task_rows"] == {"requeued": 0, "other_states": {}, "no_row": 2, "not_celery": 0, "unknown": 0}
    assert summary["tasks_requeued"] == 0

    # Rows a worker already took since: said with their states.
    taken = stack.dead_task("demo.always_fail")
    store.claim(stack.engine, taken, worker="w9", lease_seconds=300)
    proc = stack.ops("redrive", "default-dlq", "--yes")
    assert "task rows: 1 already taken by a worker since, or not dead (running 1)" in proc.stdout


def test_replay_deletes_the_old_copies_from_the_dlq_and_says_so(stack):
    """A replayed dead task's message still in the DLQ would run it again on the next redrive:
    the replay deletes it, and the dry run says it will."""
    dead = [stack.dead_task("demo.always_fail") for _ in range(3)]
    other = stack.dead_task("demo.flaky")  # not replayed: its copy stays
    dlq = stack.url("default", dlq=True)
    assert stack.counts(dlq)[0] == 4

    dry = stack.ops("replay", "--state", "dead", "--task", "demo.always_fail", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert ("3 of them still have a message in pcelery-local-default-dlq: the replay deletes those copies"
            in dry.stdout)
    assert stack.counts(dlq) == (4, 0, 0)  # looked at, left there

    proc = stack.ops("replay", "--state", "dead", "--task", "demo.always_fail", "--yes")
    assert proc.returncode == 0, proc.stderr
    assert "replayed 3 tasks: published 3" in proc.stdout
    assert "deleted 3 old copies of them from pcelery-local-default-dlq" in proc.stdout
    assert stack.counts(dlq) == (1, 0, 0)
    from pcelery.messages import decode_body

    [left] = stack.dlq_bodies("default")
    assert decode_body(left).task_id == other
    msgs = stack.drain_bodies(stack.url("default"), 3)
    assert sorted(decode_body(b).task_id for b in msgs) == sorted(dead)

    # --keep-dlq-copies leaves them, and says what that means.
    kept = stack.ops_json("replay", other, "--keep-dlq-copies", "--yes")
    assert kept["dlq_copies_checked"] is False and stack.counts(dlq)[0] == 1
    assert "do not also redrive" in stack.ops("replay", other, "--keep-dlq-copies", "--yes").stdout


def test_lists_say_how_many_they_left_out(stack):
    """tasks (default --limit 50) and peek (10) say every time that there are more, and how many."""
    with stack.engine.begin() as conn:
        for i in range(60):
            store.insert_task(conn, task_id=str(uuid.uuid4()), task_name="demo.add", queue="default", args=[i, 1],
                              kwargs={})
    table = stack.ops("tasks")
    assert len(table.stdout.splitlines()) == 1 + 50 + 1
    assert table.stdout.splitlines()[-1] == "showing 50 of 60 rows: --limit 60 shows them all"
    as_json = stack.ops("tasks", "-o", "json")
    assert len(json.loads(as_json.stdout)) == 50
    assert "ops: showing 50 of 60 rows: --limit 60 shows them all" in as_json.stderr
    assert "showing" not in stack.ops("tasks", "--limit", "60").stdout
    narrowed = stack.ops("tasks", "--state", "pending", "--limit", "7")
    assert "showing 7 of 60 rows: --limit 60 shows them all" in narrowed.stdout

    for i in range(12):
        stack.send(stack.url("default", dlq=True), f"poison {i}")
    peek = stack.ops("peek", "default-dlq")
    assert "showing 10 of about 12 visible messages: --limit 12 shows them all" in peek.stdout
    peek_json = stack.ops("peek", "default-dlq", "-o", "json")
    assert len(json.loads(peek_json.stdout)) == 10 and "showing 10 of about 12" in peek_json.stderr
    assert "showing" not in stack.ops("peek", "default-dlq", "--limit", "20").stdout


def test_tasks_says_an_error_on_a_succeeded_row_is_an_earlier_attempt_s(stack):
    tid = str(uuid.uuid4())
    with stack.engine.begin() as conn:
        store.insert_task(conn, task_id=tid, task_name="demo.flaky", queue="default", args=["k"], kwargs={})
    store.claim(stack.engine, tid, worker="w1", lease_seconds=30)
    store.finish_failure(stack.engine, tid, worker="w1", error="RuntimeError: flaky k: failing on purpose",
                         final=False)
    store.claim(stack.engine, tid, worker="w1", lease_seconds=30)
    store.finish_success(stack.engine, tid, worker="w1", result=2)
    dead = stack.dead_task("demo.always_fail", error="RuntimeError: payment API down")

    table = stack.ops("tasks")
    assert table.stdout.splitlines()[0].split() == ["ID", "TASK", "STATE", "TRIES", "UPDATED", "LAST", "ERROR"]
    [ok_line] = [ln for ln in table.stdout.splitlines() if ln.startswith(tid)]
    [dead_line] = [ln for ln in table.stdout.splitlines() if ln.startswith(dead)]
    assert "succeeded" in ok_line and "(earlier attempt) RuntimeError: flaky k" in ok_line
    assert dead_line.endswith("RuntimeError: payment API down") and "earlier" not in dead_line
    assert "(earlier attempt): the row has run to another state since that error" in table.stdout


def test_depth_says_why_oldest_is_not_known_locally(stack):
    table = stack.ops("depth")
    assert table.returncode == 0
    assert table.stdout.splitlines()[0].split() == ["QUEUE", "VISIBLE", "IN-FLIGHT", "DELAYED", "OLDEST", "DLQ",
                                                    "TASKS"]
    assert "n/a" in table.stdout.splitlines()[1]
    assert "OLDEST n/a: a local endpoint has no CloudWatch metrics" in table.stdout
    [row] = stack.ops_json("depth", "default")
    assert row["oldest_age_seconds"] is None and row["oldest_age_unavailable"].startswith("a local endpoint")


def test_commands_aimed_at_a_deployed_env_refuse_the_local_stack_s_settings(stack):
    """A shell that still has the local stack's exports must not run `--env prod` against moto:
    not depth, and above all not purge of moto's pcelery-prod-* queues."""
    prod = create_queues(stack.sqs, DEMO_CATALOG, "prod")
    stack.send(prod["default"]["dlq_url"], "a prod message, on moto")
    for args in (["depth", "--env", "prod"], ["purge", "default-dlq", "--env", "prod", "--confirm-name",
                                              "pcelery-prod-default-dlq"], ["tasks"]):
        proc = stack.ops(*args, env={"PCELERY_ENV": "prod"} if args == ["tasks"] else None)
        assert proc.returncode == 6, (args, proc.stderr)
        line = _error_line(proc)
        assert "aimed at env 'prod', a deployed environment, but this shell points at a local stack" in line
        assert f"the SQS endpoint {stack.endpoint} (AWS_ENDPOINT_URL_SQS" in line and "DATABASE_URL=sqlite" in line
        assert 'eval "$(python -m ops local down)"' in line
    assert stack.counts(prod["default"]["dlq_url"]) == (1, 0, 0)
    # The emulators' dummy key alone (the endpoint already unset) is refused too.
    proc = stack.ops("depth", "--env", "staging", env={"AWS_ENDPOINT_URL_SQS": "", "DATABASE_URL": ""})
    assert proc.returncode == 6 and "AWS_ACCESS_KEY_ID=local (the emulators' dummy key)" in _error_line(proc)
    # On purpose, with --endpoint-url, it runs, and says where.
    proc = stack.ops_prod("depth", "default-dlq")
    assert proc.returncode == 0
    assert f"env prod on the endpoint {stack.endpoint} (--endpoint-url), not AWS" in proc.stderr
    # With no database configured for a deployed env, task fields say where the database is.
    assert "it runs in the VPC, where the ops task has it (RUNBOOK.md#ops-in-the-vpc)" in proc.stderr


def test_a_missing_dependency_is_a_setup_problem_with_its_fix(tmp_path):
    """`python -m ops` from a Python without the package (outside the virtualenv) and a Python
    missing a dependency: the fix, exit 10, never "internal error" or a traceback."""
    outside = subprocess.run([sys.executable, "-S", "-m", "ops", "depth", "--env", "prod"], check=False, cwd=REPO,
                             capture_output=True, text=True, timeout=60)
    assert outside.returncode == 10, outside.stderr
    assert outside.stderr.startswith("ops: setup problem: this Python (")
    assert "cannot import 'pcelery', which ops needs" in outside.stderr
    assert "`.venv/bin/python -m ops depth --env prod`" in outside.stderr
    assert "`. .venv/bin/activate` once per shell" in outside.stderr
    assert "Traceback" not in outside.stderr and "internal error" not in outside.stderr

    no_sqlalchemy = ("import sys; sys.modules['sqlalchemy'] = None; sys.argv = ['pcelery-ops', 'tasks']; "
                     "from pcelery.ops.cli import main; sys.exit(main())")
    proc = subprocess.run([sys.executable, "-c", no_sqlalchemy], check=False, cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 10, proc.stderr
    assert "setup problem" in proc.stderr and "'sqlalchemy'" in proc.stderr
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr


# ------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("args, option, says", [
    (["tasks", "--limit", "99999999999999999999"], "--limit", "is above the most this option takes, 1,000,000"),
    (["tasks", "--limit", "0"], "--limit", "'0' must be 1 or more"),
    (["peek", "default-dlq", "--limit", "1e9"], "--limit", "'1e9' is not a whole number"),
    (["tasks", "--older-than", "99999999999d"], "--older-than", "is longer than 3650 days"),
    (["replay", "--state", "dead", "--limit", "10000000"], "--limit", "is above the most this option takes"),
    (["redrive", "default-dlq", "--hold-seconds", "43201"], "--hold-seconds",
     "'43201' is above the most this option takes, 43,200"),
    (["redrive", "default-dlq", "--rate", "inf"], "--rate", "'inf' must be a number above 0"),
    (["depth", "--watch", "nan"], "--watch", "'nan' must be a number above 0"),
])
def test_numeric_options_are_checked_when_parsed(stack, args, option, says):
    proc = stack.ops(*args)
    assert proc.returncode == 2, proc.stderr
    assert f"argument {option}: " in proc.stderr and says in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "sqlite" not in proc.stderr.lower() and "SELECT" not in proc.stderr


class _NotSqs(http.server.BaseHTTPRequestHandler):
    """What answers when AWS_ENDPOINT_URL_SQS points at the wrong service: a web page."""

    status = 200

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        page = b"<html><body>Welcome to nginx!</body></html>"
        self.send_response(self.status)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(page)))
        self.end_headers()
        self.wfile.write(page)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.parametrize("status", [200, 404, 501])
def test_an_endpoint_that_is_not_sqs_is_named_as_such(stack, status):
    handler = type("Handler", (_NotSqs,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        proc = stack.ops("depth", "--endpoint-url", endpoint)
    finally:
        server.shutdown()
    assert proc.returncode == 4, proc.stderr
    assert _error_line(proc) == (
        f"ops: error: queue 'default': the endpoint {endpoint} does not answer like SQS (HTTP {status}, content type "
        "'text/html': <html><body>Welcome to nginx!</body></html>): check AWS_ENDPOINT_URL_SQS / AWS_ENDPOINT_URL (or "
        "--endpoint-url)")


# ------------------------------------------------------------------------ the whole CLI


def test_help_documents_every_exit_code_and_parse_only_mode_touches_nothing(stack):
    from pcelery.ops import EXIT_CODES

    out = subprocess.run([sys.executable, "-m", "ops", "--help"], check=False, capture_output=True, text=True,
                         cwd=REPO).stdout
    for code in EXIT_CODES:
        assert f"  {code:>3}  " in out
    for cmd in ("depth", "peek", "redrive", "tasks", "replay", "purge"):
        sub = stack.ops(cmd, "--help")
        assert sub.returncode == 0 and "--output" in sub.stdout and "--endpoint-url" in sub.stdout
    stack.send(stack.url("default", dlq=True), "x")
    proc = stack.ops("purge", "default-dlq", "--yes", env={"OPS_PARSE_ONLY": "1"})
    assert proc.returncode == 0 and stack.counts(stack.url("default", dlq=True)) == (1, 0, 0)
    proc = stack.ops("tasks", "--older-than", "soon", env={"OPS_PARSE_ONLY": "1"})
    assert proc.returncode == 2


def test_the_store_side_works_on_postgres_too(stack, pg_url):
    """The same commands with the claim-check store on the real Postgres (as in AWS)."""
    engine = schema.make_engine(pg_url)
    schema.migrate(engine)
    sqlite_engine, stack.engine = stack.engine, engine
    try:
        tid = stack.dead_task("demo.always_fail", error="RuntimeError: on postgres")
        env = {"DATABASE_URL": pg_url}
        [row] = [r for r in stack.ops_json("tasks", "--state", "dead", env=env) if r["id"] == tid]
        assert row["error"] == "RuntimeError: on postgres" and row["queue"] == "default"
        [depth] = stack.ops_json("depth", "default", env=env)
        assert depth["tasks"]["dead"] >= 1 and depth["dlq"]["visible"] == 1
        [peeked] = stack.ops_json("peek", "default-dlq", env=env)
        assert peeked["task_row"]["state"] == "dead"
        summary = stack.ops_json("redrive", "default-dlq", "--yes", env=env)
        assert summary["moved"] == 1 and summary["tasks_requeued"] == 1
        assert store.get_task(engine, tid).state == "queued"
    finally:
        stack.engine = sqlite_engine
        engine.dispose()


def _ops_on_terminal(stack: OpsEnv, args: list[str], answer: str, env: dict[str, str] | None = None
                     ) -> subprocess.CompletedProcess:
    """Run ops with a terminal on stdin where `answer` is already typed."""
    master, slave = os.openpty()
    try:
        os.write(master, answer.encode() + b"\n")
        return subprocess.run([sys.executable, "-m", "ops", *args], check=False, stdin=slave,
                              env={**stack.env, **(env or {})}, cwd=REPO, capture_output=True, text=True, timeout=60)
    finally:
        os.close(slave)
        os.close(master)


def test_confirmation_on_a_terminal(stack):
    dlq = stack.url("default", dlq=True)
    for i in range(3):
        stack.send(dlq, f"m{i}")

    no = _ops_on_terminal(stack, ["redrive", "default-dlq"], "n")
    assert no.returncode == 7 and "Type 'yes' to continue" in no.stderr and "nothing was changed" in no.stderr
    assert stack.counts(dlq) == (3, 0, 0)
    yes = _ops_on_terminal(stack, ["redrive", "default-dlq"], "yes")
    assert yes.returncode == 0 and "moved 3" in yes.stdout
    assert stack.counts(dlq) == (0, 0, 0) and stack.counts(stack.url("default"))[0] == 3

    # In prod, purge wants the queue's name typed back; "yes" is not enough.
    prod = create_queues(stack.sqs, DEMO_CATALOG, "prod")
    stack.send(prod["default"]["dlq_url"], "dead")
    prod_args = ["--env", "prod", "--endpoint-url", stack.endpoint]
    wrong = _ops_on_terminal(stack, ["purge", "default-dlq", *prod_args], "yes", env={"DATABASE_URL": ""})
    assert wrong.returncode == 7 and stack.counts(prod["default"]["dlq_url"]) == (1, 0, 0)
    typed = _ops_on_terminal(stack, ["purge", "default-dlq", *prod_args], "pcelery-prod-default-dlq",
                             env={"DATABASE_URL": ""})
    assert typed.returncode == 0 and stack.counts(prod["default"]["dlq_url"]) == (0, 0, 0)

    # A URL that names no queue is "not found", like a name.
    gone = stack.ops("peek", stack.url("default", dlq=True).replace("default-dlq", "gone-dlq"))
    assert gone.returncode == 3 and "not found" in _error_line(gone)


# --------------------------------------------------------------- native redrive (LocalStack)


def _localstack_health(endpoint: str) -> bool:
    try:
        health = json.loads(urllib.request.urlopen(f"{endpoint}/_localstack/health", timeout=2).read())
    except OSError:
        return False
    return health["services"].get("sqs") in ("available", "running")


@pytest.fixture(scope="session")
def localstack_endpoint(tmp_path_factory):
    if not LOCALSTACK_PY.exists():
        pytest.skip(f"LocalStack venv missing ({LOCALSTACK_PY}): run `make setup` to test the native redrive path")
    port = free_port()
    root = tmp_path_factory.mktemp("localstack")
    env = {**os.environ, "OVERRIDE_IN_DOCKER": "0", "FILESYSTEM_ROOT": str(root),
           "GATEWAY_LISTEN": f"127.0.0.1:{port}", "LOCALSTACK_HOST": f"127.0.0.1:{port}", "SERVICES": "sqs",
           "SQS_ENDPOINT_STRATEGY": "path", "SKIP_SSL_CERT_DOWNLOAD": "1", "LOCALSTACK_TELEMETRY_DISABLED": "1",
           "DNS_ADDRESS": "0"}
    log_path = root / "localstack.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed in the finally below
    proc = subprocess.Popen([str(LOCALSTACK_PY), "-m", "localstack.runtime.main"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True, cwd=root)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: proc.poll() is not None or _localstack_health(endpoint), timeout=120, interval=0.5,
                 what="LocalStack to become healthy", logs=[log_path])
        if proc.poll() is not None:
            pytest.fail(f"LocalStack exited with {proc.returncode}: see {log_path}")
        yield endpoint
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.fixture
def ls_stack(localstack_endpoint: str, tmp_path: Path) -> Iterator[OpsEnv]:
    sqs = sqs_client(localstack_endpoint)
    for url in sqs.list_queues().get("QueueUrls", []):  # every test starts from no queues
        sqs.delete_queue(QueueUrl=url)
    yield from _ops_env(localstack_endpoint, tmp_path)


def test_native_redrive_on_localstack_moves_everything_and_reports_progress(ls_stack):
    dlq = ls_stack.url("default", dlq=True)
    for i in range(15):
        ls_stack.send(dlq, f"native-{i}", n=str(i))

    proc = ls_stack.ops("redrive", "default-dlq", "--yes", "-o", "json", timeout=120)  # auto picks native here

    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert (summary["mode"], summary["moved"], summary["failed"]) == ("native", 15, 0)
    assert "native move task started" in proc.stderr and "COMPLETED: 15 of 15 moved" in proc.stderr
    moved = []
    deadline = time.monotonic() + 30
    while len(moved) < 15 and time.monotonic() < deadline:
        moved += ls_stack.sqs.receive_message(QueueUrl=ls_stack.url("default"), MaxNumberOfMessages=10,
                                              MessageAttributeNames=["All"], WaitTimeSeconds=1).get("Messages", [])
    assert {(m["Body"], m["MessageAttributes"]["n"]["StringValue"]) for m in moved} == {
        (f"native-{i}", str(i)) for i in range(15)}


def test_native_redrive_on_localstack_cancels_on_ctrl_c(ls_stack):
    dlq, dest = ls_stack.url("default", dlq=True), ls_stack.url("default")
    for i in range(20):
        ls_stack.send(dlq, f"slow-{i}")
    proc = subprocess.Popen([sys.executable, "-m", "ops", "redrive", "default-dlq", "--mode", "native", "--rate",
                             "1", "--yes", "-o", "json"], env=ls_stack.env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while ls_stack.counts(dest)[0] < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130, err
    summary = json.loads(out)
    assert "cancelling the move task" in err
    assert 1 <= summary["moved"] < 20
    in_dest, in_dlq = ls_stack.counts(dest)[0], ls_stack.counts(dlq)[0]
    assert in_dest + in_dlq == 20 and in_dest < 20
