"""Everything that leans on Celery's or kombu's internals rather than their public API.

A kombu or Celery upgrade that changes any of these breaks here first (tests/unit/test_celery_internals.py
checks the shapes this module relies on, and requirements pin the range it was tested with):

- `sqs_receipt`: where kombu's SQS transport leaves the received message (MessageId, receipt
  handle, ApproximateReceiveCount, queue URL) on a Celery request: `properties.delivery_info`
  holds `sqs_message` (the ReceiveMessage entry) and `sqs_queue` (its URL), and the receipt
  handle is the message's `delivery_tag`.
- `PersistentRequest` (the main process's side of a delivery, a `celery.worker.request.Request`
  subclass): a lost pool child's row is released and a hard time limit recorded, which the child
  cannot do itself; LeftForRedelivery and RedundantCopy / DeadLettered are turned into reject / ack without
  recording a failure.
- `PersistentConsumer` (a `celery.worker.consumer.Consumer` subclass): messages that cannot be
  decoded or name no registered task are rejected, never acked (kombu deletes an acked message;
  a rejected one stays for the redrive policy to dead-letter); an unregistered task's row says so.
- `PersistentTransport` / `PersistentChannel` (kombu's SQS transport, `broker_transport` in
  pcelery.celeryconfig): kombu 5.7 exits the worker on any ReceiveMessage error (it hands `[]`
  to `_on_messages_ready`, or raises from `AsyncAWSQueryConnection._on_list_ready`) and on
  envelopes its message class cannot build. The channel turns a failed receive into a logged,
  backed-off retry, sends structurally broken messages towards the DLQ before kombu parses them
  (pcelery.messages.envelope_problem), keeps any other per-message error to that message, pauses
  receiving while the claim-check store is unreachable (`STORE_BREAKER`), and deletes acked
  messages on a thread of its own (`Deleter`; it skips kombu's blocking DeleteMessage by calling
  the virtual channel's basic_ack), logging a failure instead of raising it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from billiard.einfo import ExceptionWithTraceback
from botocore.exceptions import BotoCoreError, ClientError
from celery import signals
from celery.exceptions import NotRegistered, WorkerLostError
from celery.utils.objects import Bunch
from celery.worker import state as worker_state
from celery.worker.consumer import Consumer
from celery.worker.request import Request
from kombu.asynchronous.aws.sqs.connection import AsyncSQSConnection
from kombu.transport import virtual
from kombu.transport.SQS import Channel as SQSChannel
from kombu.transport.SQS import Transport as SQSTransport

from pcelery import store
from pcelery.messages import envelope_problem
from pcelery.worker import (
    DeadLettered,
    LeftForRedelivery,
    RedundantCopy,
    StoreUnavailable,
    TroubleLog,
    backoff,
    contract_of,
    engine,
    settings,
    worker_identity,
)

logger = logging.getLogger("pcelery.worker")


@dataclass(frozen=True)
class SqsReceipt:
    """What kombu's SQS transport recorded about one receive of a message."""

    queue_url: str | None
    receipt_handle: str | None
    receive_count: int  # ApproximateReceiveCount of this receive (0 if unknown)
    message_id: str | None  # the same for every receive of one message
    routing_key: str | None  # the Celery queue name the sender put in delivery_info


def sqs_receipt(request: Any) -> SqsReceipt:
    """The receipt of a Celery request (pool child side) or a kombu message's delivery info."""
    properties = getattr(request, "properties", None) or {}
    info = properties.get("delivery_info") or {}
    message = info.get("sqs_message") or {}
    attributes = message.get("Attributes") or {}
    return SqsReceipt(
        queue_url=info.get("sqs_queue"),
        receipt_handle=properties.get("delivery_tag") or message.get("ReceiptHandle"),
        receive_count=int(attributes.get("ApproximateReceiveCount") or 0),
        message_id=message.get("MessageId"),
        routing_key=(getattr(request, "delivery_info", None) or {}).get("routing_key"),
    )


class PersistentRequest(Request):
    """Main-process side of a delivery: what happens when the child cannot report itself."""

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> Any:
        exc = exc_info.exception
        if isinstance(exc, ExceptionWithTraceback):
            exc = exc.exc
        if isinstance(exc, LeftForRedelivery):
            # Not a failure: leave the message for SQS, and keep the result backend untouched
            # (Celery would record a FAILURE for a task that another worker is running).
            worker_state.task_ready(self)
            logger.info("task %s[%s] left for redelivery: %s", self.name, self.id, exc.reason)
            self.reject(requeue=False)
            return
        if isinstance(exc, RedundantCopy):
            worker_state.task_ready(self)
            logger.info("task %s[%s] redundant copy acked: %s", self.name, self.id, exc)
            self.acknowledge()
            return
        if isinstance(exc, DeadLettered):
            # Its copy is in the DLQ and its row dead: this message is done with.
            worker_state.task_ready(self)
            self.acknowledge()
            return
        if isinstance(exc, StoreUnavailable):
            # Not the task's failure: the message goes back to SQS (visible again after the
            # transport's wait time) and no further message is received until the store answers.
            worker_state.task_ready(self)
            STORE_BREAKER.trip(str(exc.reason))
            self.reject(requeue=True)
            return
        if isinstance(exc, (WorkerLostError, SystemExit, KeyboardInterrupt)):
            self._release_lease()
        return super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)

    def on_timeout(self, soft: bool, timeout: float) -> Any:
        if not soft:
            # The pool kills the child at the hard limit; record the verdict it could not.
            self._record_hard_timeout(timeout)
        return super().on_timeout(soft, timeout)

    def _child_identity(self) -> str | None:
        return worker_identity(self.worker_pid) if self.worker_pid else None

    def _release_lease(self) -> None:
        child = self._child_identity()
        if not child:
            return
        try:
            if store.release(engine(), self.id, worker=child):
                logger.warning("task %s[%s]: its worker process %s was lost; row released for the redelivery",
                               self.name, self.id, child)
        except Exception as exc:  # noqa: BLE001 - the lease then simply expires
            logger.warning("task %s[%s]: releasing the lost worker's row failed: %s", self.name, self.id, exc)

    def _record_hard_timeout(self, timeout: float) -> None:
        child = self._child_identity()
        if not child:
            return
        info = self.message.delivery_info or {}
        attributes = (info.get("sqs_message") or {}).get("Attributes") or {}
        receive_count = int(attributes.get("ApproximateReceiveCount") or 0)
        declared = getattr(self.task, "pcelery_queue", None) or settings.catalog.default_queue
        contract = contract_of(info.get("sqs_queue"), info.get("routing_key"), declared)
        try:
            store.finish_failure(
                engine(), self.id, worker=child,
                error=f"TimeLimitExceeded: hard time limit ({timeout} s) exceeded; the process was killed",
                final=receive_count >= contract.max_receive_count,
            )
        except Exception as exc:  # noqa: BLE001
            logger.warning("task %s[%s]: recording the hard time limit failed: %s", self.name, self.id, exc)


class PersistentConsumer(Consumer):
    """Celery's consumer, except that no message it cannot run is ever deleted: it is rejected,
    which on a queue with a redrive policy leaves it to SQS, and after maxReceiveCount receives
    it sits in the DLQ for `ops peek`. (Celery acks undecodable messages, and its log lines say
    "deleted"/"discarded" for messages kombu in fact leaves in a redrive queue.)"""

    def on_decode_error(self, message: Any, exc: BaseException) -> None:
        logger.critical(
            "undecodable message left for the DLQ (content type %r, encoding %r): %s; body starts %r",
            message.content_type, message.content_encoding, exc, _body_head(message),
        )
        message.reject_log_error(logger, self.connection_errors)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        logger.error("message that is not a Celery task left for the DLQ (content type %r): body starts %r",
                     message.content_type, _body_head(message))
        message.reject_log_error(logger, self.connection_errors)
        signals.task_rejected.send(sender=self, message=message, exc=None)

    def on_unknown_task(self, body: Any, message: Any, exc: BaseException) -> None:
        headers = message.headers if isinstance(message.headers, dict) else {}
        name, task_id = headers.get("task"), headers.get("id")
        if not name or not task_id:
            return self.on_unknown_message(body, message)
        queue = (message.delivery_info or {}).get("routing_key")
        logger.error("task %r [%s] is not registered on this worker; its message is left for the DLQ: add its "
                     "module to PCELERY_TASK_MODULES of the workers of queue %r, then redrive the DLQ",
                     name, task_id, queue)
        _record_unregistered(message, str(name), str(task_id), queue)
        message.reject_log_error(logger, self.connection_errors)
        request = Bunch(name=name, chord=None, root_id=headers.get("root_id"), errbacks=None,
                        correlation_id=message.properties.get("correlation_id"),
                        reply_to=message.properties.get("reply_to"))
        # An AsyncResult waiter learns why instead of waiting forever.
        self.app.backend.mark_as_failure(task_id, NotRegistered(name), request=request)
        signals.task_unknown.send(sender=self, message=message, exc=exc, name=name, id=task_id)


def _body_head(message: Any) -> bytes | str:
    body = getattr(message, "body", b"") or b""
    return body[:200]


def _record_unregistered(message: Any, name: str, task_id: str, queue: str | None) -> None:
    """The row of a task no worker of its queue declares says so, and reads `dead` on the receive
    that sends its message to the DLQ: a misspelt or undeployed task is never `queued` forever."""
    receipt = sqs_receipt(message)
    contract = contract_of(receipt.queue_url, queue, settings.catalog.default_queue)
    final = receipt.receive_count >= contract.max_receive_count
    error = (f"NotRegistered: no worker of queue {contract.name!r} declares task {name!r} (receive "
             f"{receipt.receive_count} of {contract.max_receive_count}): deploy its module in PCELERY_TASK_MODULES "
             "of that queue's workers, then redrive the DLQ")
    try:
        store.record_unrunnable(engine(), task_id, task_name=name, error=error, final=final)
    except Exception as exc:  # noqa: BLE001 - the message still goes to the DLQ; the row is the extra
        logger.warning("task %r [%s]: recording that it is not registered failed: %s", name, task_id, exc)


# --- The store breaker: no receives while the claim-check store is down -----------------------

class StoreBreaker:
    """Open while the claim-check store is unreachable. A received message whose claim cannot
    reach the store is given back (StoreUnavailable), and every further receive would only spend
    one of its messages' maxReceiveCount: so the channel receives nothing while this is open. A
    thread probes the store with capped backoff and closes it when the store answers."""

    PROBE_BACKOFF = (0.5, 10.0)  # first and longest wait between probes, seconds

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._opened_at: float | None = None
        self._reason = ""

    @property
    def is_open(self) -> bool:
        return self._opened_at is not None

    def trip(self, reason: str) -> None:
        with self._lock:
            if self._opened_at is not None:
                return
            self._opened_at, self._reason = time.monotonic(), reason
        logger.warning("task store unreachable (%s): no messages are received until it answers again; running "
                       "tasks keep their messages invisible and wait to record their verdict", reason)
        threading.Thread(target=self._probe_until_reachable, daemon=True, name="store-breaker").start()

    def _probe_until_reachable(self) -> None:
        attempt = 0
        while True:
            attempt += 1
            time.sleep(backoff(attempt, *self.PROBE_BACKOFF))
            try:
                with engine().connect() as conn:
                    conn.execute(sa.text("SELECT 1"))
            except Exception as exc:  # noqa: BLE001 - any failure means "not yet"
                logger.debug("task store still unreachable (probe %d): %s", attempt, exc)
                continue
            with self._lock:
                opened_at, self._opened_at = self._opened_at, None
            logger.warning("task store reachable again after %.0f s: receiving resumes",
                           time.monotonic() - (opened_at or time.monotonic()))
            return


STORE_BREAKER = StoreBreaker()


# --- The transport: a worker survives what SQS, the network and senders do ---------------------

@dataclass(frozen=True)
class ReceiveFailure:
    """What a failed ReceiveMessage hands the channel instead of kombu's `[]` or exception."""

    status: int
    reason: str


class _ResilientAsyncSQS(AsyncSQSConnection):
    """kombu's async SQS client, except that a failed list call (ReceiveMessage) answers with a
    ReceiveFailure instead of `[]` (timeouts, 5xx, connection failures) or an exception (any
    other status), both of which end the worker in kombu 5.7."""

    def _on_list_ready(self, parent: Any, markers: Any, operation: Any, response: Any) -> Any:
        try:
            result = super()._on_list_ready(parent, markers, operation, response)
        except Exception as exc:  # noqa: BLE001 - whatever the endpoint said, the worker keeps serving
            return ReceiveFailure(getattr(response, "status", 0) or 0, _short(exc))
        if isinstance(result, list):  # kombu's answer to a timeout, a 5xx or a dropped connection
            status = getattr(response, "status", 0) or 0
            reason = getattr(response, "reason", "") or ("no response" if status == 599 else "")
            return ReceiveFailure(status, f"HTTP {status}" + (f" ({reason})" if reason else ""))
        return result


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


class PersistentChannel(SQSChannel):
    """kombu's SQS channel, hardened (see the module docstring)."""

    RECEIVE_BACKOFF = (1.0, 10.0)  # first and longest wait after a failed receive, seconds
    BREAKER_RECHECK = 1.0  # seconds between looks at an open store breaker
    REFILL_RECHECK = 0.005  # seconds between looks for a batch's worth of free prefetch slots

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._receive_failures: dict[str, int] = {}
        self._retry_in: dict[str, float] = {}
        self._trouble = TroubleLog(logger)
        options = self.transport_options
        # pcelery.celeryconfig.worker_settings sizes these from the consumed queues' contracts.
        self._receive_batch = int(options.get("pcelery_receive_batch", 1))
        self._deleter = Deleter(self._trouble, linger=float(options.get("pcelery_ack_linger", 0.0)))
        self._keeper = VisibilityKeeper(self._trouble)

    def asynsqs(self, queue: Any = None) -> Any:
        client = super().asynsqs(queue=queue)
        if type(client) is AsyncSQSConnection:
            client.__class__ = _ResilientAsyncSQS  # same state, safer list callback
        return client

    # -- receiving --

    def _schedule_queue(self, queue: str) -> None:
        if STORE_BREAKER.is_open:
            self._later(self.BREAKER_RECHECK, queue)
            return
        if self._receive_batch > 1 and queue in self._active_queues:
            # Receive when a whole batch fits in the prefetch window (kombu asks for as many
            # messages as are free, so refilling one slot at a time costs a ReceiveMessage per
            # task). The window holds concurrency + a batch, so until a batch fits every pool
            # slot is busy and messages still wait: the wait costs no throughput.
            # The look is local (no request), so it is repeated often: waiting a polling_interval
            # here capped a full worker at one batch per interval (200 tasks/s at 0.05 s).
            free = self.qos.can_consume_max_estimate()
            if free is not None and 0 < free < min(self._receive_batch, self.qos.prefetch_count or 1):
                self._later(self.REFILL_RECHECK, queue)
                return
        try:
            super()._schedule_queue(queue)
        except Exception as exc:  # noqa: BLE001 - e.g. signing without credentials: retried, logged once
            self._receive_failed(queue, _short(exc))
            self._loop1(queue, 0)

    def _later(self, delay: float, queue: str) -> None:
        assert self.hub is not None, "the SQS channel polls asynchronously only with the worker's hub"
        self.hub.call_later(delay, self._schedule_queue, queue)

    def _loop1(self, queue: str, messages_fetched: Any = None) -> None:
        delay = self._retry_in.pop(queue, None)
        if delay is not None:
            self._later(delay, queue)
            return
        super()._loop1(queue, messages_fetched)

    def _receive_failed(self, queue: str, reason: str) -> None:
        failures = self._receive_failures[queue] = self._receive_failures.get(queue, 0) + 1
        delay = backoff(failures, *self.RECEIVE_BACKOFF)
        self._retry_in[queue] = delay
        self._trouble.failed(f"ReceiveMessage on {queue}", f"{reason}; retrying with backoff (next in {delay:g} s), "
                                                           "running tasks go on")

    def _on_messages_ready(self, queue: str, qname: str, messages: Any) -> int:
        # kombu's argument names: `queue` is the queue's URL, `qname` the name it is consumed as.
        if not isinstance(messages, dict):
            reason = messages.reason if isinstance(messages, ReceiveFailure) else f"unreadable answer {messages!r}"
            self._receive_failed(qname, reason)
            return 0
        if self._receive_failures.pop(qname, None):
            self._trouble.recovered(f"ReceiveMessage on {qname}")
        msgs = messages.get("Messages") or []
        if not msgs:
            return 0
        callback = self.connection._callbacks.get(qname)
        if callback is None:
            self._release_messages(queue, qname, msgs)
            return 0
        contract = contract_of(queue, qname, settings.catalog.default_queue)
        for msg in msgs:
            problem = envelope_problem(msg.get("Body", ""))
            if problem:
                self._poison(queue, qname, msg, problem)
                continue
            receipt = msg.get("ReceiptHandle", "")
            self._keeper.track(self.sqs(queue=self.canonical_queue_name(qname)), queue, receipt, contract)
            try:
                callback(self._message_to_python(msg, qname, queue))
            except Exception as exc:  # noqa: BLE001 - one message's trouble stays that message's
                self._keeper.forget(receipt)
                self._poison(queue, qname, msg, _short(exc))
        return len(msgs)

    def _poison(self, queue_url: str, qname: str, msg: dict[str, Any], problem: str) -> None:
        """A message no worker can run: made visible again at once, so it spends its receives
        quickly and the redrive policy moves it to the DLQ, where `ops peek` shows the same
        problem. Never deleted, never handed to kombu's message class."""
        receipt = msg.get("ReceiptHandle", "")
        count = (msg.get("Attributes") or {}).get("ApproximateReceiveCount", "?")
        logger.error("poison message %s on %s (receive %s): %s; left for the DLQ", msg.get("MessageId"), qname,
                     count, problem)
        if receipt in self.qos._delivered:  # taken into the prefetch window before it failed
            self.qos.ack(receipt)  # frees the slot only: basic_ack would delete it from SQS
        try:
            self.sqs(queue=self.canonical_queue_name(qname)).change_message_visibility(
                QueueUrl=queue_url, ReceiptHandle=receipt, VisibilityTimeout=0)
        except (BotoCoreError, ClientError, OSError) as exc:
            logger.warning("could not hand poison message %s back at once (%s): it comes back after its "
                           "visibility timeout", msg.get("MessageId"), _short(exc))

    # -- acknowledging --

    def basic_ack(self, delivery_tag: Any, multiple: bool = False) -> None:
        """Release the delivery at once and delete its message on the Deleter's thread: kombu's
        DeleteMessage is a blocking call on the event loop, and a stalled SQS would stall every
        running task's bookkeeping (time limits included) with it. Safe to defer: the task's
        verdict is committed before the ack, and a message that comes back is acked as a duplicate."""
        try:
            info = self.qos.get(delivery_tag).delivery_info
            receipt, queue_url = info["sqs_message"]["ReceiptHandle"], info["sqs_queue"]
        except KeyError:
            super().basic_ack(delivery_tag, multiple)
            return
        queue = self.canonical_queue_name(info["routing_key"]) if "routing_key" in info else None
        client = self.sqs(queue=queue)
        self._keeper.forget(receipt)
        virtual.Channel.basic_ack(self, delivery_tag)  # frees the prefetch slot; no SQS call here
        self._deleter.delete(client, queue_url, receipt)

    def basic_reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        self._keeper.forget(delivery_tag)  # left for SQS: its visibility must now run out
        super().basic_reject(delivery_tag, requeue=requeue)

    def close(self) -> None:
        self._keeper.stop()
        self._deleter.flush(timeout=10.0)
        super().close()


SQS_BATCH = 10  # entries per DeleteMessageBatch / ChangeMessageVisibilityBatch (the SQS maximum)


class Deleter:
    """Deletes acked messages from SQS on a thread of its own, in batches: DeleteMessageBatch of up
    to 10 per queue, sent when 10 are waiting or `linger` seconds after the first, at once on
    `flush` (shutdown). Deferring is safe: a task's verdict is committed before its ack, and a
    message that comes back (the worker died with acks buffered, a delete failed) is acked as a
    duplicate without running. A failure is logged once per outage and the message left."""

    def __init__(self, trouble: TroubleLog, *, linger: float = 0.0):
        self._queue: queue.Queue[tuple[Any, str, str] | None] = queue.Queue()
        self._trouble = trouble
        self._linger = linger
        self._flushing = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def delete(self, client: Any, queue_url: str, receipt: str) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():  # started lazily: after the fork
                self._thread = threading.Thread(target=self._run, daemon=True, name="sqs-deleter")
                self._thread.start()
        self._queue.put((client, queue_url, receipt))

    def flush(self, timeout: float) -> bool:
        """Send what is buffered now and wait for it (up to timeout); True when nothing is left."""
        self._flushing.set()
        self._queue.put(None)  # wakes a batch that is lingering
        try:
            deadline = time.monotonic() + timeout
            while self._queue.unfinished_tasks and time.monotonic() < deadline:
                time.sleep(0.02)
            return not self._queue.unfinished_tasks
        finally:
            self._flushing.clear()

    def _next_batch(self) -> list[tuple[Any, str, str] | None]:
        batch = [self._queue.get()]
        deadline = time.monotonic() + self._linger
        while len(batch) < SQS_BATCH and batch[-1] is not None:
            wait = 0.0 if self._flushing.is_set() else deadline - time.monotonic()
            try:
                batch.append(self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            by_queue: dict[tuple[int, str], list[tuple[Any, str, str]]] = {}
            for item in batch:
                if item is None:  # a flush's wake-up call
                    self._queue.task_done()
                    continue
                by_queue.setdefault((id(item[0]), item[1]), []).append(item)
            for items in by_queue.values():
                try:
                    self._delete(items[0][0], items[0][1], [receipt for _, _, receipt in items])
                finally:
                    for _ in items:
                        self._queue.task_done()

    def _delete(self, client: Any, queue_url: str, receipts: list[str]) -> None:
        lost = ("the message comes back after its visibility timeout and is acked as a duplicate")
        try:
            answer = client.delete_message_batch(
                QueueUrl=queue_url, Entries=[{"Id": str(i), "ReceiptHandle": r} for i, r in enumerate(receipts)])
        except (BotoCoreError, ClientError, OSError) as exc:
            self._trouble.failed("DeleteMessageBatch", f"{_short(exc)}; {lost} ({len(receipts)} message(s))")
            return
        failed = [f for f in answer.get("Failed") or [] if f.get("Code") not in STALE_RECEIPT_CODES]
        stale = len(answer.get("Failed") or []) - len(failed)
        if stale:
            logger.debug("DeleteMessageBatch on %s: %d stale receipt handle(s)", queue_url, stale)
        if failed:
            self._trouble.failed("DeleteMessageBatch", f"{len(failed)} of {len(receipts)} entries failed "
                                                       f"({failed[0].get('Code')}: {failed[0].get('Message')}); {lost}")
        else:
            self._trouble.recovered("DeleteMessageBatch")


# What SQS says of a receipt handle that no longer names a received message (it was received
# again, or its visibility ran out): nothing to delete or extend, and nothing to report.
STALE_RECEIPT_CODES = ("ReceiptHandleIsInvalid", "InvalidParameterValue", "MessageNotInflight")


@dataclass
class _Held:
    client: Any
    queue_url: str
    deadline: float  # monotonic time at which SQS makes the message visible again
    needed: float  # seconds of visibility a message must have left when it starts running
    visibility: int


class VisibilityKeeper:
    """Keeps a received message that waits in the prefetch window from reappearing on SQS.

    The worker prefetches a batch beyond its pool's concurrency (pcelery.celeryconfig), so a
    message may wait behind running tasks. Whatever the wait, it must start with enough
    visibility left for the run its queue's contract allows (hard time limit + margin), or SQS
    would hand it to another worker while it runs. Every second this thread looks at the held
    messages and extends (ChangeMessageVisibilityBatch, to the full visibility timeout) those about
    to fall short of that. A message acked or rejected is forgotten at once: a rejected one must
    reappear. Messages that start soon after arriving, the usual case, cost nothing.
    Queues with heartbeats are not prefetched beyond their concurrency and are not kept here:
    their running tasks extend their own messages."""

    TICK = 1.0

    def __init__(self, trouble: TroubleLog):
        self._trouble = trouble
        self._held: dict[str, _Held] = {}
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def track(self, client: Any, queue_url: str, receipt: str, contract: Any) -> None:
        if contract.heartbeat or not receipt:
            return
        held = _Held(client, queue_url, time.monotonic() + contract.visibility_timeout,
                     contract.uncovered_run + contract.visibility_margin, contract.visibility_timeout)
        with self._lock:
            self._held[receipt] = held
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, daemon=True, name="sqs-visibility-keeper")
                self._thread.start()

    def forget(self, receipt: str) -> None:
        with self._lock:
            self._held.pop(receipt, None)

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        while not self._stopped.wait(self.TICK):
            now = time.monotonic()
            with self._lock:
                due = [(r, h) for r, h in self._held.items() if h.deadline - now < h.needed + 2 * self.TICK]
            by_queue: dict[tuple[int, str], list[tuple[str, _Held]]] = {}
            for receipt, held in due:
                by_queue.setdefault((id(held.client), held.queue_url), []).append((receipt, held))
            for items in by_queue.values():
                for start in range(0, len(items), SQS_BATCH):
                    self._extend(items[start:start + SQS_BATCH])

    def _extend(self, items: list[tuple[str, _Held]]) -> None:
        client, queue_url = items[0][1].client, items[0][1].queue_url
        sent_at = time.monotonic()
        try:
            answer = client.change_message_visibility_batch(QueueUrl=queue_url, Entries=[
                {"Id": str(i), "ReceiptHandle": receipt, "VisibilityTimeout": held.visibility}
                for i, (receipt, held) in enumerate(items)])
        except (BotoCoreError, ClientError, OSError) as exc:
            self._trouble.failed("ChangeMessageVisibilityBatch", f"{_short(exc)}; retried next second while the "
                                                                 "messages wait")
            return
        done = {int(entry["Id"]) for entry in answer.get("Successful") or []}
        failed = {int(entry["Id"]): entry.get("Code") for entry in answer.get("Failed") or []}
        with self._lock:
            for i, (receipt, held) in enumerate(items):
                if i in done and receipt in self._held:
                    held.deadline = sent_at + held.visibility
                elif failed.get(i) in STALE_RECEIPT_CODES:
                    self._held.pop(receipt, None)  # no longer this worker's to keep
        others = [code for code in failed.values() if code not in STALE_RECEIPT_CODES]
        if others:
            self._trouble.failed("ChangeMessageVisibilityBatch", f"{len(others)} entries failed ({others[0]}); "
                                                                 "retried next second while the messages wait")
        else:
            self._trouble.recovered("ChangeMessageVisibilityBatch")


class PersistentTransport(SQSTransport):
    """kombu's SQS transport with PersistentChannel (pcelery.celeryconfig: broker_transport)."""

    Channel = PersistentChannel
