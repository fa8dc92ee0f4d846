"""How the CLI shows the library's data: tables on stdout that fit the terminal, JSON with
--output json, one-line notes and progress bars on stderr. Nothing here decides anything or
talks to AWS or the database.

Colour and progress bars only on a terminal (rich decides: never when piped, never with NO_COLOR
or TERM=dumb). Tables fit the terminal's width: columns that can give up width (an error, a task
name) are cut with an ellipsis, never dropped; when piped they keep their full width unless
COLUMNS says otherwise.
"""

from __future__ import annotations

import datetime as dt
import json
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

if TYPE_CHECKING:
    from rich.console import Console

    from pcelery.ops.queues import MessageInfo, PurgeResult, QueueDepth
    from pcelery.ops.redrive import RedrivePlan, RedriveResult
    from pcelery.ops.tasks import CancelResult, ReplayResult, RowOutcome, ScheduleView
    from pcelery.store import TaskRow

T = TypeVar("T")

GAP = 2  # spaces between columns


# ---------------------------------------------------------------------------------- basics


def _console(stream: TextIO) -> Console:
    from rich.console import Console

    # soft_wrap: the lines are already as wide as they should be; never re-wrapped or cropped.
    return Console(file=stream, highlight=False, markup=False, emoji=False, soft_wrap=True)


def out() -> Console:
    return _console(sys.stdout)


def err() -> Console:
    return _console(sys.stderr)


def width(stream: TextIO | None = None) -> int | None:
    """The width tables fit in: the terminal's (COLUMNS overrides it, as for any terminal
    program); None, unlimited, when piped."""
    stream = stream or sys.stdout
    return shutil.get_terminal_size((100, 24)).columns if stream.isatty() else None


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def show(output: str, data: T, text: Callable[[T], object]) -> None:
    """`data` as JSON with --output json, else as text(data) renders it."""
    if output == "json":
        print_json(data)
    else:
        text(data)


def line(text: str = "", style: str | None = None) -> None:
    """One line of the table view on stdout (a footnote, a summary), wrapped to the terminal."""
    import textwrap

    from rich.text import Text

    limit = width()
    parts = textwrap.wrap(text, limit, subsequent_indent="  ", break_on_hyphens=False) if limit and text else [text]
    for part in parts:
        out().print(Text(part, style=style or ""))


def note(text: str) -> None:
    """One line on stderr, always: an AWS error message can carry a whole HTML page."""
    text = " ".join(str(text).split())
    text = text if len(text) <= 600 else text[:599] + "…"
    style = "bold red" if text.startswith("error:") else "yellow" if text.startswith("warning:") else ""
    from rich.text import Text

    err().print(Text("ops: ", style="dim") + Text(text, style=style))


def short(text: Any, n: int = 60) -> str | None:
    if text is None:
        return None
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def when(value: dt.datetime | str | None) -> str | None:
    """2026-11-24T01:38:21.123456Z (or that datetime) -> '2026-11-24 01:38:21'."""
    if not value:
        return None
    iso = value.isoformat() if isinstance(value, dt.datetime) else str(value)
    return iso.replace("T", " ")[:19]


def _as_datetime(value: dt.datetime | str | None) -> dt.datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    try:
        parsed = dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def duration(seconds: float) -> str:
    """42 -> '42s', 150 -> '2m30s', 7300 -> '2h01m', 200000 -> '2d07h'."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def ago(value: dt.datetime | str | None, now: dt.datetime | None = None) -> str | None:
    """A time as its age: '12s ago', '5m ago', '3h ago', '2d ago' (tables; JSON keeps ISO times)."""
    moment = _as_datetime(value)
    if moment is None:
        return None
    seconds = ((now or dt.datetime.now(dt.UTC)) - moment).total_seconds()
    if seconds < 60:
        return f"{max(0, int(seconds))}s ago"
    if seconds < 3600:
        return f"{int(seconds // 60)}m ago"
    if seconds < 86400:
        return f"{int(seconds // 3600)}h ago"
    return f"{int(seconds // 86400)}d ago"


def until(value: dt.datetime | str | None, now: dt.datetime | None = None) -> str | None:
    """A future time as the wait: 'in 20d00h', 'in 4m10s'; a past one as its age."""
    moment = _as_datetime(value)
    if moment is None:
        return None
    seconds = (moment - (now or dt.datetime.now(dt.UTC))).total_seconds()
    return f"in {duration(seconds)}" if seconds >= 0 else ago(moment, now)


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


# ----------------------------------------------------------------------------------- tables


@dataclass(frozen=True)
class Col:
    """A table column. shrink: 0 keeps its full width; 1, 2, ... give up width in that order
    when the table is wider than the terminal, down to `least`. keep_end: cut from the left
    (a dotted task name differs at its end)."""

    header: str
    right: bool = False
    shrink: int = 0
    least: int = 8
    keep_end: bool = False
    # When the terminal leaves it fewer than `least` columns, it goes on a line of its own under
    # each row (indented, cut to the width) instead of being cut to nothing.
    below: bool = False


@dataclass(frozen=True)
class Styled:
    text: str
    style: str


Cell = Any  # str, int, float, None ('-') or Styled

STATE_STYLES = {"succeeded": "green", "failed": "yellow", "dead": "bold red", "running": "cyan",
                "pending": "magenta", "scheduled": "magenta", "queued": "blue", "cancelled": "dim"}


def state(name: str | None) -> Styled | None:
    return None if name is None else Styled(name, STATE_STYLES.get(name, ""))


def _text(cell: Cell) -> tuple[str, str]:
    if isinstance(cell, Styled):
        return " ".join(cell.text.split()), cell.style
    if cell is None:
        return "-", "dim"
    return " ".join(str(cell).split()), ""


def _cut(text: str, n: int, keep_end: bool) -> str:
    if len(text) <= n:
        return text
    if n <= 1:
        return "…"[:n]
    return "…" + text[-(n - 1):] if keep_end else text[: n - 1] + "…"


def fit(columns: Sequence[Col], natural: list[int], total_width: int | None) -> list[int]:
    """Column widths: the natural ones, narrowed column by column (in `shrink` order, each down
    to `least`) until the row fits total_width. Nothing is dropped; if even that is too wide the
    table is left wider than the terminal."""
    widths = list(natural)
    if total_width is None:
        return widths
    excess = sum(widths) + GAP * (len(widths) - 1) - total_width
    for i in sorted((i for i, c in enumerate(columns) if c.shrink), key=lambda i: columns[i].shrink):
        if excess <= 0:
            break
        give = min(excess, max(0, widths[i] - columns[i].least))
        widths[i] -= give
        excess -= give
    return widths


BELOW_INDENT = "    "


def table_lines(columns: Sequence[Col], rows: Iterable[Sequence[Cell]], total_width: int | None) -> list[Any]:
    """The table as rich Text lines, fitted to total_width."""
    from rich.text import Text

    cells = [[_text(c) for c in row] for row in rows]
    natural = [max([len(col.header)] + [len(r[i][0]) for r in cells]) for i, col in enumerate(columns)]
    shown = list(range(len(columns)))
    widths = fit(columns, natural, total_width)
    # A column narrowed down to its `least` reads badly, and a table still too wide overflows: such a
    # column goes under the row instead.
    too_wide = total_width is not None and sum(widths) + GAP * (len(widths) - 1) > total_width
    squeezed = [i for i in shown if columns[i].below
                and (too_wide or (widths[i] < natural[i] and widths[i] <= columns[i].least))]
    if squeezed:
        shown = [i for i in shown if i not in squeezed]
        sub = fit([columns[i] for i in shown], [natural[i] for i in shown], total_width)
        widths = [0] * len(columns)
        for i, w in zip(shown, sub, strict=True):
            widths[i] = w
    lines = []
    header = Text()
    for n, i in enumerate(shown):
        col, w = columns[i], widths[i]
        title = _cut(col.header, w, False)
        header.append(title.rjust(w) if col.right else title.ljust(w), style="bold")
        if n < len(shown) - 1:
            header.append(" " * GAP)
    header.rstrip()
    lines.append(header)
    for row in cells:
        text = Text()
        for n, i in enumerate(shown):
            (value, style), col, w = row[i], columns[i], widths[i]
            value = _cut(value, w, col.keep_end)
            text.append(value.rjust(w) if col.right else value.ljust(w), style=style)
            if n < len(shown) - 1:
                text.append(" " * GAP)
        text.rstrip()
        lines.append(text)
        for i in squeezed:
            value, style = row[i]
            if value != "-":
                room = (total_width or 10**6) - len(BELOW_INDENT)
                lines.append(Text(BELOW_INDENT) + Text(_cut(value, room, False), style=style))
    return lines


def table(columns: Sequence[Col], rows: Iterable[Sequence[Cell]], *, console: Console | None = None,
          total_width: int | None = None, stream: TextIO | None = None) -> None:
    console = console or out()
    for text in table_lines(columns, rows, total_width if total_width is not None else width(stream)):
        console.print(text)


def footnote(text: str) -> None:
    """A line under a table (what a column means, what was left out), dimmed on a terminal."""
    line(text, style="dim")


def more_note(shown: int, total: int | None, *, what: str, how: str, output: str, approximate: bool = False) -> None:
    """Say that a list was cut and by how much: under the table, or on stderr beside JSON."""
    if total is None or total <= shown:
        return
    about = "about " if approximate else ""
    text = f"showing {shown} of {about}{total} {what}: {how} {total} shows them all"
    if output == "json":
        note(text)
    else:
        footnote(text)


# ----------------------------------------------------------------------------------- depth

DEPTH_COLUMNS = (Col("QUEUE"), Col("VISIBLE", right=True),
                 Col("IN-FLIGHT", right=True), Col("DELAYED", right=True), Col("OLDEST", right=True),
                 Col("DLQ", right=True), Col("TASKS", shrink=1, least=20, below=True))

# The order task counts are shown in: what needs attention first.
_STATE_ORDER = ("dead", "failed", "running", "pending", "scheduled", "queued", "succeeded", "cancelled")


def task_counts_text(tasks: Mapping[str, int] | None) -> Cell:
    if tasks is None:
        return None
    order = [s for s in _STATE_ORDER if s in tasks] + [s for s in tasks if s not in _STATE_ORDER]
    text = " ".join(f"{s}={tasks[s]}" for s in order if tasks[s])
    return text or Styled("none", "dim")


def depth_cells(rows: list[QueueDepth]) -> list[list[Cell]]:
    cells: list[list[Cell]] = []
    for r in rows:
        dlq: Mapping[str, Any] = r["dlq"] or {}
        age = r["oldest_age_seconds"]
        dlq_cell: Cell = None
        if dlq:
            text = str(dlq["visible"]) + (f"+{dlq['in_flight']}" if dlq["in_flight"] else "")
            dlq_cell = Styled(text, "bold red") if dlq["visible"] or dlq["in_flight"] else text
        cells.append([
            r["queue"], r["visible"], r["in_flight"], r["delayed"],
            duration(age) if age is not None else Styled("n/a", "dim"), dlq_cell, task_counts_text(r["tasks"]),
        ])
    return cells


def depth_footnotes(rows: list[QueueDepth]) -> list[str]:
    reasons = sorted({why for r in rows if (why := r.get("oldest_age_unavailable"))})
    notes = [f"OLDEST n/a: {reason}" for reason in reasons]
    if any(r["dlq"] and r["dlq"]["in_flight"] for r in rows):
        notes.append("DLQ n+m: n visible, m in flight (being moved or peeked right now)")
    if rows and all(r["tasks"] is None for r in rows):
        notes.append("TASKS -: the claim-check database was not read (see the note above)")
    return notes


def depth_table(rows: list[QueueDepth]) -> None:
    table(DEPTH_COLUMNS, depth_cells(rows))
    for text in depth_footnotes(rows):
        footnote(text)


class DepthWatch:
    """`depth --watch`: the table refreshed in place on a terminal (rich Live), else one
    timestamped table after another; with --output json, a JSON document per line. Always on
    stdout: it is the data."""

    def __init__(self, output: str, every: float):
        self.output, self.every = output, every
        self.live: Any = None

    def __enter__(self) -> DepthWatch:
        if self.output != "json" and sys.stdout.isatty():
            from rich.live import Live

            self.live = Live(console=out(), auto_refresh=False, transient=False)
            self.live.__enter__()
        return self

    def show(self, rows: list[QueueDepth]) -> None:
        if self.output == "json":
            print(json.dumps(rows, default=str), flush=True)
            return
        from rich.console import Group
        from rich.text import Text

        heading = Text(f"{time.strftime('%H:%M:%S')}  depth every {self.every:g}s; Ctrl-C to stop", style="dim")
        body = table_lines(DEPTH_COLUMNS, depth_cells(rows), width())
        notes = [Text(n, style="dim") for n in depth_footnotes(rows)]
        if self.live is not None:
            self.live.update(Group(heading, *body, *notes), refresh=True)
            return
        console = out()
        for text in (heading, *body, *notes):
            console.print(text)
        console.print()
        sys.stdout.flush()

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)


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


PEEK_COLUMNS = (Col("TASK ID"), Col("TASK", shrink=2, least=12, keep_end=True), Col("SENT", right=True),
                Col("ROW", shrink=3, least=6), Col("WHY", shrink=1, least=24, below=True))


def peek_table(queue: str, messages: list[MessageInfo], rows: Mapping[str, TaskRow], *, store_read: bool,
               total: int | None, in_flight: int = 0) -> None:
    """store_read: the store was asked for the rows, so a task id without one is worth a word."""
    if not messages:
        line(f"{queue}: no visible messages" + (f" ({in_flight} in flight: being received or moved by someone "
                                                "else right now)" if in_flight else ""))
        return
    cells: list[list[Cell]] = []
    for m in messages:
        row = _row_of(m, rows)
        if row is not None:
            row_cell: Cell = Styled(f"{row.state}/{row.attempts}", STATE_STYLES.get(row.state, ""))
        else:
            row_cell = Styled("no row", "bold red") if (m["task_id"] and store_read) else None
        why = why_poison(m, row, store_read=store_read)
        cells.append([m["task_id"], m["task"] or Styled("(not Celery)", "bold red"),
                      ago(m["sent_at"]), row_cell, why])
    table(PEEK_COLUMNS, cells)
    by_task: dict[str, int] = {}
    for m in messages:
        by_task[m["task"] or "(not Celery)"] = by_task.get(m["task"] or "(not Celery)", 0) + 1
    summary = ", ".join(f"{name} {n}" for name, n in sorted(by_task.items(), key=lambda kv: (-kv[1], kv[0])))
    footnote(f"{queue}: {plural(len(messages), 'message')} shown, none consumed; by task: {summary}")
    footnote("ROW: the task row's state/attempts; -o json shows bodies, attributes and payloads")
    if not store_read:
        footnote("ROW -: the claim-check database was not read (see the note above)")


# --------------------------------------------------------------------------------- redrive


def redrive_plan_text(plan: RedrivePlan, *, task: str | None, limit: int | None, rate: float | None,
                      dry_run: bool = False) -> str:
    """The one line said before anything moves: what, where, how much, how."""
    scope = [f"{plan.visible} visible"]
    if task:
        scope.append(f"only task {task}")
    if limit:
        scope.append(f"at most {limit}")
    if rate:
        scope.append(f"{rate:g}/s")
    verb = "dry run of redrive" if dry_run else "redrive"
    return (f"{verb} {plan.source.name} -> {plan.destination.name} ({', '.join(scope)}); "
            f"mode {plan.mode}: {plan.mode_reason}")


def rows_text(outcome: RowOutcome) -> str | None:
    """What happened to the moved tasks' rows, in one line naming every case that occurred."""
    parts = []
    if outcome["requeued"]:
        parts.append(f"{outcome['requeued']} dead -> queued")
    others = outcome["other_states"]
    if others:
        states = ", ".join(f"{s} {n}" for s, n in sorted(others.items()))
        parts.append(f"{sum(others.values())} already taken by a worker since, or not dead ({states})")
    if outcome["no_row"]:
        parts.append(f"{plural(outcome['no_row'], 'message')} with no task row (poison: see `peek` on "
                     "the queue, RUNBOOK.md#poison-task)")
    if outcome["not_celery"]:
        parts.append(f"{plural(outcome['not_celery'], 'message')} that are not Celery messages")
    if outcome["unknown"]:
        parts.append(f"{outcome['unknown']} not checked: the claim-check database was not read")
    return "task rows: " + "; ".join(parts) if parts else None


def redrive_text(result: RedriveResult, outcome: RowOutcome | None) -> None:
    if result.dry_run:
        line(f"dry run: would move {plural(result.would_move or 0, 'message')} from {result.source} to "
             f"{result.destination} (mode {result.mode}); nothing moved")
        if result.skipped:
            footnote(f"{result.skipped} other message(s) in {result.source} would stay (not matched)")
    else:
        style = "bold red" if result.failed else "green" if result.moved else ""
        line(f"moved {result.moved}, failed {result.failed}, skipped {result.skipped}: {result.source} -> "
             f"{result.destination} (mode {result.mode})", style=style)
        if result.mode == "native":
            footnote("a native move does not say which messages it moved: their rows stay dead until a "
                     "worker claims them")
    text = rows_text(outcome) if outcome else None
    if text:
        line(text)
    if result.failure_reason:
        line(f"reason: {result.failure_reason}", style="bold red")


# ------------------------------------------------------------------------- tasks and replay

TASK_COLUMNS = (Col("ID"), Col("TASK", shrink=2, least=12, keep_end=True), Col("STATE"), Col("TRIES", right=True),
                Col("UPDATED", right=True), Col("LAST ERROR", shrink=1, least=24, below=True))


def error_cell(row: TaskRow) -> Cell:
    """The row's last error; on a row that has since run to another state it is an earlier
    attempt's, and says so."""
    if not row.error:
        return None
    if row.state in ("failed", "dead"):
        return Styled(row.error, "red")
    return Styled(f"(earlier attempt) {row.error}", "dim")


def tasks_table(rows: list[TaskRow], *, total: int | None = None, limit: int | None = None) -> None:
    if not rows:
        line("no task rows match")
        return
    if any(r.state == "scheduled" for r in rows):  # held in the store until due: say when
        table((*TASK_COLUMNS[:3], Col("DUE", right=True), *TASK_COLUMNS[3:]),
              [[r.id, r.task_name, state(r.state), until(r.due_at) if r.state == "scheduled" else None, r.attempts,
                ago(r.updated_at), error_cell(r)] for r in rows])
    else:
        table(TASK_COLUMNS, [[r.id, r.task_name, state(r.state), r.attempts, ago(r.updated_at), error_cell(r)]
                             for r in rows])
    if any(r.error and r.state not in ("failed", "dead") for r in rows):
        footnote("(earlier attempt): the row has run to another state since that error")


def replay_plan_json(rows: list[TaskRow], *, dry_run: bool, dlq_copies: Mapping[str, int] | None = None
                     ) -> dict[str, Any]:
    return {"dry_run": dry_run, "would_replay": [r.id for r in rows], "rows": [r.as_json() for r in rows],
            "dlq_copies": dict(dlq_copies or {})}


REPLAY_COLUMNS = (Col("ID"), Col("TASK", shrink=1, least=8, keep_end=True), Col("STATE"), Col("TRIES", right=True))


def replay_plan_text(rows: list[TaskRow], *, dry_run: bool, dlq_copies: Mapping[str, int] | None = None) -> None:
    if not rows:
        line("nothing to replay: no task row matches")
        return
    table(REPLAY_COLUMNS, [[r.id, r.task_name, state(r.state), r.attempts] for r in rows])
    line(f"dry run: would replay {plural(len(rows), 'task')} (rows back to pending, then published); "
         "nothing changed" if dry_run else f"{plural(len(rows), 'task')} to replay")
    for queue, n in (dlq_copies or {}).items():
        line(f"{n} of them still have a message in {queue}: the replay deletes those copies, so a later redrive "
             "cannot run them twice (--keep-dlq-copies keeps them)")


def replay_text(result: ReplayResult) -> None:
    style = "bold red" if result["error"] else "green"
    line(f"replayed {plural(len(result['reset']), 'task')}: published {len(result['published'])}, "
         f"left for the relay {len(result['left_for_relay'])}, skipped (running) {len(result['skipped_running'])}",
         style=style)
    for queue, n in result["dlq_copies_deleted"].items():
        line(f"deleted {n} old {'copy' if n == 1 else 'copies'} of them from {queue}, so a later redrive cannot "
             "run them twice")
    if not result["dlq_copies_checked"]:
        line("their DLQs were not looked at (--keep-dlq-copies): do not also redrive these tasks", style="yellow")
    if result["error"]:
        line(f"note: {result['error']}", style="yellow")


def cancel_text(result: CancelResult, *, dry_run: bool) -> None:
    verb = "would cancel" if dry_run else "cancelled"
    n = len(result["cancelled"])
    line(f"{verb} {plural(n, 'task')}" + (": they will not run" if n and not dry_run else "")
         + ("; nothing changed (dry run)" if dry_run else ""), style="green" if n else None)
    for task_id in result["cancelled"]:
        line(f"  {task_id}")
    for task_id, st in result["not_cancelled"].items():
        why = ("no such task row" if st is None else
               "it is running now" if st == "running" else f"it is {st} already")
        line(f"not cancelled {task_id}: {why}", style="yellow")


SCHEDULE_COLUMNS = (Col("SCHEDULE", shrink=2, least=10), Col("TASK", shrink=1, least=12, keep_end=True),
                    Col("WHEN", shrink=3, least=10), Col("LAST RUN", right=True), Col("LAST STATE"),
                    Col("NEXT RUN", right=True))


def schedules_table(views: list[ScheduleView]) -> None:
    if not views:
        line("no schedules: none declared (PCELERY_SCHEDULES or --schedules) and none recorded in the store")
        return
    table(SCHEDULE_COLUMNS, [[v.name, v.task if v.task else Styled("(not declared)", "yellow"), v.when,
                              ago(v.last_slot), state(v.last_task_state), until(v.next_slot)] for v in views])
    if any(v.task is None for v in views):
        footnote("(not declared): the store has run this schedule, but the schedules given no longer declare it")
    if views and all(v.last_slot is None for v in views):
        footnote("LAST RUN '-': no scheduler has submitted a slot of these schedules yet (or the store was not read)")


# ----------------------------------------------------------------------------------- purge


def purge_plan_json(queue: str, url: str, count: int) -> dict[str, Any]:
    return {"queue": queue, "url": url, "would_purge_approximately": count, "dry_run": True}


def purge_plan_text(queue: str, count: int) -> None:
    line(f"dry run: would purge about {plural(count, 'message')} from {queue}; nothing purged")


def purge_text(result: PurgeResult) -> None:
    line(f"purged {result['queue']} (about {plural(result['purged_approximately'], 'message')}; SQS may take up to "
         "60 s)")


# -------------------------------------------------------------------------------- progress


class Progress:
    """Progress of a long move on stderr: a bar with count, rate and ETA on a terminal; else a
    line at most every `every` seconds (none for a run shorter than that). The result itself is
    printed once, on stdout, by the command."""

    def __init__(self, what: str, total: int | None, *, unit: str = "msg", every: float = 5.0):
        self.what, self.total, self.unit, self.every = what, total, unit, every
        self.started = time.monotonic()
        self.last_line = self.started
        self.bar: Any = None
        self.task: Any = None
        if sys.stderr.isatty():
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TaskProgressColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as Bar

            self.bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TaskProgressColumn(), TextColumn("{task.fields[rate]}"), TextColumn("eta"),
                           TimeRemainingColumn(), TextColumn("elapsed"), TimeElapsedColumn(),
                           console=err(), transient=True, refresh_per_second=5)
            self.bar.start()
            self.task = self.bar.add_task(what, total=total, rate="")

    def update(self, done: int, total: int | None = None) -> None:
        if total is not None:
            self.total = total
        elapsed = time.monotonic() - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        if self.bar is not None:
            self.bar.update(self.task, completed=done, total=self.total, rate=f"{rate:.1f} {self.unit}/s")
            return
        now = time.monotonic()
        if now - self.last_line < self.every:
            return
        self.last_line = now
        left = ""
        if self.total and rate > 0 and done < self.total:
            left = f", about {duration((self.total - done) / rate)} left"
        of = f" of {'about ' if self.total else ''}{self.total}" if self.total else ""
        note(f"{self.what}: {done}{of} ({rate:.1f} {self.unit}/s{left})")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------ local stack


def exports(environ: Mapping[str, str]) -> str:
    """`export` lines for `eval "$(python -m ops local up)"`."""
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in environ.items())


def unsets(restore: Mapping[str, str | None]) -> str:
    """What `eval "$(python -m ops local down)"` runs: each variable the stack set goes back to
    its value before `local up` (unset when it had none)."""
    return "".join(f"unset {k}\n" if v is None else f"export {k}={shlex.quote(v)}\n" for k, v in restore.items())


def local_up_text(data: Mapping[str, Any]) -> None:
    sys.stdout.write(exports(data["environ"]))


def local_down_text(data: Mapping[str, Any]) -> None:
    sys.stdout.write(unsets(data["restore"]))


LOCAL_COLUMNS = (Col("PROCESS"), Col("PID", right=True), Col("STATE", shrink=2, least=10),
                 Col("LOG", shrink=1, least=12, keep_end=True))


def process_state(p: Mapping[str, Any]) -> Styled:
    if p["alive"]:
        return Styled("running", "green")
    exit_info = p.get("exit")
    if not exit_info:
        return Styled("gone (no exit recorded)", "bold red")
    at = when(exit_info.get("exited_at")) or "?"
    how = f"killed by {exit_info['signal']}" if exit_info.get("signal") else f"exited {exit_info.get('exit_code')}"
    return Styled(f"{how} at {at[11:]} UTC", "bold red")


def local_status_text(data: Mapping[str, Any]) -> None:
    if not data["processes"]:
        line(f"local stack: down (nothing recorded in {data['state_dir']})")
        line("start one with: eval \"$(python -m ops local up)\"", style="dim")
        return
    dead = [n for n, p in data["processes"].items() if not p["alive"]]
    if data["up"]:
        line("local stack: up", style="green")
    elif dead:
        line(f"local stack: partly down: {', '.join(dead)} not running (its log says why)", style="bold red")
    else:
        line(f"local stack: not answering: SQS {data['endpoint']} does not answer", style="bold red")
    table(LOCAL_COLUMNS, [[name, p["pid"], process_state(p), p.get("log")] for name, p in data["processes"].items()])
    line(f"SQS    {data['endpoint']}")
    line(f"store  {data['database_url']}")
    line(f"state  {data['state_dir']} (PCELERY_LOCAL_DIR; started {data.get('started_at') or '?'})")
    if data.get("release"):
        line(f"release {data['release']}")
    if not data["up"]:
        footnote("restart it: eval \"$(python -m ops local down)\"; eval \"$(python -m ops local up)\"")


def local_down_report(data: Mapping[str, Any]) -> str | None:
    """The stderr line of `local down`: what it stopped, and what had died before (how, when, its
    log). None when there was no stack to stop (the harness already said so)."""
    if not data["stopped"] and not data["already_exited"]:
        return None
    parts = [f"stopped {', '.join(data['stopped'])}" if data["stopped"] else "nothing was still running"]
    for name, info in data["already_exited"].items():
        how = process_state({"alive": False, "exit": info}).text
        parts.append(f"{name} had already died ({how}; its log: {info['log']})")
    return "local stack down: " + "; ".join(parts)


SEED_COLUMNS = (Col("TASK ID"), Col("TASK", shrink=2, least=8, keep_end=True), Col("EXPECT", shrink=1, least=12))


def seed_text(data: Mapping[str, Any]) -> None:
    table(SEED_COLUMNS, [[t["id"], t["task"], t["expect"]] for t in data["tasks"]])
    footnote(f"submitted {plural(len(data['tasks']), 'task')}; {data['hint']}")


def deploy_text(data: Mapping[str, Any]) -> None:
    line(f"deployed the {data['release']} release: worker restarted (pid {data['worker_pid']})")
    footnote(data["hint"])
