"""Every statement on the claim-check table: one row per task, holding its payload, state and
result. Only this module reads or writes `pcelery_tasks`; the outbox, the worker, the relay and
ops go through its functions. Two writes must run on Django's connection instead and go through its
ORM with the values made here (pcelery.django): a submit's INSERT (task_row) and a transactional
Django task's success (success_update). The table and its migrations are in pcelery.schema.

States and transitions (the only ones allowed):

    pending --publish--> queued --claim--> running --success--> succeeded
       ^                   |                  |--failure-->  failed   (SQS will redeliver)
       |                   |                  |--failure on the last receive--> dead
       |                   |                  '--lease expired: may be claimed again
       '------ replay (ops) from failed / dead / succeeded / queued / pending / cancelled
    pending, queued, failed --cancel (ops, the Django admin)--> cancelled

A `failed` row can be claimed again (SQS redelivered it); `succeeded` never runs again except
by an explicit replay; `dead` runs again only if replayed or redriven from the DLQ; a
`cancelled` row never runs: its message, when it arrives, is acked without running.

Claim accepts `pending` as well as `queued`: the worker can receive the message before the
publisher has marked the row queued (SendMessage returns, then the UPDATE runs). A delivery of a
`dead` row's message can only come from a DLQ redrive, so it runs too.

Concurrency: `claim` is one conditional UPDATE ... WHERE <claimable> RETURNING, so of two
workers racing for one id exactly one gets the row (Postgres re-checks the WHERE after the
first commits; SQLite transactions start with BEGIN IMMEDIATE, one writer at a time).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import sqlalchemy as sa

from pcelery.schema import UTC, autocommit_write, begin, schedules, tasks, utcnow

STATES = ("scheduled", "pending", "queued", "running", "succeeded", "failed", "dead", "cancelled")
CANCELLABLE = ("scheduled", "pending", "queued", "failed")  # not yet run to a verdict, and not running now
# SQS holds a message back at most this long (DelaySeconds); a task due later waits in the store
# as `scheduled` until the relay publishes it with the rest of its delay.
SQS_MAX_DELAY = 15 * 60
ATTEMPT_ERROR_CHARS = 500  # each attempt's error in attempt_errors; the last one in full in `error`
# States a delivery may run from; `running` joins them once its lease has expired.
_CLAIMABLE = ("pending", "queued", "failed", "dead")

MAX_ERROR_CHARS = 4000  # a traceback-sized message is for logs; the row keeps the gist
_CHUNK = 500  # ids or rows per statement: well under SQLite's bound-parameter limit


@dataclass(frozen=True)
class Claim:
    """What the worker should do with a delivery. outcome is one of:
    - "run": the row is now `running`, owned by this worker, attempts already incremented
    - "duplicate": the row is `succeeded`; ack the message, do not run
    - "busy": another worker holds a live lease; do not run a second copy
    - "cancelled": the row was cancelled before it ran; ack the message, do not run
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


@dataclass(frozen=True)
class OutboxEntry:
    """What the publisher needs of a row to put its task on SQS."""

    id: str
    task_name: str
    queue: str  # catalog queue name
    delay_seconds: int = 0
    due_at: dt.datetime | None = None  # when set, the delay is what is left of it at publishing

    def delay_now(self, now: dt.datetime | None = None) -> int:
        """DelaySeconds for SQS: the rest of the countdown (a row published late by the relay, or
        a scheduled one published ahead of its due time), within SQS's 0..SQS_MAX_DELAY."""
        if self.due_at is None:
            return max(0, min(SQS_MAX_DELAY, int(self.delay_seconds or 0)))
        left = (self.due_at - (now or utcnow())).total_seconds()
        return max(0, min(SQS_MAX_DELAY, math.ceil(left)))


@dataclass(frozen=True)
class TaskRow:
    """A task's row as ops and the tests read it: payload and result decoded from JSON (a value
    that does not decode is kept as the stored text, so a damaged row can still be shown)."""

    id: str
    task_name: str
    queue: str
    payload: Any
    state: str
    attempts: int
    delay_seconds: int
    lease_until: dt.datetime | None
    worker: str | None
    result: Any
    error: str | None
    message_id: str | None
    claimed_message_id: str | None
    created_at: dt.datetime
    updated_at: dt.datetime
    queued_at: dt.datetime | None
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    due_at: dt.datetime | None = None
    attempt_errors: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_db(cls, row: sa.Row) -> TaskRow:
        values = dict(row._mapping)
        for key in ("payload", "result"):
            if values.get(key) is not None:
                # A value that does not decode is shown raw: ops must still be able to look at it.
                with contextlib.suppress(TypeError, ValueError):
                    values[key] = json.loads(values[key])
        known: dict[str, Any] = {f.name: values.get(f.name) for f in fields(cls)}
        known["attempt_errors"] = _json_lines(values.get("attempt_errors"))
        return cls(**known)

    def as_json(self) -> dict[str, Any]:
        """JSON-ready data: datetimes as ISO 8601 with a Z."""
        return {k: _iso(v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class PendingSummary:
    """The relay's health metric: pending rows and the age of the oldest (0 when none)."""

    count: int
    oldest_age_seconds: float


def _json_lines(text: str | None) -> list[dict[str, Any]]:
    entries = []
    for line in (text or "").splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            entries.append({"error": line})  # damaged: shown as it is
    return entries


def _iso(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat().replace("+00:00", "Z")
    return value


def _chunks(items: Sequence[str]) -> Iterable[list[str]]:
    for start in range(0, len(items), _CHUNK):
        yield list(items[start:start + _CHUNK])


# --- Writing tasks --------------------------------------------------------------------------

def encode_payload(args: Sequence[Any], kwargs: dict[str, Any]) -> str:
    """The row's JSON payload. Raises TypeError/ValueError for values JSON cannot hold."""
    return json.dumps({"args": list(args), "kwargs": dict(kwargs)}, separators=(",", ":"))


def task_row(*, task_id: str, task_name: str, queue: str, args: Sequence[Any], kwargs: dict[str, Any],
             delay_seconds: int = 0, now: dt.datetime | None = None) -> dict[str, Any]:
    """The INSERT values of a new row: `pending` (published after commit), or `scheduled` when it
    is due beyond SQS's delay (the relay publishes it within SQS_MAX_DELAY of its due time)."""
    now = now or utcnow()
    return {
        "id": task_id, "task_name": task_name, "queue": queue, "payload": encode_payload(args, kwargs),
        "state": "scheduled" if delay_seconds > SQS_MAX_DELAY else "pending", "attempts": 0,
        "delay_seconds": int(delay_seconds), "due_at": now + dt.timedelta(seconds=delay_seconds) if delay_seconds
        else None, "created_at": now, "updated_at": now,
    }


def insert_task(conn: sa.Connection, *, task_id: str, task_name: str, queue: str,
                args: Sequence[Any], kwargs: dict[str, Any], delay_seconds: int = 0) -> None:
    """Insert a `pending` row inside the caller's transaction (conn)."""
    conn.execute(tasks.insert().values(task_row(task_id=task_id, task_name=task_name, queue=queue,
                                                args=args, kwargs=kwargs, delay_seconds=delay_seconds)))


def insert_tasks(conn: sa.Connection, rows: list[dict[str, Any]]) -> None:
    """Insert rows made by `task_row` with multi-row INSERTs, in the caller's transaction."""
    for start in range(0, len(rows), _CHUNK):
        conn.execute(tasks.insert().values(rows[start:start + _CHUNK]))


def insert_task_if_absent(conn: sa.Connection, row: dict[str, Any]) -> tuple[str, Any] | None:
    """Idempotent insert of a `task_row`, in the caller's transaction: ON CONFLICT DO NOTHING, so
    a repeated id never aborts the caller's transaction. Returns None when the row went in, else
    the existing row's (task_name, decoded payload) for the caller to compare."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif conn.dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]
    else:  # pragma: no cover - the product runs on these two
        raise ValueError(f"an idempotent insert needs Postgres or SQLite, not {conn.dialect.name}")
    # RETURNING rather than rowcount: psycopg reports -1 for INSERT ... ON CONFLICT.
    inserted = conn.execute(
        insert(tasks).values(row).on_conflict_do_nothing(index_elements=["id"]).returning(tasks.c.id)
    ).first()
    if inserted is not None:
        return None
    existing = conn.execute(sa.select(tasks.c.task_name, tasks.c.payload).where(tasks.c.id == row["id"])).one()
    return existing.task_name, json.loads(existing.payload)


def existing_ids(engine: sa.Engine, task_ids: list[str]) -> set[str]:
    """Which of these ids have a row (the outbox's check after a rolled-back SAVEPOINT)."""
    found: set[str] = set()
    with begin(engine, read_only=True) as conn:
        for chunk in _chunks(task_ids):
            found.update(conn.execute(sa.select(tasks.c.id).where(tasks.c.id.in_(chunk))).scalars())
    return found


def pending_entries(engine: sa.Engine, task_ids: list[str]) -> list[OutboxEntry]:
    """Of these ids, the rows still `pending`, as the publisher needs them: what
    `Outbox.publish_ids` sends right after ops reset them for replay."""
    c = tasks.c
    entries: list[OutboxEntry] = []
    with begin(engine, read_only=True) as conn:
        for chunk in _chunks(task_ids):
            entries += [OutboxEntry(r.id, r.task_name, r.queue, r.delay_seconds, r.due_at) for r in conn.execute(
                sa.select(c.id, c.task_name, c.queue, c.delay_seconds, c.due_at)
                .where(c.id.in_(chunk), c.state == "pending")
            )]
    return entries


def mark_queued(engine: sa.Engine | sa.Connection, published: dict[str, str]) -> int:
    """{task_id: sqs_message_id} -> rows moved pending/scheduled->queued (other states untouched).
    Accepts a Connection too, so the relay marks rows in the transaction that locked them."""
    if not published:
        return 0
    now = utcnow()
    statement = (
        sa.update(tasks)
        .where(tasks.c.id == sa.bindparam("task_id_"),
               sa.or_(tasks.c.state == "pending", tasks.c.state == "scheduled"))  # no IN: executemany
        .values(state="queued", message_id=sa.bindparam("message_id_"), queued_at=now, updated_at=now)
    )
    values = [{"task_id_": t, "message_id_": m} for t, m in published.items()]
    if isinstance(engine, sa.Connection):
        return engine.execute(statement, values).rowcount
    # One statement (an executemany sums its rowcount on both drivers); run again after a dead
    # connection it changes nothing already changed.
    return autocommit_write(engine, lambda conn, _retrying: conn.execute(statement, values).rowcount)


# --- The worker's side ----------------------------------------------------------------------

def _claim_statement(*, or_mine: bool) -> Any:
    """Built once: the claim runs for every delivery, and building a statement costs more Python
    time than running it does (the values are bound parameters)."""
    c = tasks.c
    now = sa.bindparam("now_", type_=tasks.c.updated_at.type)
    claimable = sa.or_(
        c.state.in_(_CLAIMABLE),
        sa.and_(c.state == "running", sa.or_(c.lease_until.is_(None), c.lease_until < now)),
    )
    if or_mine:
        claimable = sa.or_(claimable, sa.and_(c.state == "running", c.worker == sa.bindparam("worker_"),
                                              c.claimed_message_id == sa.bindparam("message_id_")))
    return (
        sa.update(tasks)
        .where(c.id == sa.bindparam("task_id_"), claimable)
        .values(state="running", attempts=c.attempts + 1, lease_until=sa.bindparam("lease_until_", type_=now.type),
                worker=sa.bindparam("worker_"), claimed_message_id=sa.bindparam("message_id_"), started_at=now,
                finished_at=None, updated_at=now)
        .returning(c.task_name, c.payload, c.attempts, c.lease_until)
    )


_CLAIM = _claim_statement(or_mine=False)
_CLAIM_AGAIN = _claim_statement(or_mine=True)


def claim(engine: sa.Engine, task_id: str, *, worker: str, lease_seconds: int,
          message_id: str | None = None) -> Claim:
    """One statement: decide run/duplicate/busy/missing and, for run, set running,
    attempts+1, lease_until=now+lease_seconds, worker, started_at and claimed_message_id (the
    SQS MessageId of the delivery, when known). A `running` row whose lease has expired (its
    worker died) may be claimed again."""
    now = utcnow()
    c = tasks.c
    params = {"task_id_": task_id, "now_": now, "lease_until_": now + dt.timedelta(seconds=lease_seconds),
              "worker_": worker[:200], "message_id_": message_id}

    def take(conn: sa.Connection, retrying: bool) -> Any:
        # Retrying after a dead connection: the first run may have committed; this worker's own
        # claim for this very message then counts as won (one pool child runs one task at a time).
        return conn.execute(_CLAIM_AGAIN if retrying and message_id else _CLAIM, params).first()

    # The common case is one statement, one round trip on Postgres. Only a delivery that does not
    # win reads the row to say why (a separate statement: what it reads is advice, not a lock).
    won = autocommit_write(engine, take)
    if won is None:
        with begin(engine, read_only=True) as conn:
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
    if current.state == "cancelled":
        return Claim("cancelled", task_id, current.task_name, attempts=current.attempts)
    return Claim("busy", task_id, current.task_name, attempts=current.attempts, lease_until=current.lease_until,
                 message_id=current.claimed_message_id)


def _owned(task_id: str, worker: str, *also: str) -> sa.ColumnElement[bool]:
    """The row is this worker's running claim (or, retrying a write whose first run may have
    committed, already in one of the states `also` that write sets, by this worker)."""
    return sa.and_(tasks.c.id == task_id, tasks.c.state.in_(("running", *also)), tasks.c.worker == worker[:200])


def extend_lease(engine: sa.Engine, task_id: str, *, worker: str, lease_seconds: int) -> bool:
    """Heartbeat: push lease_until forward if this worker still owns the running row."""
    now = utcnow()
    return autocommit_write(engine, lambda conn, _retrying: conn.execute(
        sa.update(tasks).where(_owned(task_id, worker))
        .values(lease_until=now + dt.timedelta(seconds=lease_seconds), updated_at=now)
    ).rowcount == 1)


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


def _succeeded(result: Any, now: Any) -> dict[str, Any]:
    """What a success sets, as values or bound parameters (finish_success and success_update)."""
    return {"state": "succeeded", "result": result, "lease_until": None, "claimed_message_id": None,
            "finished_at": now, "updated_at": now}


def _succeed_statement(*states: str) -> Any:
    c, now = tasks.c, sa.bindparam("now_", type_=tasks.c.updated_at.type)
    return (
        sa.update(tasks)
        .where(c.id == sa.bindparam("task_id_"), c.state.in_(states), c.worker == sa.bindparam("worker_"))
        .values(**_succeeded(sa.bindparam("result_"), now))
    )


def success_update(task_id: str, *, worker: str, result: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(which row, what to set) of finish_success, for the one write that must run on another
    connection than the store's engine: a Django task's, in its own transaction.atomic() on
    Django's connection (pcelery.django), where only the UPDATE goes through the ORM. The same
    condition as _succeed_statement, the same values (_succeeded)."""
    return {"id": task_id, "state": "running", "worker": worker[:200]}, _succeeded(result_json(result), utcnow())


_SUCCEED = _succeed_statement("running")
_SUCCEED_AGAIN = _succeed_statement("running", "succeeded")  # the retry after a dead connection


def finish_success(target: sa.Engine | sa.Connection, task_id: str, *, worker: str, result: Any) -> bool:
    """Mark succeeded with the JSON result: in the caller's transaction when given a Connection
    (so a task's own DB writes commit atomically with it), else in one statement of its own.
    False if this worker no longer owns the row."""
    now = utcnow()
    params = {"task_id_": task_id, "worker_": worker[:200], "result_": result_json(result), "now_": now}

    def write(conn: sa.Connection, retrying: bool) -> bool:
        return conn.execute(_SUCCEED_AGAIN if retrying else _SUCCEED, params).rowcount == 1

    if isinstance(target, sa.Connection):
        return write(target, False)
    return autocommit_write(target, write)


def finish_failure(engine: sa.Engine, task_id: str, *, worker: str, error: str | BaseException,
                   final: bool) -> bool:
    """Record the error; state `dead` when final (last receive before the DLQ), else `failed`.
    Returns False (and changes nothing) if this worker no longer owns the row."""
    now = utcnow()
    state = "dead" if final else "failed"
    text = format_error(error)
    c = tasks.c

    def write(conn: sa.Connection, retrying: bool) -> bool:
        # A retry after a dead connection whose first run committed must not add the line twice.
        line = sa.func.coalesce(c.attempt_errors, "") + _attempt_line(c.attempts, now, text)
        return conn.execute(
            sa.update(tasks).where(_owned(task_id, worker, *((state,) if retrying else ())))
            .values(state=state, error=text, lease_until=None, claimed_message_id=None, finished_at=now,
                    updated_at=now, attempt_errors=sa.case((c.state == "running", line), else_=c.attempt_errors))
        ).rowcount == 1

    return autocommit_write(engine, write)


def _attempt_line(attempt: Any, at: dt.datetime, error: str) -> Any:
    """SQL for one attempt_errors line: {"attempt": n, "at": ..., "error": ...} and a newline, with
    the attempt number taken from the row in the same statement."""
    head = '{"attempt": '
    tail = ", " + json.dumps({"at": _iso(at), "error": error[:ATTEMPT_ERROR_CHARS]})[1:] + "\n"
    return sa.literal(head) + sa.cast(attempt, sa.String) + sa.literal(tail)


def record_unrunnable(engine: sa.Engine, task_id: str, *, task_name: str, error: str, final: bool) -> bool:
    """A delivery that reached a worker which cannot run it at all (no worker declares the task):
    record why on its row, `dead` on the receive that sends the message to the DLQ, else
    `failed`, so a misspelt or undeployed task never reads `queued` forever. Rows that are running
    (another worker does run the task) or succeeded are left alone. False when nothing changed."""
    now = utcnow()
    c = tasks.c
    return autocommit_write(engine, lambda conn, _retrying: conn.execute(
        sa.update(tasks)
        .where(c.id == task_id, c.task_name == task_name, c.state.in_(("pending", "queued", "failed", "dead")))
        .values(state="dead" if final else "failed", error=format_error(error), updated_at=now,
                finished_at=now if final else c.finished_at)
    ).rowcount == 1)


def release(engine: sa.Engine, task_id: str, *, worker: str) -> bool:
    """Give the lease up without a verdict (warm shutdown, worker lost): running -> queued."""
    now = utcnow()
    return autocommit_write(engine, lambda conn, retrying: conn.execute(
        sa.update(tasks).where(_owned(task_id, worker, *(("queued",) if retrying else ())))
        .values(state="queued", lease_until=None, claimed_message_id=None, updated_at=now)
    ).rowcount == 1)


# --- The relay's side -----------------------------------------------------------------------

def claim_unpublished(conn: sa.Connection, *, older_than_seconds: float, limit: int = 10,
                      exclude_ids: Iterable[str] = ()) -> list[OutboxEntry]:
    """Relay: lock up to `limit` pending rows older than the threshold (FOR UPDATE SKIP LOCKED on
    Postgres; SQLite has one writer anyway) and return them (id, task_name, queue, delay_seconds).
    Age counts from when the row became pending (updated_at), so a replayed row also gets the
    submitter's head start before the relay sends it. exclude_ids: rows SQS refused earlier in
    this relay pass."""
    now = utcnow()
    cutoff = now - dt.timedelta(seconds=older_than_seconds)
    c = tasks.c
    # Pending rows the submitter did not publish, and scheduled rows now within SQS's delay of
    # their due time (published with the rest of it as DelaySeconds, so SQS releases them on time).
    query = sa.select(c.id, c.task_name, c.queue, c.delay_seconds, c.due_at).where(sa.or_(
        sa.and_(c.state == "pending", c.updated_at <= cutoff),
        sa.and_(c.state == "scheduled", c.due_at <= now + dt.timedelta(seconds=SQS_MAX_DELAY)),
    ))
    exclude = list(exclude_ids)
    if exclude:
        query = query.where(c.id.not_in(exclude))
    rows = conn.execute(
        query
        .order_by(c.updated_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return [OutboxEntry(r.id, r.task_name, r.queue, r.delay_seconds, r.due_at) for r in rows]


def pending_summary(engine: sa.Engine) -> PendingSummary:
    """Pending rows and the age of the oldest: the relay's health metric."""
    with begin(engine, read_only=True) as conn:
        count, oldest = conn.execute(
            sa.select(sa.func.count(), sa.func.min(tasks.c.updated_at)).where(tasks.c.state == "pending")
        ).one()
    if isinstance(oldest, str):  # in case a driver hands an aggregate back untyped
        oldest = dt.datetime.fromisoformat(oldest)
    if oldest is not None and oldest.tzinfo is None:
        oldest = oldest.replace(tzinfo=UTC)
    age = max(0.0, (utcnow() - oldest).total_seconds()) if oldest is not None else 0.0
    return PendingSummary(int(count), age)


# --- Reading (ops) --------------------------------------------------------------------------

def get_task(engine: sa.Engine, task_id: str) -> TaskRow | None:
    with begin(engine, read_only=True) as conn:
        row = conn.execute(sa.select(tasks).where(tasks.c.id == task_id)).first()
    return TaskRow.from_db(row) if row is not None else None


def get_tasks(engine: sa.Engine, task_ids: Sequence[str]) -> dict[str, TaskRow]:
    """{id: row} of the given ids that have a row."""
    found: dict[str, TaskRow] = {}
    with begin(engine, read_only=True) as conn:
        for chunk in _chunks(list(dict.fromkeys(task_ids))):
            rows = conn.execute(sa.select(tasks).where(tasks.c.id.in_(chunk)))
            found.update((r.id, TaskRow.from_db(r)) for r in rows)
    return found


def list_tasks(engine: sa.Engine, *, state: str | None = None, task_name: str | None = None,
               older_than_seconds: float | None = None, stuck: bool = False,
               limit: int = 100) -> list[TaskRow]:
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
    with begin(engine, read_only=True) as conn:
        return [TaskRow.from_db(r) for r in conn.execute(query)]


def count_by_state(engine: sa.Engine) -> dict[str, int]:
    """{state: count} with every state in STATES present (0 when none)."""
    counts = dict.fromkeys(STATES, 0)
    with begin(engine, read_only=True) as conn:
        for state, n in conn.execute(sa.select(tasks.c.state, sa.func.count()).group_by(tasks.c.state)):
            counts[state] = int(n)
    return counts


def count_by_queue_and_state(engine: sa.Engine) -> dict[str, dict[str, int]]:
    """{catalog queue: {state: count}}, every state in STATES present for each queue that has rows
    (a queue without rows is absent)."""
    counts: dict[str, dict[str, int]] = {}
    c = tasks.c
    with begin(engine, read_only=True) as conn:
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
        for chunk in _chunks(task_ids):
            moved += conn.execute(
                sa.update(tasks).where(c.id.in_(chunk), c.state == "dead")
                .values(state="queued", queued_at=now, updated_at=now)
                .returning(c.id)
            ).scalars().all()
    order = {tid: i for i, tid in enumerate(task_ids)}
    return sorted(moved, key=order.__getitem__)


def cancel(engine: sa.Engine, task_ids: list[str]) -> list[str]:
    """Cancel tasks that have not run to a verdict and are not running (pending, queued, failed):
    they never run; a message that still arrives is acked without running. Returns the ids
    cancelled, in the order given (the others had run, were running, or do not exist)."""
    now = utcnow()
    c = tasks.c
    cancelled: list[str] = []
    with engine.begin() as conn:
        for chunk in _chunks(task_ids):
            cancelled += conn.execute(
                sa.update(tasks).where(c.id.in_(chunk), c.state.in_(CANCELLABLE))
                .values(state="cancelled", lease_until=None, finished_at=now, updated_at=now)
                .returning(c.id)
            ).scalars().all()
    order = {tid: i for i, tid in enumerate(task_ids)}
    return sorted(cancelled, key=order.__getitem__)


def reset_for_replay(engine: sa.Engine, task_ids: list[str]) -> list[str]:
    """Move the given rows back to `pending` (attempts kept, error kept) so the publisher or
    the relay sends them again. Running rows with a live lease are not touched. Returns ids reset.
    The old result is cleared: a pending row showing a result would read as this run's."""
    now = utcnow()
    c = tasks.c
    not_live = sa.or_(c.state != "running", c.lease_until.is_(None), c.lease_until <= now)
    reset: list[str] = []
    with engine.begin() as conn:
        for chunk in _chunks(task_ids):
            reset += conn.execute(
                sa.update(tasks).where(c.id.in_(chunk), not_live)
                .values(state="pending", lease_until=None, claimed_message_id=None, worker=None, result=None,
                        queued_at=None, finished_at=None, updated_at=now)
                .returning(c.id)
            ).scalars().all()
    order = {tid: i for i, tid in enumerate(task_ids)}
    return sorted(reset, key=order.__getitem__)




# --- Schedules (pcelery.scheduler) ----------------------------------------------------------

@dataclass(frozen=True)
class ScheduleState:
    """A periodic schedule's progress: the latest slot submitted (by any scheduler)."""

    name: str
    last_slot: dt.datetime | None
    last_task_id: str | None
    next_slot: dt.datetime | None
    updated_at: dt.datetime


def schedule_states(engine: sa.Engine) -> dict[str, ScheduleState]:
    with begin(engine, read_only=True) as conn:
        return {r.name: ScheduleState(r.name, r.last_slot, r.last_task_id, r.next_slot, r.updated_at)
                for r in conn.execute(sa.select(schedules))}


def record_slot(conn: sa.Connection, *, name: str, slot: dt.datetime, task_id: str,
                next_slot: dt.datetime | None) -> None:
    """In the submitting transaction: the schedule's latest slot is now at least `slot`. Several
    schedulers may record the same or older slots in any order; the latest wins."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]
    c = schedules.c
    stmt = insert(schedules).values(name=name, last_slot=slot, last_task_id=task_id, next_slot=next_slot,
                                    updated_at=utcnow())
    newer = sa.or_(c.last_slot.is_(None), stmt.excluded.last_slot >= c.last_slot)
    conn.execute(stmt.on_conflict_do_update(index_elements=["name"], set_={
        "last_slot": sa.case((newer, stmt.excluded.last_slot), else_=c.last_slot),
        "last_task_id": sa.case((newer, stmt.excluded.last_task_id), else_=c.last_task_id),
        "next_slot": sa.case((newer, stmt.excluded.next_slot), else_=c.next_slot),
        "updated_at": stmt.excluded.updated_at,
    }))
