"""Every malformed message reaches the DLQ, `ops peek` says why, and the worker keeps serving.

A table of message shapes anyone with sqs:SendMessage on a work queue can send: garbage, broken
envelopes (each field kombu or Celery reads, with the wrong type), other content types, damaged
inner bodies, a huge body, NUL characters, a task no worker declares, an id without a row, a row
of another task. All go to one running worker at once; a good task submitted right after them
succeeds; every shape ends in the DLQ (at once where nothing can ever read it: it is made visible
again on each receive and spends its maxReceiveCount quickly; after maxReceiveCount visibility
timeouts otherwise); the worker process never exits; then the DLQ is redriven with ops, every
shape comes back to the DLQ, and the worker still serves.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from conftest import REPO, LocalEnv, new_task, wait_for

from devstack import DEMO_CATALOG
from pcelery import store
from pcelery.messages import encode_body

DEFAULT = DEMO_CATALOG.get("default")


def b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def envelope(task: str = "demo.add", task_id: str | None = None, *, headers: dict | None = None,
             properties: dict | None = None, replace: dict | None = None, drop: tuple[str, ...] = ()) -> str:
    """A real Celery envelope for the default queue with some of its parts changed: headers and
    properties updated, top-level fields replaced, "headers.task"-style paths dropped."""
    env = json.loads(base64.b64decode(encode_body(task_id or str(uuid.uuid4()), task, queue="default")))
    env["headers"].update(headers or {})
    env["properties"].update(properties or {})
    env.update(replace or {})
    for path in drop:
        section, _, key = path.partition(".")
        (env[section] if key else env).pop(key or section)
    return b64(json.dumps(env))


@dataclass(frozen=True)
class Shape:
    name: str
    build: Callable[[LocalEnv], str]
    why: str  # what `ops peek` says, in part
    structural: bool = True  # no code version can read it: it is sped to the DLQ


def _row_for(env: LocalEnv, task_name: str) -> str:
    return new_task(env.engine, task_name=task_name, args=[1], kwargs={})


SHAPES = [
    Shape("plain text", lambda e: "hello, world", "the envelope is not JSON"),
    Shape("a single space", lambda e: " ", "the message is empty"),
    Shape("punctuation, not base64", lambda e: "!!!###$$$%%%", "the envelope is not JSON"),
    Shape("base64 of plain text", lambda e: b64("just some text"), "the envelope is not JSON"),
    Shape("base64 of bytes that are not UTF-8", lambda e: b64(b"\xff\xfe\xfd\xfc"), "the envelope is not JSON"),
    Shape("base64 of a JSON array", lambda e: b64("[1, 2, 3]"), "the envelope is an array, not a JSON object"),
    Shape("base64 of a JSON string", lambda e: b64('"a string"'), "the envelope is a string, not a JSON object"),
    Shape("base64 of JSON null", lambda e: b64("null"), "the envelope is null, not a JSON object"),
    Shape("raw JSON without kombu's fields", lambda e: '{"hello": "world"}', "no properties object"),
    Shape("JSON nested 100,000 deep", lambda e: b64("[" * 100_000), "nested too deeply to decode"),
    Shape("a protocol-1 message", lambda e: b64(json.dumps({"task": "demo.add", "id": "p1", "args": [], "kwargs": {}})),
          "no properties object"),
    Shape("properties a string", lambda e: envelope(replace={"properties": "x"}),
          "properties is a string, not an object"),
    Shape("properties a list", lambda e: envelope(replace={"properties": []}), "properties is an array, not an object"),
    Shape("unknown body_encoding", lambda e: envelope(properties={"body_encoding": "rot13"}),
          "unknown body_encoding 'rot13'"),
    Shape("body_encoding base64 over a body that is not", lambda e: envelope(replace={"body": "%%% not base64 %%%"}),
          "the body is not valid base64"),
    Shape("delivery_info a string", lambda e: envelope(properties={"delivery_info": "default"}),
          "properties.delivery_info is a string"),
    Shape("headers a string", lambda e: envelope(replace={"headers": "demo.add"}),
          "headers is a string, not an object"),
    Shape("headers a list", lambda e: envelope(replace={"headers": ["task", "id"]}),
          "headers is an array, not an object"),
    Shape("headers without the task", lambda e: envelope(drop=("headers.task",)), "headers.task is missing"),
    Shape("headers without the id", lambda e: envelope(drop=("headers.id",)), "headers.id is missing"),
    Shape("task name a number", lambda e: envelope(headers={"task": 42}), "headers.task is a number"),
    Shape("id a list", lambda e: envelope(headers={"id": ["a"]}), "headers.id is an array"),
    Shape("eta not a date", lambda e: envelope(headers={"eta": "tomorrow"}), "headers.eta='tomorrow' is not an ISO"),
    Shape("timelimit not a pair", lambda e: envelope(headers={"timelimit": "60"}), "headers.timelimit is not"),
    Shape("retries not a count", lambda e: envelope(headers={"retries": "many"}), "headers.retries is not a count"),
    Shape("pickle", lambda e: envelope(replace={"content-type": "application/x-python-serialize"}),
          "content type 'application/x-python-serialize' is not accepted"),
    Shape("yaml", lambda e: envelope(replace={"content-type": "application/x-yaml"}),
          "content type 'application/x-yaml' is not accepted"),
    Shape("unknown content encoding", lambda e: envelope(replace={"content-encoding": "utf-99"}),
          "content encoding 'utf-99' is not utf-8"),
    Shape("body a number", lambda e: envelope(replace={"body": 12345}), "the body is a number, not a string"),
    Shape("body an object", lambda e: envelope(replace={"body": {"args": []}}), "the body is an object, not a string"),
    Shape("inner body cut-off JSON", lambda e: envelope(replace={"body": b64("[[1, 2], {")}), "the body is not JSON"),
    Shape("inner body not [args, kwargs, embed]", lambda e: envelope(replace={"body": b64('{"args": [1]}')}),
          "the body is not Celery's [args, kwargs, embed]"),
    Shape("inner body not UTF-8", lambda e: envelope(replace={"body": b64(b"\xff\xfe")}), "the body is not JSON"),
    # Well-formed messages that still cannot run: they take maxReceiveCount visibility timeouts.
    Shape("huge (150 KB), id without a row", lambda e: envelope(headers={"argsrepr": "x" * 150_000}),
          "no task row has this id", structural=False),
    Shape("NUL characters, id without a row", lambda e: envelope(headers={"argsrepr": "a\u0000b\u0000"}),
          "no task row has this id", structural=False),
    Shape("an id without a row", lambda e: envelope(), "no task row has this id", structural=False),
    Shape("a task no worker declares", lambda e: envelope("demo.no_such_task", _row_for(e, "demo.no_such_task")),
          "NotRegistered: no worker of queue 'default' declares task 'demo.no_such_task'", structural=False),
    Shape("a row of another task", lambda e: envelope("demo.add", _row_for(e, "demo.effect")),
          "the message names task 'demo.add' but row", structural=False),
]


def _ops(env: LocalEnv, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ops", *args], cwd=REPO, env={**env.environ}, capture_output=True,
                          text=True, timeout=120, check=False)


def _peek_dlq(env: LocalEnv) -> dict[str, str | None]:
    """{body: why} of every message in the default queue's DLQ (ops peek consumes nothing)."""
    done = _ops(env, "peek", "default-dlq", "--limit", "200", "-o", "json")
    assert done.returncode == 0, done.stderr
    return {m["body"]: m["why"] for m in json.loads(done.stdout)}


@dataclass
class Run:
    bodies: dict[str, str]  # shape name -> body
    first: dict[str, str | None]  # body -> why, once every shape was in the DLQ
    second: dict[str, str | None]  # the same after a redrive and a second pass
    seconds_to_dlq: dict[str, float]  # shape name -> seconds from send to the DLQ (first pass)
    worker_alive: list[bool]
    good_results: list[object]
    env: LocalEnv


@pytest.fixture(scope="module")
def run(moto_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("poison")
    env = LocalEnv(moto_server.endpoint, f"sqlite:///{tmp / 'tasks.sqlite3'}", "local", tmp).migrate()
    try:
        worker = env.worker("poison", concurrency=2).wait_ready()
        bodies = {shape.name: shape.build(env) for shape in SHAPES}
        assert len(set(bodies.values())) == len(bodies)
        sent = time.monotonic()
        for body in bodies.values():
            env.send_raw("default", body)
        good = [env.submit("demo.add", 20, 22)]  # right after the poison: it must not wait behind it
        env.wait_rows(good, "succeeded", timeout=60)

        seen: dict[str, float] = {}

        def all_in_dlq() -> dict[str, str | None] | None:
            peeked = _peek_dlq(env)
            for name, body in bodies.items():
                if body in peeked and name not in seen:
                    seen[name] = time.monotonic() - sent
            return peeked if set(bodies.values()) <= set(peeked) else None

        first = wait_for(all_in_dlq, timeout=180, interval=2, logs=env.logs(),
                         what=lambda: f"every shape in the DLQ; missing {sorted(set(bodies) - set(seen))}")
        alive = [worker.alive()]

        redrive = _ops(env, "redrive", "default-dlq", "--yes", "--mode", "client")
        assert redrive.returncode == 0, redrive.stderr
        after = env.submit("demo.add", 1, 1)
        second = wait_for(lambda: (p := _peek_dlq(env)) and set(bodies.values()) <= set(p) and p, timeout=180,
                          interval=2, logs=env.logs(), what="every shape back in the DLQ after the redrive")
        env.wait_rows([after], "succeeded", timeout=60)
        alive.append(worker.alive())
        results = [env.row(t).result for t in [*good, after]]
        yield Run(bodies, first, second, seen, alive, results, env)
    finally:
        env.close()


@pytest.mark.parametrize("shape", SHAPES, ids=[s.name for s in SHAPES])
def test_each_malformed_message_reaches_the_dlq_and_ops_peek_says_why(run, shape):
    body = run.bodies[shape.name]
    assert body in run.first, "not in the DLQ"
    assert shape.why in (run.first[body] or ""), run.first[body]
    assert body in run.second, "not back in the DLQ after the redrive"
    # Unreadable messages are sent on at once (each receive hands them back right away); the
    # rest wait out maxReceiveCount visibility timeouts like any failing task.
    if shape.structural:
        assert run.seconds_to_dlq[shape.name] < DEFAULT.max_receive_count * DEFAULT.visibility_timeout


def test_the_table_has_at_least_thirty_shapes():
    assert len(SHAPES) >= 30


def test_the_worker_kept_serving_through_every_shape_and_the_redrive(run):
    assert run.worker_alive == [True, True], "a message stopped the worker"
    assert run.good_results == [42, 2]
    log = "\n".join(p.log.read_text(errors="replace") for p in run.env.processes)
    assert "Unrecoverable error" not in log
    assert log.count("poison message") >= 2 * sum(s.structural for s in SHAPES)  # logged, not crashed on


def test_the_row_of_a_task_no_worker_declares_reads_dead_with_why(run):
    [row] = store.list_tasks(run.env.engine, task_name="demo.no_such_task")
    assert row.state == "dead" and row.error.startswith("NotRegistered: no worker of queue 'default' declares")
