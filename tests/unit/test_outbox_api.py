"""The submit API's checks, without SQS: every bad argument is a SubmitError naming the argument
and the fix, a plain connection is refused, declarations decide the queue, and the relay's
metric line carries the alarmed names. (Publishing, through a real moto server, is in
tests/integration/test_outbox.py.)"""

from __future__ import annotations

import json

import pytest

from devstack import DEMO_CATALOG
from devstack.stack import sqs_client
from pcelery import schema, store
from pcelery.outbox import Outbox, SubmitError
from pcelery.relay import emf_line
from pcelery.store import PendingSummary


def closed_port_outbox(engine) -> Outbox:
    """An outbox whose SQS endpoint refuses connections: these tests never get as far as a send."""
    return Outbox(engine, DEMO_CATALOG, "local", sqs_client("http://127.0.0.1:9"))


def test_submit_on_a_plain_connection_is_refused(engine):
    outbox = closed_port_outbox(engine)
    refused = pytest.raises(SubmitError,
                            match=r"not a transaction of this outbox: open it with `with outbox.transaction\(\)")
    with engine.begin() as conn, refused:
        outbox.submit(conn, "demo.add")
    assert store.count_by_state(engine)["pending"] == 0

def test_declarations_imported_by_the_process_are_honoured(tmp_path):
    import devstack.tasks  # noqa: F401 - declares demo.long for the long queue via @persistent_task

    eng = schema.make_engine(f"sqlite:///{tmp_path / 'd.sqlite3'}")
    ob = closed_port_outbox(eng)
    assert (ob.declared_queue("demo.long"), ob.declared_queue("unknown.task")) == ("long", None)
    eng.dispose()

@pytest.mark.parametrize("call, message", [
    (lambda ob, c: ob.submit(c, ""), "task_name='' is empty or not a string"),
    (lambda ob, c: ob.submit(c, "demo.add", queue="urgent"),
     "queue='urgent' is not in the catalog: use one of ['default', 'long']"),
    (lambda ob, c: ob.submit(c, "demo.add", countdown=-1), "countdown=-1 is negative: pass 0 or more seconds"),
    (lambda ob, c: ob.submit(c, "demo.add", countdown=6),
     "countdown=6 exceeds queue 'default''s max_countdown of 5 s"),
    (lambda ob, c: ob.submit(c, "demo.add", countdown="soon"), "countdown='soon' is not a number of seconds"),
    (lambda ob, c: ob.submit(c, "demo.add", 1, {"when": object()}),
     "args[1]['when'] of 'demo.add' has type object, which JSON cannot hold"),
    (lambda ob, c: ob.submit(c, "demo.add", at=__import__("datetime").datetime(2026, 1, 1)),
     "kwargs['at'] of 'demo.add' has type datetime, which JSON cannot hold"),
    (lambda ob, c: ob.submit(c, "demo.add", task_id="x" * 37), "must be a non-empty string of at most 36 characters"),
    (lambda ob, c: ob.submit_many(c, [("demo.add", [1], {}), ("demo.add", [1])]),
     "item 1 of submit_many is ('demo.add', [1]): each item must be (task_name, args, kwargs)"),
    (lambda ob, c: ob.submit_many(c, [("demo.add", [1], {}), ("demo.add", [{1, 2}], {})]),
     "args[0] of 'demo.add' has type set"),
])
def test_validation_errors_name_the_argument_and_the_fix(tmp_path, call, message):
    eng = schema.make_engine(f"sqlite:///{tmp_path / 'v.sqlite3'}")
    schema.migrate(eng)
    ob = closed_port_outbox(eng)
    with ob.transaction() as conn, pytest.raises(SubmitError) as caught:
        call(ob, conn)
    assert message in str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert sum(store.count_by_state(eng).values()) == 0  # nothing half-submitted
    eng.dispose()

def test_emf_line_carries_the_alarmed_metric_names():
    record = json.loads(emf_line("prod", PendingSummary(3, 42.12345), published=7, now=1_700_000_000))
    directive = record["_aws"]["CloudWatchMetrics"][0]
    assert record["_aws"]["Timestamp"] == 1_700_000_000_000
    assert directive["Namespace"] == "PersistentCelery"
    assert directive["Dimensions"] == [["Environment"]]
    assert {(m["Name"], m["Unit"]) for m in directive["Metrics"]} == {
        ("OutboxPendingCount", "Count"), ("OutboxOldestPendingAgeSeconds", "Seconds")}
    assert (record["Environment"], record["OutboxPendingCount"], record["OutboxOldestPendingAgeSeconds"]) == \
        ("prod", 3, 42.123)
