"""The claim-check store: one row per task, holding its payload, state and result.

INTERFACE STUB (agreed API; bodies are filled in by the store/outbox work). Other modules code
against exactly these names and signatures. SQLAlchemy Core 2.x serves Postgres (psycopg 3,
production) and SQLite (embedded default) from one code path.

States and transitions (the only ones allowed):

    pending --publish--> queued --claim--> running --success--> succeeded
       ^                   |                  |--failure-->  failed   (SQS will redeliver)
       |                   |                  |--failure on the last receive--> dead
       |                   |                  '--lease expired: may be claimed again
       '------ replay (ops) from failed / dead / succeeded / queued / pending ------'

A `failed` row can be claimed again (SQS redelivered it); `succeeded` never runs again except
by an explicit replay; `dead` runs again only if replayed or redriven from the DLQ.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

STATES = ("pending", "queued", "running", "succeeded", "failed", "dead")

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
    sa.Column("lease_until", sa.DateTime(timezone=True)),
    sa.Column("worker", sa.String(200)),  # hostname/pid of the claiming worker process
    sa.Column("result", sa.Text),  # JSON
    sa.Column("error", sa.Text),  # last error: "ExcType: message"
    sa.Column("message_id", sa.String(100)),  # last SQS MessageId it was published as
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("queued_at", sa.DateTime(timezone=True)),
    sa.Column("started_at", sa.DateTime(timezone=True)),
    sa.Column("finished_at", sa.DateTime(timezone=True)),
    sa.Index("ix_pcelery_tasks_state_created", "state", "created_at"),
    sa.Index("ix_pcelery_tasks_name_state", "task_name", "state"),
)


@dataclass(frozen=True)
class Claim:
    """What the worker should do with a delivery. outcome is one of:
    - "run": the row is now `running`, owned by this worker, attempts already incremented
    - "duplicate": the row is `succeeded`; ack the message, do not run
    - "busy": another worker holds a live lease; do not run a second copy
    - "missing": no row with that id (poison message)
    """

    outcome: str
    task_id: str
    task_name: str | None = None
    args: list | None = None
    kwargs: dict | None = None
    attempts: int = 0
    lease_until: dt.datetime | None = None


def make_engine(url: str) -> sa.Engine:
    """Engine for a SQLAlchemy URL. SQLite gets WAL and a busy timeout so a worker's pool
    processes and the relay can share the file; Postgres gets pool_pre_ping (RDS failover)."""
    raise NotImplementedError


def migrate(engine: sa.Engine) -> list[str]:
    """Create or upgrade the schema; idempotent. Returns the steps applied (empty when current).
    CLI: `python -m app.store migrate` (uses Settings.from_env().database_url)."""
    raise NotImplementedError


def insert_task(conn: sa.Connection, *, task_id: str, task_name: str, queue: str,
                args: list, kwargs: dict, delay_seconds: int = 0) -> None:
    """Insert a `pending` row inside the caller's transaction (conn)."""
    raise NotImplementedError


def mark_queued(engine: sa.Engine, published: dict[str, str]) -> int:
    """{task_id: sqs_message_id} -> rows moved pending->queued (other states untouched)."""
    raise NotImplementedError


def claim(engine: sa.Engine, task_id: str, *, worker: str, lease_seconds: int) -> Claim:
    """One short transaction: decide run/duplicate/busy/missing and, for run, set running,
    attempts+1, lease_until=now+lease_seconds, worker, started_at. A `running` row whose lease
    has expired (its worker died) may be claimed again."""
    raise NotImplementedError


def extend_lease(engine: sa.Engine, task_id: str, *, worker: str, lease_seconds: int) -> bool:
    """Heartbeat: push lease_until forward if this worker still owns the running row."""
    raise NotImplementedError


def finish_success(conn: sa.Connection, task_id: str, *, worker: str, result: Any) -> bool:
    """Mark succeeded with the JSON result, in the caller's transaction (so a task's own DB
    writes on conn commit atomically with it). False if this worker no longer owns the row."""
    raise NotImplementedError


def finish_failure(engine: sa.Engine, task_id: str, *, worker: str, error: str, final: bool) -> None:
    """Record the error; state `dead` when final (last receive before the DLQ), else `failed`."""
    raise NotImplementedError


def release(engine: sa.Engine, task_id: str, *, worker: str) -> None:
    """Give the lease up without a verdict (warm shutdown, worker lost): running -> queued."""
    raise NotImplementedError


def claim_unpublished(conn: sa.Connection, *, older_than_seconds: float, limit: int = 10) -> list[dict]:
    """Relay: lock up to `limit` pending rows older than the threshold (FOR UPDATE SKIP LOCKED on
    Postgres; SQLite has one writer anyway) and return them (id, task_name, queue, delay_seconds)."""
    raise NotImplementedError


def get_task(engine: sa.Engine, task_id: str) -> dict | None:
    """The row as a dict (payload/result decoded from JSON), or None."""
    raise NotImplementedError


def list_tasks(engine: sa.Engine, *, state: str | None = None, task_name: str | None = None,
               older_than_seconds: float | None = None, stuck: bool = False,
               limit: int = 100) -> list[dict]:
    """Rows, oldest first. stuck=True: running rows whose lease has expired."""
    raise NotImplementedError


def count_by_state(engine: sa.Engine) -> dict[str, int]:
    """{state: count} with every state in STATES present (0 when none)."""
    raise NotImplementedError


def reset_for_replay(engine: sa.Engine, task_ids: list[str]) -> list[str]:
    """Move the given rows back to `pending` (attempts kept, error kept) so the publisher or
    the relay sends them again. Running rows with a live lease are not touched. Returns ids reset."""
    raise NotImplementedError
