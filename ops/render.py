"""How the CLI shows the library's data: tables and text on stdout, JSON with --output json, and
one-line notes on stderr. Nothing here decides anything or talks to AWS or the database."""

from __future__ import annotations

import datetime as dt
import json
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

if TYPE_CHECKING:
    from pcelery.ops.queues import MessageInfo, PurgeResult, QueueDepth
    from pcelery.ops.redrive import RedrivePlan, RedriveResult
    from pcelery.ops.tasks import ReplayResult
    from pcelery.store import TaskRow

T = TypeVar("T")


# ---------------------------------------------------------------------------------- basics


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def show(output: str, data: T, text: Callable[[T], object]) -> None:
    """`data` as JSON with --output json, else as text(data) renders it."""
    if output == "json":
        print_json(data)
    else:
        text(data)


def table(headers: list[str], rows: Sequence[Sequence[Any]], out: TextIO | None = None) -> None:
    out = out or sys.stdout
    cells = [[("-" if v is None else str(v)) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    out.write("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=False)).rstrip() + "\n")
    for r in cells:
        out.write("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=False)).rstrip() + "\n")


def short(text: Any, n: int = 60) -> str | None:
    if text is None:
        return None
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def when(value: dt.datetime | str | None) -> str | None:
    """2026-11-24T01:38:21.123456Z (or that datetime) -> '2026-11-24 01:38:21' for tables."""
    if not value:
        return None
    iso = value.isoformat() if isinstance(value, dt.datetime) else str(value)
    return iso.replace("T", " ")[:19]


def note(text: str) -> None:
    # One line, always: an AWS error message can carry a whole HTML page.
    text = " ".join(str(text).split())
    print(f"ops: {text if len(text) <= 600 else text[:599] + '…'}", file=sys.stderr)


# ----------------------------------------------------------------------------------- depth


def depth_table(rows: list[QueueDepth], out: TextIO | None = None) -> None:
    cells = []
    for r in rows:
        dlq: Mapping[str, Any] = r["dlq"] or {}
        tasks = r["tasks"]
        tasks_text = None
        if tasks is not None:
            tasks_text = " ".join(f"{k}={v}" for k, v in tasks.items() if v) or "none"
        age = r["oldest_age_seconds"]
        cells.append([r["queue"], r["visible"], r["in_flight"], r["delayed"],
                      None if age is None else f"{age:.0f}s", dlq.get("visible"), dlq.get("in_flight"), tasks_text])
    table(["QUEUE", "VISIBLE", "IN-FLIGHT", "DELAYED", "OLDEST", "DLQ-VISIBLE", "DLQ-IN-FLIGHT", "TASKS"],
          cells, out=out)


def depth_refresh(rows: list[QueueDepth], output: str, every: float, *, clear: bool) -> None:
    """One refresh of `depth --watch`: a JSON document per line on stdout, or the table on stderr
    (cleared first on a terminal) under the time."""
    if output == "json":
        print(json.dumps(rows, default=str), flush=True)
        return
    if clear:
        sys.stderr.write("\033[H\033[J")
    sys.stderr.write(f"{time.strftime('%H:%M:%S')}  every {every:g}s, Ctrl-C to stop\n")
    depth_table(rows, out=sys.stderr)
    sys.stderr.flush()


# ------------------------------------------------------------------------------------ peek


def peek_row(row: TaskRow | None) -> dict[str, Any] | None:
    """The part of a row that peek shows next to its message."""
    if row is None:
        return None
    return {"state": row.state, "attempts": row.attempts, "last_error": row.error,
            "payload": row.payload, "updated_at": row.as_json()["updated_at"]}


def _row_of(message: MessageInfo, rows: Mapping[str, TaskRow]) -> TaskRow | None:
    return rows.get(message["task_id"]) if message["task_id"] else None


def why_poison(message: MessageInfo, row: TaskRow | None, *, store_read: bool) -> str | None:
    """Why a DLQ message cannot run, in one line: what is wrong with its body, else what its
    row says (the worker records why it could not run it), else that it has no row."""
    if message["problem"]:
        return message["problem"]
    if row is None:
        return ("no task row has this id: nothing to run (a message sent without the outbox, or its row was deleted)"
                if store_read and message["task_id"] else None)
    if message["task"] and row.task_name != message["task"]:
        return f"the message names task {message['task']!r} but row {row.id} is for {row.task_name!r}"
    return row.error if row.state in ("failed", "dead") else None


def peek_json(messages: list[MessageInfo], rows: Mapping[str, TaskRow], *, store_read: bool) -> list[dict[str, Any]]:
    return [{**m, "task_row": peek_row(_row_of(m, rows)),
             "why": why_poison(m, _row_of(m, rows), store_read=store_read)} for m in messages]


def peek_text(queue: str, messages: list[MessageInfo], rows: Mapping[str, TaskRow], *, store_read: bool) -> None:
    """store_read: the store was asked for the rows, so a task id without one is worth a word."""
    if not messages:
        print(f"{queue}: no visible messages")
        return
    print(f"{queue}: {len(messages)} message(s), none consumed")
    for m in messages:
        row = _row_of(m, rows)
        print()
        print(f"message {m['message_id']}  received {m['receive_count']}x (this peek included)  sent {m['sent_at']}")
        print(f"  task     {m['task'] or '(not a Celery message)'}  id {m['task_id'] or '-'}")
        if row is not None:
            print(f"  row      {row.state}  attempts {row.attempts}  error {short(row.error, 100) or '-'}")
            print(f"  payload  {short(json.dumps(row.payload, default=str), 100)}")
        elif m["task_id"] and store_read:
            print("  row      (no row with this id: a poison message, see RUNBOOK.md#poison-task)")
        why = why_poison(m, row, store_read=store_read)
        if why and (m["problem"] or (row is not None and why != row.error)):  # else the row line says it
            print(f"  why      {short(why, 200)}")
        if m["attributes"]:
            print(f"  attrs    {json.dumps(m['attributes'])}")
        if not m["task"]:  # a Celery body is base64 of an envelope: the row's payload says more
            print(f"  body     {short(m['body'], 100)}")


# --------------------------------------------------------------------------------- redrive


def redrive_plan_text(plan: RedrivePlan, *, task: str | None, limit: int | None, rate: float | None) -> str:
    """The one line said before anything moves: what, where, how much, how."""
    scope = [f"{plan.visible} visible"]
    if task:
        scope.append(f"only task {task}")
    if limit:
        scope.append(f"at most {limit}")
    if rate:
        scope.append(f"{rate:g}/s")
    return f"redrive {plan.source.name} -> {plan.destination.name} ({', '.join(scope)}; mode {plan.mode})"


def redrive_text(result: RedriveResult, tasks_requeued: int | None) -> None:
    if result.dry_run:
        print(f"dry run: would move {result.would_move} message(s) from {result.source} to "
              f"{result.destination} (mode {result.mode}); nothing moved")
    else:
        print(f"moved {result.moved}, failed {result.failed}, skipped {result.skipped}: {result.source} -> "
              f"{result.destination} (mode {result.mode})")
        if tasks_requeued is not None:
            n, of = tasks_requeued, len(result.moved_task_ids)
            print(f"task rows dead -> queued: {n} of {of}"
                  + (" (the others were already claimed by a worker)" if n < of else ""))
    if result.failure_reason:
        print(f"reason: {result.failure_reason}")


# ------------------------------------------------------------------------- tasks and replay


def tasks_table(rows: list[TaskRow]) -> None:
    table(["ID", "TASK", "QUEUE", "STATE", "ATTEMPTS", "CREATED", "UPDATED", "ERROR"],
          [[r.id, r.task_name, r.queue, r.state, r.attempts, when(r.created_at), when(r.updated_at),
            short(r.error, 50)] for r in rows])


def replay_plan_json(rows: list[TaskRow], *, dry_run: bool) -> dict[str, Any]:
    return {"dry_run": dry_run, "would_replay": [r.id for r in rows], "rows": [r.as_json() for r in rows]}


def replay_plan_text(rows: list[TaskRow], *, dry_run: bool) -> None:
    print(f"{'dry run: would replay' if dry_run else 'nothing to replay:'} {len(rows)} task(s)")
    for r in rows:
        print(f"  {r.id}  {r.task_name}  {r.state}  attempts {r.attempts}")


def replay_text(result: ReplayResult) -> None:
    print(f"replayed {len(result['reset'])} task(s): published {len(result['published'])}, "
          f"left for the relay {len(result['left_for_relay'])}, skipped (running) {len(result['skipped_running'])}")
    if result["error"]:
        print(f"note: {result['error']}")


# ----------------------------------------------------------------------------------- purge


def purge_plan_json(queue: str, url: str, count: int) -> dict[str, Any]:
    return {"queue": queue, "url": url, "would_purge_approximately": count, "dry_run": True}


def purge_plan_text(queue: str, count: int) -> None:
    print(f"dry run: would purge about {count} message(s) from {queue}")


def purge_text(result: PurgeResult) -> None:
    print(f"purged {result['queue']} (about {result['purged_approximately']} message(s); SQS may take up to 60 s)")


# ------------------------------------------------------------------------------ local stack


def exports(environ: Mapping[str, str]) -> str:
    """`export` lines for `eval "$(python -m ops local up)"`."""
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in environ.items())


def local_up_text(data: Mapping[str, Any]) -> None:
    sys.stdout.write(exports(data["environ"]))


def local_down_text(data: Mapping[str, Any]) -> None:
    """Nothing: what `down` stopped is said on stderr as it happens."""


def local_status_text(data: Mapping[str, Any]) -> None:
    if data["up"]:
        print(f"up: SQS {data['endpoint']}, store {data['database_url']}")
        for name, p in data["processes"].items():
            print(f"  {name:<7} pid {p['pid']}  {'running' if p['alive'] else 'NOT running'}")
    else:
        print("down" if not data["processes"] else "partly down: `python -m ops local down` then `up`")


def seed_text(data: Mapping[str, Any]) -> None:
    print(f"submitted {len(data['task_ids'])} task(s): "
          f"{', '.join(f'{n} {k}' for k, n in data['by_task'].items())}; "
          "the failing ones reach the DLQ in about a minute (`python -m ops depth`)")
