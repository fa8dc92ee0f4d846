"""SQS queues for on-call: resolve a queue argument, attributes, depth, peek, purge, and the
message helpers redrive shares (receive, release, describe).

Functions take a boto3 SQS client (or ops.aws.Aws) and return plain data; nothing here prints.
Progress goes through the `ops` logger (the CLI sends it to stderr). AWS failures become OpsError
with an exit code and a sentence saying what to do (pcelery.ops.aws).

Safety rule: peek never consumes; every received message is made visible again
(ChangeMessageVisibility 0).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypedDict

from pcelery.catalog import Catalog, parse_queue_name, sqs_queue_name
from pcelery.messages import DecodedMessage, decode_body, envelope_problem
from pcelery.ops import EXIT_NOT_FOUND, EXIT_REFUSED, OpsError
from pcelery.ops.aws import Aws, SqsClient, aws_error, call

log = logging.getLogger("ops")

BATCH = 10  # SQS batch limit for receive, send, delete and change-visibility

# An SQS message as ReceiveMessage returns it (MessageId, ReceiptHandle, Body, Attributes...).
Message = dict[str, Any]


# ------------------------------------------------------------------------------------ data


class QueueCounts(TypedDict):
    visible: int
    in_flight: int
    delayed: int


class DlqDepth(TypedDict):
    queue: str
    url: str
    visible: int
    in_flight: int
    delayed: int


class QueueDepth(TypedDict):
    """One row of `depth` (the keys in the order `--output json` shows them)."""

    queue: str
    url: str
    visible: int
    in_flight: int
    delayed: int
    oldest_age_seconds: float | None
    oldest_age_unavailable: str | None  # why oldest_age_seconds is null (a local endpoint, no datapoints...)
    dlq: DlqDepth | None
    tasks: dict[str, int] | None  # rows per state of its catalog queue; None: not known


class MessageInfo(TypedDict):
    """A peeked message, decoded where it is a Celery message."""

    message_id: str
    task: str | None
    task_id: str | None
    receive_count: int | None
    sent_at: str | None
    attributes: dict[str, Any]
    body: str
    # Why no worker can run the body (pcelery.messages.envelope_problem), None when it is a
    # well-formed Celery message (its task or row may still be the trouble: see the row).
    problem: str | None


class PurgeResult(TypedDict):
    queue: str
    url: str
    purged_approximately: int
    before_visible: int
    before_in_flight: int
    before_delayed: int


# ---------------------------------------------------------------------------------- queues


@dataclass(frozen=True)
class QueueRef:
    name: str  # the SQS queue name
    url: str
    catalog_queue: str | None = None  # the catalog queue it belongs to, when it does
    is_catalog_dlq: bool = False


def queue_ref(name: str, url: str, *, env: str, catalog: Catalog) -> QueueRef:
    """The ref of SQS queue `name`, naming its catalog queue when it is one of `env`'s."""
    parsed = parse_queue_name(name, catalog=catalog)
    if parsed is None or parsed.env != env:
        return QueueRef(name=name, url=url)
    return QueueRef(name=name, url=url, catalog_queue=parsed.queue, is_catalog_dlq=parsed.dlq)


def resolve(sqs: SqsClient, spec: str, *, env: str, catalog: Catalog) -> QueueRef:
    """A queue argument: a catalog queue name (`default`, or `default-dlq` for its DLQ) taken
    with --env, a raw SQS queue name, or a queue URL."""
    url: str | None
    if spec.startswith(("http://", "https://")):
        name = spec.rstrip("/").rsplit("/", 1)[-1]
        url = spec
        attrs_check = True
    else:
        stem, is_dlq = (spec[:-4], True) if spec.endswith("-dlq") else (spec, False)
        name = sqs_queue_name(env, stem, dlq=is_dlq) if stem in catalog.names() else spec
        url = None
        attrs_check = False
    if url is None:
        import botocore.exceptions as bx

        try:
            url = sqs.get_queue_url(QueueName=name)["QueueUrl"]
        except (bx.BotoCoreError, bx.ClientError) as exc:
            err = aws_error(exc, f"queue {spec!r}")
            if err.exit_code == EXIT_NOT_FOUND:
                hint = (f"catalog queues are {', '.join(catalog.names())} (add -dlq for a DLQ)"
                        if name == spec else f"is the {env!r} environment deployed in this region?")
                err = OpsError(f"queue {spec!r} not found (looked for SQS queue {name!r} in env {env!r}): "
                               f"check the name, --env and --region; {hint}", EXIT_NOT_FOUND)
            raise err from None
    ref = queue_ref(name, url, env=env, catalog=catalog)
    if attrs_check:
        attributes(sqs, ref, ["QueueArn"])
    return ref


def catalog_refs(sqs: SqsClient, *, env: str, catalog: Catalog) -> list[QueueRef]:
    return [resolve(sqs, name, env=env, catalog=catalog) for name in catalog.names()]


def attributes(sqs: SqsClient, ref: QueueRef, names: Iterable[str] = ("All",)) -> dict[str, str]:
    import botocore.exceptions as bx

    try:
        return sqs.get_queue_attributes(QueueUrl=ref.url, AttributeNames=list(names)).get("Attributes", {})
    except (bx.BotoCoreError, bx.ClientError) as exc:
        err = aws_error(exc, f"queue {ref.name!r}")
        if err.exit_code == EXIT_NOT_FOUND:
            err = OpsError(f"queue {ref.name!r} not found at {ref.url}: check the URL, --endpoint-url and --region",
                           EXIT_NOT_FOUND)
        raise err from None


def ref_from_arn(sqs: SqsClient, arn: str, *, env: str, catalog: Catalog) -> QueueRef:
    name = arn.rsplit(":", 1)[-1]
    url = call(f"queue {name!r}", sqs.get_queue_url, QueueName=name)["QueueUrl"]
    return queue_ref(name, url, env=env, catalog=catalog)


def counts(attrs: dict[str, str]) -> QueueCounts:
    return {
        "visible": int(attrs.get("ApproximateNumberOfMessages", 0)),
        "in_flight": int(attrs.get("ApproximateNumberOfMessagesNotVisible", 0)),
        "delayed": int(attrs.get("ApproximateNumberOfMessagesDelayed", 0)),
    }


def is_work_queue(attrs: dict[str, str]) -> bool:
    return bool(attrs.get("RedrivePolicy"))


def dead_letter_target(attrs: dict[str, str]) -> str | None:
    policy = attrs.get("RedrivePolicy")
    if not policy:
        return None
    return json.loads(policy).get("deadLetterTargetArn")


# ----------------------------------------------------------------------------------- depth


LOCAL_NO_AGE = "a local endpoint has no CloudWatch metrics (on AWS: the age of the oldest message, from CloudWatch)"


def oldest_age(aws: Aws, queue_name: str) -> float | None:
    """ApproximateAgeOfOldestMessage from CloudWatch (the newest 1-minute maximum); None where
    CloudWatch cannot tell: local endpoints, no datapoints yet, or no permission."""
    return oldest_age_and_why(aws, queue_name)[0]


def oldest_age_and_why(aws: Aws, queue_name: str) -> tuple[float | None, str | None]:
    """(age, None), or (None, why there is no age)."""
    if aws.local:
        return None, LOCAL_NO_AGE
    now = dt.datetime.now(dt.UTC)
    try:
        points = aws.cloudwatch().get_metric_statistics(
            Namespace="AWS/SQS", MetricName="ApproximateAgeOfOldestMessage",
            Dimensions=[{"Name": "QueueName", "Value": queue_name}],
            StartTime=now - dt.timedelta(minutes=10), EndTime=now, Period=60, Statistics=["Maximum"],
        )["Datapoints"]
    except Exception as exc:  # noqa: BLE001 - an age is a nicety; depth itself must still answer
        log.warning("oldest message age of %s unavailable (%s)", queue_name, exc)
        return None, f"CloudWatch did not answer ({type(exc).__name__}): see the warning above"
    if not points:
        return None, "no CloudWatch datapoints in the last 10 minutes (a new or idle queue; metrics lag minutes)"
    return float(max(points, key=lambda p: p["Timestamp"])["Maximum"]), None


def depth(aws: Aws, refs: list[QueueRef], *, env: str, catalog: Catalog,
          task_counts: dict[str, dict[str, int]] | None = None) -> list[QueueDepth]:
    """Counts of each queue and of its DLQ. task_counts ({catalog queue: {state: n}}, from the
    claim-check store) fills `tasks`; None means the database was not reachable."""
    rows: list[QueueDepth] = []
    for ref in refs:
        attrs = attributes(aws.sqs, ref)
        age, why = oldest_age_and_why(aws, ref.name)
        row: QueueDepth = {"queue": ref.name, "url": ref.url, **counts(attrs), "oldest_age_seconds": age,
                           "oldest_age_unavailable": why, "dlq": None, "tasks": None}
        target = dead_letter_target(attrs)
        if target:
            dlq = ref_from_arn(aws.sqs, target, env=env, catalog=catalog)
            row["dlq"] = {"queue": dlq.name, "url": dlq.url, **counts(attributes(aws.sqs, dlq))}
        if task_counts is not None and ref.catalog_queue is not None:
            row["tasks"] = task_counts.get(ref.catalog_queue) or {}
        rows.append(row)
    return rows


# -------------------------------------------------------------------------------- messages


def decode(body: str) -> DecodedMessage | None:
    """The Celery message inside a body (pcelery.messages.decode_body), or None. Never raises."""
    return decode_body(body)


def _iso_millis(ms: str | None) -> str | None:
    if not ms:
        return None
    return dt.datetime.fromtimestamp(int(ms) / 1000, dt.UTC).isoformat().replace("+00:00", "Z")


def describe_message(msg: Message) -> MessageInfo:
    decoded = decode(msg.get("Body", ""))
    attrs = msg.get("Attributes", {})
    return {
        "message_id": msg["MessageId"],
        "task": decoded.task if decoded else None,
        "task_id": decoded.task_id if decoded else None,
        "receive_count": int(attrs["ApproximateReceiveCount"]) if "ApproximateReceiveCount" in attrs else None,
        "sent_at": _iso_millis(attrs.get("SentTimestamp")),
        "attributes": {k: v.get("StringValue", v.get("BinaryValue")) for k, v in
                       (msg.get("MessageAttributes") or {}).items()},
        "body": msg.get("Body", ""),
        "problem": envelope_problem(msg.get("Body", "")),
    }


def receive(sqs: SqsClient, ref: QueueRef, n: int, hold: int, *, wait: int = 1) -> list[Message]:
    """Up to n (at most BATCH) messages, each invisible for `hold` seconds."""
    return call(f"receive from {ref.name!r}", sqs.receive_message, QueueUrl=ref.url,
                MaxNumberOfMessages=max(1, min(BATCH, n)), VisibilityTimeout=hold, WaitTimeSeconds=wait,
                AttributeNames=["All"], MessageSystemAttributeNames=["All"],
                MessageAttributeNames=["All"]).get("Messages", [])


def release(sqs: SqsClient, ref: QueueRef, messages: list[Message]) -> int:
    """Make messages visible again at once. Returns how many could not be released (they come
    back by themselves when their visibility timeout ends)."""
    failed = 0
    for i in range(0, len(messages), BATCH):
        chunk = messages[i:i + BATCH]
        try:
            resp = sqs.change_message_visibility_batch(QueueUrl=ref.url, Entries=[
                {"Id": str(j), "ReceiptHandle": m["ReceiptHandle"], "VisibilityTimeout": 0}
                for j, m in enumerate(chunk)])
            failed += len(resp.get("Failed", []))
        except Exception as exc:  # noqa: BLE001 - they come back by themselves; say so and go on
            log.warning("could not make %d message(s) of %s visible again (%s): they reappear after their "
                        "visibility timeout", len(chunk), ref.name, exc)
            failed += len(chunk)
    return failed


# ------------------------------------------------------------------------------------ peek


def peek(sqs: SqsClient, ref: QueueRef, *, limit: int = 10, force: bool = False, hold: int = 30) -> list[MessageInfo]:
    """Up to `limit` messages, without consuming them.

    Receiving counts toward maxReceiveCount, so peeking a work queue (one with a RedrivePolicy)
    could push its messages into the DLQ: refused unless force."""
    if is_work_queue(attributes(sqs, ref, ["RedrivePolicy"])) and not force:
        raise OpsError(f"{ref.name!r} is a work queue, not a DLQ: peeking counts as a receive and can push its "
                       "messages to the DLQ; peek its DLQ (add -dlq) or pass --force", EXIT_REFUSED)
    received: dict[str, Message] = {}  # message id -> newest copy (its receipt handle is the one that works)
    try:
        while len(received) < limit:
            batch = receive(sqs, ref, limit - len(received), hold)
            fresh = [m for m in batch if m["MessageId"] not in received]
            received.update((m["MessageId"], m) for m in batch)
            if not fresh:
                break
    finally:
        release(sqs, ref, list(received.values()))
    return [describe_message(m) for m in list(received.values())[:limit]]


# ----------------------------------------------------------------------------------- purge


def purge(sqs: SqsClient, ref: QueueRef) -> PurgeResult:
    before = counts(attributes(sqs, ref))
    call(f"purge {ref.name!r}", sqs.purge_queue, QueueUrl=ref.url)
    return {"queue": ref.name, "url": ref.url,
            "purged_approximately": before["visible"] + before["in_flight"] + before["delayed"],
            "before_visible": before["visible"], "before_in_flight": before["in_flight"],
            "before_delayed": before["delayed"]}


# ------------------------------------------------------------------------------ DLQ copies

Progress = Callable[[int, int | None], None]  # (done, total or None when not known)


def find_copies(sqs: SqsClient, ref: QueueRef, task_ids: set[str], *, delete: bool, hold: int = 60,
                progress: Progress | None = None) -> int:
    """The messages of `ref` (a DLQ) that carry one of these task ids: deleted (delete=True) or
    only counted. Every other message is held while the scan runs and made visible again at once
    after it. Returns how many were found (and, with delete, deleted)."""
    held: dict[str, Message] = {}  # message id -> newest copy; released at the end
    handled: set[str] = set()
    found = 0
    total = counts(attributes(sqs, ref))["visible"]
    try:
        while True:
            batch = receive(sqs, ref, BATCH, hold)
            fresh = [m for m in batch if m["MessageId"] not in held and m["MessageId"] not in handled]
            for m in batch:
                if m["MessageId"] in held:
                    held[m["MessageId"]] = m  # its hold ran out: keep the newer receipt handle
            if not fresh:
                break
            matches = []
            for m in fresh:
                if getattr(decode(m.get("Body", "")), "task_id", None) in task_ids:
                    matches.append(m)
                else:
                    held[m["MessageId"]] = m
            handled.update(m["MessageId"] for m in matches)
            if delete and matches:
                resp = call(f"delete copies from {ref.name!r}", sqs.delete_message_batch, QueueUrl=ref.url,
                            Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
                                     for i, m in enumerate(matches)])
                failed = {int(f["Id"]) for f in resp.get("Failed", [])}
                for i in sorted(failed):
                    log.warning("could not delete the old copy %s from %s: it stays there",
                                matches[i]["MessageId"], ref.name)
                found += len(matches) - len(failed)
            else:
                held.update((m["MessageId"], m) for m in matches)
                found += len(matches)
            if progress:
                progress(len(set(held) | handled), total)
    finally:
        release(sqs, ref, list(held.values()))
    return found
