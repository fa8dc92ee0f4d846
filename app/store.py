"""The claim-check store: one row per task, holding its payload, state and result.

Other modules code against exactly these names and signatures. SQLAlchemy Core 2.x serves
Postgres (psycopg 3, production) and SQLite (embedded default) from one code path.

States and transitions (the only ones allowed):

    pending --publish--> queued --claim--> running --success--> succeeded
       ^                   |                  |--failure-->  failed   (SQS will redeliver)
       |                   |                  |--failure on the last receive--> dead
       |                   |                  '--lease expired: may be claimed again
       '------ replay (ops) from failed / dead / succeeded / queued / pending ------'

A `failed` row can be claimed again (SQS redelivered it); `succeeded` never runs again except
by an explicit replay; `dead` runs again only if replayed or redriven from the DLQ.

Claim accepts `pending` as well as `queued`: the worker can receive the message before the
publisher has marked the row queued (SendMessage returns, then the UPDATE runs). A delivery of a
`dead` row's message can only come from a DLQ redrive, so it runs too.

Concurrency: `claim` is one conditional UPDATE ... WHERE <claimable> RETURNING, so of two
workers racing for one id exactly one gets the row (Postgres re-checks the WHERE after the
first commits; SQLite transactions start with BEGIN IMMEDIATE, one writer at a time). Times are
taken from the Python clock in UTC and read back timezone-aware on both databases.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event

STATES = ("pending", "queued", "running", "succeeded", "failed", "dead")
# States a delivery may run from; `running` joins them once its lease has expired.
_CLAIMABLE = ("pending", "queued", "failed", "dead")

MAX_ERROR_CHARS = 4000  # a traceback-sized message is for logs; the row keeps the gist
SQLITE_BUSY_SECONDS = 30  # worker pool processes, relay and ops share one SQLite file
POSTGRES_CONNECT_TIMEOUT = 10  # a down RDS fails a start-up quickly instead of hanging

UTC = dt.UTC


class UTCDateTime(sa.TypeDecorator):
    """Timezone-aware UTC datetimes on both databases. SQLite has no time zones: values are stored
    as naive UTC and given their zone back on read."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


metadata = sa.MetaData()

tasks = sa.Table(
    "pcelery_tasks",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),  # also the Celery task id on the wire
    sa.Column("task_name", sa.String(200), nullable=False),
    sa.Column("queue", sa.String(80), nullable=False),  # catalog queue name
    sa.Column("payload", sa.Text, nullable=False),  # JSON: {"args": [...], "kwargs": {...}}
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("delay_seconds", sa.Integer, nullable=False, server_default="0"),
    sa.Column("lease_until", UTCDateTime),
    sa.Column("worker", sa.String(200)),  # hostname/pid of the claiming worker process
    sa.Column("result", sa.Text),  # JSON
    sa.Column("error", sa.Text),  # last error: "ExcType: message"
    sa.Column("message_id", sa.String(100)),  # last SQS MessageId it was published as
    # The SQS MessageId of the delivery that holds the running claim: a second message for a
    # running task (a duplicate publish, a redrive) can then be told apart from SQS handing the
    # running message itself out again. Like lease_until it describes the live claim only and is
    # cleared when the row leaves `running`: during a rolling deploy, v1 code's claims (which do
    # not set it) then read as "unknown" rather than as an earlier run's message (v2).
    sa.Column("claimed_message_id", sa.String(100)),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),  # for `pending` rows: pending since
    sa.Column("queued_at", UTCDateTime),
    sa.Column("started_at", UTCDateTime),
    sa.Column("finished_at", UTCDateTime),
    sa.Index("ix_pcelery_tasks_state_created", "state", "created_at"),
    sa.Index("ix_pcelery_tasks_name_state", "task_name", "state"),
)

# One row per applied migration step, so an upgrade is "apply the steps above the highest row".
schema_versions = sa.Table(
    "pcelery_schema_version",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("description", sa.String(200), nullable=False),
    sa.Column("applied_at", UTCDateTime, nullable=False),
)


@dataclass(frozen=True)
class Claim:
    """What the worker should do with a delivery. outcome is one of:
    - "run": the row is now `running`, owned by this worker, attempts already incremented
    - "duplicate": the row is `succeeded`; ack the message, do not run
    - "busy": another worker holds a live lease; do not run a second copy
    - "missing": no row with that id (poison message)

    message_id: for "run", the SQS MessageId this claim was made for; for "busy", the one the
    holder's claim was made for (None when its claimant did not say).
    """

    outcome: str
    task_id: str
    task_name: str | None = None
    args: list | None = None
    kwargs: dict | None = None
    attempts: int = 0
    lease_until: dt.datetime | None = None
    message_id: str | None = None


def utcnow() -> dt.datetime:
    return dt.datetime.now(UTC)


# --- Engine ---------------------------------------------------------------------------------

# Execution option for read-only work on SQLite: a deferred BEGIN, so reads never queue
# behind writers for the write lock.
SQLITE_READ_ONLY = "pcelery_read_only"


def make_engine(url: str, **engine_kwargs) -> sa.Engine:
    """Engine for a SQLAlchemy URL. SQLite gets WAL and a busy timeout so a worker's pool
    processes and the relay can share the file; Postgres gets pool_pre_ping (RDS failover)."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(parsed, connect_args={"timeout": SQLITE_BUSY_SECONDS}, **engine_kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn, _record):
            # pysqlite's own implicit BEGIN is deferred; a deferred transaction that reads and then
            # writes can fail with "database is locked" without waiting. We issue BEGIN ourselves.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_SECONDS * 1000}")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn):
            # IMMEDIATE takes the write lock up front, so two processes cannot both decide they
            # won a claim; the busy timeout makes the loser wait instead of failing.
            read_only = conn.get_execution_options().get(SQLITE_READ_ONLY)
            conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

        return engine
    if parsed.get_backend_name() == "postgresql":
        connect_args = {} if "connect_timeout" in parsed.query else {"connect_timeout": POSTGRES_CONNECT_TIMEOUT}
        return sa.create_engine(parsed, pool_pre_ping=True, connect_args=connect_args, **engine_kwargs)
    return sa.create_engine(parsed, pool_pre_ping=True, **engine_kwargs)


@contextlib.contextmanager
def _begin(target: sa.Engine | sa.Connection, *, read_only: bool = False) -> Iterator[sa.Connection]:
    """A transaction on an engine, or the caller's own connection (whose transaction it joins)."""
    if isinstance(target, sa.Connection):
        yield target
        return
    if read_only:
        with target.connect() as conn:
            conn = conn.execution_options(**{SQLITE_READ_ONLY: True})
            with conn.begin():
                yield conn
        return
    with target.begin() as conn:
        yield conn


# --- Schema ---------------------------------------------------------------------------------

def _create_tasks_v1(conn: sa.Connection) -> None:
    # The table as version 1 shipped it, spelled out rather than taken from `tasks` (which always
    # describes the newest schema): a fresh database then climbs the same steps as an old one.
    v1 = sa.Table(
        tasks.name, sa.MetaData(),
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("task_name", sa.String(200), nullable=False),
        sa.Column("queue", sa.String(80), nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("delay_seconds", sa.Integer, nullable=False, server_default="0"),
        sa.Column("lease_until", UTCDateTime),
        sa.Column("worker", sa.String(200)),
        sa.Column("result", sa.Text),
        sa.Column("error", sa.Text),
        sa.Column("message_id", sa.String(100)),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.Column("queued_at", UTCDateTime),
        sa.Column("started_at", UTCDateTime),
        sa.Column("finished_at", UTCDateTime),
        sa.Index("ix_pcelery_tasks_state_created", "state", "created_at"),
        sa.Index("ix_pcelery_tasks_name_state", "task_name", "state"),
    )
    v1.create(conn, checkfirst=True)


def _add_claimed_message_id(conn: sa.Connection) -> None:
    # A nullable column without a default: instant on Postgres (no table rewrite) and on SQLite.
    conn.execute(sa.text(f"ALTER TABLE {tasks.name} ADD COLUMN claimed_message_id VARCHAR(100)"))


MIGRATIONS: list[tuple[int, str, Any]] = [
    (1, "create table pcelery_tasks with its state indexes", _create_tasks_v1),
    (2, "add pcelery_tasks.claimed_message_id (the SQS message a claim was made for)", _add_claimed_message_id),
]
_PG_MIGRATION_LOCK = 0x70636C72  # "pclr": serializes concurrent `migrate` runs (two tasks starting)


def migrate(engine: sa.Engine, *, up_to: int | None = None) -> list[str]:
    """Create or upgrade the schema; idempotent. Returns the steps applied (empty when current).
    up_to: stop after that version (tests build an old database with it).
    CLI: `python -m app.store migrate` (uses Settings.from_env().database_url)."""
    applied = []
    with engine.begin() as conn:  # DDL is transactional on both databases: all steps or none
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
        schema_versions.create(conn, checkfirst=True)
        current = conn.execute(sa.select(sa.func.max(schema_versions.c.version))).scalar() or 0
        for version, description, step in MIGRATIONS:
            if version <= current or (up_to is not None and version > up_to):
                continue
            step(conn)
            conn.execute(schema_versions.insert().values(version=version, description=description,
                                                         applied_at=utcnow()))
            applied.append(f"{version}: {description}")
    return applied


def schema_version(engine: sa.Engine) -> int:
    """Highest applied migration (0 for an empty database); entry points compare it with
    LATEST_SCHEMA_VERSION to refuse running against an old schema."""
    with _begin(engine, read_only=True) as conn:
        if not sa.inspect(conn).has_table(schema_versions.name):
            return 0
        return conn.execute(sa.select(sa.func.max(schema_versions.c.version))).scalar() or 0


LATEST_SCHEMA_VERSION = MIGRATIONS[-1][0]


# --- Writing tasks --------------------------------------------------------------------------

def encode_payload(args, kwargs) -> str:
    """The row's JSON payload. Raises TypeError/ValueError for values JSON cannot hold."""
    return json.dumps({"args": list(args), "kwargs": dict(kwargs)}, separators=(",", ":"))


def task_row(*, task_id: str, task_name: str, queue: str, args: list, kwargs: dict,
             delay_seconds: int = 0, now: dt.datetime | None = None) -> dict:
    now = now or utcnow()
    return {
        "id": task_id, "task_name": task_name, "queue": queue, "payload": encode_payload(args, kwargs),
        "state": "pending", "attempts": 0, "delay_seconds": int(delay_seconds),
        "created_at": now, "updated_at": now,
    }


def insert_task(conn: sa.Connection, *, task_id: str, task_name: str, queue: str,
                args: list, kwargs: dict, delay_seconds: int = 0) -> None:
    """Insert a `pending` row inside the caller's transaction (conn)."""
    conn.execute(tasks.insert().values(task_row(task_id=task_id, task_name=task_name, queue=queue,
                                                args=args, kwargs=kwargs, delay_seconds=delay_seconds)))


_INSERT_CHUNK = 500  # rows per multi-row INSERT: well under SQLite's bound-parameter limit


def insert_tasks(conn: sa.Connection, rows: list[dict]) -> None:
    """Insert rows made by `task_row` with multi-row INSERTs, in the caller's transaction."""
    for start in range(0, len(rows), _INSERT_CHUNK):
        conn.execute(tasks.insert().values(rows[start:start + _INSERT_CHUNK]))


def insert_task_if_absent(conn: sa.Connection, row: dict) -> dict | None:
    """Idempotent insert of a `task_row`, in the caller's transaction: ON CONFLICT DO NOTHING, so
    a repeated id never aborts the caller's transaction. Returns None when the row went in, else
    the existing row's {"task_name", "payload"} (payload as stored JSON text) for the caller to
    compare."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif conn.dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:  # pragma: no cover - the product runs on these two
        raise ValueError(f"an idempotent insert needs Postgres or SQLite, not {conn.dialect.name}")
    # RETURNING rather than rowcount: psycopg reports -1 for INSERT ... ON CONFLICT.
    inserted = conn.execute(
        insert(tasks).values(row).on_conflict_do_nothing(index_elements=["id"]).returning(tasks.c.id)
    ).first()
    if inserted is not None:
        return None
    existing = conn.execute(sa.select(tasks.c.task_name, tasks.c.payload).where(tasks.c.id == row["id"])).one()
    return {"task_name": existing.task_name, "payload": existing.payload}


def existing_ids(engine: sa.Engine, task_ids: list[str]) -> set[str]:
    """Which of these ids have a row (the outbox's check after a rolled-back SAVEPOINT)."""
    found: set[str] = set()
    with _begin(engine, read_only=True) as conn:
        for start in range(0, len(task_ids), _INSERT_CHUNK):
            chunk = list(task_ids[start:start + _INSERT_CHUNK])
            found.update(conn.execute(sa.select(tasks.c.id).where(tasks.c.id.in_(chunk))).scalars())
    return found


def pending_rows(engine: sa.Engine, task_ids: list[str]) -> list[dict]:
    """Of these ids, the rows still `pending`, as the publisher needs them (id, task_name, queue,
    delay_seconds): what `Outbox.publish_ids` sends right after ops reset them for replay."""
    c = tasks.c
    rows: list[dict] = []
    with _begin(engine, read_only=True) as conn:
        for start in range(0, len(task_ids), _INSERT_CHUNK):
            chunk = list(task_ids[start:start + _INSERT_CHUNK])
            rows += [dict(r) for r in conn.execute(
                sa.select(c.id, c.task_name, c.queue, c.delay_seconds).where(c.id.in_(chunk), c.state == "pending")
            ).mappings()]
    return rows


def mark_queued(engine: sa.Engine | sa.Connection, published: dict[str, str]) -> int:
    """{task_id: sqs_message_id} -> rows moved pending->queued (other states untouched).
    Accepts a Connection too, so the relay marks rows in the transaction that locked them."""
    if not published:
        return 0
    now = utcnow()
    statement = (
        sa.update(tasks)
        .where(tasks.c.id == sa.bindparam("task_id_"), tasks.c.state == "pending")
        .values(state="queued", message_id=sa.bindparam("message_id_"), queued_at=now, updated_at=now)
    )
    with _begin(engine) as conn:  # one executemany: both drivers sum its rowcount
        return conn.execute(statement, [{"task_id_": t, "message_id_": m} for t, m in published.items()]).rowcount


# --- The worker's side ----------------------------------------------------------------------

def claim(engine: sa.Engine, task_id: str, *, worker: str, lease_seconds: int,
          message_id: str | None = None) -> Claim:
    """One short transaction: decide run/duplicate/busy/missing and, for run, set running,
    attempts+1, lease_until=now+lease_seconds, worker, started_at and claimed_message_id (the
    SQS MessageId of the delivery, when known). A `running` row whose lease has expired (its
    worker died) may be claimed again."""
    now = utcnow()
    c = tasks.c
    claimable = sa.or_(
        c.state.in_(_CLAIMABLE),
        sa.and_(c.state == "running", sa.or_(c.lease_until.is_(None), c.lease_until < now)),
    )
    with engine.begin() as conn:
        won = conn.execute(
            sa.update(tasks)
            .where(c.id == task_id, claimable)
            .values(state="running", attempts=c.attempts + 1, lease_until=now + dt.timedelta(seconds=lease_seconds),
                    worker=worker[:200], claimed_message_id=message_id, started_at=now, finished_at=None,
                    updated_at=now)
            .returning(c.task_name, c.payload, c.attempts, c.lease_until)
        ).first()
        if won is None:
            current = conn.execute(
                sa.select(c.state, c.task_name, c.attempts, c.lease_until, c.claimed_message_id)
                .where(c.id == task_id)
            ).first()
    if won is not None:
        payload = json.loads(won.payload)
        return Claim("run", task_id, won.task_name, list(payload.get("args", [])),
                     dict(payload.get("kwargs", {})), won.attempts, won.lease_until, message_id)
    if current is None:
        return Claim("missing", task_id)
    if current.state == "succeeded":
        return Claim("duplicate", task_id, current.task_name, attempts=current.attempts)
    return Claim("busy", task_id, current.task_name, attempts=current.attempts, lease_until=current.lease_until,
                 message_id=current.claimed_message_id)


def _owned(task_id: str, worker: str):
    return sa.and_(tasks.c.id == task_id, tasks.c.state == "running", tasks.c.worker == worker[:200])


def extend_lease(engine: sa.Engine, task_id: str, *, worker: str, lease_seconds: int) -> bool:
    """Heartbeat: push lease_until forward if this worker still owns the running row."""
    now = utcnow()
    with engine.begin() as conn:
        return conn.execute(
            sa.update(tasks).where(_owned(task_id, worker))
            .values(lease_until=now + dt.timedelta(seconds=lease_seconds), updated_at=now)
        ).rowcount == 1


def result_json(result: Any) -> str:
    """JSON text of a task's result; a value JSON cannot hold is kept as its repr with a note,
    because losing a finished task's verdict over its return type would be worse."""
    try:
        return json.dumps(result)
    except (TypeError, ValueError) as exc:
        return json.dumps({
            "repr": repr(result)[:MAX_ERROR_CHARS],
            "note": f"result was not JSON-serializable ({type(result).__name__}: {exc}); stored its repr",
        })


def format_error(error: BaseException | str) -> str:
    """"ExcType: message", cut to MAX_ERROR_CHARS."""
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    if len(text) > MAX_ERROR_CHARS:
        text = text[:MAX_ERROR_CHARS - 15] + " ...[truncated]"
    return text


def finish_success(conn: sa.Connection, task_id: str, *, worker: str, result: Any) -> bool:
    """Mark succeeded with the JSON result, in the caller's transaction (so a task's own DB
    writes on conn commit atomically with it). False if this worker no longer owns the row."""
    now = utcnow()
    return conn.execute(
        sa.update(tasks).where(_owned(task_id, worker))
        .values(state="succeeded", result=result_json(result), lease_until=None, claimed_message_id=None,
                finished_at=now, updated_at=now)
    ).rowcount == 1


def finish_failure(engine: sa.Engine, task_id: str, *, worker: str, error: str | BaseException,
                   final: bool) -> bool:
    """Record the error; state `dead` when final (last receive before the DLQ), else `failed`.
    Returns False (and changes nothing) if this worker no longer owns the row."""
    now = utcnow()
    with engine.begin() as conn:
        return conn.execute(
            sa.update(tasks).where(_owned(task_id, worker))
            .values(state="dead" if final else "failed", error=format_error(error), lease_until=None,
                    claimed_message_id=None,
                    finished_at=now, updated_at=now)
        ).rowcount == 1


def release(engine: sa.Engine, task_id: str, *, worker: str) -> bool:
    """Give the lease up without a verdict (warm shutdown, worker lost): running -> queued."""
    now = utcnow()
    with engine.begin() as conn:
        return conn.execute(
            sa.update(tasks).where(_owned(task_id, worker))
            .values(state="queued", lease_until=None, claimed_message_id=None, updated_at=now)
        ).rowcount == 1


# --- The relay's side -----------------------------------------------------------------------

def claim_unpublished(conn: sa.Connection, *, older_than_seconds: float, limit: int = 10,
                      exclude_ids: Iterable[str] = ()) -> list[dict]:
    """Relay: lock up to `limit` pending rows older than the threshold (FOR UPDATE SKIP LOCKED on
    Postgres; SQLite has one writer anyway) and return them (id, task_name, queue, delay_seconds).
    Age counts from when the row became pending (updated_at), so a replayed row also gets the
    submitter's head start before the relay sends it. exclude_ids: rows SQS refused earlier in
    this relay pass."""
    cutoff = utcnow() - dt.timedelta(seconds=older_than_seconds)
    c = tasks.c
    query = sa.select(c.id, c.task_name, c.queue, c.delay_seconds).where(c.state == "pending", c.updated_at <= cutoff)
    exclude = list(exclude_ids)
    if exclude:
        query = query.where(c.id.not_in(exclude))
    rows = conn.execute(
        query
        .order_by(c.updated_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).mappings().all()
    return [dict(r) for r in rows]


def pending_summary(engine: sa.Engine) -> dict:
    """{"count": pending rows, "oldest_age_seconds": age of the oldest (0 when none)}: the
    relay's health metric."""
    with _begin(engine, read_only=True) as conn:
        count, oldest = conn.execute(
            sa.select(sa.func.count(), sa.func.min(tasks.c.updated_at)).where(tasks.c.state == "pending")
        ).one()
    if isinstance(oldest, str):  # in case a driver hands an aggregate back untyped
        oldest = dt.datetime.fromisoformat(oldest)
    if oldest is not None and oldest.tzinfo is None:
        oldest = oldest.replace(tzinfo=UTC)
    age = max(0.0, (utcnow() - oldest).total_seconds()) if oldest is not None else 0.0
    return {"count": int(count), "oldest_age_seconds": age}


# --- Reading (ops) --------------------------------------------------------------------------

def _row_dict(row) -> dict:
    d = dict(row._mapping)
    try:
        d["payload"] = json.loads(d["payload"])
    except (TypeError, ValueError):
        pass  # shown raw: ops must still be able to look at a damaged row
    if d.get("result") is not None:
        try:
            d["result"] = json.loads(d["result"])
        except (TypeError, ValueError):
            pass
    return d


def get_task(engine: sa.Engine, task_id: str) -> dict | None:
    """The row as a dict (payload/result decoded from JSON), or None."""
    with _begin(engine, read_only=True) as conn:
        row = conn.execute(sa.select(tasks).where(tasks.c.id == task_id)).first()
    return _row_dict(row) if row is not None else None


def list_tasks(engine: sa.Engine, *, state: str | None = None, task_name: str | None = None,
               older_than_seconds: float | None = None, stuck: bool = False,
               limit: int = 100) -> list[dict]:
    """Rows, oldest first. stuck=True: running rows whose lease has expired."""
    if state is not None and state not in STATES:
        raise ValueError(f"unknown state {state!r}: use one of {', '.join(STATES)}")
    now = utcnow()
    query = sa.select(tasks).order_by(tasks.c.created_at).limit(limit)
    if state is not None:
        query = query.where(tasks.c.state == state)
    if task_name is not None:
        query = query.where(tasks.c.task_name == task_name)
    if older_than_seconds is not None:
        query = query.where(tasks.c.created_at <= now - dt.timedelta(seconds=older_than_seconds))
    if stuck:
        query = query.where(tasks.c.state == "running", tasks.c.lease_until < now)
    with _begin(engine, read_only=True) as conn:
        return [_row_dict(r) for r in conn.execute(query)]


def count_by_state(engine: sa.Engine) -> dict[str, int]:
    """{state: count} with every state in STATES present (0 when none)."""
    counts = dict.fromkeys(STATES, 0)
    with _begin(engine, read_only=True) as conn:
        for state, n in conn.execute(sa.select(tasks.c.state, sa.func.count()).group_by(tasks.c.state)):
            counts[state] = int(n)
    return counts


def count_by_queue_and_state(engine: sa.Engine) -> dict[str, dict[str, int]]:
    """{catalog queue: {state: count}}, every state in STATES present for each queue that has rows
    (a queue without rows is absent)."""
    counts: dict[str, dict[str, int]] = {}
    c = tasks.c
    with _begin(engine, read_only=True) as conn:
        for queue, state, n in conn.execute(sa.select(c.queue, c.state, sa.func.count()).group_by(c.queue, c.state)):
            counts.setdefault(queue, dict.fromkeys(STATES, 0))[state] = int(n)
    return counts


def mark_redriven(engine: sa.Engine, task_ids: list[str]) -> list[str]:
    """After a client redrive put these tasks' messages back on their queue: dead -> queued, so
    the rows show them waiting again. Only rows still `dead` move; a row a worker already claimed
    from the redriven message is left alone (the conditional update loses that race harmlessly).
    Returns the ids moved, in the order given."""
    if not task_ids:
        return []
    now = utcnow()
    c = tasks.c
    moved: list[str] = []
    with engine.begin() as conn:
        for start in range(0, len(task_ids), _INSERT_CHUNK):
            chunk = list(task_ids[start:start + _INSERT_CHUNK])
            moved += conn.execute(
                sa.update(tasks).where(c.id.in_(chunk), c.state == "dead")
                .values(state="queued", queued_at=now, updated_at=now)
                .returning(c.id)
            ).scalars().all()
    order = {tid: i for i, tid in enumerate(task_ids)}
    return sorted(moved, key=order.__getitem__)


def reset_for_replay(engine: sa.Engine, task_ids: list[str]) -> list[str]:
    """Move the given rows back to `pending` (attempts kept, error kept) so the publisher or
    the relay sends them again. Running rows with a live lease are not touched. Returns ids reset.
    The old result is cleared: a pending row showing a result would read as this run's."""
    now = utcnow()
    c = tasks.c
    not_live = sa.or_(c.state != "running", c.lease_until.is_(None), c.lease_until <= now)
    reset: list[str] = []
    with engine.begin() as conn:
        for start in range(0, len(task_ids), _INSERT_CHUNK):
            chunk = list(task_ids[start:start + _INSERT_CHUNK])
            reset += conn.execute(
                sa.update(tasks).where(c.id.in_(chunk), not_live)
                .values(state="pending", lease_until=None, claimed_message_id=None, worker=None, result=None,
                        queued_at=None, finished_at=None, updated_at=now)
                .returning(c.id)
            ).scalars().all()
    order = {tid: i for i, tid in enumerate(task_ids)}
    return sorted(reset, key=order.__getitem__)


# --- CLI ------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.store", description="Claim-check store maintenance.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="create or upgrade the schema (idempotent); exit 2 if the DB is unreachable")
    args = parser.parse_args(argv)

    from app.settings import Settings, SettingsError

    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    engine = make_engine(settings.database_url)
    where = engine.url.render_as_string(hide_password=True)
    try:
        if args.command == "migrate":
            steps = migrate(engine)
            for step in steps:
                print(f"applied {step}", file=sys.stderr)
            if not steps:
                print(f"schema is current (version {LATEST_SCHEMA_VERSION}) on {where}", file=sys.stderr)
    except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
        reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0] if str(getattr(exc, "orig", exc)).strip() else type(exc).__name__
        print(f"error: cannot reach the database at {where}: {reason}; check DATABASE_URL (or DB_HOST...) "
              "and that the server is up", file=sys.stderr)
        return 2
    finally:
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
