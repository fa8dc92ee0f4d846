"""Redrive: move messages from a DLQ back to its source queue (or another queue).

`plan_redrive` checks the move makes sense before anything moves; `redrive` runs it with SQS's
native move task (StartMessageMoveTask) or client-side (receive, send, delete), falling back to
the client mode where the endpoint lacks the native one (moto). Progress goes to the `ops` logger.

Safety rule: the client redrive sends first and deletes second, and deletes only what was sent,
so killing it at any moment can duplicate a message but never lose one.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pcelery.catalog import Catalog
from pcelery.ops import EXIT_REFUSED, EXIT_UNREACHABLE, OpsError
from pcelery.ops.aws import Aws, SqsClient, aws_error, call, error_code, http_status
from pcelery.ops.queues import (
    BATCH,
    Message,
    Progress,
    QueueRef,
    attributes,
    decode,
    is_work_queue,
    queue_ref,
    receive,
    release,
)

log = logging.getLogger("ops")

# How long a message moved by the client redrive stays invisible in the DLQ between its receive
# and its delete. If the process dies in between, the message reappears after this.
DEFAULT_HOLD_SECONDS = 60
NATIVE_TERMINAL = ("COMPLETED", "CANCELLED", "FAILED")


@dataclass
class RedrivePlan:
    source: QueueRef  # the DLQ
    source_arn: str
    destination: QueueRef
    destination_arn: str
    mode: str  # native or client: what this run uses
    visible: int
    notes: list[str] = field(default_factory=list)
    mode_reason: str = ""  # why that mode, in words the operator reads before anything moves
    requested_mode: str = "auto"  # --mode as given


@dataclass
class RedriveResult:
    source: str
    destination: str
    mode: str
    moved: int = 0
    failed: int = 0
    skipped: int = 0
    dry_run: bool = False
    would_move: int | None = None
    moved_task_ids: list[str] = field(default_factory=list)
    failure_reason: str | None = None
    interrupted: bool = False
    # MessageIds of the copies this run sent. SQS keeps a message's id when its redrive policy
    # moves it to the DLQ, so one of these seen in the DLQ is a message that came straight back
    # (poison no worker can read goes back within seconds): it is left there, not moved again.
    sent_ids: set[str] = field(default_factory=set)

    def summary(self) -> dict[str, Any]:
        return {
            "source": self.source, "destination": self.destination, "mode": self.mode,
            "moved": self.moved, "failed": self.failed, "skipped": self.skipped, "dry_run": self.dry_run,
            "would_move": self.would_move, "failure_reason": self.failure_reason,
        }


def _names(urls: list[str]) -> list[str]:
    return [u.rsplit("/", 1)[-1] for u in urls]


def plan_redrive(sqs: SqsClient, dlq: QueueRef, *, env: str, catalog: Catalog, to: QueueRef | None = None,
                 mode: str = "auto", task: str | None = None, limit: int | None = None,
                 force: bool = False) -> RedrivePlan:
    """Check the move makes sense before anything moves.

    The destination defaults to the DLQ's one source queue (ListDeadLetterSourceQueues). Refused
    (EXIT_REFUSED) unless force: the DLQ is itself a work queue or no queue uses it as its DLQ,
    it has several sources and no --to, or --to is not one of its sources."""
    if mode not in ("auto", "native", "client"):
        raise OpsError(f"unknown --mode {mode!r}: use auto, native or client", EXIT_REFUSED)
    if mode == "native" and (task or limit):
        raise OpsError("--mode native moves every message of the DLQ: it cannot filter by --task or stop at "
                       "--limit; use --mode client (or auto, which picks client for these)", EXIT_REFUSED)
    attrs = attributes(sqs, dlq)
    sources: list[str] = call(f"list the source queues of {dlq.name!r}", sqs.list_dead_letter_source_queues,
                              QueueUrl=dlq.url).get("queueUrls", [])
    notes = []
    if is_work_queue(attrs) and not force:
        raise OpsError(f"{dlq.name!r} is a work queue (it has a redrive policy), not a DLQ: redrive moves messages "
                       "out of a DLQ; name the DLQ (add -dlq), or pass --force", EXIT_REFUSED)
    if not sources and not force:
        raise OpsError(f"{dlq.name!r} is not a DLQ: no queue names it in its redrive policy; check the queue name, "
                       "or pass --to QUEUE --force to move its messages anyway", EXIT_REFUSED)
    if to is None:
        if len(sources) != 1:
            names = ", ".join(_names(sources)) or "none"
            raise OpsError(f"cannot pick a destination for {dlq.name!r}: its source queues are {names}; "
                           "pass --to QUEUE", EXIT_REFUSED)
        destination = queue_ref(_names(sources)[0], sources[0], env=env, catalog=catalog)
    else:
        destination = to
        if to.url not in sources and to.name not in _names(sources):
            if not force:
                raise OpsError(f"{to.name!r} is not a source queue of {dlq.name!r} (sources: "
                               f"{', '.join(_names(sources)) or 'none'}): messages would "
                               "land where they were never sent; pass --force if that is really meant",
                               EXIT_REFUSED)
            notes.append(f"--force: {to.name} is not a source of {dlq.name}")
    if destination.url == dlq.url:
        raise OpsError("source and destination are the same queue: pick another --to", EXIT_REFUSED)
    requested = mode
    if mode == "client":
        reason = "receive, send, delete from here (--mode client)"
    elif mode == "native":
        missing = native_missing(sqs, attrs["QueueArn"])
        if missing is not None:
            raise OpsError(f"--mode native: this SQS endpoint does not implement the native move task ({missing}): "
                           "use --mode client (moto lacks it; AWS and LocalStack have it)", EXIT_UNREACHABLE)
        reason = "SQS's move task, StartMessageMoveTask (--mode native)"
    elif task:
        mode, reason = "client", "receive, send, delete from here: --task picks messages one by one"
    elif limit:
        mode, reason = "client", "receive, send, delete from here: --limit stops after that many"
    else:
        missing = native_missing(sqs, attrs["QueueArn"])
        if missing is None:
            mode, reason = "native", "SQS's move task, StartMessageMoveTask"
        else:
            mode = "client"
            reason = f"receive, send, delete from here: this endpoint has no native move task ({missing})"
    return RedrivePlan(
        source=dlq, source_arn=attrs["QueueArn"], destination=destination,
        destination_arn=attributes(sqs, destination, ["QueueArn"])["QueueArn"], mode=mode,
        visible=int(attrs.get("ApproximateNumberOfMessages", 0)), notes=notes, mode_reason=reason,
        requested_mode=requested,
    )


def native_missing(sqs: SqsClient, source_arn: str) -> str | None:
    """None when the endpoint has SQS's move-task API (or it cannot be told: the run then falls
    back by itself), else how it said it has none ("ListMessageMoveTasks answered HTTP 500").
    Asks ListMessageMoveTasks, which changes nothing."""
    import botocore.exceptions as bx

    try:
        sqs.list_message_move_tasks(SourceArn=source_arn, MaxResults=1)
    except (bx.BotoCoreError, bx.ClientError) as exc:
        unsupported = _native_unsupported(exc)
        if unsupported is not None:
            return f"ListMessageMoveTasks answered {unsupported}"
        log.debug("could not check for the native move task (%s): trying it", exc)
    return None


# ---------------------------------------------------------------------------------- native


class NativeUnsupported(Exception):
    """The endpoint does not implement StartMessageMoveTask (moto answers HTTP 500)."""


def _native_unsupported(exc: Exception) -> str | None:
    """How the endpoint said it has no native move task ("HTTP 500"), or None if it did not."""
    import botocore.exceptions as bx

    if not isinstance(exc, bx.ClientError):
        return None
    code, status = error_code(exc), http_status(exc)
    # moto answers 500; UnsupportedOperation is AWS's answer for queues the move task cannot
    # serve (FIFO): in both cases the client-side move still works.
    if status in (500, 501) or code in ("NotImplemented", "InternalFailure", "UnknownOperationException",
                                        "InvalidAction", "UnsupportedOperation"):
        # moto's error code is the status again ("500"): say it once.
        return f"HTTP {status}" + (f" {code}" if code and code != str(status) else "")
    return None


def redrive_native(sqs: SqsClient, plan: RedrivePlan, *, rate: float | None = None, poll_seconds: float = 2.0,
                   sleep: Callable[[float], None] = time.sleep, cancel_wait_seconds: float = 30.0,
                   progress: Progress | None = None) -> RedriveResult:
    """StartMessageMoveTask, then follow ListMessageMoveTasks until it ends. Ctrl-C cancels the
    task (CancelMessageMoveTask), waits for it to stop and returns with result.interrupted set."""
    import botocore.exceptions as bx

    result = RedriveResult(source=plan.source.name, destination=plan.destination.name, mode="native")
    kwargs: dict[str, Any] = {"SourceArn": plan.source_arn, "DestinationArn": plan.destination_arn}
    if rate:
        kwargs["MaxNumberOfMessagesPerSecond"] = max(1, min(500, int(rate)))
    try:
        handle = sqs.start_message_move_task(**kwargs)["TaskHandle"]
    except (bx.BotoCoreError, bx.ClientError) as exc:
        unsupported = _native_unsupported(exc)
        if unsupported is not None:
            raise NativeUnsupported(f"StartMessageMoveTask answered {unsupported}") from None
        raise aws_error(exc, f"start a move task on {plan.source.name!r} (is one already running? "
                             "`aws sqs list-message-move-tasks`)") from None
    log.info("native move task started: %s -> %s", plan.source.name, plan.destination.name)
    task: dict[str, Any] = {}
    try:
        while True:
            task = _native_status(sqs, plan, handle)
            to_move = task.get("ApproximateNumberOfMessagesToMove")
            if progress:
                progress(int(task.get("ApproximateNumberOfMessagesMoved", 0)),
                         None if to_move is None else int(to_move))
            if task.get("Status") in NATIVE_TERMINAL:
                log.info("move task %s: %s of %s moved", task.get("Status"),
                         task.get("ApproximateNumberOfMessagesMoved", 0), to_move if to_move is not None else "?")
                break
            log.debug("move task %s: %s of %s moved", task.get("Status"),
                      task.get("ApproximateNumberOfMessagesMoved", 0), to_move if to_move is not None else "?")
            sleep(poll_seconds)
    except KeyboardInterrupt:
        log.warning("interrupted: cancelling the move task (messages already moved stay moved)")
        try:
            sqs.cancel_message_move_task(TaskHandle=handle)
        except Exception as exc:  # noqa: BLE001 - tell the operator how to cancel it by hand
            log.warning("cancel failed (%s): cancel it with `aws sqs cancel-message-move-task --task-handle %s`",
                        exc, handle)
        deadline = time.monotonic() + cancel_wait_seconds
        while time.monotonic() < deadline:
            task = _native_status(sqs, plan, handle)
            if task.get("Status") in NATIVE_TERMINAL:
                break
            sleep(min(poll_seconds, 1.0))
        result.interrupted = True
    _fill_native(result, task)
    return result


def _native_status(sqs: SqsClient, plan: RedrivePlan, handle: str) -> dict[str, Any]:
    results = call("follow the move task", sqs.list_message_move_tasks, SourceArn=plan.source_arn,
                   MaxResults=10).get("Results", [])
    for r in results:
        if r.get("TaskHandle") in (None, handle):
            return r
    return results[0] if results else {}


def _fill_native(result: RedriveResult, task: dict[str, Any]) -> None:
    result.moved = int(task.get("ApproximateNumberOfMessagesMoved", 0))
    to_move = task.get("ApproximateNumberOfMessagesToMove")
    if task.get("Status") == "FAILED":
        result.failure_reason = task.get("FailureReason") or "the move task failed without a reason"
        result.failed = max(0, int(to_move or 0) - result.moved)
    elif task.get("Status") in ("CANCELLED", "CANCELLING", "RUNNING"):
        result.failure_reason = f"move task {task['Status'].lower()}"
        result.skipped = max(0, int(to_move or 0) - result.moved)


# ---------------------------------------------------------------------------------- client


def _send_attributes(msg: Message) -> dict[str, dict[str, Any]]:
    """Message attributes as SendMessage wants them (receive adds empty list fields)."""
    out = {}
    for name, value in (msg.get("MessageAttributes") or {}).items():
        out[name] = {k: v for k, v in value.items() if k in ("DataType", "StringValue", "BinaryValue")}
    return out


def redrive_client(sqs: SqsClient, plan: RedrivePlan, *, limit: int | None = None, rate: float | None = None,
                   task: str | None = None, dry_run: bool = False, hold_seconds: int = DEFAULT_HOLD_SECONDS,
                   sleep: Callable[[float], None] = time.sleep, progress: Progress | None = None) -> RedriveResult:
    """Receive in batches, send to the destination preserving body and attributes, delete only
    what was sent. --task moves only that task's messages; the others are held (invisible) until
    the end of the run so the loop does not receive them again, then made visible again at once."""
    result = RedriveResult(source=plan.source.name, destination=plan.destination.name, mode="client",
                           dry_run=dry_run)
    held: dict[str, Message] = {}  # message id -> newest received copy; released at the end
    handled: set[str] = set()  # ids moved, failed or (dry run) counted
    skipped_ids: set[str] = set()
    remaining: float = limit if limit is not None else math.inf
    per_batch = BATCH if not rate else max(1, min(BATCH, int(rate)))
    started = time.monotonic()
    is_fifo = plan.destination.url.endswith(".fifo")
    would = 0
    # What the bar counts toward: unknown when --task picks some of them.
    total = None if task is not None else (min(plan.visible, limit) if limit is not None else plan.visible)
    try:
        while remaining > 0:
            batch = receive(sqs, plan.source, int(min(per_batch, remaining)), hold_seconds)
            to_move: list[Message] = []
            first_seen = 0
            for m in batch:
                mid = m["MessageId"]
                if mid in held or mid in handled or mid in result.sent_ids:
                    held[mid] = m  # its hold ran out, or it came back: keep holding it (newer receipt handle)
                    continue
                first_seen += 1
                if task is not None and getattr(decode(m.get("Body", "")), "task", None) != task:
                    held[mid] = m
                    skipped_ids.add(mid)
                    continue
                to_move.append(m)
            if not first_seen:
                break  # empty, or only messages this run has already dealt with
            for m in to_move[int(min(remaining, len(to_move))):]:
                held[m["MessageId"]] = m  # over --limit
                skipped_ids.add(m["MessageId"])
            to_move = to_move[:int(min(remaining, len(to_move)))]
            if not to_move:
                continue
            handled.update(m["MessageId"] for m in to_move)
            remaining -= len(to_move)
            if dry_run:
                held.update((m["MessageId"], m) for m in to_move)
                would += len(to_move)
                continue
            _move_batch(sqs, plan, to_move, is_fifo, result)
            log.debug("moved %d, failed %d, skipped %d", result.moved, result.failed, len(skipped_ids))
            if progress:
                progress(result.moved + result.failed, total)
            if rate:
                # Pace on the running total so a slow batch is not followed by a burst.
                wait = started + (result.moved + result.failed) / rate - time.monotonic()
                if wait > 0:
                    sleep(wait)
    except KeyboardInterrupt:
        # Whatever was sent is deleted or will reappear; nothing in hand is lost.
        log.warning("interrupted: stopping after %d moved", result.moved)
        result.interrupted = True
    finally:
        release(sqs, plan.source, list(held.values()))
    result.skipped = len(skipped_ids)
    if dry_run:
        result.would_move = would
    return result


def _move_batch(sqs: SqsClient, plan: RedrivePlan, messages: list[Message], is_fifo: bool,
                result: RedriveResult) -> int:
    entries = []
    for i, m in enumerate(messages):
        entry: dict[str, Any] = {"Id": str(i), "MessageBody": m["Body"]}
        attrs = _send_attributes(m)
        if attrs:
            entry["MessageAttributes"] = attrs
        if is_fifo:
            entry["MessageGroupId"] = m.get("Attributes", {}).get("MessageGroupId", "redrive")
            entry["MessageDeduplicationId"] = m["MessageId"]
        entries.append(entry)
    try:
        resp = sqs.send_message_batch(QueueUrl=plan.destination.url, Entries=entries)
    except Exception as exc:  # noqa: BLE001 - whatever went wrong, the originals must go back
        # Nothing was (knowingly) sent: give the messages back to the DLQ at once.
        log.warning("send to %s failed (%s): %d message(s) stay in the DLQ", plan.destination.name,
                    exc, len(messages))
        release(sqs, plan.source, messages)
        result.failed += len(messages)
        return 0
    sent = [messages[int(s["Id"])] for s in resp.get("Successful", [])]
    result.sent_ids.update(s["MessageId"] for s in resp.get("Successful", []) if s.get("MessageId"))
    failed = [messages[int(f["Id"])] for f in resp.get("Failed", [])]
    for f in resp.get("Failed", []):
        log.warning("message %s not sent: %s %s", messages[int(f["Id"])]["MessageId"], f.get("Code"),
                    f.get("Message", ""))
    if failed:
        release(sqs, plan.source, failed)
        result.failed += len(failed)
    # Only now, with the copies safely in the destination, delete the originals.
    for i in range(0, len(sent), BATCH):
        chunk = sent[i:i + BATCH]
        try:
            dresp = sqs.delete_message_batch(QueueUrl=plan.source.url, Entries=[
                {"Id": str(j), "ReceiptHandle": m["ReceiptHandle"]} for j, m in enumerate(chunk)])
            not_deleted = len(dresp.get("Failed", []))
        except Exception as exc:  # noqa: BLE001 - a failed delete is a duplicate, never a loss
            log.warning("delete from %s failed (%s)", plan.source.name, exc)
            not_deleted = len(chunk)
        if not_deleted:
            log.warning("%d message(s) were copied but not deleted from %s: they reappear there as duplicates "
                        "(the worker runs a task once; succeeded rows are acked)", not_deleted, plan.source.name)
    result.moved += len(sent)
    for m in sent:
        task_id = getattr(decode(m.get("Body", "")), "task_id", None)
        if task_id:
            result.moved_task_ids.append(task_id)
    return len(sent)


# --------------------------------------------------------------------------------- redrive


def redrive(aws: Aws, plan: RedrivePlan, *, limit: int | None = None, rate: float | None = None,
            task: str | None = None, dry_run: bool = False,
            hold_seconds: int = DEFAULT_HOLD_SECONDS, progress: Progress | None = None) -> RedriveResult:
    """Run the plan in its mode. A native move the endpoint turns out not to have (it could not
    be checked when planning) falls back to the client mode unless --mode native asked for it."""
    if dry_run:
        if plan.mode == "client":
            result = redrive_client(aws.sqs, plan, limit=limit, task=task, dry_run=True, hold_seconds=hold_seconds)
        else:
            # Native moves everything visible; the DLQ is not touched to find that out.
            result = RedriveResult(source=plan.source.name, destination=plan.destination.name, mode=plan.mode,
                                   dry_run=True, would_move=plan.visible)
        return result
    if plan.mode == "native":
        try:
            return redrive_native(aws.sqs, plan, rate=rate, progress=progress)
        except NativeUnsupported as exc:
            if plan.requested_mode == "native":
                raise OpsError(f"this SQS endpoint does not implement the native move task ({exc}): use --mode "
                               "client (moto lacks it; AWS and LocalStack have it)", EXIT_UNREACHABLE) from None
            log.warning("the native move task is not available after all (%s): moving messages client-side", exc)
            plan.mode = "client"
    return redrive_client(aws.sqs, plan, limit=limit, rate=rate, task=task, hold_seconds=hold_seconds,
                          progress=progress)
