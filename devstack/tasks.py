"""Demo tasks (PCELERY_TASK_MODULES=devstack.tasks): one per behaviour the demo and the
integration tests show.

Every visible effect goes into `pcelery_demo_effects` (created by `migrate`), so "the effect
happened exactly once" is a row count, and each row says which attempt and which SQS receive
produced it.
"""

from __future__ import annotations

import datetime as dt
import os
import time

import sqlalchemy as sa

from pcelery.catalog import RetryPolicy
from pcelery.worker import current_run, persistent_task

metadata = sa.MetaData()

effects = sa.Table(
    "pcelery_demo_effects",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("key", sa.String(200), nullable=False, index=True),
    sa.Column("task_id", sa.String(36)),
    sa.Column("attempt", sa.Integer),
    sa.Column("receive_count", sa.Integer),
    sa.Column("worker", sa.String(200)),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

def migrate(engine: sa.Engine) -> None:
    """Create the demo tables (idempotent); the demo and the tests call it once before the workers start."""
    metadata.create_all(engine, checkfirst=True)


def effect_count(engine: sa.Engine, key: str) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(effects).where(effects.c.key == key)).scalar_one()


def effect_rows(engine: sa.Engine, key: str) -> list[dict]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(effects).where(effects.c.key == key).order_by(effects.c.id))
        return [dict(r._mapping) for r in rows]


def _record_effect(conn: sa.Connection, key: str) -> None:
    run = current_run()
    conn.execute(effects.insert().values(
        key=key,
        task_id=run.task_id if run else None,
        attempt=run.attempt if run else None,
        receive_count=run.receive_count if run else None,
        worker=run.worker if run else None,
        created_at=dt.datetime.now(dt.UTC),
    ))


@persistent_task(name="demo.add")
def add(x, y):
    return x + y


@persistent_task(name="demo.effect", transactional=True)
def effect(key, *, db):
    """The effect (one row) commits with the task's success: a duplicate delivery adds nothing."""
    _record_effect(db, key)
    return key


@persistent_task(name="demo.flaky", transactional=True)
def flaky(key, failures=1, *, db):
    """Fails on its first `failures` attempts, then records its effect and succeeds."""
    run = current_run()
    attempt = run.attempt if run else 1  # called directly, outside a worker: a first attempt
    if attempt <= failures:
        raise RuntimeError(f"flaky {key}: failing on purpose (attempt {attempt} of {failures} planned failures)")
    _record_effect(db, key)
    return attempt


@persistent_task(name="demo.append")
def append(path, line, seconds=0.0):
    """Not transactional: sleeps, then appends a line to a file, an effect outside the store (an
    e-mail, a webhook). It happens once only if the success is recorded before a redelivery."""
    time.sleep(seconds)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
    return line


@persistent_task(name="demo.until_fixed", transactional=True)
def until_fixed(key, bug_path, *, db):
    """Fails while the file `bug_path` exists (a bug in production), then records its effect: a
    task that ends in the DLQ, is fixed by a deploy (the file removed) and redriven."""
    if os.path.exists(bug_path):
        raise RuntimeError(f"{key}: the bug in {bug_path} is still deployed")
    _record_effect(db, key)
    return key


@persistent_task(name="demo.always_fail")
def always_fail(reason="always fails"):
    raise RuntimeError(reason)


@persistent_task(name="demo.slow", transactional=True)
def slow(key, seconds=3.0, ignore_soft_limit=False, *, db):
    """Sleeps, then records its effect: long enough to kill its worker mid-task. Longer than the
    queue's soft time limit it fails with SoftTimeLimitExceeded; with ignore_soft_limit=True it
    keeps going until the hard limit kills its process."""
    from celery.exceptions import SoftTimeLimitExceeded

    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            time.sleep(left)
        except SoftTimeLimitExceeded:
            if not ignore_soft_limit:
                raise
    _record_effect(db, key)
    return key


@persistent_task(name="demo.long", queue="long", transactional=True)
def long(key, seconds=10.0, *, db):
    """Runs for longer than the long queue's visibility timeout: only the heartbeat keeps the
    message from being delivered (and run) a second time meanwhile."""
    time.sleep(seconds)
    _record_effect(db, key)
    return key


# Backoff retries (pcelery.catalog.RetryPolicy): a timeout retries after 1-2 s, not after a whole
# visibility timeout; anything else is dead at once, sent to the DLQ by the worker.
@persistent_task(name="demo.retry_backoff", transactional=True,
                 retry=RetryPolicy(max_attempts=2, retry_on=(TimeoutError,), backoff=1, backoff_max=2))
def retry_backoff(key, failures=1, error="timeout", *, db):
    """Fails on its first `failures` attempts (TimeoutError, or ValueError with error="value"),
    then records its effect."""
    run = current_run()
    if (run.attempt if run else 1) <= failures:
        raise (TimeoutError if error == "timeout" else ValueError)(f"{key}: failing on purpose")
    _record_effect(db, key)
    return key
