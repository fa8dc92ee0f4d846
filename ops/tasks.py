"""The claim-check store side of ops: opening the store, task rows (pcelery.store.TaskRow), replay.
Every read and write of the tasks table goes through pcelery.store, which owns it; the CLI turns
the rows into JSON (TaskRow.as_json) or table cells."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import TypedDict

import sqlalchemy as sa

from pcelery.ops import EXIT_DB, EXIT_NOT_FOUND, EXIT_USAGE, OpsError
from pcelery.store import TaskRow

log = logging.getLogger("ops")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

# publish(ids) -> {task_id: message_id} of those sent (the outbox's publisher; see replay).
Publish = Callable[[list[str]], dict[str, str] | None]


class ReplayResult(TypedDict):
    """What replay did (the keys in the order `--output json` shows them)."""

    requested: list[str]
    reset: list[str]
    skipped_running: list[str]
    published: list[str]
    left_for_relay: list[str]
    error: str | None


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


def replay(engine: sa.Engine, rows: list[TaskRow], publish: Publish) -> ReplayResult:
    """Reset the rows to pending (store.reset_for_replay: live running rows are skipped) and hand
    the reset ids to `publish(ids) -> {task_id: message_id}` (the outbox publisher), which sends
    them and marks them queued. What it does not send stays pending for the relay."""
    from pcelery.store import reset_for_replay

    ids = [r.id for r in rows]
    reset = reset_for_replay(engine, ids)
    published: dict[str, str] = {}
    error = None
    if reset:
        try:
            published = publish(reset) or {}
        except Exception as exc:  # noqa: BLE001 - the rows are pending: the relay publishes them
            error = f"publish failed ({exc}); the rows stay pending and the outbox relay will send them"
            log.warning("%s", error)
    return {
        "requested": ids,
        "reset": reset,
        "skipped_running": [i for i in ids if i not in reset],
        "published": sorted(published),
        "left_for_relay": [i for i in reset if i not in published],
        "error": error,
    }
