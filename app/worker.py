"""The Celery app, the `persistent_task` decorator, and the one wrapper every task runs through.

A delivery carries only the task id (the payload is the row in the claim-check store, app.store).
`PersistentTask.__call__` runs in the pool child for every delivery:

1. Claim the row (store.claim, worker identity "host:pid", lease a little shorter than the
   queue's visibility timeout, see `lease_seconds`):
   - duplicate (the row already succeeded): return the stored result; the message is acked.
   - busy (another worker holds a live lease): do not run. What happens to this delivery depends
     on whether it is the message the holder claimed for (the claim records SQS MessageIds):
     - another message (published twice by the submitter and the relay, or redriven): redundant. The
       holder's own message is still in flight and its lifecycle (success, failure and
       redelivery, a crash and redelivery) owns the task, so this copy is acked (deleted) at
       once with `RedundantCopy`. Leaving it would cost a receive every visibility timeout and
       could dead-letter a copy of a long task that in fact succeeds.
     - the same message (SQS handed the running message out again: its visibility was not
       extended in time), or either id unknown: raise `LeftForRedelivery`, which rejects without
       requeue, so the message stays in SQS and comes back after the visibility timeout, when
       the claim sees the verdict. Cost: each such return is one more receive towards
       maxReceiveCount.
   - missing (no row: a forged or stale id): `PoisonMessage`; the message is never acked, so
     SQS moves it to the DLQ after maxReceiveCount receives.
   - run: load args/kwargs from the row and run the task.
2. While it runs, on queues whose contract has heartbeat=True, a heartbeat thread calls
   ChangeMessageVisibility(visibility timeout) and store.extend_lease every heartbeat_interval,
   so a task longer than the visibility timeout is never delivered twice at once. Queues
   without heartbeats do not need it: the catalog refuses a contract whose hard time limit does
   not fit in the visibility timeout, and each beat is an SQS request.
3. Success: store.finish_success, in the same transaction as the task's own writes when it is
   declared transactional=True (it gets a `db` Connection; in a Django project a task without a
   `db` parameter runs in Django's transaction.atomic() instead, see use_task_transaction): the
   effect happens exactly once.
   Failure (soft time limit included): store.finish_failure, `dead` when this receive is the
   last one before the DLQ (ApproximateReceiveCount >= maxReceiveCount), then re-raise so Celery
   rejects the message and SQS redelivers it, or dead-letters it.

In the main process, pcelery.celery_internals covers what the child cannot: a SIGKILLed child's
row is released (running -> queued) so the requeued message runs at once instead of waiting for
the dead worker's lease, a hard time limit is recorded as a failure, and messages that cannot be
decoded are rejected (rather than acked, i.e. deleted), so they reach the DLQ too.

At start (`worker_init`) the worker refuses to consume a queue without a RedrivePolicy (kombu
would silently delete every failed task there) and a store whose schema is behind the code.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import inspect
import logging
import math
import os
import random
import re
import socket
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import sqlalchemy as sa
from celery import Celery, Task, shared_task, signals
from celery.exceptions import Ignore, Reject

from pcelery import schema, store
from pcelery import sqs as sqs_clients
from pcelery.catalog import QueueContract, RetryPolicy, parse_queue_name, sqs_queue_name
from pcelery.settings import Settings

logger = logging.getLogger("pcelery.worker")

settings = Settings.from_env()
# The product's own app (`pcelery-worker` runs it unless PCELERY_CELERY_APP names a team's app);
# not set as current, so it never takes over a team's app in their processes. Configured at the
# end of this module, once PersistentTask exists.
app = Celery("pcelery", set_as_current=False)

T = TypeVar("T")


# --- Declaring tasks --------------------------------------------------------------------------

class TaskTransaction:
    """Where a transactional task without a `db` parameter runs: a transaction on another
    connection than the store's engine (Django's, registered by pcelery.django when Django
    starts). `atomic()` opens it and yields `record(task_id, worker, result) -> bool`, which writes
    the success in it (False: this worker no longer owns the row); leaving the block commits both,
    an exception rolls both back. `errors`: what a broken connection raises there."""

    errors: tuple[type[BaseException], ...] = ()

    def atomic(self) -> contextlib.AbstractContextManager[Callable[[str, str, Any], bool]]:
        raise NotImplementedError


_task_transaction: TaskTransaction | None = None


def use_task_transaction(transaction: TaskTransaction | None) -> None:
    """pcelery.django registers Django's transaction.atomic() here (None: back to none)."""
    global _task_transaction
    _task_transaction = transaction


@dataclass(frozen=True)
class TaskDeclaration:
    name: str
    queue: str  # catalog queue name
    transactional: bool


# Every persistent task this process has imported, by wire name. The outbox and the router read it.
TASKS: dict[str, TaskDeclaration] = {}


def declare(name: str, queue: str | None, transactional: bool) -> TaskDeclaration:
    """Register a persistent task by its wire name. The queue must be a catalog queue (default:
    the catalog's default); a second declaration of the name must say the same."""
    try:
        contract = settings.catalog.get(queue or settings.catalog.default_queue)
    except ValueError as exc:  # CatalogError names the catalog's queues
        raise ValueError(f"task {name!r}: {exc}") from None
    declaration = TaskDeclaration(name, contract.name, transactional)
    existing = TASKS.get(name)
    if existing is not None and existing != declaration:
        raise ValueError(f"task name {name!r} is declared twice ({existing} and {declaration}): task names must be "
                         "unique")
    TASKS[name] = declaration
    return declaration


def persistent_task(*, name: str, queue: str | None = None, transactional: bool = False,
                    retry: RetryPolicy | None = None) -> Callable[[Any], Any]:
    """Declare a task for any Celery app (it is a `shared_task` with PersistentTask as its base).
    `name` is its stable wire name; `queue` a catalog queue (default: the catalog's default),
    whose contract gives the soft and hard time limits.

    transactional=True passes a `db` keyword (a SQLAlchemy Connection) whose writes commit
    together with the task's success, so its effect happens exactly once. The task executes on
    `db` and never commits, rolls back or begins a transaction block on it itself (that would
    commit its writes apart from the success). On failure, its writes are rolled back. In a
    Django project (pcelery.django installed), a transactional task whose function takes no `db`
    runs inside transaction.atomic() on the store's database instead: its ORM writes there commit
    with its success.

    retry: how failed attempts are retried (pcelery.catalog.RetryPolicy), instead of the queue's.

    A team's existing Celery tasks need no decorator change: `configure(app)` makes every task
    of their app persistent (or `base=PersistentTask` on one `@shared_task` / `@app.task`)."""
    declare(name, queue, transactional)  # now: a bad queue fails the import, and the outbox knows the queue
    return cast(Callable[[Any], Any],
                shared_task(name=name, base=PersistentTask, pcelery_queue=queue, transactional=transactional,
                            retry_policy=retry))


def route_task(name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **kw: Any) -> dict[str, str] | None:
    """Celery router: a declared task goes to its declared queue (only for bare .delay(); the
    outbox publishes by itself)."""
    declared = TASKS.get(name)
    return {"queue": declared.queue} if declared else None


# --- The wrapper -------------------------------------------------------------------------------

class LeftForRedelivery(Reject):
    """Do not run and do not ack: the message stays in SQS and comes back after the visibility
    timeout. Not a task failure: nothing is recorded in the store or the result backend."""

    def __init__(self, reason: str | None = None, requeue: bool = False):
        super().__init__(reason, requeue)


class RedundantCopy(Ignore):
    """Do not run, and ack (delete) this message: another message for the same task is running
    and owns it. Not a task failure: nothing is recorded in the store or the result backend."""


class DeadLettered(Ignore):
    """The failure is final before the receives run out (an exception the retry policy does not
    name, or its last attempt): the worker has sent a copy to the DLQ, so this message is acked."""


class PoisonMessage(Exception):
    """A delivery that can never run (no row for its id, or a row of another task). It fails on
    every receive and so ends in the DLQ, where ops can look at it."""


class StoreUnavailable(Ignore):
    """The claim-check store could not be reached for this delivery. Not the task's failure:
    nothing is recorded, the main process gives the message back to SQS and receives nothing more
    until the store answers (pcelery.celery_internals.STORE_BREAKER). An Ignore, so Celery logs
    it as one line (a Reject or a failure would print a traceback for every delivery of an outage)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# What a lost database connection raises through SQLAlchemy (psycopg and sqlite3 alike).
STORE_ERRORS = (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.DisconnectionError, sa.exc.TimeoutError)
# How long a task that has finished waits for the store to record its verdict, keeping its
# message invisible meanwhile, before it gives the message back. Beyond this a non-transactional
# task whose success could not be recorded runs again when SQS redelivers it.
STORE_OUTAGE_WAIT = 600.0


def backoff(attempt: int, first: float, longest: float) -> float:
    """Capped exponential backoff: first, 2 x first, 4 x first ... never above longest."""
    return min(longest, first * 2 ** max(0, attempt - 1))


class TroubleLog:
    """Logs the first failure of an operation at WARNING with its cause, repeats at DEBUG while it
    keeps failing, and its recovery once: an outage reads as two lines, not thousands."""

    def __init__(self, log: logging.Logger):
        self._log = log
        self._lock = threading.Lock()
        self._failing: dict[str, tuple[float, int]] = {}  # what -> (since, failures)

    def failed(self, what: str, cause: str) -> None:
        with self._lock:
            since, count = self._failing.get(what, (time.monotonic(), 0))
            self._failing[what] = (since, count + 1)
        if count == 0:
            self._log.warning("%s failed: %s", what, cause)
        else:
            self._log.debug("%s failed again (%d): %s", what, count + 1, cause)

    def recovered(self, what: str) -> None:
        with self._lock:
            entry = self._failing.pop(what, None)
        if entry is not None:
            self._log.warning("%s works again, after %d failure(s) over %.0f s", what, entry[1],
                              time.monotonic() - entry[0])


TROUBLE = TroubleLog(logger)


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def worker_identity(pid: int | None = None) -> str:
    return f"{socket.gethostname()}:{pid or os.getpid()}"


def lease_seconds(contract: QueueContract) -> int:
    """The row's lease ends a margin before the message's visibility timeout, which started a
    little earlier (at the receive). So when a dead worker's message reappears, its lease has
    expired and the new delivery runs at once instead of being turned away as busy."""
    return max(1, contract.visibility_timeout - contract.visibility_margin)


_per_process: dict[str, tuple[int, Any]] = {}


def _process_local(key: str, factory: Callable[[], T]) -> T:
    """One engine/SQS client per process: pool children are forked, and a connection pool or
    HTTP session must never be shared across a fork."""
    pid = os.getpid()
    cached = _per_process.get(key)
    if cached is None or cached[0] != pid:
        cached = _per_process[key] = (pid, factory())
    return cached[1]


def engine() -> sa.Engine:
    return _process_local("engine", lambda: schema.make_engine(settings.database_url))


def sqs() -> Any:
    # Short timeouts and few retries: a heartbeat call hung for the SDK's default minutes would
    # outlast the visibility timeout that the beats are there to keep from running out.
    return _process_local("sqs", lambda: sqs_clients.make_client(settings, timeouts=sqs_clients.WORKER))


@dataclass(frozen=True)
class Delivery:
    """Where the message came from, as kombu's SQS transport recorded it on receipt."""

    contract: QueueContract
    queue_url: str | None
    receipt_handle: str | None
    receive_count: int  # SQS ApproximateReceiveCount of this receive (0 if unknown)
    message_id: str | None = None  # SQS MessageId: the same for every receive of one message

    @classmethod
    def from_request(cls, request: Any, default_queue: str) -> Delivery:
        from pcelery.celery_internals import sqs_receipt

        receipt = sqs_receipt(request)
        return cls(
            contract=contract_of(receipt.queue_url, receipt.routing_key, default_queue),
            queue_url=receipt.queue_url,
            receipt_handle=receipt.receipt_handle,
            receive_count=receipt.receive_count,
            message_id=receipt.message_id,
        )

    def is_last_receive(self, attempts: int) -> bool:
        """True when SQS dead-letters the message instead of delivering it again. Without the
        receive count (never seen with kombu, which always asks for it) the row's attempts stand in."""
        return (self.receive_count or attempts) >= self.contract.max_receive_count

    def is_redundant_copy(self, busy: store.Claim) -> bool:
        """True when the task is busy running for another SQS message than this one. Unknown ids
        (a claim made by older code, a transport that did not say) count as the same message:
        leaving a message for redelivery is the safe default, deleting it is not."""
        return bool(busy.message_id and self.message_id and busy.message_id != self.message_id)


def contract_of(queue_url: str | None, routing_key: str | None, default_queue: str) -> QueueContract:
    """The contract of the queue the message was received from (a submit may route a task to
    another queue than its declared one), else the task's declared queue."""
    for name in (queue_url, routing_key):
        parsed = parse_queue_name(name, catalog=settings.catalog) if name else None
        if parsed is not None:
            return settings.catalog.get(parsed.queue)
    return settings.catalog.get(default_queue)


class Heartbeat:
    """Keeps a running task's message invisible and its row's lease alive, every
    heartbeat_interval, until stopped. Failures are logged and retried at the next beat: a
    missed beat or two is what the catalog's visibility timeout is sized to survive.

    The SQS beat and the lease beat run on threads of their own, so a slow database (or, on
    SQLite, the task's own open write transaction holding the lock) never delays the visibility
    extension, which is what keeps SQS from delivering the message a second time."""

    def __init__(self, *, task_id: str, worker: str, delivery: Delivery, lease: bool = True):
        self.task_id, self.worker, self.delivery = task_id, worker, delivery
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._every_interval, args=(self._extend_visibility,), daemon=True,
                             name=f"heartbeat-sqs-{task_id}"),
        ]
        if lease:
            self._threads.append(threading.Thread(target=self._every_interval, args=(self._extend_lease,),
                                                  daemon=True, name=f"heartbeat-lease-{task_id}"))

    def __enter__(self) -> Heartbeat:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)

    def _every_interval(self, beat: Callable[[], None]) -> None:
        what = "heartbeat ChangeMessageVisibility" if beat == self._extend_visibility else "heartbeat lease"
        while not self._stop.wait(self.delivery.contract.heartbeat_interval):
            try:
                beat()
            except Exception as exc:  # noqa: BLE001 - the next beat retries; the margin covers a miss
                TROUBLE.failed(what, f"task {self.task_id}: {type(exc).__name__}: {exc}")
            else:
                TROUBLE.recovered(what)

    def _extend_visibility(self) -> None:
        sqs().change_message_visibility(
            QueueUrl=self.delivery.queue_url,
            ReceiptHandle=self.delivery.receipt_handle,
            VisibilityTimeout=self.delivery.contract.visibility_timeout,
        )

    def _extend_lease(self) -> None:
        if not store.extend_lease(engine(), self.task_id, worker=self.worker,
                                  lease_seconds=lease_seconds(self.delivery.contract)):
            logger.warning("heartbeat of task %s: this worker no longer owns the row", self.task_id)


@dataclass(frozen=True)
class RunInfo:
    """What a running task may want to know about its own delivery (see `current_run`)."""

    task_id: str
    attempt: int  # 1 on the first run; counts runs, not busy/duplicate deliveries
    receive_count: int  # SQS ApproximateReceiveCount of this delivery
    max_receive_count: int
    worker: str


_current_run = threading.local()


def current_run() -> RunInfo | None:
    """The delivery the calling task runs for, or None outside a worker's task."""
    return getattr(_current_run, "info", None)


class _LostOwnership(Exception):
    """finish_success found the row owned by someone else: roll the task's writes back."""


class PersistentTask(Task):
    """The base of every persistent task: a Celery task whose message carries only its id, whose
    row in the store is claimed before it runs, and whose `.delay()` / `.apply_async()` go
    through the outbox (pcelery.outbox.submit_task) instead of Celery's producer.

    Used as `base=` of a `@shared_task` / `@app.task`, or as the default of an app by
    `configure(app)`. A task's options that conflict with the SQS contract are refused when the
    task is defined: `acks_late=False`, `autoretry_for` (SQS redelivers a failed task; see the
    queue's maxReceiveCount), a `queue` outside the catalog, a `time_limit` that outlasts its
    queue's visibility timeout on a queue without heartbeats."""

    Request = "pcelery.celery_internals:PersistentRequest"
    acks_late = True
    transactional = False
    retry_policy: RetryPolicy | None = None  # the task's own (persistent_task's retry=, or Celery's autoretry_for)
    pcelery_queue: str | None = None  # the catalog queue (persistent_task's queue=, or the task's own `queue`)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        # Celery first derives an app-bound base class (no name), then one class per task; its
        # own built-in tasks ("celery.*") keep their behaviour and are not the team's to declare.
        if name and not name.startswith("celery."):
            cls._declare(name)

    @classmethod
    def _declare(cls, name: str) -> None:
        own = cls.__dict__
        if own.get("acks_late") is False:
            raise ValueError(f"task {name!r} sets acks_late=False: a persistent task acks its message only after it "
                             "ran, or a crash loses it; remove the option")
        declaration = declare(name, own.get("pcelery_queue") or own.get("queue"), bool(cls.transactional))
        contract = settings.catalog.get(declaration.queue)
        policy = own.get("retry_policy") or cls._celery_retry_options(name, own)
        if policy is not None:
            problems = list(policy.problems(contract.max_receive_count))
            if problems:
                raise ValueError(f"task {name!r} on queue {contract.name!r}: " + "; ".join(problems))
            cls.retry_policy = policy
        hard = own.get("time_limit")
        if hard and hard + contract.visibility_margin > contract.visibility_timeout and not contract.heartbeat:
            raise ValueError(f"task {name!r}: time_limit={hard} does not fit queue {contract.name!r}'s visibility "
                             f"timeout of {contract.visibility_timeout} s (it would be delivered again while it "
                             "runs): lower it, or declare the task for a queue with heartbeats")
        cls.pcelery_queue = declaration.queue
        cls.soft_time_limit = own.get("soft_time_limit") or contract.soft_time_limit
        cls.time_limit = hard or contract.hard_time_limit

    # Options of apply_async a persistent task can honour; the rest of Celery's are refused, not
    # silently dropped. Publishing retries, serializer and compression are the outbox's business.
    _IGNORED_OPTIONS = frozenset(("retry", "retry_policy", "serializer", "compression", "add_to_parent",
                                  "ignore_result", "priority"))

    @staticmethod
    def _celery_retry_options(name: str, own: Mapping[str, Any]) -> RetryPolicy | None:
        """Celery's autoretry_for / max_retries / retry_backoff / retry_backoff_max / retry_jitter,
        as the RetryPolicy the worker applies (Celery's own retry would publish a new message
        around the outbox)."""
        retry_on = own.get("autoretry_for")
        if not retry_on:
            return None
        if own.get("dont_autoretry_for"):
            raise ValueError(f"task {name!r} sets dont_autoretry_for: not supported on a persistent task; list only "
                             "the exceptions that retry in autoretry_for")
        max_retries = own.get("max_retries", Task.max_retries)
        if max_retries is None:
            raise ValueError(f"task {name!r} sets max_retries=None (retry forever): a persistent task's attempts end "
                             "in the DLQ after the queue's maxReceiveCount; set max_retries")
        backoff = own.get("retry_backoff", False)
        delay = float(own.get("default_retry_delay", Task.default_retry_delay))
        first = (1.0 if backoff is True else float(backoff)) if backoff else delay
        return RetryPolicy(max_attempts=int(max_retries) + 1, retry_on=tuple(retry_on), backoff=first,
                           backoff_max=float(own.get("retry_backoff_max", 600)) if backoff else delay,
                           jitter=bool(own.get("retry_jitter", True)))

    def apply_async(self, args: Any = None, kwargs: Any = None, task_id: str | None = None, producer: Any = None,
                    link: Any = None, link_error: Any = None, shadow: str | None = None, **options: Any) -> Any:
        """Submit through the outbox (pcelery.outbox.submit_task: the caller's transaction, Django's
        connection, or a transaction of its own) and return the AsyncResult of the id at once."""
        from pcelery.outbox import SubmitError, submit_task

        countdown = options.pop("countdown", None) or 0
        eta = options.pop("eta", None)
        queue = options.pop("queue", None)
        refused = [k for k, v in (("producer", producer), ("link", link), ("link_error", link_error),
                                  ("shadow", shadow)) if v]
        refused += [k for k, v in options.items() if v not in (None, False) and k not in self._IGNORED_OPTIONS]
        if refused:
            raise SubmitError(f"{self.name}.apply_async({', '.join(sorted(refused))}=...): not supported on a "
                              "persistent task (it is submitted through the outbox): drop the option")
        if task_id is not None and task_id == self.request.id:
            raise SubmitError(f"{self.name}: self.retry() is not supported on a persistent task: raise the exception "
                              "instead, and SQS delivers the task again (up to its queue's maxReceiveCount)")
        if eta is not None:
            eta = eta if eta.tzinfo else eta.replace(tzinfo=dt.UTC)
            countdown = max(0.0, (eta - dt.datetime.now(dt.UTC)).total_seconds())
        if self.app.conf.task_always_eager:
            # A test suite's CELERY_TASK_ALWAYS_EAGER: run here and now, as Celery would, after the
            # same checks a real submit makes (so the suite still catches a bad option).
            from pcelery.outbox import check_submit

            check_submit(settings.catalog, {self.name: self.pcelery_queue or settings.catalog.default_queue},
                         self.name, list(args or ()), dict(kwargs or {}), queue, countdown, task_id)
            return self.apply(args, kwargs, task_id=task_id)
        submitted = submit_task(self.name, list(args or ()), dict(kwargs or {}), queue=queue, countdown=countdown,
                                task_id=task_id)
        return self.AsyncResult(submitted)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        if request.called_directly or request.is_eager:
            return self._run_inline(*args, **kwargs)
        task_id = request.id
        delivery = Delivery.from_request(request, self.pcelery_queue or settings.catalog.default_queue)
        worker = worker_identity()
        db = engine()
        try:
            claim = store.claim(db, task_id, worker=worker, lease_seconds=lease_seconds(delivery.contract),
                                message_id=delivery.message_id)
        except STORE_ERRORS as exc:
            raise StoreUnavailable(f"claiming task {task_id}: {_first_line(exc)}") from None

        if claim.outcome == "duplicate":
            logger.info("task %s[%s] already succeeded: duplicate delivery acked, not run", self.name, task_id)
            row = store.get_task(db, task_id)
            return row.result if row else None
        if claim.outcome == "cancelled":
            logger.info("task %s[%s] was cancelled: its message acked, not run", self.name, task_id)
            return None
        if claim.outcome == "busy" and delivery.is_redundant_copy(claim):
            raise RedundantCopy(
                f"task {task_id} is running on another worker for SQS message {claim.message_id} (lease until "
                f"{claim.lease_until}); this copy (message {delivery.message_id}) is redundant: deleted"
            )
        if claim.outcome == "busy":
            raise LeftForRedelivery(
                f"task {task_id} is running on another worker (lease until {claim.lease_until}); "
                f"this delivery comes back after the {delivery.contract.visibility_timeout} s visibility timeout"
            )
        if claim.outcome == "missing":
            raise PoisonMessage(
                f"no row for task id {task_id} ({self.name}): nothing to run; the message is left to "
                f"go to the DLQ after {delivery.contract.max_receive_count} receives"
            )
        if claim.task_name != self.name:
            error = PoisonMessage(
                f"message names task {self.name!r} but row {task_id} is for {claim.task_name!r}: not run"
            )
            self._until_stored(delivery, task_id, worker, "its verdict", lambda: store.finish_failure(
                db, task_id, worker=worker, error=error, final=delivery.is_last_receive(claim.attempts)))
            raise error

        if delivery.contract.name != self.pcelery_queue:
            logger.warning("task %s[%s] is declared for queue %r but came from %r, whose contract (visibility "
                           "timeout, heartbeat) now applies: submit it with queue=%r", self.name, task_id,
                           self.pcelery_queue, delivery.contract.name, self.pcelery_queue)
        heartbeat: contextlib.AbstractContextManager[Any] = (
            Heartbeat(task_id=task_id, worker=worker, delivery=delivery)
            if self._needs_heartbeat(delivery.contract) and delivery.queue_url and delivery.receipt_handle
            else contextlib.nullcontext()
        )
        _current_run.info = RunInfo(task_id, claim.attempts, delivery.receive_count,
                                    delivery.contract.max_receive_count, worker)
        try:
            with heartbeat:
                return self._run_claimed(db, task_id, worker, claim, delivery)
        except _LostOwnership:
            raise LeftForRedelivery(
                f"task {task_id}: this worker lost its lease before finishing; its writes were rolled back"
            ) from None
        except StoreUnavailable:
            raise
        except Exception as exc:
            if self.transactional and isinstance(exc, STORE_ERRORS + self._other_store_errors()):
                # The store connection the task ran on broke: its writes are rolled back with it,
                # so running it again later keeps its effect exactly once.
                raise StoreUnavailable(f"task {task_id} lost its store connection: {_first_line(exc)}") from None
            policy = self.retry_policy or delivery.contract.retry
            last_receive = delivery.is_last_receive(claim.attempts)
            # With a retry policy, a failure it does not retry (or its last attempt) is final now,
            # before the receives run out: the worker dead-letters the message itself.
            give_up = policy is not None and not last_receive and (
                not policy.retries(exc) or claim.attempts >= policy.max_attempts)
            final = last_receive or give_up
            failure = exc
            self._until_stored(delivery, task_id, worker, "its failure", lambda: store.finish_failure(
                db, task_id, worker=worker, error=failure, final=final))
            if give_up and self._send_to_dlq(delivery, task_id):
                logger.warning("task %s[%s] failed on attempt %s (%s): dead, sent to the DLQ without waiting for "
                               "its remaining receives", self.name, task_id, claim.attempts,
                               "not retried" if policy and not policy.retries(exc) else "its last attempt")
                raise DeadLettered(f"task {task_id} failed ({_first_line(exc)}); sent to the DLQ") from exc
            if policy is not None and not final:
                delay = policy.delay(claim.attempts, random.random())
                self._retry_after(delivery, task_id, delay)
                logger.warning("task %s[%s] failed on attempt %s of %s: retried in %.1f s: %s", self.name, task_id,
                               claim.attempts, policy.max_attempts, delay, exc)
                raise
            logger.warning("task %s[%s] failed on receive %s of %s (%s): %s", self.name, task_id,
                           delivery.receive_count, delivery.contract.max_receive_count,
                           "dead, goes to the DLQ" if final else "SQS redelivers it", exc)
            raise
        finally:
            _current_run.info = None

    def _retry_after(self, delivery: Delivery, task_id: str, delay: float) -> None:
        """The failed message comes back after `delay` rather than its whole visibility timeout."""
        if not (delivery.queue_url and delivery.receipt_handle):
            return
        try:
            sqs().change_message_visibility(QueueUrl=delivery.queue_url, ReceiptHandle=delivery.receipt_handle,
                                            VisibilityTimeout=max(0, math.ceil(delay)))
        except Exception as exc:  # noqa: BLE001 - it comes back after its visibility timeout instead
            logger.warning("task %s: could not shorten its message's visibility for the retry (%s): it comes back "
                           "after the %s s visibility timeout", task_id, _first_line(exc),
                           delivery.contract.visibility_timeout)

    def _send_to_dlq(self, delivery: Delivery, task_id: str) -> bool:
        """A copy of the message into the queue's DLQ (the same envelope the outbox sends, so a
        redrive runs it like any other); the caller then acks the original. Send first, then delete:
        if this fails, the message is left for SQS to redeliver and, in time, dead-letter."""
        from pcelery.messages import encode_body

        contract = delivery.contract
        try:
            client = sqs()
            url = _process_local(f"dlq-url-{contract.name}", lambda: client.get_queue_url(
                QueueName=sqs_queue_name(settings.env, contract.name, dlq=True))["QueueUrl"])
            client.send_message(QueueUrl=url, MessageBody=encode_body(task_id, self.name, queue=contract.name))
        except Exception as exc:  # noqa: BLE001 - left to SQS's own redrive policy instead
            logger.warning("task %s: could not send it to the DLQ (%s): SQS dead-letters it after its remaining "
                           "receives instead", task_id, _first_line(exc))
            return False
        return True

    def _needs_heartbeat(self, contract: QueueContract) -> bool:
        """Heartbeat on the queues whose contract asks for it, and also wherever this task's own
        hard time limit does not fit in the queue's visibility timeout: a task submitted to
        another queue than its declared one (a submitter that never imported the task module
        gets the catalog's default queue) keeps its declared time limits, and without beats
        would be delivered again, and run again, every visibility timeout until the DLQ."""
        own_limit = self.time_limit or contract.hard_time_limit
        return contract.heartbeat or own_limit + contract.visibility_margin > contract.visibility_timeout

    def _until_stored(self, delivery: Delivery, task_id: str, worker: str, what: str,
                      write: Callable[[], Any]) -> Any:
        """Run a store write that records a verdict; while the store is unreachable, keep the
        message invisible (SQS beats only) and retry with capped backoff for STORE_OUTAGE_WAIT,
        then give up with StoreUnavailable (the message goes back to SQS)."""
        try:
            return write()
        except STORE_ERRORS as exc:
            first_error = exc
        TROUBLE.failed("recording a task's verdict", f"task {task_id}: {_first_line(first_error)}; keeping its "
                       f"message invisible and retrying for up to {STORE_OUTAGE_WAIT:.0f} s")
        deadline = time.monotonic() + STORE_OUTAGE_WAIT
        beats: contextlib.AbstractContextManager[Any] = (
            Heartbeat(task_id=task_id, worker=worker, delivery=delivery, lease=False)
            if delivery.queue_url and delivery.receipt_handle else contextlib.nullcontext())
        with beats:
            attempt = 0
            while True:
                attempt += 1
                time.sleep(min(backoff(attempt, 0.5, 10.0), max(0.0, deadline - time.monotonic())))
                try:
                    result = write()
                except STORE_ERRORS as exc:
                    if time.monotonic() >= deadline:
                        raise StoreUnavailable(f"recording {what} of task {task_id}: {_first_line(exc)}") from None
                    continue
                TROUBLE.recovered("recording a task's verdict")
                return result

    def _takes_db(self) -> bool:
        """Whether the task's function has a `db` parameter (a transactional task without one
        runs in the registered TaskTransaction: Django's atomic())."""
        takes = self.__dict__.get("_pcelery_takes_db")
        if takes is None:
            try:
                takes = "db" in inspect.signature(self.run).parameters
            except (TypeError, ValueError):
                takes = True
            self._pcelery_takes_db = takes
        return bool(takes)

    def _task_transaction(self) -> TaskTransaction | None:
        """The transaction a transactional task without `db` runs in; a clear error without one."""
        if not self.transactional or self._takes_db():
            return None
        if _task_transaction is None:
            raise TypeError(f"task {self.name!r} is transactional=True but its function takes no `db` parameter "
                            "and no Django project is set up to run it in transaction.atomic(): add a `db` "
                            "parameter (a SQLAlchemy Connection that commits with its success), or add "
                            "\"pcelery.django\" to INSTALLED_APPS")
        return _task_transaction

    def _other_store_errors(self) -> tuple[type[BaseException], ...]:
        return _task_transaction.errors if _task_transaction is not None and not self._takes_db() else ()

    def _run_claimed(self, db: sa.Engine, task_id: str, worker: str, claim: store.Claim,
                     delivery: Delivery) -> Any:
        args, kwargs = claim.args or [], claim.kwargs or {}
        shared = self._task_transaction()
        if shared is not None:
            # Django: the body's ORM writes and the success commit together when the block ends.
            with shared.atomic() as record_success:
                result = self.run(*args, **kwargs)
                if not record_success(task_id, worker, result):
                    raise _LostOwnership()
            return result
        if self.transactional:
            # The transaction begins at the task's first statement (SQLAlchemy's autobegin), not
            # before it runs: on SQLite a transaction holds the database's write lock, which a
            # task that first computes for a while must not keep from every other claim.
            with db.connect() as conn:
                try:
                    result = self.run(*args, db=conn, **kwargs)
                    if not store.finish_success(conn, task_id, worker=worker, result=result):
                        raise _LostOwnership()
                    conn.commit()
                except BaseException:
                    with contextlib.suppress(*STORE_ERRORS):  # a broken connection has rolled back already
                        conn.rollback()
                    raise
            return result
        result = self.run(*args, **kwargs)

        def record() -> bool:
            return store.finish_success(db, task_id, worker=worker, result=result)

        # The effect already happened (not transactional): its success must be recorded, or a
        # redelivery would run it again. So a store outage here is waited out.
        if not self._until_stored(delivery, task_id, worker, "its success", record):
            logger.warning("task %s[%s] finished after losing its lease; result not recorded", self.name, task_id)
        return result

    def _run_inline(self, *args: Any, **kwargs: Any) -> Any:
        """Direct call (a unit test, or one task calling another's function): no claim."""
        shared = self._task_transaction()
        if shared is not None:
            with shared.atomic():
                return self.run(*args, **kwargs)
        if self.transactional and "db" not in kwargs:
            with engine().begin() as conn:
                return self.run(*args, db=conn, **kwargs)
        return self.run(*args, **kwargs)


# --- Start-up guard ------------------------------------------------------------------------------

def startup_problems(queues: list[str]) -> list[str]:
    """What makes it unsafe to start consuming `queues` (pcelery.startup: a queue missing or
    without a RedrivePolicy, a store schema behind the code, SQS or the store not answering).
    pcelery-worker checked all of it before Celery started; this guards a `celery worker` run by
    hand. Empty when the worker may start."""
    from pcelery import startup

    problems = []
    try:
        startup.queue_urls(settings, sqs(), consumed=queues)
    except (startup.Refused, startup.Unreachable) as exc:
        problems.append(str(exc))
    try:
        startup.store_is_current(engine())
    except (startup.Refused, startup.Unreachable) as exc:
        problems.append(str(exc))
    return problems


def _consumed_queues(worker: Any) -> list[str]:
    try:
        names = list(worker.app.amqp.queues.consume_from or worker.app.amqp.queues)
    except AttributeError:
        names = []
    parsed = [parse_queue_name(n, catalog=settings.catalog) for n in names]
    return [p.queue for p in parsed if p is not None] or settings.catalog.names()


@signals.worker_init.connect
def _refuse_unsafe_start(sender: Any = None, **_: Any) -> None:
    problems = startup_problems(_consumed_queues(sender))
    if problems:
        print("worker: refusing to start:\n" + "\n".join(f"  - {p}" for p in problems), file=sys.stderr, flush=True)
        raise SystemExit(3)


# --- The worker's log stays text --------------------------------------------------------------

# A NUL or another control character in a task's arguments, error or id would otherwise reach
# the log as it is, and `grep` then calls the whole file binary. Tab and newline stay; ESC stays
# for the colours Celery adds on a terminal.
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b-\x1a\x1c-\x1f\x7f]")


class _TextOnlyFormatter(logging.Formatter):
    """Wraps a handler's formatter: control characters come out as \\x00."""

    def __init__(self, inner: logging.Formatter):
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return _CONTROL_CHARACTERS.sub(lambda m: f"\\x{ord(m.group()):02x}", self.inner.format(record))


@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def _keep_the_log_text(logger: logging.Logger | None = None, **_: Any) -> None:
    for handler in logger.handlers if logger is not None else ():
        if not isinstance(handler.formatter, _TextOnlyFormatter):
            handler.setFormatter(_TextOnlyFormatter(handler.formatter or logging.Formatter()))


# --- A team's own Celery app ---------------------------------------------------------------------

_CONFIGURED: weakref.WeakSet[Celery] = weakref.WeakSet()


def configure(celery_app: Celery, *, persistent_by_default: bool = True) -> Celery:
    """Run a Celery app on SQS with the claim-check store: the one change a team makes to the
    `celery.py` of its existing project, right after `Celery(...)` and before any task exists.

    - persistent_by_default: every task of the app is a PersistentTask, so the existing
      `@shared_task` / `@app.task` functions need no change, and their `.delay()` goes through
      the outbox. Without it, give `base=PersistentTask` to the tasks that should be.
    - The product's settings (pcelery.celeryconfig.app_settings) replace the app's own for the
      keys they name once the app has read its configuration; everything else of the app's
      configuration (its timezone, its annotations...) stays.
    - In a worker (pcelery-worker with PCELERY_CELERY_APP naming the app), the queues' URLs and
      the rest of pcelery.celeryconfig.worker_settings are added when it starts.
    """
    from pcelery import celeryconfig

    if persistent_by_default:
        made = celery_app.__dict__.get("Task")  # Celery caches the app's task base class once built
        if made is not None and not issubclass(made, PersistentTask):
            raise RuntimeError("configure(app) came after the app built its task class (a task was already "
                               "defined): call it right after Celery(...)")
        celery_app.task_cls = PersistentTask
    _CONFIGURED.add(celery_app)

    def apply(sender: Celery, **_: Any) -> None:
        sender.conf.update(celeryconfig.app_settings(settings))

    if celery_app.configured:
        apply(celery_app)
    else:
        celery_app.on_after_configure.connect(apply, weak=False)
    return celery_app


@signals.celeryd_init.connect
def _add_worker_settings(sender: Any = None, instance: Any = None, conf: Any = None, **_: Any) -> None:
    """Only a worker computes its queues' URLs (and only when it starts)."""
    from pcelery import celeryconfig

    if instance is not None and instance.app in _CONFIGURED:
        conf.update(celeryconfig.worker_settings(settings, conf))


configure(app)

