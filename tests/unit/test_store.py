"""The claim-check store on both databases: every transition, the refused ones, migrations.
(The claim race between processes and the migrate command are in
tests/integration/test_store_processes.py.)"""

from __future__ import annotations

import datetime as dt
import time
import uuid

import pytest
import sqlalchemy as sa
from conftest import new_task

from pcelery import schema, store


def state_of(engine, task_id):
    return store.get_task(engine, task_id).state


# --- migrations -----------------------------------------------------------------------------

def _drop_schema(eng):
    with eng.begin() as conn:
        conn.execute(sa.text("DROP TABLE IF EXISTS pcelery_schedules"))
        conn.execute(sa.text("DROP TABLE IF EXISTS pcelery_tasks"))
        conn.execute(sa.text("DROP TABLE IF EXISTS pcelery_schema_version"))


def test_migrate_is_idempotent_and_versioned(db_url):
    eng = schema.make_engine(db_url)
    _drop_schema(eng)  # from an empty database, also on the session's Postgres
    assert schema.schema_version(eng) == 0
    first = schema.migrate(eng)
    assert first == ["1: create table pcelery_tasks with its state indexes",
                     "2: add pcelery_tasks.claimed_message_id (the SQS message a claim was made for)",
                     "3: add pcelery_tasks.due_at and attempt_errors, table pcelery_schedules (scheduling, retries)"]
    assert schema.migrate(eng) == []
    assert schema.schema_version(eng) == schema.LATEST_SCHEMA_VERSION == 3
    names = set(sa.inspect(eng).get_table_names())
    assert {"pcelery_tasks", "pcelery_schema_version", "pcelery_schedules"} <= names
    # The steps build exactly the tables the code describes (a drift would break the next ALTER).
    for table in (schema.tasks, schema.schedules):
        built = {c["name"] for c in sa.inspect(eng).get_columns(table.name)}
        assert built == {c.name for c in table.columns}
    indexes = {i["name"] for i in sa.inspect(eng).get_indexes("pcelery_tasks")}
    assert indexes == {i.name for i in schema.tasks.indexes}
    eng.dispose()


def test_a_version_1_database_with_rows_upgrades_in_place(db_url):
    """The upgrade path a deployed database takes: v1 rows survive, the new column starts empty,
    and the code that needs it works right after."""
    eng = schema.make_engine(db_url)
    _drop_schema(eng)
    assert schema.migrate(eng, up_to=1) == ["1: create table pcelery_tasks with its state indexes"]
    assert schema.schema_version(eng) == 1  # the worker and ops refuse this (tested with them)
    assert "claimed_message_id" not in {c["name"] for c in sa.inspect(eng).get_columns("pcelery_tasks")}
    running, queued = str(uuid.uuid4()), str(uuid.uuid4())
    with eng.begin() as conn:  # rows as v1 code wrote them: statements that name only v1 columns
        for task_id in (running, queued):
            row = store.task_row(task_id=task_id, task_name="demo.add", queue="default", args=[1, 2], kwargs={})
            conn.execute(schema.tasks.insert().values({k: v for k, v in row.items() if k != "due_at"}))
        conn.execute(sa.update(schema.tasks).where(schema.tasks.c.id == queued).values(state="queued"))
        conn.execute(sa.update(schema.tasks).where(schema.tasks.c.id == running).values(
            state="running", attempts=1, worker="old-worker", lease_until=schema.utcnow() + dt.timedelta(minutes=5)))

    assert schema.migrate(eng) == [
        "2: add pcelery_tasks.claimed_message_id (the SQS message a claim was made for)",
        "3: add pcelery_tasks.due_at and attempt_errors, table pcelery_schedules (scheduling, retries)"]
    assert schema.schema_version(eng) == schema.LATEST_SCHEMA_VERSION
    row = store.get_task(eng, running)
    assert (row.state, row.worker, row.claimed_message_id) == ("running", "old-worker", None)
    # A task claimed by v1 code: busy, and nobody knows which message it runs for.
    busy = store.claim(eng, running, worker="new", lease_seconds=60, message_id="m-2")
    assert (busy.outcome, busy.message_id) == ("busy", None)
    won = store.claim(eng, queued, worker="new", lease_seconds=60, message_id="m-1")
    assert (won.outcome, won.args, won.message_id) == ("run", [1, 2], "m-1")
    assert store.get_task(eng, queued).claimed_message_id == "m-1"
    eng.dispose()


# --- transitions ----------------------------------------------------------------------------

def test_happy_path_pending_queued_running_succeeded(engine):
    task_id = new_task(engine, args=[2, 3], kwargs={"scale": 10})
    row = store.get_task(engine, task_id)
    assert row.state == "pending" and row.attempts == 0
    assert row.payload == {"args": [2, 3], "kwargs": {"scale": 10}}
    assert row.created_at.tzinfo is not None and row.created_at.utcoffset() == dt.timedelta(0)

    assert store.mark_queued(engine, {task_id: "msg-1"}) == 1
    row = store.get_task(engine, task_id)
    assert (row.state, row.message_id) == ("queued", "msg-1")
    assert row.queued_at.utcoffset() == dt.timedelta(0)

    before = schema.utcnow()
    claim = store.claim(engine, task_id, worker="w1@host:1", lease_seconds=60, message_id="msg-1")
    assert claim.outcome == "run"
    assert (claim.task_name, claim.args, claim.kwargs, claim.attempts) == ("demo.add", [2, 3], {"scale": 10}, 1)
    assert claim.lease_until.utcoffset() == dt.timedelta(0)
    assert before + dt.timedelta(seconds=59) < claim.lease_until < schema.utcnow() + dt.timedelta(seconds=61)
    row = store.get_task(engine, task_id)
    assert (row.state, row.worker, row.claimed_message_id) == ("running", "w1@host:1", "msg-1")

    assert store.extend_lease(engine, task_id, worker="w1@host:1", lease_seconds=120)
    assert store.get_task(engine, task_id).lease_until > claim.lease_until

    with engine.begin() as conn:
        assert store.finish_success(conn, task_id, worker="w1@host:1", result={"sum": 5})
    row = store.get_task(engine, task_id)
    assert (row.state, row.result, row.lease_until) == ("succeeded", {"sum": 5}, None)
    assert row.claimed_message_id is None  # it describes the live claim only, like the lease
    assert row.finished_at >= row.started_at


def test_succeeded_row_is_a_duplicate_and_never_requeued(engine):
    task_id = new_task(engine)
    store.claim(engine, task_id, worker="w1", lease_seconds=60)
    with engine.begin() as conn:
        store.finish_success(conn, task_id, worker="w1", result=None)
    again = store.claim(engine, task_id, worker="w2", lease_seconds=60)
    assert again.outcome == "duplicate" and again.args is None
    assert store.mark_queued(engine, {task_id: "late"}) == 0  # a late publisher does not resurrect it
    row = store.get_task(engine, task_id)
    assert (row.state, row.attempts, row.message_id) == ("succeeded", 1, None)


def test_claim_accepts_pending_because_the_message_can_beat_mark_queued(engine):
    task_id = new_task(engine)
    assert store.claim(engine, task_id, worker="w1", lease_seconds=60).outcome == "run"
    assert store.mark_queued(engine, {task_id: "m"}) == 0  # pending->queued only: running untouched
    assert state_of(engine, task_id) == "running"


def test_failure_redelivery_then_dead_then_redrive(engine):
    task_id = new_task(engine)
    store.claim(engine, task_id, worker="w1", lease_seconds=60, message_id="m")
    assert store.finish_failure(engine, task_id, worker="w1", error=ValueError("bad input"), final=False)
    row = store.get_task(engine, task_id)
    assert (row.state, row.error, row.lease_until) == ("failed", "ValueError: bad input", None)
    assert row.claimed_message_id is None

    second = store.claim(engine, task_id, worker="w2", lease_seconds=60)  # SQS redelivered it
    assert (second.outcome, second.attempts) == ("run", 2)
    assert store.finish_failure(engine, task_id, worker="w2", error="KeyError: 'x'", final=True)
    row = store.get_task(engine, task_id)
    assert (row.state, row.error) == ("dead", "KeyError: 'x'")

    redriven = store.claim(engine, task_id, worker="w3", lease_seconds=60)  # back from the DLQ
    assert (redriven.outcome, redriven.attempts) == ("run", 3)


def test_other_workers_are_refused_while_the_lease_is_live(engine):
    task_id = new_task(engine)
    assert store.claim(engine, task_id, worker="w1", lease_seconds=60, message_id="sqs-1").message_id == "sqs-1"
    busy = store.claim(engine, task_id, worker="w2", lease_seconds=60, message_id="sqs-2")
    assert busy.outcome == "busy" and busy.lease_until is not None
    assert busy.message_id == "sqs-1"  # the holder's message, so the worker can tell a second copy apart
    assert not store.extend_lease(engine, task_id, worker="w2", lease_seconds=60)
    with engine.begin() as conn:
        assert not store.finish_success(conn, task_id, worker="w2", result=1)
    assert not store.finish_failure(engine, task_id, worker="w2", error="x", final=True)
    assert not store.release(engine, task_id, worker="w2")
    row = store.get_task(engine, task_id)
    assert (row.state, row.worker, row.attempts, row.error) == ("running", "w1", 1, None)
    assert row.claimed_message_id == "sqs-1"  # a refused claim records nothing


def test_release_gives_the_row_back_to_queued(engine):
    task_id = new_task(engine)
    store.claim(engine, task_id, worker="w1", lease_seconds=60, message_id="m")
    assert store.release(engine, task_id, worker="w1")
    row = store.get_task(engine, task_id)
    assert (row.state, row.lease_until, row.claimed_message_id) == ("queued", None, None)
    assert store.claim(engine, task_id, worker="w2", lease_seconds=60).attempts == 2


def test_missing_row_is_reported_as_missing(engine):
    assert store.claim(engine, "no-such-task", worker="w1", lease_seconds=60).outcome == "missing"
    assert store.get_task(engine, "no-such-task") is None


def test_expired_lease_can_be_claimed_again_and_the_old_owner_loses(engine):
    task_id = new_task(engine)
    store.claim(engine, task_id, worker="dead-worker", lease_seconds=0)  # expires at once
    stuck = store.list_tasks(engine, stuck=True)
    assert [r.id for r in stuck] == [task_id]
    retaken = store.claim(engine, task_id, worker="w2", lease_seconds=60)
    assert (retaken.outcome, retaken.attempts) == ("run", 2)
    assert store.list_tasks(engine, stuck=True) == []
    with engine.begin() as conn:  # the first worker came back to life: its verdict must not land
        assert not store.finish_success(conn, task_id, worker="dead-worker", result="stale")
    assert store.get_task(engine, task_id).worker == "w2"


def test_finish_success_joins_the_callers_transaction(engine):
    task_id = new_task(engine)
    store.claim(engine, task_id, worker="w1", lease_seconds=60)

    def succeed_then_fail():
        with engine.begin() as conn:
            store.finish_success(conn, task_id, worker="w1", result=1)
            raise RuntimeError("the task's own write failed")

    with pytest.raises(RuntimeError, match="the task's own write failed"):
        succeed_then_fail()
    assert state_of(engine, task_id) == "running"


def test_errors_are_formatted_and_truncated(engine):
    task_id = new_task(engine)
    store.claim(engine, task_id, worker="w1", lease_seconds=60)
    store.finish_failure(engine, task_id, worker="w1", error=RuntimeError("x" * 20000), final=False)
    error = store.get_task(engine, task_id).error
    assert error.startswith("RuntimeError: xxx") and error.endswith("...[truncated]")
    assert len(error) == store.MAX_ERROR_CHARS


def test_result_that_json_cannot_hold_is_stored_as_repr(engine):
    task_id = new_task(engine)
    store.claim(engine, task_id, worker="w1", lease_seconds=60)
    with engine.begin() as conn:
        assert store.finish_success(conn, task_id, worker="w1", result={1, 2})
    result = store.get_task(engine, task_id).result
    assert result["repr"] == "{1, 2}"
    assert "not JSON-serializable (set" in result["note"]


def test_reset_for_replay_spares_live_running_rows(engine):
    done, live, crashed = new_task(engine), new_task(engine), new_task(engine)
    store.claim(engine, done, worker="w1", lease_seconds=60)
    store.finish_failure(engine, done, worker="w1", error="E: boom", final=True)
    store.claim(engine, live, worker="w1", lease_seconds=60)
    store.claim(engine, crashed, worker="w1", lease_seconds=0)

    reset = store.reset_for_replay(engine, [done, live, crashed, "no-such-task"])
    assert reset == [done, crashed]
    row = store.get_task(engine, done)
    assert (row.state, row.attempts, row.error, row.worker) == ("pending", 1, "E: boom", None)
    assert state_of(engine, live) == "running"
    assert state_of(engine, crashed) == "pending"


def test_counts_lists_and_pending_summary(engine):
    a, b, c = new_task(engine), new_task(engine, task_name="demo.other"), new_task(engine)
    store.mark_queued(engine, {b: "m"})
    store.claim(engine, c, worker="w", lease_seconds=60)
    counts = store.count_by_state(engine)
    assert counts == {"scheduled": 0, "pending": 1, "queued": 1, "running": 1, "succeeded": 0, "failed": 0, "dead": 0,
                      "cancelled": 0}
    assert [r.id for r in store.list_tasks(engine)] == [a, b, c]
    assert [r.id for r in store.list_tasks(engine, state="queued")] == [b]
    assert [r.id for r in store.list_tasks(engine, task_name="demo.other")] == [b]
    assert store.list_tasks(engine, older_than_seconds=3600) == []
    with pytest.raises(ValueError, match="unknown state 'done': use one of scheduled, pending"):
        store.list_tasks(engine, state="done")

    summary = store.pending_summary(engine)
    assert summary.count == 1 and 0 <= summary.oldest_age_seconds < 600
    with engine.begin() as conn:  # make the pending row look 10 minutes old
        conn.execute(sa.update(schema.tasks).where(schema.tasks.c.id == a)
                     .values(updated_at=schema.utcnow() - dt.timedelta(minutes=10)))
    assert store.pending_summary(engine).oldest_age_seconds >= 600


def test_count_by_queue_and_state_counts_each_queue_apart(engine):
    assert store.count_by_queue_and_state(engine) == {}
    default_ids = [new_task(engine) for _ in range(3)]
    long_id = new_task(engine, queue="long")
    store.mark_queued(engine, {default_ids[0]: "m0", long_id: "m1"})
    store.claim(engine, default_ids[1], worker="w", lease_seconds=60)
    store.finish_failure(engine, default_ids[1], worker="w", error="E: x", final=True)
    zero = dict.fromkeys(store.STATES, 0)
    assert store.count_by_queue_and_state(engine) == {
        "default": {**zero, "queued": 1, "dead": 1, "pending": 1},
        "long": {**zero, "queued": 1},
    }


def test_mark_redriven_moves_only_rows_still_dead(engine):
    dead, claimed, succeeded = new_task(engine), new_task(engine), new_task(engine)
    for task_id in (dead, claimed, succeeded):
        store.claim(engine, task_id, worker="w1", lease_seconds=60)
        store.finish_failure(engine, task_id, worker="w1", error="E: boom", final=True)
    # The redriven message of `claimed` reached a worker before ops updated the row; `succeeded`
    # ran to the end from its redriven copy already.
    store.claim(engine, claimed, worker="w2", lease_seconds=60)
    store.claim(engine, succeeded, worker="w2", lease_seconds=60)
    with engine.begin() as conn:
        store.finish_success(conn, succeeded, worker="w2", result=1)

    assert store.mark_redriven(engine, [succeeded, "no-such-task", dead, claimed]) == [dead]
    row = store.get_task(engine, dead)
    assert (row.state, row.error, row.attempts) == ("queued", "E: boom", 1)
    assert row.queued_at is not None
    assert (state_of(engine, claimed), state_of(engine, succeeded)) == ("running", "succeeded")
    assert store.mark_redriven(engine, [dead]) == []  # queued now: nothing to move
    assert store.mark_redriven(engine, []) == []


def test_claim_unpublished_honours_age_and_exclusions(engine):
    old, fresh = new_task(engine), new_task(engine)
    with engine.begin() as conn:
        conn.execute(sa.update(schema.tasks).where(schema.tasks.c.id == old)
                     .values(updated_at=schema.utcnow() - dt.timedelta(seconds=120)))
    with engine.begin() as conn:
        rows = store.claim_unpublished(conn, older_than_seconds=60)
    assert rows == [store.OutboxEntry(old, "demo.add", "default", 0)]
    with engine.begin() as conn:
        assert [r.id for r in store.claim_unpublished(conn, older_than_seconds=0)] == [old, fresh]
        assert [r.id for r in store.claim_unpublished(conn, older_than_seconds=0, exclude_ids={old})] == [fresh]


def test_claim_unpublished_skips_rows_another_relay_has_locked(pg_url):
    eng = schema.make_engine(pg_url)
    schema.migrate(eng)
    with eng.begin() as conn:
        conn.execute(schema.tasks.delete())
    ids = [new_task(eng) for _ in range(15)]
    with eng.connect() as first, eng.connect() as second, first.begin():
        mine = [r.id for r in store.claim_unpublished(first, older_than_seconds=0, limit=10)]
        with second.begin():  # while the first relay still holds its rows
            theirs = [r.id for r in store.claim_unpublished(second, older_than_seconds=0, limit=10)]
    assert mine == ids[:10] and theirs == ids[10:]
    eng.dispose()


# --- the race -------------------------------------------------------------------------------


def test_sqlite_is_shared_safely_between_processes(tmp_path):
    eng = schema.make_engine(f"sqlite:///{tmp_path / 'nested' / 'dir' / 'db.sqlite3'}")  # directories made
    with eng.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == schema.SQLITE_BUSY_SECONDS * 1000
    eng.dispose()


# --- round trips and failover (Postgres through a counting TCP proxy) -------------------------

@pytest.fixture
def counted(pg_url):
    """(engine through a Postgres-counting FaultProxy, the proxy), on the session's database."""
    from faults import FaultProxy

    proxy = FaultProxy("127.0.0.1", 5432, count_postgres=True).start()
    direct = schema.make_engine(pg_url)
    schema.migrate(direct)
    direct.dispose()
    eng = schema.make_engine(pg_url.replace("@127.0.0.1:5432/", f"@127.0.0.1:{proxy.port}/"))
    with eng.connect() as conn:  # the first connection's set-up queries are not the store's
        conn.execute(sa.text("SELECT 1"))
    proxy.postgres.reset()
    yield eng, proxy
    eng.dispose()
    proxy.stop()


def test_a_task_costs_the_worker_two_round_trips_and_a_heartbeat_one(counted):
    eng, proxy = counted
    tid = new_task(eng)
    proxy.postgres.reset()
    assert store.claim(eng, tid, worker="w1", lease_seconds=60, message_id="m1").outcome == "run"
    assert store.extend_lease(eng, tid, worker="w1", lease_seconds=60)
    assert store.finish_success(eng, tid, worker="w1", result=3)
    # One statement each, in autocommit: no ping of a connection that just worked, no BEGIN/COMMIT.
    assert (proxy.postgres.round_trips, proxy.postgres.queries) == (3, [])
    assert state_of(eng, tid) == "succeeded"


def test_a_connection_idle_in_the_pool_is_pinged_and_replaced_when_dead(counted, monkeypatch):
    eng, proxy = counted
    # Used within the window: not pinged, so a read (never retried) on a connection that died
    # meets the dead connection...
    monkeypatch.setattr(schema, "PING_AFTER_IDLE_SECONDS", 1000.0)
    proxy.set("pass")  # cuts every open connection: what a failover does to the pool
    with pytest.raises(sa.exc.OperationalError):
        store.count_by_state(eng)
    # ...while one idle past it is pinged first and replaced.
    store.count_by_state(eng)  # the pool was invalidated: a new connection
    monkeypatch.setattr(schema, "PING_AFTER_IDLE_SECONDS", 0.2)
    proxy.set("pass")
    time.sleep(0.3)
    assert store.count_by_state(eng)["pending"] >= 0


def test_writes_on_a_connection_a_failover_closed_are_retried(pg_url):
    import psycopg

    eng = schema.make_engine(pg_url)
    schema.migrate(eng)
    tid = new_task(eng)
    database = sa.make_url(pg_url).database

    def failover() -> None:
        """Close every connection of the pool as a failover would (the server ends them)."""
        with psycopg.connect(sa.make_url(pg_url).set(drivername="postgresql").render_as_string(False),
                             autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
                          "AND pid <> pg_backend_pid()", (database,))

    failover()
    assert store.claim(eng, tid, worker="w1", lease_seconds=60, message_id="m1").outcome == "run"
    failover()
    assert store.extend_lease(eng, tid, worker="w1", lease_seconds=60)
    failover()
    assert store.finish_success(eng, tid, worker="w1", result=3)
    assert state_of(eng, tid) == "succeeded"
    eng.dispose()


def test_a_retried_write_accepts_its_own_first_run_having_committed(pg_url):
    """The connection dies after the statement committed but before its answer arrived: the retry
    runs with retrying=True and must accept the state its first run left."""
    eng = schema.make_engine(pg_url)
    schema.migrate(eng)
    tid = new_task(eng)
    assert store.claim(eng, tid, worker="w1", lease_seconds=60, message_id="m1").outcome == "run"
    runs: list[bool] = []

    def finish_then_lose_the_connection(conn: sa.Connection, retrying: bool) -> bool:
        runs.append(retrying)
        done = conn.execute(
            sa.update(schema.tasks).where(store._owned(tid, "w1", *(("succeeded",) if retrying else ())))
            .values(state="succeeded")).rowcount == 1
        if not retrying:
            conn.exec_driver_sql("SELECT pg_terminate_backend(pg_backend_pid())")
        return done

    assert schema.autocommit_write(eng, finish_then_lose_the_connection) is True
    assert runs == [False, True] and state_of(eng, tid) == "succeeded"
    eng.dispose()
