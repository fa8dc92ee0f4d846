"""The worker's batched SQS traffic keeps the guarantees: acks buffered for a DeleteMessageBatch
when the worker dies are redelivered and acked as duplicates (nothing runs twice), a warm shutdown
flushes them, and a message prefetched behind running tasks never reappears on SQS while it waits
(the VisibilityKeeper). Real `pcelery-worker` processes on a moto server and the real Postgres,
DEMO_CATALOG timings (default queue: visibility 8 s, hard time limit 5 s, margin 2 s)."""

from __future__ import annotations

import re
import signal

import pytest
from conftest import LocalEnv, make_pg_database, reset_moto, wait_for

from devstack.tasks import effect_rows
from pcelery import store


@pytest.fixture
def env(moto_server, tmp_path):
    reset_moto(moto_server.endpoint)
    e = LocalEnv(moto_server.endpoint, make_pg_database("batching"), "dev", tmp_path).migrate()
    yield e
    e.close()


def in_flight(env: LocalEnv) -> int:
    return env.counts(env.url("default"))[1]


def test_acks_buffered_when_the_worker_dies_are_redelivered_and_nothing_runs_twice(env):
    env.environ["PCELERY_ACK_LINGER"] = "5"  # acks wait 5 s to fill a batch: the kill lands inside
    worker = env.worker("a", queues=["default"], concurrency=2).wait_ready()
    # Not transactional: the effect (a line in a file) is outside the store, so only the claim's
    # duplicate check keeps a redelivered message from doing it again.
    effects = env.tmp / "effects.txt"
    ids = [env.submit("demo.append", str(effects), f"k{i}") for i in range(6)]
    env.wait_rows(ids, "succeeded")
    worker.stop(signal.SIGKILL)
    assert in_flight(env) == 6  # every message done, none deleted: the acks died with the worker

    env.environ["PCELERY_ACK_LINGER"] = "0.2"
    env.worker("b", queues=["default"], concurrency=2).wait_ready()
    # After the visibility timeout each message comes back; the claim finds its row succeeded.
    wait_for(lambda: env.depth("default") == 0, timeout=90, what="the redelivered messages acked",
             logs=env.logs())
    assert sorted(effects.read_text().split()) == [f"k{i}" for i in range(6)]
    assert [env.row(tid).attempts for tid in ids] == [1] * 6
    assert env.depth("default", dlq=True) == 0


def test_a_warm_shutdown_deletes_the_buffered_acks(env):
    env.environ["PCELERY_ACK_LINGER"] = "5"
    worker = env.worker("a", queues=["default"], concurrency=2).wait_ready()
    ids = [env.submit("demo.add", i, i) for i in range(4)]
    env.wait_rows(ids, "succeeded")
    assert worker.stop(signal.SIGTERM) == 0
    assert env.depth("default") == 0  # deleted on the way out, not left to come back


def test_a_prefetched_message_never_reappears_while_it_waits_for_the_pool(env):
    # One pool slot and five 3-second tasks, received together (the prefetch window holds the
    # pool plus a batch): the last waits about 12 s, beyond the 8 s visibility timeout.
    worker = env.worker("a", queues=["default"], concurrency=1).wait_ready()
    with env.outbox.transaction() as conn:
        ids = [env.outbox.submit(conn, "demo.slow", f"w{i}", seconds=3) for i in range(5)]
    env.wait_rows(ids, "succeeded", timeout=120)
    log = worker.log.read_text(errors="replace")
    received = {tid: len(re.findall(rf"demo\.slow\[{tid}\] received", log)) for tid in ids}
    assert received == dict.fromkeys(ids, 1), f"received more than once: {received}"
    for i, tid in enumerate(ids):
        [effect] = effect_rows(env.engine, f"w{i}")
        assert (effect["receive_count"], env.row(tid).attempts) == (1, 1)
    assert "duplicate delivery" not in log
    assert store.count_by_state(env.engine)["succeeded"] == 5
