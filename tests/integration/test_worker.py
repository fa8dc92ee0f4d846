"""End-to-end behaviour of the worker: real `bin/worker` subprocesses (Celery prefork), a real
moto server over HTTP, the real Postgres and Redis. Timings come from catalog:DEMO_CATALOG
(default: visibility 8 s, maxReceiveCount 3; long: visibility 6 s, heartbeat every 2 s,
maxReceiveCount 2), so redeliveries and dead-lettering happen within seconds.

Isolation: this module runs its own moto server and its own Postgres database, so other test
modules' queues and rows never mix with these. Scenarios that need their own worker (kills,
result backend, refused start) use another environment name (dev/staging/prod): its SQS queues
are disjoint from the shared worker's "local" ones, so no other worker can take their messages.

Waits poll for a condition with generous deadlines (two cores, other test runs in parallel);
nothing asserts on wall time.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import time
import uuid

import pytest
from conftest import REDIS_URL, REPO, LocalEnv, make_pg_database, run_console_script, wait_for

from devstack import DEMO_CATALOG
from devstack.stack import create_queues, sqs_client, start_moto_server
from pcelery import store
from pcelery.catalog import sqs_queue_name
from pcelery.messages import decode_body, encode_body
from pcelery.outbox import Outbox

DEFAULT = DEMO_CATALOG.get("default")
LONG = DEMO_CATALOG.get("long")
Stack = LocalEnv


def effects(stack: Stack, key: str) -> list[dict]:
    from devstack.tasks import effect_rows

    return effect_rows(stack.engine, key)


@pytest.fixture(scope="module")
def database_url():
    """A database of this module's own on the machine's Postgres, with the demo tables."""
    url = make_pg_database("pcelery_worker")
    from devstack.tasks import migrate as migrate_demo_tables
    from pcelery import schema

    engine = schema.make_engine(url)
    schema.migrate(engine)
    migrate_demo_tables(engine)
    engine.dispose()
    return url


@pytest.fixture(scope="module")
def moto(moto_server):
    return moto_server


@pytest.fixture(scope="module")
def stack(moto, database_url, tmp_path_factory):
    """Environment "local" with one shared worker (both queues, concurrency 2)."""
    s = Stack(moto.endpoint, database_url, "local", tmp_path_factory.mktemp("local"))
    s.worker("shared").wait_ready()
    yield s
    s.close()


@pytest.fixture(scope="module")
def dead_letters(stack):
    """Started once and early: an always-failing task and the three kinds of poison message.
    Each needs maxReceiveCount visibility timeouts to reach the DLQ, so they cycle in parallel
    while the first tests wait."""
    failing = stack.submit("demo.always_fail", "boom on purpose")
    no_row_id = str(uuid.uuid4())
    unknown_id = str(uuid.uuid4())
    stack.send_raw("default", "this is neither base64 nor JSON {{{")
    stack.send_raw("default", encode_body(unknown_id, "demo.no_such_task", queue="default"))
    stack.send_raw("default", encode_body(no_row_id, "demo.add", queue="default"))
    # A Celery envelope whose inner body is not the JSON it claims to be, and one in pickle
    # (not accepted: a message must not be able to run code).
    bad_json_id, pickle_id = str(uuid.uuid4()), str(uuid.uuid4())
    stack.send_raw("default", _tampered(bad_json_id, body=base64.b64encode(b"[[1, 2], {").decode()))
    stack.send_raw("default", _tampered(pickle_id, **{"content-type": "application/x-python-serialize"}))
    # Tasks that outlive the default queue's soft limit, and its hard limit.
    soft = stack.submit("demo.slow", f"soft-{uuid.uuid4().hex[:8]}", 30.0)
    hard = stack.submit("demo.slow", f"hard-{uuid.uuid4().hex[:8]}", 30.0, True)
    return {"failing": failing, "no_row": no_row_id, "unknown": unknown_id, "bad_json": bad_json_id,
            "pickle": pickle_id, "soft": soft, "hard": hard}


def _envelope_task_id(body: str) -> str | None:
    """The id in a Celery envelope's headers, whatever its inner body holds."""
    try:
        return json.loads(base64.b64decode(body, validate=True))["headers"]["id"]
    except Exception:  # noqa: BLE001 - not an envelope
        return None


def _tampered(task_id: str, **envelope_changes) -> str:
    envelope = json.loads(base64.b64decode(encode_body(task_id, "demo.add", queue="default")))
    envelope.update(envelope_changes)
    return base64.b64encode(json.dumps(envelope).encode()).decode()


# --- Failures and poison end in the DLQ -----------------------------------------------------------

def test_always_failing_task_runs_max_receive_count_times_then_sits_in_the_dlq(stack, dead_letters):
    task_id = dead_letters["failing"]
    wait_for(lambda: any((decode_body(b) or None) and decode_body(b).task_id == task_id
                         for b in stack.dlq_bodies("default")),
             timeout=120, what="the always-failing task's message in the DLQ", logs=stack.logs())
    row = stack.row(task_id)
    assert row.state == "dead"
    assert row.attempts == DEFAULT.max_receive_count
    assert row.error == "RuntimeError: boom on purpose"


def test_each_poison_kind_ends_in_the_dlq_while_the_worker_keeps_serving(stack, dead_letters):
    def dlq_state():
        bodies = stack.dlq_bodies("default")
        ids = {_envelope_task_id(b) for b in bodies}
        return {
            "undecodable": "this is neither base64 nor JSON {{{" in bodies,
            "unknown task": dead_letters["unknown"] in ids,
            "no row": dead_letters["no_row"] in ids,
            "inner body not JSON": dead_letters["bad_json"] in ids,
            "pickle": dead_letters["pickle"] in ids,
        }

    state = {}
    wait_for(lambda: all(state.update(dlq_state()) or state.values()), timeout=120,
             what=lambda: f"every poison message in the DLQ (so far: {state})", logs=stack.logs())
    assert stack.row(dead_letters["no_row"]) is None  # nothing invented a row for it
    wait_for(lambda: stack.depth("default") == 0, timeout=60, what="default queue drained", logs=stack.logs())

    assert stack.processes[0].alive(), "a poison message stopped the worker"
    good = [stack.submit("demo.add", i, 100) for i in range(3)]
    rows = stack.wait_rows(good, "succeeded")
    assert [r.result for r in rows] == [100, 101, 102]


def test_time_limits_are_recorded_as_failures_and_end_in_the_dlq(stack, dead_letters):
    soft, hard = dead_letters["soft"], dead_letters["hard"]
    wait_for(lambda: {soft, hard} <= {_envelope_task_id(b) for b in stack.dlq_bodies("default")}, timeout=150,
             what="both time-limited tasks in the DLQ", logs=stack.logs())
    soft_row, hard_row = stack.row(soft), stack.row(hard)
    # The task saw its soft limit and failed; the wrapper recorded it like any other error.
    assert soft_row.state == "dead" and soft_row.attempts == DEFAULT.max_receive_count
    assert soft_row.error.startswith("SoftTimeLimitExceeded")
    # The pool killed the process at the hard limit; the main process recorded the verdict.
    assert hard_row.state == "dead" and hard_row.attempts == DEFAULT.max_receive_count
    assert hard_row.error.startswith(f"TimeLimitExceeded: hard time limit ({DEFAULT.hard_time_limit}")
    for row in (soft_row, hard_row):
        assert effects(stack, row.payload["args"][0]) == []


# --- The happy path, duplicates and heartbeats -------------------------------------------------

def test_twenty_tasks_succeed_and_the_queue_drains(stack):
    import redis

    ids = [stack.submit("demo.add", i, i) for i in range(20)]
    rows = stack.wait_rows(ids, "succeeded")
    assert [r.result for r in rows] == [2 * i for i in range(20)]
    assert all(r.attempts == 1 for r in rows)
    wait_for(lambda: stack.depth("default") == 0, timeout=60, what="default queue empty", logs=stack.logs())
    # This worker runs without a result backend: the row is the only record of the result.
    r = redis.Redis.from_url(REDIS_URL)
    assert not any(r.exists(f"celery-task-meta-{i}") for i in ids)


def _redundant_copy_acked(stack: Stack, task_id: str) -> bool:
    return any("redundant copy acked" in line and task_id in line
               for line in stack.processes[0].log.read_text(errors="replace").splitlines())


def test_the_same_id_delivered_twice_has_its_effect_once(stack):
    key = f"dup-{uuid.uuid4().hex[:8]}"
    task_id = stack.submit("demo.slow", key, 3.0)
    body = encode_body(task_id, "demo.slow", queue="default")
    stack.wait_rows([task_id], "running")
    stack.send_raw("default", body)  # a second message while the first runs: the claim says "busy"
    wait_for(lambda: _redundant_copy_acked(stack, task_id), timeout=30,
             what="the busy copy, another SQS message, deleted at once", logs=stack.logs())
    stack.wait_rows([task_id], "succeeded")
    wait_for(lambda: stack.depth("default") == 0, timeout=60, what="both messages gone", logs=stack.logs())
    stack.send_raw("default", body)  # and once more, long after success
    wait_for(lambda: stack.depth("default") == 0, timeout=60, what="late duplicate acked", logs=stack.logs())
    assert len(effects(stack, key)) == 1
    row = stack.row(task_id)
    assert row.state == "succeeded" and row.attempts == 1 and row.result == key


def test_a_long_task_runs_once_thanks_to_the_heartbeat_and_a_second_copy_is_deleted_not_dead_lettered(stack):
    seconds = 2.5 * LONG.visibility_timeout  # without heartbeats SQS would redeliver it twice meanwhile
    key = f"long-{uuid.uuid4().hex[:8]}"
    task_id = stack.submit("demo.long", key, seconds, queue="long")
    first_lease = stack.wait_rows([task_id], "running")[0].lease_until
    # A second message for the running task (a duplicate publish, say). It is deleted at once:
    # turned away and left in SQS instead, it would come back every visibility timeout (6 s),
    # and after maxReceiveCount (2) receives land in the DLQ long before the task ends.
    stack.send_raw("long", encode_body(task_id, "demo.long", queue="long"))
    wait_for(lambda: _redundant_copy_acked(stack, task_id), timeout=30,
             what="the second copy deleted while the task runs", logs=stack.logs())
    assert stack.row(task_id).state == "running"
    # The lease beat: the row's lease moves forward while the task runs, so no other worker
    # could claim it even if a copy of the message were delivered.
    wait_for(lambda: (stack.row(task_id).lease_until or first_lease) > first_lease, timeout=30,
             what="the row's lease extended by the heartbeat", logs=stack.logs())
    row = stack.wait_rows([task_id], "succeeded", timeout=120)[0]
    assert row.attempts == 1
    [effect] = effects(stack, key)
    # The control: the message was received exactly once. Without the heartbeat it becomes
    # visible again after 6 s, is received again (count 2), and with the row's lease (4 s) long
    # expired the second delivery would have claimed and run the task a second time.
    assert effect["receive_count"] == 1
    wait_for(lambda: stack.depth("long") == 0, timeout=30, what="long queue empty", logs=stack.logs())
    assert stack.depth("long", dlq=True) == 0


def test_a_long_task_submitted_to_a_queue_without_heartbeats_still_runs_once(stack):
    """A submitter that never imported the task module sends demo.long (declared for `long`,
    hard limit 60 s) to the default queue (visibility 8 s, no heartbeat in its contract). The
    task keeps its own time limit, so the worker beats for it anyway: without that the message
    would come back every 8 s, the lease (6 s) long expired, and run again each time."""
    seconds = 2.5 * DEFAULT.visibility_timeout
    key = f"misrouted-{uuid.uuid4().hex[:8]}"
    unaware = Outbox(stack.engine, DEMO_CATALOG, "local", stack.sqs, task_queues={})
    with unaware.transaction() as conn:  # knows no declarations: the default queue it is
        task_id = unaware.submit(conn, "demo.long", key, seconds)
    assert stack.row(task_id).queue == "default"
    row = stack.wait_rows([task_id], "succeeded", timeout=120)[0]
    assert row.attempts == 1
    [effect] = effects(stack, key)
    assert effect["receive_count"] == 1
    wait_for(lambda: stack.depth("default") == 0, timeout=30, what="default queue empty", logs=stack.logs())


def test_only_another_message_for_a_running_task_is_a_redundant_copy():
    """The busy verdict's rule on its own: the cases an integration test cannot stage (SQS handing
    the running message itself out again needs a failed visibility heartbeat)."""
    from pcelery.worker import Delivery

    def delivery(message_id):
        return Delivery(contract=LONG, queue_url="q", receipt_handle="r", receive_count=2, message_id=message_id)

    def busy(message_id):
        return store.Claim("busy", "t-1", "demo.long", attempts=1, message_id=message_id)

    assert delivery("m-2").is_redundant_copy(busy("m-1"))
    assert not delivery("m-1").is_redundant_copy(busy("m-1"))  # the running message itself: left for SQS
    assert not delivery("m-2").is_redundant_copy(busy(None))  # claimed by code older than schema v2
    assert not delivery(None).is_redundant_copy(busy("m-1"))  # a transport that gave no MessageId


# --- Killed workers ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def kill_stack(moto, database_url, tmp_path_factory):
    s = Stack(moto.endpoint, database_url, "staging", tmp_path_factory.mktemp("staging"))
    yield s
    s.close()


def _running_pid(stack: Stack, task_id: str) -> int:
    row = stack.wait_rows([task_id], "running", timeout=60)[0]
    return int(row.worker.rsplit(":", 1)[1])


def test_sigkill_of_a_pool_child_mid_task_still_completes_the_task(kill_stack):
    worker = kill_stack.worker("kill-child", queues=["default"], concurrency=1).wait_ready()
    key = f"child-{uuid.uuid4().hex[:8]}"
    task_id = kill_stack.submit("demo.slow", key, 3.0)
    child = _running_pid(kill_stack, task_id)
    assert child != worker.proc.pid
    os.kill(child, signal.SIGKILL)
    row = kill_stack.wait_rows([task_id], "succeeded", timeout=90)[0]
    assert row.attempts == 2
    assert len(effects(kill_stack, key)) == 1
    assert worker.alive()
    worker.stop()


def test_sigkill_of_the_whole_worker_mid_task_completes_on_a_new_worker(kill_stack):
    first = kill_stack.worker("kill-main-1", queues=["default"], concurrency=1).wait_ready()
    key = f"main-{uuid.uuid4().hex[:8]}"
    task_id = kill_stack.submit("demo.slow", key, 3.0)
    _running_pid(kill_stack, task_id)
    os.killpg(first.proc.pid, signal.SIGKILL)  # the main process and its pool children: a lost container
    first.stop()
    kill_stack.worker("kill-main-2", queues=["default"], concurrency=1).wait_ready()
    row = kill_stack.wait_rows([task_id], "succeeded", timeout=90)[0]
    assert row.attempts == 2
    assert len(effects(kill_stack, key)) == 1


# --- Result backend ---------------------------------------------------------------------------------

def test_with_the_redis_result_backend_async_result_get_returns_the_result(moto, database_url, tmp_path):
    from celery import Celery
    from celery.result import AsyncResult

    s = Stack(moto.endpoint, database_url, "dev", tmp_path, result_backend=REDIS_URL)
    try:
        s.worker("results", queues=["default"]).wait_ready()
        task_id = s.submit("demo.add", 20, 22)
        client = Celery("results-client", backend=REDIS_URL)
        assert AsyncResult(task_id, app=client).get(timeout=90, interval=0.2) == 42
        assert s.row(task_id).result == 42  # the row holds it as well
        client.backend.forget(task_id)
    finally:
        s.close()


# --- SQS down at submit time ------------------------------------------------------------------------

def test_a_task_submitted_while_sqs_is_down_is_published_by_the_relay_and_runs(database_url, tmp_path):
    server = start_moto_server()
    port = int(server.endpoint.rsplit(":", 1)[1])
    s = Stack(server.endpoint, database_url, "prod", tmp_path)
    relay = s.relay(interval=0.5, min_age=1.0)
    try:
        server.stop()
        task_id = s.submit("demo.add", 1, 2)  # publish after commit fails fast; the row stays
        assert s.row(task_id).state == "pending"
        time.sleep(1.5)  # older than --min-age while SQS is still down: the relay tries and fails
        assert s.row(task_id).state == "pending"
        assert relay.alive(), "the relay died while SQS was down"

        server = start_moto_server(port)  # back on the same endpoint, with its queues recreated
        s.queues = create_queues(s.sqs, DEMO_CATALOG, "prod")
        s.wait_rows([task_id], ("queued", "running", "succeeded"), timeout=60)
        s.worker("after-outage", queues=["default"]).wait_ready()
        row = s.wait_rows([task_id], "succeeded")[0]
        assert row.result == 3 and row.message_id
    finally:
        s.close()
        server.stop()


# --- Refusing to start ---------------------------------------------------------------------------

def test_a_missing_queue_a_queue_without_redrive_policy_and_an_old_schema_are_refused_at_start(moto, tmp_path):
    env = "prod"  # the endpoint-down test uses "prod" on a server of its own
    empty_store = f"sqlite:///{tmp_path / 'never-migrated.sqlite3'}"
    s = Stack(moto.endpoint, empty_store, env, tmp_path, create=False)

    def refusal(name: str) -> str:
        w = s.worker(name, queues=["default"])
        code = w.proc.wait(90)
        output = w.log.read_text()
        assert code == 3, output
        assert "refusing to start" in output and "Traceback" not in output
        return output

    try:
        assert f"SQS queue '{sqs_queue_name(env, 'default')}' (catalog queue 'default', env 'prod') does not exist" \
            in refusal("missing-queue")
        sqs = sqs_client(moto.endpoint)
        for contract in DEMO_CATALOG:
            sqs.create_queue(QueueName=sqs_queue_name(env, contract.name))  # no RedrivePolicy
        output = refusal("no-redrive")
        assert f"'{sqs_queue_name(env, 'default')}' has no RedrivePolicy" in output
        assert "run `pcelery-migrate`" in output
        assert sqs_queue_name(env, "long") not in output  # not consumed by this worker: not its concern
    finally:
        s.close()


def test_invalid_settings_stop_the_worker_before_celery_starts(tmp_path):
    done = run_console_script("pcelery-worker", env={"PCELERY_WORKER_QUEUES": "default,nope",
                                                    "PCELERY_CATALOG": "devstack:DEMO_CATALOG",
                                                    "PYTHONPATH": str(REPO)}, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == ("pcelery-worker: error: PCELERY_WORKER_QUEUES names ['nope'], which the catalog "
                                   "does not have: use some of ['default', 'long']")
    outside_local = run_console_script("pcelery-worker", env={"PCELERY_ENV": "staging"}, cwd=tmp_path)
    assert outside_local.returncode == 2
    assert outside_local.stderr.strip() == (
        "pcelery-worker: error: PCELERY_TASK_MODULES is not set: name the modules that declare your tasks, e.g. "
        "PCELERY_TASK_MODULES=myproject.tasks (a worker without them would dead-letter every message)")
