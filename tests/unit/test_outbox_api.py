"""The submit API's checks, without SQS: every bad argument is a SubmitError naming the argument
and the fix, a plain connection is refused, declarations decide the queue, and the relay's
metric line carries the alarmed names. (Publishing, through a real moto server, is in
tests/integration/test_outbox.py.)"""

from __future__ import annotations

import json
import time

import pytest
from faults import FaultProxy

from devstack import DEMO_CATALOG
from devstack.stack import sqs_client
from pcelery import schema, store
from pcelery.outbox import Outbox, SubmitError
from pcelery.relay import emf_line
from pcelery.settings import Settings
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
    (lambda ob, c: ob.submit(c, "demo.add", countdown=31 * 86400),
     "countdown=2678400 exceeds queue 'default''s max_countdown of 2592000 s"),
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
    (lambda ob, c: ob.submit(c, "demo.add", _nested(5000)),
     "args of 'demo.add' has lists and dicts nested deeper than 100 levels"),
    (lambda ob, c: ob.submit(c, "demo.add", tree=_nested(101)),
     "kwargs of 'demo.add' has lists and dicts nested deeper than 100 levels"),
    (lambda ob, c: ob.submit(c, "demo.add", _self_containing()), "(or one that contains itself)"),
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

def _nested(levels: int) -> list:
    value: list = []
    for _ in range(levels):
        value = [value]
    return value


def _self_containing() -> list:
    loop: list = []
    loop.append(loop)
    return loop


def test_nesting_up_to_the_limit_is_accepted(tmp_path):
    eng = schema.make_engine(f"sqlite:///{tmp_path / 'n.sqlite3'}")
    schema.migrate(eng)
    ob = closed_port_outbox(eng)
    with ob.transaction() as conn:
        task_id = ob.submit(conn, "demo.add", _nested(98))  # with args itself: 100 levels
    assert store.get_task(eng, task_id).state == "pending"  # the closed port left it for the relay
    eng.dispose()


def test_an_undeclared_task_name_is_refused_where_the_outbox_knows_the_declarations(engine):
    strict = Outbox(engine, DEMO_CATALOG, "local", sqs_client("http://127.0.0.1:9"),
                    task_queues={"shop.send_receipt": "default", "shop.export": "long"}, require_declared=True)
    with strict.transaction() as conn, pytest.raises(SubmitError) as caught:
        strict.submit(conn, "shop.send_reciept", 1)
    assert str(caught.value) == ("task_name='shop.send_reciept' is not declared by any task module this process "
                                 "knows (did you mean 'shop.send_receipt'?): fix the name, or import the module "
                                 "that declares it")
    with strict.transaction() as conn:  # a declared one goes through, to its declared queue
        task_id = strict.submit(conn, "shop.export", 1)
    assert store.get_task(engine, task_id).queue == "long"
    lenient = closed_port_outbox(engine)  # does not know the declarations: a worker records it (integration)
    with lenient.transaction() as conn:
        assert lenient.submit(conn, "shop.send_reciept", 1)


def test_the_process_declarations_count_when_no_mapping_is_given(engine):
    import devstack.tasks  # noqa: F401 - declares demo.* via @persistent_task

    strict = Outbox(engine, DEMO_CATALOG, "local", sqs_client("http://127.0.0.1:9"), require_declared=True)
    with strict.transaction() as conn, pytest.raises(SubmitError, match=r"did you mean 'demo\.flaky'"):
        strict.submit(conn, "demo.flakey")


@pytest.mark.parametrize("mode", ["hang", "refuse"])
def test_a_commit_returns_within_the_bound_when_sqs_hangs_or_refuses(engine, mode):
    """pcelery.sqs.SUBMIT: one attempt, connect 0.5 s, read 1 s. With the SDK's defaults a commit
    against an endpoint that accepts and never answers took about 15 s."""
    proxy = FaultProxy("127.0.0.1", 9).start()  # its upstream is never used: hang answers nothing
    proxy.set(mode)
    try:
        settings = Settings.from_env({"AWS_ENDPOINT_URL_SQS": proxy.url, "PCELERY_CATALOG": "devstack:DEMO_CATALOG"})
        outbox = Outbox.from_settings(settings, engine=engine)
        started = time.monotonic()
        with outbox.transaction() as conn:
            task_id = outbox.submit(conn, "demo.add", 1, 2)
            outbox.submit(conn, "demo.long", 1, queue="long")  # a second queue is not tried once SQS is down
        elapsed = time.monotonic() - started
    finally:
        proxy.stop()
    assert elapsed < 2.0, f"the commit took {elapsed:.1f} s"
    assert store.get_task(engine, task_id).state == "pending"  # left for the relay


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
