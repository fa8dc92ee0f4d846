"""Everything that leans on Celery's or kombu's internals rather than their public API.

A kombu or Celery upgrade that changes any of these breaks here first (tests/unit/test_celery_internals.py
checks the shapes this module relies on, and requirements pin the range it was tested with):

- `sqs_receipt`: where kombu's SQS transport leaves the received message (MessageId, receipt
  handle, ApproximateReceiveCount, queue URL) on a Celery request: `properties.delivery_info`
  holds `sqs_message` (the ReceiveMessage entry) and `sqs_queue` (its URL), and the receipt
  handle is the message's `delivery_tag`.
- `PersistentRequest` (the main process's side of a delivery, a `celery.worker.request.Request`
  subclass): a lost pool child's row is released and a hard time limit recorded, which the child
  cannot do itself; LeftForRedelivery and RedundantCopy are turned into reject / ack without
  recording a failure.
- `PersistentConsumer` (a `celery.worker.consumer.Consumer` subclass): messages that cannot be
  decoded or name no registered task are rejected, never acked (kombu deletes an acked message;
  a rejected one stays for the redrive policy to dead-letter).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from billiard.einfo import ExceptionWithTraceback
from celery import signals
from celery.exceptions import NotRegistered, WorkerLostError
from celery.utils.objects import Bunch
from celery.worker import state as worker_state
from celery.worker.consumer import Consumer
from celery.worker.request import Request

from pcelery import store
from pcelery.worker import LeftForRedelivery, RedundantCopy, contract_of, engine, worker_identity

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
        contract = contract_of(info.get("sqs_queue"), info.get("routing_key"), self.task.queue)
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
