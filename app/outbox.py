"""Submitting tasks without losing them: the transactional outbox, its publisher and its relay.

Application code submits through an `Outbox`, never through `.delay()`:

    from pcelery.outbox import Outbox
    from pcelery.settings import Settings

    outbox = Outbox.from_settings(Settings.from_env())

    with outbox.transaction() as conn:                 # BEGIN ... COMMIT, then publish
        conn.execute(orders.insert().values(id=order_id, total=total))
        outbox.submit(conn, "shop.send_receipt", order_id, copy_to="audit@example.com")
        outbox.submit(conn, "shop.reindex", queue="long", countdown=3)
        outbox.submit_many(conn, [("shop.thumbnail", [img], {}) for img in images])
    # here: the rows are committed and their ids are on SQS (or the relay will send them)

    outbox.engine  # the SQLAlchemy engine of the claim-check store, for get_task & co.

Why `outbox.transaction()` rather than a bare `engine.begin()`: the ids may be published only
after COMMIT has succeeded, and SQLAlchemy Core has no after-commit hook (its `commit` event
fires *before* the COMMIT is sent). So the outbox owns the transaction: the rows go in with the
caller's own writes, atomically; an exception rolls everything back and publishes nothing; a
successful commit publishes exactly those rows. `submit(conn, ...)` with any other connection
raises SubmitError at once instead of silently waiting for the relay. A caller that already
holds a Connection passes it in: `with outbox.transaction(conn) as conn:` begins on it.

Publication never raises into the caller: if SQS is down or slow (short timeouts and few
attempts, pcelery.sqs.SUBMIT), the rows simply stay `pending` and the relay sends them once they
are `PCELERY_RELAY_MIN_AGE` seconds old. Rows submitted inside a SAVEPOINT that was rolled back are not published.

Idempotent submit: `submit(conn, name, ..., task_id="order-42-receipt")` inserts with ON
CONFLICT DO NOTHING. Submitting the same id again with the same task and arguments is a no-op
that returns the id (the first submit's publication stands); the same id with a different task
or different arguments raises SubmitError. Task ids are at most 36 characters.

Queue: `queue=` if given, else the queue the task was declared for (`@persistent_task(queue=...)`
in a task module this process imported, or `Outbox(..., task_queues={name: queue})`), else the
catalog's default queue. A queue= that contradicts the declaration is refused.

Unknown task names: with `Outbox(..., require_declared=True)` a name that no declaration this
process knows (`task_queues`, else the task modules it imported) is refused at submit with the
closest declared names. Without it (a submitter that does not import the workers' task modules)
the name is accepted, and a worker that receives a task no worker of its queue declares records
that on the row (`failed`, then `dead` on the receive that dead-letters it) and leaves the message
for the DLQ: the row never reads `queued` forever.

Task keyword arguments named `queue`, `countdown` or `task_id` collide with submit's own
options; pass them through `submit_many(conn, [(name, args, kwargs)])`.

Arguments must be plain JSON nested at most MAX_NESTING levels deep; anything else is a
SubmitError, never a RecursionError.

Bounded commit: publishing after COMMIT makes at most one SQS call per queue with the SUBMIT
timeouts (connect 0.5 s, read 1 s, one attempt) and stops at the first unreachable endpoint, so
a commit returns within about 1.5 s when SQS refuses, hangs or fails (the first submit of a
process to a queue may add one GetQueueUrl call of the same bound).

The relay (pcelery.relay, `pcelery-relay`) publishes what a submitter could not.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import difflib
import json
import logging
import math
import os
import queue as queues
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import sqlalchemy as sa

from pcelery import sqs as sqs_clients
from pcelery import store
from pcelery.catalog import Catalog, CatalogError, sqs_queue_name
from pcelery.messages import encode_body
from pcelery.settings import Settings
from pcelery.store import OutboxEntry

log = logging.getLogger("pcelery.outbox")

SQS_BATCH = 10  # SendMessageBatch's limit


class SubmitError(ValueError):
    """A submit that cannot be accepted. The message names the argument and the fix."""


# --- Publisher ------------------------------------------------------------------------------

@dataclass
class Published:
    sent: dict[str, str] = field(default_factory=dict)  # {task_id: SQS MessageId}
    unreachable: bool = False  # SQS could not be reached: further calls would only wait out timeouts


class Publisher:
    """Sends task ids to their catalog queue's SQS queue. Never raises for SQS trouble: what was
    not sent stays `pending` for the relay."""

    def __init__(self, catalog: Catalog, env: str, sqs: Any = None, *, settings: Settings | None = None):
        """sqs: a boto3 SQS client; made from `settings` (pcelery.sqs.make_client) on first use
        when not given."""
        self.catalog = catalog
        self.env = env
        self._sqs = sqs
        self._settings = settings
        self._urls: dict[str, str] = {}
        self._lock = threading.Lock()

    @property
    def sqs(self) -> Any:
        with self._lock:
            if self._sqs is None:
                self._sqs = sqs_clients.make_client(self._settings)
            return self._sqs

    def queue_url(self, queue: str) -> str:
        url = self._urls.get(queue)
        if url is None:
            url = self.sqs.get_queue_url(QueueName=sqs_queue_name(self.env, queue))["QueueUrl"]
            self._urls[queue] = url
        return url

    def publish(self, rows: Iterable[OutboxEntry]) -> Published:
        """Returns what SQS accepted."""
        from botocore.exceptions import BotoCoreError, ClientError

        by_queue: dict[str, list[OutboxEntry]] = {}
        for row in rows:
            by_queue.setdefault(row.queue, []).append(row)
        published: dict[str, str] = {}
        unreachable = False
        for queue, queue_rows in by_queue.items():
            try:
                url = self.queue_url(queue)
                for start in range(0, len(queue_rows), SQS_BATCH):
                    published.update(self._send_batch(url, queue, queue_rows[start:start + SQS_BATCH]))
            except ClientError as exc:
                # Per queue: a missing queue must not hold back the others.
                log.warning("SQS refused publishing to queue %r (%s); %d task(s) stay pending for the relay",
                            queue, exc, len(queue_rows) - sum(r.id in published for r in queue_rows))
            except (BotoCoreError, OSError) as exc:
                # Endpoint down or timing out: every further call would wait out the same timeouts.
                unsent = sum(1 for rows_ in by_queue.values() for r in rows_ if r.id not in published)
                log.warning("SQS unreachable (%s: %s); %d task(s) stay pending for the relay",
                            type(exc).__name__, exc, unsent)
                unreachable = True
                break
        return Published(published, unreachable)

    def _send_batch(self, url: str, queue: str, rows: list[OutboxEntry]) -> dict[str, str]:
        def entry(i: int, row: OutboxEntry) -> dict[str, Any]:
            return {"Id": str(i), "MessageBody": encode_body(row.id, row.task_name, queue=queue),
                    "DelaySeconds": row.delay_now()}

        if len(rows) == 1:
            e = entry(0, rows[0])
            response = self.sqs.send_message(QueueUrl=url, MessageBody=e["MessageBody"], DelaySeconds=e["DelaySeconds"])
            return {rows[0].id: response["MessageId"]}
        response = self.sqs.send_message_batch(QueueUrl=url, Entries=[entry(i, r) for i, r in enumerate(rows)])
        sent = {rows[int(ok["Id"])].id: ok["MessageId"] for ok in response.get("Successful", [])}
        for failed in response.get("Failed", []):
            log.warning("SQS did not accept task %s (%s: %s); it stays pending for the relay",
                        rows[int(failed["Id"])].id, failed.get("Code"), failed.get("Message"))
        return sent


def publish_and_mark(engine_or_conn: sa.Engine | sa.Connection, publisher: Publisher,
                     rows: list[OutboxEntry]) -> Published:
    """Publish rows and move the sent ones to `queued`."""
    published = publisher.publish(rows)
    if published.sent:
        store.mark_queued(engine_or_conn, published.sent)
    return published


class Coalescer:
    """Publishes committed rows on a thread of its own, so that single submits from any thread of
    the process share SendMessageBatch calls: up to 10 rows per batch, sent when 10 are waiting or
    `linger` seconds after the first, then marked queued in one statement. The outbox's guarantee
    is unchanged: a row is committed before it is handed over, so if the process dies first the
    relay sends it (its min age is far above any linger). `flush` sends what waits (it runs at
    interpreter exit too)."""

    def __init__(self, engine: sa.Engine, publisher: Publisher, linger: float):
        self.engine, self.publisher, self.linger = engine, publisher, linger
        self._lock = threading.Lock()
        self._pid = 0
        self._queue: queues.Queue[OutboxEntry | None] = queues.Queue()
        self._flushing = threading.Event()
        atexit.register(self.flush, 5.0)

    def add(self, rows: Iterable[OutboxEntry]) -> None:
        with self._lock:
            if self._pid != os.getpid():  # first use, or a forked child: a thread of its own
                self._pid, self._queue = os.getpid(), queues.Queue()
                threading.Thread(target=self._run, args=(self._queue,), daemon=True, name="outbox-coalescer").start()
            for row in rows:
                self._queue.put(row)

    def flush(self, timeout: float) -> bool:
        """Publish what waits now; True when nothing is left within timeout."""
        if self._pid != os.getpid():
            return True
        self._flushing.set()
        self._queue.put(None)  # wakes a batch that is lingering
        try:
            deadline = time.monotonic() + timeout
            while self._queue.unfinished_tasks and time.monotonic() < deadline:
                time.sleep(0.01)
            return not self._queue.unfinished_tasks
        finally:
            self._flushing.clear()

    def _run(self, rows: queues.Queue[OutboxEntry | None]) -> None:
        while True:
            batch = [rows.get()]
            deadline = time.monotonic() + self.linger
            while len(batch) < SQS_BATCH and batch[-1] is not None:
                wait = 0.0 if self._flushing.is_set() else deadline - time.monotonic()
                try:
                    batch.append(rows.get(timeout=wait) if wait > 0 else rows.get_nowait())
                except queues.Empty:
                    break
            entries = [row for row in batch if row is not None]
            try:
                if entries:
                    publish_and_mark(self.engine, self.publisher, entries)
            except Exception:
                log.warning("publishing %d committed task(s) failed; the relay will send them", len(entries),
                            exc_info=True)
            finally:
                for _ in batch:
                    rows.task_done()


# --- Submit API -----------------------------------------------------------------------------

class _Unit:
    """The rows submitted in one outbox transaction, published after it commits."""

    def __init__(self) -> None:
        self.rows: list[OutboxEntry] = []
        self.in_savepoint: set[str] = set()


MAX_NESTING = 100  # levels of lists/dicts in a task's arguments; also stops a list that contains itself


def _unserializable(value: Any, path: str, depth: int = 0) -> tuple[str, str] | None:
    """(where, what is wrong) of the first value in `value` that JSON cannot hold, else None."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return None
    if isinstance(value, (list, tuple, dict)) and depth >= MAX_NESTING:
        return path.split("[", 1)[0], (f"lists and dicts nested deeper than {MAX_NESTING} levels (or one that "
                                       "contains itself)")
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found = _unserializable(item, f"{path}[{i}]", depth + 1)
            if found:
                return found
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{path} key {key!r}", f"type {type(key).__name__}, which JSON cannot hold"
            found = _unserializable(item, f"{path}[{key!r}]", depth + 1)
            if found:
                return found
        return None
    return path, f"type {type(value).__name__}, which JSON cannot hold"


def check_submit(catalog: Catalog, declarations: Mapping[str, str], task_name: Any, args: Any, kwargs: Any,
                 queue: str | None, countdown: Any, task_id: Any = None, *,
                 require_declared: bool = False) -> tuple[str, int]:
    """(queue, delay seconds) of a task about to be submitted, given the catalog and the {task:
    queue} declarations; SubmitError naming the argument and the fix when it cannot be accepted."""
    if not isinstance(task_name, str) or not task_name.strip():
        raise SubmitError(f"task_name={task_name!r} is empty or not a string: pass the registered task "
                          "name, e.g. 'shop.send_receipt'")
    if len(task_name) > 200:
        raise SubmitError(f"task_name is {len(task_name)} characters; the limit is 200: shorten the task name")
    declared = declarations.get(task_name)
    if declared is None and require_declared:
        known = sorted(declarations)
        close = difflib.get_close_matches(task_name, known, n=3)
        hint = f"did you mean {', '.join(map(repr, close))}?" if close else f"declared: {known[:10]}"
        raise SubmitError(f"task_name={task_name!r} is not declared by any task module this process knows "
                          f"({hint}): fix the name, or import the module that declares it")
    wanted = queue if queue is not None else declared or catalog.default_queue
    try:
        contract = catalog.get(wanted)
    except CatalogError:
        raise SubmitError(f"queue={wanted!r} is not in the catalog: use one of {catalog.names()}") from None
    if declared and wanted != declared:
        # Its time limits come from the declared queue's contract, which the other queue's
        # visibility timeout was not sized for.
        raise SubmitError(f"queue={wanted!r} but {task_name!r} is declared for queue {declared!r}: "
                          f"drop queue= or pass queue={declared!r}")
    queue = wanted
    if isinstance(countdown, bool) or not isinstance(countdown, (int, float)) or math.isnan(countdown):
        raise SubmitError(f"countdown={countdown!r} is not a number of seconds: pass an int or float")
    if countdown < 0:
        raise SubmitError(f"countdown={countdown} is negative: pass 0 or more seconds")
    if countdown > contract.max_countdown:
        raise SubmitError(
            f"countdown={countdown} exceeds queue {queue!r}'s max_countdown of {contract.max_countdown} s: "
            "lower it, or schedule the task later from your own scheduler")
    if not isinstance(args, (list, tuple)):
        raise SubmitError(f"args of {task_name!r} must be a list or tuple, not {type(args).__name__}")
    if not isinstance(kwargs, dict):
        raise SubmitError(f"kwargs of {task_name!r} must be a dict, not {type(kwargs).__name__}")
    for where, value in (("args", list(args)), ("kwargs", kwargs)):
        found = _unserializable(value, where)
        if found:
            path, problem = found
            raise SubmitError(
                f"{path} of {task_name!r} has {problem}: pass plain str/int/float/bool/None/list/dict "
                "values (e.g. an id instead of an object, an ISO string instead of a datetime)")
    if task_id is not None and (not isinstance(task_id, str) or not task_id or len(task_id) > 36):
        raise SubmitError(f"task_id={task_id!r} must be a non-empty string of at most 36 characters")
    return queue, math.ceil(countdown)



class Outbox:
    """Submit tasks inside the caller's transaction; publish them after it commits."""

    def __init__(self, engine: sa.Engine, catalog: Catalog, env: str, sqs: Any = None, *,
                 settings: Settings | None = None, task_queues: Mapping[str, str] | None = None,
                 require_declared: bool = False, publish_linger: float = 0.0):
        """sqs: a boto3 SQS client, else one made from `settings` on the first publish.
        task_queues: {task name: catalog queue} of every task this outbox may submit, instead of
        the declarations of the task modules this process imported. require_declared: refuse a
        task name no declaration knows (see the module docstring). publish_linger: 0 publishes
        each transaction's rows as it commits; above 0, committed rows are handed to a thread that
        publishes up to 10 per SendMessageBatch, at most this many seconds later (`Coalescer`)."""
        self.engine = engine
        self.catalog = catalog
        self.env = env
        self.task_queues = task_queues
        self.require_declared = require_declared
        self.publisher = Publisher(catalog, env, sqs, settings=settings)
        self.coalescer = Coalescer(self.engine, self.publisher, publish_linger) if publish_linger > 0 else None
        self._units: dict[int, _Unit] = {}

    @classmethod
    def from_settings(cls, settings: Settings, *, engine: sa.Engine | None = None, sqs: Any = None,
                      task_queues: Mapping[str, str] | None = None, require_declared: bool = False,
                      publish_linger: float = 0.0) -> Outbox:
        from pcelery.schema import make_engine

        return cls(engine or make_engine(settings.database_url), settings.catalog, settings.env, sqs,
                   settings=settings, task_queues=task_queues, require_declared=require_declared,
                   publish_linger=publish_linger)

    @contextlib.contextmanager
    def transaction(self, connection: sa.Connection | None = None) -> Iterator[sa.Connection]:
        """BEGIN on a new connection (or the given one), yield it, COMMIT, then publish what was
        submitted on it. An exception rolls back and publishes nothing."""
        unit = _Unit()
        with contextlib.ExitStack() as stack:
            conn = connection if connection is not None else stack.enter_context(self.engine.connect())
            if conn.in_transaction():
                raise SubmitError(
                    "outbox.transaction(conn): conn is already in a transaction, so the outbox cannot "
                    "see its COMMIT: pass a connection outside a transaction, or call "
                    "outbox.transaction() without one")
            self._units[id(conn)] = unit
            active = _ACTIVE.set((self, conn))  # Task.delay() inside this block joins it
            try:
                with conn.begin():
                    yield conn
            finally:
                _ACTIVE.reset(active)
                self._units.pop(id(conn), None)
        if unit.rows:
            self._publish_committed(unit)

    def _unit_for(self, conn: sa.Connection) -> _Unit:
        unit = self._units.get(id(conn))
        if unit is None:
            raise SubmitError(
                "conn is not a transaction of this outbox: open it with `with outbox.transaction() as conn:` "
                "so the tasks are published after COMMIT (a bare engine.begin() connection gives the "
                "outbox no way to know when the commit happened)")
        return unit

    def _publish_committed(self, unit: _Unit) -> None:
        rows = unit.rows
        if unit.in_savepoint:
            # A rolled-back SAVEPOINT took some rows with it: publish only those that exist.
            try:
                ids = [r.id for r in rows if r.id in unit.in_savepoint]
                kept = store.existing_ids(self.engine, ids)
            except Exception:
                log.warning("publishing %d committed task(s) failed; the relay will send them", len(rows),
                            exc_info=True)
                return
            rows = [r for r in rows if r.id not in unit.in_savepoint or r.id in kept]
        self.publish_rows(rows)

    def publish_rows(self, rows: list[OutboxEntry]) -> None:
        """Publish committed rows now and mark them queued. Never raises: what is not sent stays
        pending for the relay. (Django's on_commit hook calls this too.) With a publish_linger, they
        are handed to the Coalescer instead."""
        if self.coalescer is not None:
            self.coalescer.add(rows)
            return
        try:
            publish_and_mark(self.engine, self.publisher, rows)
        except Exception:
            log.warning("publishing %d committed task(s) failed; the relay will send them", len(rows), exc_info=True)

    def declared_queue(self, task_name: str) -> str | None:
        """The queue a task was declared for: from `task_queues`, else from the
        `@persistent_task` declarations this process has imported (pcelery.worker.TASKS, looked up
        without importing the worker and its dependencies)."""
        return self.declarations().get(task_name)

    def declarations(self) -> Mapping[str, str]:
        """{task name: queue} this outbox knows: `task_queues`, else the `@persistent_task`
        declarations of this process (pcelery.worker.TASKS, looked up without importing it)."""
        if self.task_queues is not None:
            return self.task_queues
        worker = sys.modules.get("pcelery.worker")
        return {name: d.queue for name, d in getattr(worker, "TASKS", {}).items()} if worker else {}

    # -- validation --

    def validate(self, task_name: Any, args: Any, kwargs: Any, queue: str | None, countdown: Any,
                 task_id: Any = None) -> tuple[str, int]:
        """(queue, delay seconds) of a task about to be submitted; SubmitError naming the argument
        and the fix when it cannot be accepted. Every submit path checks through here."""
        return check_submit(self.catalog, self.declarations(), task_name, args, kwargs, queue, countdown, task_id,
                            require_declared=self.require_declared)

    # -- submitting --

    def submit(self, conn: sa.Connection, task_name: str, *args: Any, queue: str | None = None,
               countdown: float = 0, task_id: str | None = None, **kwargs: Any) -> str:
        """Insert a pending task row in conn's outbox transaction; returns the task id. The id is
        sent to SQS after the transaction commits."""
        return self.add(conn, task_name, args, kwargs, queue=queue, countdown=countdown, task_id=task_id)

    def add(self, conn: sa.Connection, task_name: str, args: Any, kwargs: Any, *, queue: str | None = None,
            countdown: float = 0, task_id: str | None = None) -> str:
        """`submit` with the arguments as a list and a dict (no clash with submit's own keywords)."""
        if task_id is not None:
            self.add_once(conn, task_name, args, kwargs, task_id=task_id, queue=queue, countdown=countdown)
            return task_id
        unit = self._unit_for(conn)
        queue, delay = self.validate(task_name, args, kwargs, queue, countdown)
        row = store.task_row(task_id=str(uuid.uuid4()), task_name=task_name, queue=queue, args=list(args),
                             kwargs=kwargs, delay_seconds=delay)
        store.insert_tasks(conn, [row])
        self._remember(conn, unit, [row])
        return row["id"]

    def add_once(self, conn: sa.Connection, task_name: str, args: Any, kwargs: Any, *, task_id: str,
                 queue: str | None = None, countdown: float = 0) -> bool:
        """The idempotent submit of `task_id`: True when this call inserted the row (and publishes
        it after commit), False when it existed with the same task and arguments (SubmitError
        when with others). The insert never aborts the caller's transaction."""
        unit = self._unit_for(conn)
        queue, delay = self.validate(task_name, args, kwargs, queue, countdown, task_id)
        row = store.task_row(task_id=task_id, task_name=task_name, queue=queue, args=list(args), kwargs=kwargs,
                             delay_seconds=delay)
        if not self._insert_if_new(conn, row):
            return False
        self._remember(conn, unit, [row])
        return True

    def submit_many(self, conn: sa.Connection, items: Iterable[tuple[str, list | tuple, dict]], *,
                    queue: str | None = None, countdown: float = 0) -> list[str]:
        """Bulk submit [(task_name, args, kwargs), ...]: one multi-row INSERT now, SendMessageBatch
        after commit. queue= applies to every item (default: each task's declared queue). All or
        nothing: one invalid item rejects the call."""
        unit = self._unit_for(conn)
        rows = []
        for n, item in enumerate(items):
            try:
                task_name, args, kwargs = item
            except (TypeError, ValueError):
                raise SubmitError(f"item {n} of submit_many is {item!r}: each item must be "
                                  "(task_name, args, kwargs)") from None
            q, delay = self.validate(task_name, args, kwargs, queue, countdown)
            rows.append(store.task_row(task_id=str(uuid.uuid4()), task_name=task_name, queue=q,
                                       args=list(args), kwargs=kwargs, delay_seconds=delay))
        if rows:
            store.insert_tasks(conn, rows)
            self._remember(conn, unit, rows)
        return [r["id"] for r in rows]

    def _remember(self, conn: sa.Connection, unit: _Unit, rows: list[dict[str, Any]]) -> None:
        # A `scheduled` row (due beyond SQS's delay) is the relay's to publish when it falls due.
        rows = [r for r in rows if r["state"] == "pending"]
        unit.rows.extend(OutboxEntry(r["id"], r["task_name"], r["queue"], r["delay_seconds"], r["due_at"])
                         for r in rows)
        if conn.in_nested_transaction():
            unit.in_savepoint.update(r["id"] for r in rows)

    def _insert_if_new(self, conn: sa.Connection, row: dict[str, Any]) -> bool:
        existing = store.insert_task_if_absent(conn, row)
        if existing is None:
            return True
        task_name, payload = existing
        if task_name != row["task_name"] or payload != json.loads(row["payload"]):
            raise SubmitError(
                f"task_id={row['id']!r} already exists as {task_name!r} with other arguments: "
                "an idempotent submit must repeat the same task and arguments; use a new task_id otherwise")
        return False

    def publish_ids(self, task_ids: list[str]) -> dict[str, str]:
        """Publish the given rows now if they are `pending` (e.g. right after ops resets them for
        replay) instead of waiting for the relay. Returns {task_id: MessageId} of those sent;
        the rest stay pending for the relay."""
        rows = store.pending_entries(self.engine, list(task_ids))
        return publish_and_mark(self.engine, self.publisher, rows).sent if rows else {}


# --- Where Task.delay() goes ---------------------------------------------------------------------

# The outbox transaction the calling code is inside (`with outbox.transaction() as conn:`).
_ACTIVE: contextvars.ContextVar[tuple[Outbox, sa.Connection] | None] = contextvars.ContextVar(
    "pcelery_outbox_transaction", default=None)


class Submitter(Protocol):
    """An integration that submits on the application's own database connection (Django's)."""

    def submit(self, task_name: str, args: Any, kwargs: Any, *, queue: str | None, countdown: float,
               task_id: str | None) -> str: ...


_SUBMITTERS: list[Submitter] = []
# How long `.delay()` outside an outbox transaction waits to share a SendMessageBatch with other
# submits of the process (Coalescer): a caller that brings no transaction gets its id at once and
# does not wait for the send anyway.
DELAY_LINGER = 0.05
_DEFAULT: dict[int, Outbox] = {}  # pid -> the process's own outbox (an engine is not shared across a fork)


def use_submitter(submitter: Submitter) -> None:
    """Send Task.delay() calls made outside an outbox transaction through `submitter` (the Django
    app registers its own: rows join the caller's atomic() block and publish on commit)."""
    _SUBMITTERS[:] = [submitter]


def default_outbox() -> Outbox:
    """The process's outbox built from its settings (DATABASE_URL...), for submits that bring no
    transaction of their own. Its single submits share SendMessageBatch calls (DELAY_LINGER)."""
    pid = os.getpid()
    if pid not in _DEFAULT:
        _DEFAULT.clear()
        _DEFAULT[pid] = Outbox.from_settings(Settings.from_env(), publish_linger=DELAY_LINGER)
    return _DEFAULT[pid]


def submit_task(task_name: str, args: Any, kwargs: Any, *, queue: str | None = None, countdown: float = 0,
                task_id: str | None = None) -> str:
    """Where a persistent task's `.delay()` / `.apply_async()` goes. In order:
    1. inside `with outbox.transaction() as conn:` the row joins that transaction, published after COMMIT;
    2. with a registered submitter (the Django app), through it: on Django's connection, in the
       caller's atomic() block if there is one, published on commit;
    3. otherwise in a transaction of its own on the process's store (default_outbox): durable
       before it is published, but not atomic with the caller's own writes.
    Returns the task id at once; SubmitError names what cannot be accepted."""
    active = _ACTIVE.get()
    if active is not None:
        outbox, conn = active
        return outbox.add(conn, task_name, args, kwargs, queue=queue, countdown=countdown, task_id=task_id)
    if _SUBMITTERS:
        return _SUBMITTERS[0].submit(task_name, args, kwargs, queue=queue, countdown=countdown, task_id=task_id)
    outbox = default_outbox()
    with outbox.transaction() as conn:
        return outbox.add(conn, task_name, args, kwargs, queue=queue, countdown=countdown, task_id=task_id)

