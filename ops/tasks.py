"""The claim-check store side of ops: opening the store, task rows (pcelery.store.TaskRow), replay.
Every read and write of the tasks table goes through pcelery.store, which owns it; the CLI turns
the rows into JSON (TaskRow.as_json) or table cells."""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, TypedDict

import sqlalchemy as sa

from pcelery.ops import EXIT_DB, EXIT_NOT_FOUND, EXIT_USAGE, OpsError
from pcelery.store import TaskRow

if TYPE_CHECKING:
    from pcelery.scheduler import Schedule

log = logging.getLogger("ops")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

# publish(ids) -> {task_id: message_id} of those sent (the outbox's publisher; see replay).
Publish = Callable[[list[str]], dict[str, str] | None]
PUBLISH_CHUNK = 100  # ids handed to the publisher at a time (progress moves between them)


class ReplayResult(TypedDict):
    """What replay did (the keys in the order `--output json` shows them)."""

    requested: list[str]
    reset: list[str]
    skipped_running: list[str]
    published: list[str]
    left_for_relay: list[str]
    error: str | None
    # {DLQ name: old copies deleted}: the replayed tasks' messages still in their DLQ, removed so
    # that a later redrive cannot run them a second time (empty when none were found).
    dlq_copies_deleted: dict[str, int]
    dlq_copies_checked: bool  # False with --keep-dlq-copies: the DLQs were not looked at


class RowOutcome(TypedDict):
    """What became of the rows of messages a client redrive moved."""

    requeued: int  # dead -> queued
    other_states: dict[str, int]  # rows not dead any more (a worker already took them): {state: n}
    no_row: int  # Celery messages whose id has no row (poison)
    not_celery: int  # messages that carry no task id at all
    unknown: int  # not checked: the store could not be read


MAX_DURATION_DAYS = 3650  # rows are not older than ten years; a larger value is a typo


def parse_duration(text: str) -> float:
    """'90s', '15m', '2h', '1d' -> seconds."""
    m = _DURATION.match(text or "")
    if not m:
        raise ValueError(f"duration {text!r} is not like 90s, 15m, 2h or 1d")
    seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if seconds > MAX_DURATION_DAYS * 86400:
        raise ValueError(f"duration {text!r} is longer than {MAX_DURATION_DAYS} days")
    return seconds


def _where(engine: sa.Engine) -> str:
    return engine.url.render_as_string(hide_password=True)


def _reason(exc: Exception) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def open_store(database_url: str) -> tuple[sa.Engine, None] | tuple[None, str]:
    """(engine, None) when the claim-check database answers and has its schema, else
    (None, note) with a sentence for stderr."""
    from pcelery import schema

    try:
        engine = schema.make_engine(database_url)
    except Exception as exc:  # noqa: BLE001 - a malformed URL is a setting problem, said in one line
        return None, f"claim-check database URL is not usable ({_reason(exc)}): check DATABASE_URL"
    try:
        version = schema.schema_version(engine)
    except Exception as exc:  # noqa: BLE001 - any failure here means "no store": say why in one line
        engine.dispose()
        return None, (f"claim-check database {_where(engine)} is unreachable ({_reason(exc)}): check DATABASE_URL "
                      "(or DB_HOST...), the network path to RDS, and RUNBOOK.md#database-failover")
    if version == 0:
        engine.dispose()
        return None, (f"claim-check database {_where(engine)} has no schema: run `pcelery-migrate` "
                      "(RUNBOOK.md#run-migrations)")
    if version < schema.LATEST_SCHEMA_VERSION:  # reading rows would fail on the columns it lacks
        engine.dispose()
        return None, (f"claim-check database {_where(engine)} has schema version {version}, this code needs "
                      f"{schema.LATEST_SCHEMA_VERSION}: run `pcelery-migrate` (RUNBOOK.md#run-migrations)")
    return engine, None


def require_store(database_url: str) -> sa.Engine:
    opened = open_store(database_url)
    if opened[0] is None:
        raise OpsError(opened[1], EXIT_DB)
    return opened[0]


def task_rows(engine: sa.Engine, task_ids: list[str | None]) -> dict[str, TaskRow]:
    """{id: row} of the ids that have a row (None and empty ids are skipped)."""
    from pcelery.store import get_tasks

    return get_tasks(engine, [t for t in task_ids if t])


def count_tasks(engine: sa.Engine, *, state: str | None = None, task_name: str | None = None,
                older_than_seconds: float | None = None, stuck: bool = False) -> int:
    """How many rows list_tasks would return without its limit (so a cut list can say how many
    it left out). The same filters as pcelery.store.list_tasks; a unit test holds them equal."""
    import datetime as dt

    from pcelery.schema import begin, tasks, utcnow

    now = utcnow()
    query = sa.select(sa.func.count()).select_from(tasks)
    if state is not None:
        query = query.where(tasks.c.state == state)
    if task_name is not None:
        query = query.where(tasks.c.task_name == task_name)
    if older_than_seconds is not None:
        query = query.where(tasks.c.created_at <= now - dt.timedelta(seconds=older_than_seconds))
    if stuck:
        query = query.where(tasks.c.state == "running", tasks.c.lease_until < now)
    with begin(engine, read_only=True) as conn:
        return int(conn.execute(query).scalar_one())


def requeue_moved(engine: sa.Engine | None, task_ids: list[str], *, not_celery: int = 0) -> RowOutcome:
    """After a client redrive: the moved tasks' rows dead -> queued (pcelery.store.mark_redriven),
    and what the others are: rows a worker already took, ids without a row, or (engine None)
    not checked."""
    outcome: RowOutcome = {"requeued": 0, "other_states": {}, "no_row": 0, "not_celery": not_celery, "unknown": 0}
    if engine is None:
        outcome["unknown"] = len(task_ids)
        return outcome
    from pcelery.store import get_tasks, mark_redriven

    moved = set(mark_redriven(engine, task_ids)) if task_ids else set()
    outcome["requeued"] = len(moved)
    rest = [t for t in task_ids if t not in moved]
    rows = get_tasks(engine, rest) if rest else {}
    for tid in rest:
        row = rows.get(tid)
        if row is None:
            outcome["no_row"] += 1
        else:
            outcome["other_states"][row.state] = outcome["other_states"].get(row.state, 0) + 1
    return outcome


def list_tasks(engine: sa.Engine, *, state: str | None = None, task_name: str | None = None,
               older_than_seconds: float | None = None, stuck: bool = False, limit: int = 100) -> list[TaskRow]:
    from pcelery.store import STATES
    from pcelery.store import list_tasks as store_list

    if state is not None and state not in STATES:
        raise OpsError(f"unknown state {state!r}: use one of {', '.join(STATES)}", EXIT_USAGE)
    return store_list(engine, state=state, task_name=task_name, older_than_seconds=older_than_seconds,
                      stuck=stuck, limit=limit)


def select_for_replay(engine: sa.Engine, *, task_ids: list[str] | None = None, state: str | None = None,
                      task_name: str | None = None, limit: int = 100) -> list[TaskRow]:
    """The rows a replay would touch; unknown ids are an error (EXIT_NOT_FOUND) naming them."""
    from pcelery.store import get_task

    if task_ids:
        rows: list[TaskRow] = []
        missing: list[str] = []
        for tid in dict.fromkeys(task_ids):
            row = get_task(engine, tid)
            if row is not None:
                rows.append(row)
            else:
                missing.append(tid)
        if missing:
            raise OpsError(f"no task row with id {', '.join(missing)}: check the ids (`python -m ops tasks` "
                           "lists rows)", EXIT_NOT_FOUND)
        return rows[:limit]
    if not state:
        raise OpsError("replay needs TASK_ID ... or --state STATE", EXIT_USAGE)
    return list_tasks(engine, state=state, task_name=task_name, limit=limit)


def replay(engine: sa.Engine, rows: list[TaskRow], publish: Publish,
           progress: Callable[[int, int | None], None] | None = None) -> ReplayResult:
    """Reset the rows to pending (store.reset_for_replay: live running rows are skipped) and hand
    the reset ids to `publish(ids) -> {task_id: message_id}` (the outbox publisher), which sends
    them and marks them queued, PUBLISH_CHUNK at a time. What it does not send stays pending for
    the relay. (The CLI then removes the old copies from the DLQs: queues.find_copies.)"""
    from pcelery.store import reset_for_replay

    ids = [r.id for r in rows]
    reset = reset_for_replay(engine, ids)
    published: dict[str, str] = {}
    error = None
    for i in range(0, len(reset), PUBLISH_CHUNK):
        try:
            published.update(publish(reset[i:i + PUBLISH_CHUNK]) or {})
        except Exception as exc:  # noqa: BLE001 - the rows are pending: the relay publishes them
            error = f"publish failed ({exc}); the rows stay pending and the outbox relay will send them"
            log.warning("%s", error)
            break
        if progress:
            progress(min(i + PUBLISH_CHUNK, len(reset)), len(reset))
    return {
        "requested": ids,
        "reset": reset,
        "skipped_running": [i for i in ids if i not in reset],
        "published": sorted(published),
        "left_for_relay": [i for i in reset if i not in published],
        "error": error,
        "dlq_copies_deleted": {},
        "dlq_copies_checked": False,
    }


# --------------------------------------------------------------------------------- cancel


class CancelResult(TypedDict):
    """What cancel did: the rows cancelled, and the state of each that was not (None: no row)."""

    requested: list[str]
    cancelled: list[str]
    not_cancelled: dict[str, str | None]


def cancel(engine: sa.Engine, task_ids: list[str], *, dry_run: bool = False) -> CancelResult:
    """Cancel tasks that have not started (scheduled, pending, queued, failed): their rows become
    `cancelled` and a message that still arrives is acked without running (pcelery.store.cancel).
    With dry_run, says which would be, changing nothing."""
    from pcelery.store import CANCELLABLE, get_tasks
    from pcelery.store import cancel as store_cancel

    ids = list(dict.fromkeys(task_ids))
    if dry_run:
        rows = get_tasks(engine, ids)
        cancelled = [i for i in ids if i in rows and rows[i].state in CANCELLABLE]
    else:
        cancelled = store_cancel(engine, ids)
    rest = [i for i in ids if i not in set(cancelled)]
    after = get_tasks(engine, rest) if rest else {}
    return {"requested": ids, "cancelled": cancelled,
            "not_cancelled": {i: after[i].state if i in after else None for i in rest}}


# ------------------------------------------------------------------------------ schedules


@dataclass(frozen=True)
class ScheduleView:
    """A periodic schedule as on-call sees it: what it runs and when, its latest slot submitted
    (by any scheduler) with that task's state, and its next slot."""

    name: str
    task: str | None  # None: the store has a record of it, the code no longer declares it
    when: str | None  # "cron 30 2 * * * Europe/Paris" or "every 300s"
    missed: str | None
    last_slot: dt.datetime | None
    last_task_id: str | None
    last_task_state: str | None  # None: no slot yet, or its row is gone
    next_slot: dt.datetime | None  # from the code when declared, else the store's record

    def as_json(self) -> dict[str, Any]:
        def iso(v: Any) -> Any:
            if not isinstance(v, dt.datetime):
                return v
            return (v if v.tzinfo else v.replace(tzinfo=dt.UTC)).isoformat().replace("+00:00", "Z")

        return {k: iso(v) for k, v in asdict(self).items()}


def describe_when(schedule: Schedule) -> str:
    if schedule.cron is not None:
        return f"cron {schedule.cron} {schedule.timezone}"
    every = schedule.every or 0
    return f"every {every:g}s"


def list_schedules(engine: sa.Engine | None, declared: Sequence[Schedule] | None,
                   now: dt.datetime | None = None) -> list[ScheduleView]:
    """The declared schedules (in their order), then any the store remembers that the code no
    longer declares. engine None: the code's schedules alone (no last run)."""
    from pcelery.store import get_tasks, schedule_states, utcnow

    now = now or utcnow()
    states = schedule_states(engine) if engine is not None else {}
    last_ids = [s.last_task_id for s in states.values() if s.last_task_id]
    rows = get_tasks(engine, last_ids) if engine is not None and last_ids else {}

    def view(name: str, schedule: Schedule | None) -> ScheduleView:
        state = states.get(name)
        last_id = state.last_task_id if state else None
        return ScheduleView(
            name=name, task=schedule.task if schedule else None,
            when=describe_when(schedule) if schedule else None,
            missed=schedule.missed if schedule else None,
            last_slot=state.last_slot if state else None, last_task_id=last_id,
            last_task_state=rows[last_id].state if last_id in rows else None,
            next_slot=schedule.next_after(now) if schedule else (state.next_slot if state else None))

    views = [view(s.name, s) for s in declared or ()]
    known = {s.name for s in declared or ()}
    views += [view(name, None) for name in sorted(states) if name not in known]
    return views


def load_declared(spec: str, setting: str) -> list[Schedule]:
    """The schedules --schedules or PCELERY_SCHEDULES (`setting`) names; a load error is EXIT_USAGE."""
    from pcelery.scheduler import ScheduleError, load_schedules

    try:
        return load_schedules(spec, setting)
    except ScheduleError as exc:
        raise OpsError(str(exc), EXIT_USAGE) from None
