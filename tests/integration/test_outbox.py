"""The submit API, the publisher and the relay against a real moto server and both databases.
(The wire format's and the submit validation's unit tests are in tests/unit.)"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import run_console_script

from devstack import DEMO_CATALOG
from devstack.stack import create_queues, free_port, local_environ, sqs_client
from pcelery import schema, store
from pcelery.catalog import queue_prefix, sqs_queue_name
from pcelery.messages import decode_body, encode_body
from pcelery.outbox import Outbox, Publisher, SubmitError
from pcelery.relay import relay_pass

# --- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture(scope="module")
def sqs(sqs_endpoint):
    client = sqs_client(sqs_endpoint)
    return client, create_queues(client, DEMO_CATALOG, "local")


@pytest.fixture
def queues(sqs):
    """The demo queues, emptied before each test (moto allows one PurgeQueue a minute, so drain)."""
    client, created = sqs
    for q in created.values():
        while True:
            batch = client.receive_message(QueueUrl=q["url"], MaxNumberOfMessages=10, WaitTimeSeconds=0)
            if not batch.get("Messages"):
                break
            client.delete_message_batch(QueueUrl=q["url"], Entries=[
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(batch["Messages"])])
    return created


@pytest.fixture
def outbox(engine, sqs, queues):
    return Outbox(engine, DEMO_CATALOG, "local", sqs[0])


def closed_port_outbox(engine) -> Outbox:
    return Outbox(engine, DEMO_CATALOG, "local", sqs_client(f"http://127.0.0.1:{free_port()}"))


def take_messages(sqs, url: str, expected: int, *, deadline_polls: int = 30) -> list:
    """Receive and delete until `expected` messages came, then make sure no further one arrives.
    Returns the decoded messages."""
    client, _ = sqs
    got = []
    for _ in range(deadline_polls):
        wait = 1 if len(got) >= expected else 2
        resp = client.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=wait)
        batch = resp.get("Messages", [])
        for m in batch:
            client.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
            got.append(decode_body(m["Body"]))
        if not batch and len(got) >= expected:
            break
    return got


def pending_ids(engine) -> list[str]:
    return [r.id for r in store.list_tasks(engine, state="pending", limit=1000)]


def run_relay(sqs_endpoint, db_url, *args, extra_env=None, timeout=60):
    return run_console_script("pcelery-relay", *args, env={**local_environ(sqs_endpoint, db_url), **(extra_env or {})},
                              timeout=timeout)


# --- Celery's own producer ------------------------------------------------------------------

def test_our_envelope_has_the_fields_celerys_own_producer_sends(sqs, queues, sqs_endpoint, monkeypatch):
    """Send one task with Celery's producer through kombu to moto and compare envelopes, so a
    Celery or kombu upgrade that changes the format breaks here first."""
    from celery import Celery

    client, _ = sqs
    monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", sqs_endpoint)
    app = Celery("producer-check", broker="sqs://", set_as_current=False)
    app.conf.broker_transport_options = {
        "region": "us-east-1", "queue_name_prefix": queue_prefix("local"),
        "predefined_queues": {sqs_queue_name("local", "default"): {
            "url": queues["default"]["url"], "access_key_id": "local", "secret_access_key": "local"}},
    }
    app.conf.task_default_queue = "default"
    app.send_task("demo.add", task_id="celery-sent", queue="default")
    resp = client.receive_message(QueueUrl=queues["default"]["url"], WaitTimeSeconds=5)
    celerys_body = resp["Messages"][0]["Body"]
    client.delete_message(QueueUrl=queues["default"]["url"], ReceiptHandle=resp["Messages"][0]["ReceiptHandle"])
    app.close()

    theirs = json.loads(base64.b64decode(celerys_body))
    ours = json.loads(base64.b64decode(encode_body("ours", "demo.add", queue="default")))
    assert set(ours) == set(theirs)
    assert set(ours["headers"]) == set(theirs["headers"])
    assert set(ours["properties"]) == set(theirs["properties"])
    assert ours["properties"]["delivery_info"] == theirs["properties"]["delivery_info"]
    assert base64.b64decode(ours["body"]) == base64.b64decode(theirs["body"])
    decoded = decode_body(celerys_body)  # ops peek reads bare .delay() messages too
    assert (decoded.task, decoded.task_id, decoded.queue) == ("demo.add", "celery-sent", "default")


# --- submit ---------------------------------------------------------------------------------

def test_commit_publishes_exactly_once_and_marks_the_row_queued(outbox, engine, sqs, queues):
    with outbox.transaction() as conn:
        conn.execute(sa.text("SELECT 1"))  # the caller's own work shares the transaction
        task_id = outbox.submit(conn, "demo.add", 2, 3, scale=10)
        assert store.get_task(engine, task_id) is None  # other connections cannot see it yet
        early = sqs[0].receive_message(QueueUrl=queues["default"]["url"], WaitTimeSeconds=0)
        assert early.get("Messages", []) == []  # and nothing is on SQS before COMMIT
    row = store.get_task(engine, task_id)
    assert row.state == "queued" and row.message_id
    assert row.payload == {"args": [2, 3], "kwargs": {"scale": 10}}
    messages = take_messages(sqs, queues["default"]["url"], 1)
    assert [(m.task_id, m.task, m.args, m.kwargs) for m in messages] == [(task_id, "demo.add", [], {})]


def test_rollback_publishes_nothing(outbox, engine, sqs, queues):
    submitted = []

    def submit_then_fail():
        with outbox.transaction() as conn:
            submitted.append(outbox.submit(conn, "demo.add", 1))
            raise RuntimeError("the caller's own write failed")

    with pytest.raises(RuntimeError, match="the caller's own write failed"):
        submit_then_fail()
    assert store.get_task(engine, submitted[0]) is None
    assert take_messages(sqs, queues["default"]["url"], 0, deadline_polls=2) == []


def test_transaction_on_the_callers_connection(outbox, engine, sqs, queues):
    with engine.connect() as conn:
        with outbox.transaction(conn) as same:
            assert same is conn
            task_id = outbox.submit(conn, "demo.add")
        conn.begin()
        with pytest.raises(SubmitError, match="already in a transaction"), outbox.transaction(conn):
            pass
        conn.rollback()
    assert store.get_task(engine, task_id).state == "queued"
    assert [m.task_id for m in take_messages(sqs, queues["default"]["url"], 1)] == [task_id]


def test_bulk_submit_inserts_once_and_publishes_in_batches_of_ten(outbox, engine, sqs, queues):
    batch_calls, inserts = [], []
    outbox.publisher.sqs.meta.events.register(
        "before-parameter-build.sqs.SendMessageBatch", lambda params, **_: batch_calls.append(len(params["Entries"])))
    sa.event.listen(engine, "before_cursor_execute",
                    lambda conn, cur, statement, *a: statement.startswith("INSERT") and inserts.append(statement))
    with outbox.transaction() as conn:
        ids = outbox.submit_many(conn, [("demo.add", [i], {"n": i}) for i in range(25)])
    assert len(inserts) == 1  # one multi-row INSERT
    assert batch_calls == [10, 10, 5]
    assert store.count_by_state(engine)["queued"] == 25
    messages = take_messages(sqs, queues["default"]["url"], 25)
    assert sorted(m.task_id for m in messages) == sorted(ids)
    assert {m.task for m in messages} == {"demo.add"}
    assert store.get_task(engine, ids[7]).payload == {"args": [7], "kwargs": {"n": 7}}


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # SQS behaviour, not the DB
def test_queue_and_countdown_reach_sqs(outbox, engine, sqs, queues):
    client, _ = sqs
    with outbox.transaction() as conn:
        task_id = outbox.submit(conn, "demo.report", queue="long", countdown=2.2)
    assert store.get_task(engine, task_id).delay_seconds == 3  # whole seconds, rounded up
    first = client.receive_message(QueueUrl=queues["long"]["url"], WaitTimeSeconds=0)
    assert first.get("Messages", []) == []  # held by DelaySeconds, not by a Celery ETA
    messages = take_messages(sqs, queues["long"]["url"], 1)
    assert [(m.task_id, m.queue, m.headers["eta"]) for m in messages] == [(task_id, "long", None)]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_task_goes_to_the_queue_it_was_declared_for(engine, sqs_endpoint, sqs, queues):
    ob = Outbox(engine, DEMO_CATALOG, "local", sqs[0], task_queues={"reports.build": "long"})
    with ob.transaction() as conn:
        task_id = ob.submit(conn, "reports.build", 1)
        other = ob.submit(conn, "demo.add", 1)  # undeclared: the catalog's default queue
    assert [m.task_id for m in take_messages(sqs, queues["long"]["url"], 1)] == [task_id]
    assert [m.task_id for m in take_messages(sqs, queues["default"]["url"], 1)] == [other]
    with pytest.raises(SubmitError, match=re.escape("queue='default' but 'reports.build' is declared for queue "
                                                    "'long': drop queue= or pass queue='long'")), \
            ob.transaction() as conn:
        ob.submit(conn, "reports.build", queue="default")


def test_idempotent_task_id(outbox, engine, sqs, queues):
    with outbox.transaction() as conn:
        assert outbox.submit(conn, "demo.add", 1, task_id="order-42") == "order-42"
    with outbox.transaction() as conn:
        assert outbox.submit(conn, "demo.add", 1, task_id="order-42") == "order-42"  # no-op
    conflict = pytest.raises(SubmitError, match=re.escape("task_id='order-42' already exists as 'demo.add' with "
                                                          "other arguments"))
    with conflict, outbox.transaction() as conn:
        outbox.submit(conn, "demo.add", 2, task_id="order-42")
    assert [m.task_id for m in take_messages(sqs, queues["default"]["url"], 1)] == ["order-42"]
    assert store.get_task(engine, "order-42").payload["args"] == [1]


def test_rows_of_a_rolled_back_savepoint_are_not_published(outbox, engine, sqs, queues):
    with outbox.transaction() as conn:
        kept = outbox.submit(conn, "demo.add", 1)
        savepoint = conn.begin_nested()
        outbox.submit(conn, "demo.add", 2)
        savepoint.rollback()
        nested = conn.begin_nested()
        kept_nested = outbox.submit(conn, "demo.add", 3)
        nested.commit()
    assert sorted(m.task_id for m in take_messages(sqs, queues["default"]["url"], 2)) == sorted([kept, kept_nested])
    assert store.count_by_state(engine)["queued"] == 2


# --- SQS trouble and the relay --------------------------------------------------------------

def test_sqs_down_leaves_rows_pending_then_the_relay_publishes_them_once(engine, db_url, sqs_endpoint, sqs, queues):
    down = closed_port_outbox(engine)
    with down.transaction() as conn:
        task_id = down.submit(conn, "demo.add", 7)
    assert store.get_task(engine, task_id).state == "pending"

    young = run_relay(sqs_endpoint, db_url, "--once", extra_env={"PCELERY_RELAY_MIN_AGE": "3600"})
    assert young.returncode == 0, young.stderr
    assert store.get_task(engine, task_id).state == "pending"  # younger than min-age: left alone

    first = run_relay(sqs_endpoint, db_url, "--once", "--min-age", "0")
    assert first.returncode == 0, first.stderr
    assert "published 1 pending task(s)" in first.stderr
    row = store.get_task(engine, task_id)
    assert row.state == "queued" and row.message_id
    metrics = json.loads(first.stdout.strip().splitlines()[-1])
    assert (metrics["OutboxPendingCount"], metrics["OutboxPublished"], metrics["Environment"]) == (0, 1, "local")

    second = run_relay(sqs_endpoint, db_url, "--once", "--min-age", "0")
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout.strip().splitlines()[-1])["OutboxPublished"] == 0
    assert [m.task_id for m in take_messages(sqs, queues["default"]["url"], 1)] == [task_id]


def test_relays_running_together_publish_each_row_exactly_once(engine, db_url, sqs_endpoint, sqs, queues):
    with engine.begin() as conn:
        store.insert_tasks(conn, [store.task_row(task_id=str(uuid.uuid4()), task_name="demo.add", queue="default",
                                                 args=[i], kwargs={}) for i in range(120)])
    engines = [schema.make_engine(db_url) for _ in range(3)]
    start = threading.Barrier(len(engines))
    counts = [0] * len(engines)

    def relay(i):
        publisher = Publisher(DEMO_CATALOG, "local", sqs_client(sqs_endpoint))
        publisher.queue_url("default")  # resolve first so the passes really overlap
        start.wait(timeout=30)
        counts[i] = relay_pass(engines[i], publisher, min_age=0)

    threads = [threading.Thread(target=relay, args=(i,)) for i in range(len(engines))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for e in engines:
        e.dispose()
    assert sum(counts) == 120
    assert store.count_by_state(engine)["queued"] == 120
    messages = take_messages(sqs, queues["default"]["url"], 120, deadline_polls=60)
    assert len(messages) == 120 and len({m.task_id for m in messages}) == 120


def test_entries_sqs_refuses_stay_pending_and_do_not_stall_the_pass(engine, sqs_endpoint, sqs, queues):
    from faults import EntryRefusingProxy

    with engine.begin() as conn:
        rows = [store.task_row(task_id=f"ok-{i}", task_name="demo.add", queue="default", args=[], kwargs={})
                for i in range(12)]
        rows.append(store.task_row(task_id="refused", task_name="demo.add", queue="default", args=[], kwargs={}))
        store.insert_tasks(conn, rows)
    # SQS fails single entries of a batch (InternalError, throttling) with HTTP 200.
    proxy = EntryRefusingProxy(sqs_endpoint, refuse={"refused"}).start()
    try:
        published = relay_pass(engine, Publisher(DEMO_CATALOG, "local", sqs_client(proxy.url)), min_age=0)
    finally:
        proxy.stop()
    assert proxy.refused == ["refused"]
    assert published == 12
    assert pending_ids(engine) == ["refused"]
    assert len(take_messages(sqs, queues["default"]["url"], 12)) == 12


def test_a_queue_missing_in_sqs_leaves_its_rows_pending(engine, sqs_endpoint, caplog):
    unmade = Outbox(engine, DEMO_CATALOG, "dev", sqs_client(sqs_endpoint))  # no dev queues exist
    with caplog.at_level(logging.WARNING, logger="pcelery.outbox"), unmade.transaction() as conn:
        task_id = unmade.submit(conn, "demo.add")
    assert pending_ids(engine) == [task_id]
    assert "SQS refused publishing to queue 'default'" in caplog.text
    assert "1 task(s) stay pending for the relay" in caplog.text


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # SQS behaviour, not the DB
def test_publish_ids_sends_replayed_rows_now(outbox, engine, sqs, queues):
    with outbox.transaction() as conn:
        task_id = outbox.submit(conn, "demo.add")
    take_messages(sqs, queues["default"]["url"], 1)
    store.claim(engine, task_id, worker="w", lease_seconds=60)
    with engine.begin() as conn:
        store.finish_success(conn, task_id, worker="w", result=1)
    assert store.reset_for_replay(engine, [task_id, "no-such-task"]) == [task_id]
    sent = outbox.publish_ids([task_id, "no-such-task"])
    assert list(sent) == [task_id]
    assert store.get_task(engine, task_id).state == "queued"
    assert [m.task_id for m in take_messages(sqs, queues["default"]["url"], 1)] == [task_id]


def test_relay_loop_reports_each_pass_and_exits_0_on_sigterm(tmp_path, sqs_endpoint, queues):
    db_url = f"sqlite:///{tmp_path / 'relay.sqlite3'}"
    schema.migrate(schema.make_engine(db_url))
    env = {**os.environ, **local_environ(sqs_endpoint, db_url)}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "pcelery-relay"), "--interval", "60", "--min-age", "0"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready, "the relay printed no metrics line within 60 s"
        line = json.loads(proc.stdout.readline())
        assert line["OutboxPendingCount"] == 0 and "OutboxOldestPendingAgeSeconds" in line
        proc.send_signal(signal.SIGTERM)  # it is sleeping out its 60 s interval
        assert proc.wait(timeout=30) == 0
        assert "SIGTERM received" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_relay_rejects_a_malformed_min_age_setting(tmp_path, sqs_endpoint):
    done = run_relay(sqs_endpoint, f"sqlite:///{tmp_path / 'x.sqlite3'}", "--once",
                     extra_env={"PCELERY_RELAY_MIN_AGE": "half a minute"})
    assert done.returncode == 2
    assert "pcelery-relay: error: PCELERY_RELAY_MIN_AGE='half a minute' is not a number of seconds" in done.stderr


def _count_calls(client) -> dict[str, int]:
    """SQS calls a boto3 client makes, by operation (botocore's own event hooks: the real client)."""
    calls: dict[str, int] = {}

    def count(model, **_):
        calls[model.name] = calls.get(model.name, 0) + 1

    client.meta.events.register("before-call.sqs.*", count)
    return calls


def test_single_submits_from_many_threads_share_send_message_batches(engine, sqs_endpoint, queues):
    client = sqs_client(sqs_endpoint)
    calls = _count_calls(client)
    outbox = Outbox(engine, DEMO_CATALOG, "local", client, publish_linger=0.2)
    ids: list[str] = []

    def submit_one(i: int) -> None:
        with outbox.transaction() as conn:  # one transaction per submit, as a web request makes
            ids.append(outbox.submit(conn, "demo.add", i, i))

    threads = [threading.Thread(target=submit_one, args=(i,)) for i in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outbox.coalescer.flush(10)
    rows = [store.get_task(engine, i) for i in ids]
    assert all(r.state == "queued" and r.message_id for r in rows)
    assert calls.get("SendMessage", 0) == 0 and 3 <= calls["SendMessageBatch"] <= 10, calls
    visible = client.get_queue_attributes(QueueUrl=queues["default"]["url"],
                                          AttributeNames=["ApproximateNumberOfMessages"])
    assert int(visible["Attributes"]["ApproximateNumberOfMessages"]) == 30


def test_coalesced_rows_are_sent_before_the_process_exits_or_by_the_relay_after_a_crash(db_url, sqs_endpoint,
                                                                                       queues, tmp_path):
    from conftest import REPO

    engine = schema.make_engine(db_url)
    schema.migrate(engine)
    script = (
        "import os, signal, sys\n"
        "from devstack import DEMO_CATALOG\nfrom devstack.stack import sqs_client\n"
        "from pcelery import schema\nfrom pcelery.outbox import Outbox\n"
        f"outbox = Outbox(schema.make_engine({db_url!r}), DEMO_CATALOG, 'local', sqs_client({sqs_endpoint!r}),"
        " publish_linger=30)\n"
        "with outbox.transaction() as conn:\n    print(outbox.submit(conn, 'demo.add', 1, 2), flush=True)\n"
        "if sys.argv[1] == 'crash':\n    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = {}
    for how in ("exit", "crash"):
        run = subprocess.run([sys.executable, "-c", script, how], cwd=REPO, capture_output=True, text=True,
                             timeout=60, check=False)
        done[how] = (run.returncode, run.stdout.strip())
    assert done["exit"][0] == 0 and store.get_task(engine, done["exit"][1]).state == "queued"  # flushed at exit
    assert done["crash"][0] == -signal.SIGKILL and store.get_task(engine, done["crash"][1]).state == "pending"
    relay_pass(engine, Publisher(DEMO_CATALOG, "local", sqs_client(sqs_endpoint)), min_age=0)
    assert store.get_task(engine, done["crash"][1]).state == "queued"
    engine.dispose()
