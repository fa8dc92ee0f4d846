"""SQS operations for on-call: resolve a queue, depth, peek, redrive (native or client), purge.

Functions take a boto3 SQS client and return plain data; nothing here prints. Progress goes
through the `ops` logger (the CLI sends it to stderr). AWS failures become OpsError with an exit
code and a sentence saying what to do.

Safety rules that hold for every function here:
- peek never consumes: every received message is made visible again (ChangeMessageVisibility 0).
- client redrive sends first and deletes second, and deletes only what was sent, so killing it
  at any moment can duplicate a message but never lose one.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from pcelery.catalog import Catalog, sqs_queue_name
from pcelery.settings import Settings

from . import (
    EXIT_AUTH,
    EXIT_NOT_FOUND,
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    OpsError,
)

log = logging.getLogger("ops")

BATCH = 10  # SQS batch limit for receive, send, delete and change-visibility
# How long a message moved by the client redrive stays invisible in the DLQ between its receive
# and its delete. If the process dies in between, the message reappears after this.
DEFAULT_HOLD_SECONDS = 60
NATIVE_TERMINAL = ("COMPLETED", "CANCELLED", "FAILED")


# --------------------------------------------------------------------------------- clients


@dataclass
class Aws:
    """The boto3 session and clients a command uses, built from the standard AWS settings."""

    session: object
    sqs: object
    endpoint: str | None
    region: str

    @property
    def local(self) -> bool:
        # A custom endpoint is moto or LocalStack: no CloudWatch metrics exist there.
        return self.endpoint is not None

    def cloudwatch(self):
        return self.session.client("cloudwatch", region_name=self.region, config=_config())


def _config():
    from botocore.config import Config

    from pcelery.sqs import OPS

    return Config(retries={"total_max_attempts": OPS.attempts, "mode": "standard"}, connect_timeout=OPS.connect,
                  read_timeout=OPS.read)


def connect(settings: Settings, *, profile: str | None = None, region: str | None = None,
            endpoint_url: str | None = None) -> Aws:
    """Clients for a command: --profile/--region/--endpoint-url, else the standard AWS settings.
    An endpoint (a local emulator) without credentials gets the emulators' dummy keys."""
    import boto3
    import botocore.exceptions

    from pcelery.settings import DEFAULT_REGION
    from pcelery.sqs import OPS, make_client

    endpoint = endpoint_url or settings.sqs_endpoint
    try:
        session = boto3.Session(profile_name=profile, region_name=region)
    except botocore.exceptions.ProfileNotFound as exc:
        raise OpsError(f"{exc}: check --profile / AWS_PROFILE (aws configure list-profiles)", EXIT_AUTH) from None
    region = region or settings.aws_region or session.region_name
    if not region:
        if endpoint:
            region = DEFAULT_REGION
        else:
            raise OpsError("no AWS region configured: pass --region or set AWS_REGION", EXIT_AUTH)
    sqs = make_client(settings, endpoint_url=endpoint, region=region, timeouts=OPS, session=session)
    return Aws(session=session, sqs=sqs, endpoint=endpoint, region=region)


def aws_error(exc: Exception, what: str) -> OpsError:
    """The one-line, actionable form of a botocore failure while doing `what`."""
    import botocore.exceptions as bx

    if isinstance(exc, OpsError):
        return exc
    if isinstance(exc, (bx.SSOError, bx.TokenRetrievalError, bx.CredentialRetrievalError)):
        return OpsError(f"{what}: the AWS session cannot be used ({exc}): run `aws sso login` for the profile "
                        "and retry", EXIT_AUTH)
    if isinstance(exc, bx.NoRegionError):
        return OpsError(f"{what}: no AWS region configured: pass --region or set AWS_REGION", EXIT_AUTH)
    if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError)):
        return OpsError(f"{what}: no AWS credentials found: run `aws sso login --profile <profile>` and pass "
                        "--profile (or set AWS_PROFILE), or export AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY",
                        EXIT_AUTH)
    if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ReadTimeoutError)):
        return OpsError(f"{what}: cannot reach the SQS endpoint ({exc}): check --endpoint-url / "
                        "AWS_ENDPOINT_URL_SQS, the network or VPN, and --region (for the local stack: "
                        "`python -m ops local status`)", EXIT_UNREACHABLE)
    if isinstance(exc, bx.ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        message = exc.response.get("Error", {}).get("Message", "") or str(exc)
        if code in ("AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"):
            return OpsError(f"{what}: queue not found: check the name, --env and --region "
                            "(`python -m ops depth --env <env>` lists the catalog queues)", EXIT_NOT_FOUND)
        if code in ("AccessDenied", "AccessDeniedException", "UnrecognizedClientException", "InvalidClientTokenId",
                    "ExpiredToken", "ExpiredTokenException", "InvalidSecurityToken",
                    "SignatureDoesNotMatch", "AuthFailure"):
            return OpsError(f"{what}: AWS refused the credentials ({code}: {message}): refresh them "
                            "(`aws sso login`) or use a role allowed to do this", EXIT_AUTH)
        return OpsError(f"{what}: AWS error {code or exc.response.get('ResponseMetadata', {}).get('HTTPStatusCode')}: "
                        f"{message}", EXIT_UNREACHABLE)
    if isinstance(exc, bx.BotoCoreError):
        return OpsError(f"{what}: {exc}", EXIT_UNREACHABLE)
    raise exc


def _call(what: str, fn: Callable, **kwargs):
    import botocore.exceptions as bx

    try:
        return fn(**kwargs)
    except (bx.BotoCoreError, bx.ClientError) as exc:
        raise aws_error(exc, what) from None


# ---------------------------------------------------------------------------------- queues


@dataclass(frozen=True)
class QueueRef:
    name: str  # the SQS queue name
    url: str
    catalog_queue: str | None = None  # the catalog queue it belongs to, when it does
    is_catalog_dlq: bool = False


def _catalog_match(name: str, env: str, catalog: Catalog) -> tuple[str | None, bool]:
    for q in catalog.names():
        if name == sqs_queue_name(env, q):
            return q, False
        if name == sqs_queue_name(env, q, dlq=True):
            return q, True
    return None, False


def resolve(sqs, spec: str, *, env: str, catalog: Catalog) -> QueueRef:
    """A queue argument: a catalog queue name (`default`, or `default-dlq` for its DLQ) taken
    with --env, a raw SQS queue name, or a queue URL."""
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
    cat_queue, is_dlq = _catalog_match(name, env, catalog)
    ref = QueueRef(name=name, url=url, catalog_queue=cat_queue, is_catalog_dlq=is_dlq)
    if attrs_check:
        attributes(sqs, ref, ["QueueArn"])
    return ref


def catalog_refs(sqs, *, env: str, catalog: Catalog) -> list[QueueRef]:
    return [resolve(sqs, name, env=env, catalog=catalog) for name in catalog.names()]


def attributes(sqs, ref: QueueRef, names: Iterable[str] = ("All",)) -> dict[str, str]:
    import botocore.exceptions as bx

    try:
        return sqs.get_queue_attributes(QueueUrl=ref.url, AttributeNames=list(names)).get("Attributes", {})
    except (bx.BotoCoreError, bx.ClientError) as exc:
        err = aws_error(exc, f"queue {ref.name!r}")
        if err.exit_code == EXIT_NOT_FOUND:
            err = OpsError(f"queue {ref.name!r} not found at {ref.url}: check the URL, --endpoint-url and --region",
                           EXIT_NOT_FOUND)
        raise err from None


def _ref_from_arn(sqs, arn: str, *, env: str, catalog: Catalog) -> QueueRef:
    name = arn.rsplit(":", 1)[-1]
    url = _call(f"queue {name!r}", sqs.get_queue_url, QueueName=name)["QueueUrl"]
    cat_queue, is_dlq = _catalog_match(name, env, catalog)
    return QueueRef(name=name, url=url, catalog_queue=cat_queue, is_catalog_dlq=is_dlq)


def _counts(attrs: dict) -> dict:
    return {
        "visible": int(attrs.get("ApproximateNumberOfMessages", 0)),
        "in_flight": int(attrs.get("ApproximateNumberOfMessagesNotVisible", 0)),
        "delayed": int(attrs.get("ApproximateNumberOfMessagesDelayed", 0)),
    }


def dead_letter_target(attrs: dict) -> str | None:
    policy = attrs.get("RedrivePolicy")
    if not policy:
        return None
    return json.loads(policy).get("deadLetterTargetArn")


def oldest_age(aws: Aws, queue_name: str) -> float | None:
    """ApproximateAgeOfOldestMessage from CloudWatch (the newest 1-minute maximum); None where
    CloudWatch cannot tell: local endpoints, no datapoints yet, or no permission."""
    if aws.local:
        return None
    now = dt.datetime.now(dt.UTC)
    try:
        points = aws.cloudwatch().get_metric_statistics(
            Namespace="AWS/SQS", MetricName="ApproximateAgeOfOldestMessage",
            Dimensions=[{"Name": "QueueName", "Value": queue_name}],
            StartTime=now - dt.timedelta(minutes=10), EndTime=now, Period=60, Statistics=["Maximum"],
        )["Datapoints"]
    except Exception as exc:  # noqa: BLE001 - an age is a nicety; depth itself must still answer
        log.warning("oldest message age of %s unavailable (%s)", queue_name, exc)
        return None
    if not points:
        return None
    return float(max(points, key=lambda p: p["Timestamp"])["Maximum"])


def depth(aws: Aws, refs: list[QueueRef], *, env: str, catalog: Catalog,
          task_counts: dict[str, dict[str, int]] | None = None) -> list[dict]:
    """Counts of each queue and of its DLQ. task_counts ({catalog queue: {state: n}}, from the
    claim-check store) adds a `tasks` key; None means the database was not reachable."""
    rows = []
    for ref in refs:
        attrs = attributes(aws.sqs, ref)
        row = {"queue": ref.name, "url": ref.url, **_counts(attrs), "oldest_age_seconds": oldest_age(aws, ref.name),
               "dlq": None}
        target = dead_letter_target(attrs)
        if target:
            dlq = _ref_from_arn(aws.sqs, target, env=env, catalog=catalog)
            row["dlq"] = {"queue": dlq.name, "url": dlq.url, **_counts(attributes(aws.sqs, dlq))}
        if task_counts is None or ref.catalog_queue is None:
            row["tasks"] = None
        else:
            row["tasks"] = task_counts.get(ref.catalog_queue) or {}
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------ peek


def _decode(body: str):
    """The Celery message inside a body (app.messages.decode_body), or None."""
    try:
        from pcelery.messages import decode_body
    except ImportError:  # the app side is optional for pure SQS work
        return None
    return decode_body(body)  # None for anything that is not a Celery message; never raises


def _iso_millis(ms: str | None) -> str | None:
    if not ms:
        return None
    return dt.datetime.fromtimestamp(int(ms) / 1000, dt.UTC).isoformat().replace("+00:00", "Z")


def describe_message(msg: dict) -> dict:
    decoded = _decode(msg.get("Body", ""))
    attrs = msg.get("Attributes", {})
    return {
        "message_id": msg["MessageId"],
        "task": getattr(decoded, "task", None),
        "task_id": getattr(decoded, "task_id", None),
        "receive_count": int(attrs["ApproximateReceiveCount"]) if "ApproximateReceiveCount" in attrs else None,
        "sent_at": _iso_millis(attrs.get("SentTimestamp")),
        "attributes": {k: v.get("StringValue", v.get("BinaryValue")) for k, v in
                       (msg.get("MessageAttributes") or {}).items()},
        "body": msg.get("Body", ""),
        "task_row": None,
    }


def _receive(sqs, ref: QueueRef, n: int, hold: int, *, wait: int = 1) -> list[dict]:
    return _call(f"receive from {ref.name!r}", sqs.receive_message, QueueUrl=ref.url,
                 MaxNumberOfMessages=max(1, min(BATCH, n)), VisibilityTimeout=hold, WaitTimeSeconds=wait,
                 AttributeNames=["All"], MessageSystemAttributeNames=["All"],
                 MessageAttributeNames=["All"]).get("Messages", [])


def release(sqs, ref: QueueRef, messages: list[dict]) -> int:
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


def is_work_queue(attrs: dict) -> bool:
    return bool(attrs.get("RedrivePolicy"))


def peek(sqs, ref: QueueRef, *, limit: int = 10, force: bool = False, hold: int = 30) -> list[dict]:
    """Up to `limit` messages, without consuming them.

    Receiving counts toward maxReceiveCount, so peeking a work queue (one with a RedrivePolicy)
    could push its messages into the DLQ: refused unless force."""
    if is_work_queue(attributes(sqs, ref, ["RedrivePolicy"])) and not force:
        raise OpsError(f"{ref.name!r} is a work queue, not a DLQ: peeking counts as a receive and can push its "
                       "messages to the DLQ; peek its DLQ (add -dlq) or pass --force", EXIT_REFUSED)
    received: dict[str, dict] = {}  # message id -> newest copy (its receipt handle is the one that works)
    try:
        while len(received) < limit:
            batch = _receive(sqs, ref, limit - len(received), hold)
            fresh = [m for m in batch if m["MessageId"] not in received]
            received.update((m["MessageId"], m) for m in batch)
            if not fresh:
                break
    finally:
        release(sqs, ref, list(received.values()))
    return [describe_message(m) for m in list(received.values())[:limit]]


# --------------------------------------------------------------------------------- redrive


@dataclass
class RedrivePlan:
    source: QueueRef  # the DLQ
    source_arn: str
    destination: QueueRef
    destination_arn: str
    mode: str  # native or client (auto is resolved when it runs)
    visible: int
    notes: list[str] = field(default_factory=list)


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

    def summary(self) -> dict:
        return {
            "source": self.source, "destination": self.destination, "mode": self.mode,
            "moved": self.moved, "failed": self.failed, "skipped": self.skipped, "dry_run": self.dry_run,
            "would_move": self.would_move, "failure_reason": self.failure_reason,
        }


def plan_redrive(sqs, dlq: QueueRef, *, env: str, catalog: Catalog, to: QueueRef | None = None,
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
    sources = _call(f"list the source queues of {dlq.name!r}", sqs.list_dead_letter_source_queues,
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
            names = ", ".join(u.rsplit("/", 1)[-1] for u in sources) or "none"
            raise OpsError(f"cannot pick a destination for {dlq.name!r}: its source queues are {names}; "
                           "pass --to QUEUE", EXIT_REFUSED)
        destination = QueueRef(name=sources[0].rsplit("/", 1)[-1], url=sources[0],
                               **dict(zip(("catalog_queue", "is_catalog_dlq"),
                                          _catalog_match(sources[0].rsplit("/", 1)[-1], env, catalog))))
    else:
        destination = to
        if to.url not in sources and to.name not in [u.rsplit("/", 1)[-1] for u in sources]:
            if not force:
                raise OpsError(f"{to.name!r} is not a source queue of {dlq.name!r} (sources: "
                               f"{', '.join(u.rsplit('/', 1)[-1] for u in sources) or 'none'}): messages would "
                               "land where they were never sent; pass --force if that is really meant",
                               EXIT_REFUSED)
            notes.append(f"--force: {to.name} is not a source of {dlq.name}")
    if destination.url == dlq.url:
        raise OpsError("source and destination are the same queue: pick another --to", EXIT_REFUSED)
    if mode == "auto" and (task or limit):
        mode = "client"
    return RedrivePlan(
        source=dlq, source_arn=attrs["QueueArn"], destination=destination,
        destination_arn=attributes(sqs, destination, ["QueueArn"])["QueueArn"], mode=mode,
        visible=int(attrs.get("ApproximateNumberOfMessages", 0)), notes=notes,
    )


class NativeUnsupported(Exception):
    """The endpoint does not implement StartMessageMoveTask (moto answers HTTP 500)."""


def _native_unsupported(exc) -> bool:
    import botocore.exceptions as bx

    if isinstance(exc, bx.ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        # moto answers 500; UnsupportedOperation is AWS's answer for queues the move task cannot
        # serve (FIFO): in both cases the client-side move still works.
        return status in (500, 501) or code in ("NotImplemented", "InternalFailure", "UnknownOperationException",
                                                "InvalidAction", "UnsupportedOperation")
    return False


def redrive_native(sqs, plan: RedrivePlan, *, rate: float | None = None, poll_seconds: float = 2.0,
                   sleep: Callable[[float], None] = time.sleep, cancel_wait_seconds: float = 30.0) -> RedriveResult:
    """StartMessageMoveTask, then follow ListMessageMoveTasks until it ends. Ctrl-C cancels the
    task (CancelMessageMoveTask), waits for it to stop and returns with result.interrupted set."""
    import botocore.exceptions as bx

    result = RedriveResult(source=plan.source.name, destination=plan.destination.name, mode="native")
    kwargs = {"SourceArn": plan.source_arn, "DestinationArn": plan.destination_arn}
    if rate:
        kwargs["MaxNumberOfMessagesPerSecond"] = max(1, min(500, int(rate)))
    try:
        handle = sqs.start_message_move_task(**kwargs)["TaskHandle"]
    except (bx.BotoCoreError, bx.ClientError) as exc:
        if _native_unsupported(exc):
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = exc.response.get("Error", {}).get("Code", "")
            # moto's error code is the status again ("500"): say it once.
            detail = f"HTTP {status}" + (f" {code}" if code and code != str(status) else "")
            raise NativeUnsupported(f"StartMessageMoveTask answered {detail}") from None
        raise aws_error(exc, f"start a move task on {plan.source.name!r} (is one already running? "
                             "`aws sqs list-message-move-tasks`)") from None
    log.info("native move task started: %s -> %s", plan.source.name, plan.destination.name)
    status: dict = {}
    try:
        while True:
            status = _native_status(sqs, plan, handle)
            log.info("move task %s: %s of %s moved", status.get("Status"),
                     status.get("ApproximateNumberOfMessagesMoved", 0),
                     status.get("ApproximateNumberOfMessagesToMove", "?"))
            if status.get("Status") in NATIVE_TERMINAL:
                break
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
            status = _native_status(sqs, plan, handle)
            if status.get("Status") in NATIVE_TERMINAL:
                break
            sleep(min(poll_seconds, 1.0))
        result.interrupted = True
    _fill_native(result, status)
    return result


def _native_status(sqs, plan: RedrivePlan, handle: str) -> dict:
    results = _call("follow the move task", sqs.list_message_move_tasks, SourceArn=plan.source_arn,
                    MaxResults=10).get("Results", [])
    for r in results:
        if r.get("TaskHandle") in (None, handle):
            return r
    return results[0] if results else {}


def _fill_native(result: RedriveResult, status: dict) -> None:
    result.moved = int(status.get("ApproximateNumberOfMessagesMoved", 0))
    to_move = status.get("ApproximateNumberOfMessagesToMove")
    if status.get("Status") == "FAILED":
        result.failure_reason = status.get("FailureReason") or "the move task failed without a reason"
        result.failed = max(0, int(to_move or 0) - result.moved)
    elif status.get("Status") in ("CANCELLED", "CANCELLING", "RUNNING"):
        result.failure_reason = f"move task {status['Status'].lower()}"
        result.skipped = max(0, int(to_move or 0) - result.moved)


def _send_attributes(msg: dict) -> dict:
    """Message attributes as SendMessage wants them (receive adds empty list fields)."""
    out = {}
    for name, value in (msg.get("MessageAttributes") or {}).items():
        out[name] = {k: v for k, v in value.items() if k in ("DataType", "StringValue", "BinaryValue")}
    return out


def redrive_client(sqs, plan: RedrivePlan, *, limit: int | None = None, rate: float | None = None,
                   task: str | None = None, dry_run: bool = False, hold_seconds: int = DEFAULT_HOLD_SECONDS,
                   sleep: Callable[[float], None] = time.sleep) -> RedriveResult:
    """Receive in batches, send to the destination preserving body and attributes, delete only
    what was sent. --task moves only that task's messages; the others are held (invisible) until
    the end of the run so the loop does not receive them again, then made visible again at once."""
    result = RedriveResult(source=plan.source.name, destination=plan.destination.name, mode="client",
                           dry_run=dry_run)
    held: dict[str, dict] = {}  # message id -> newest received copy; released at the end
    handled: set[str] = set()  # ids moved, failed or (dry run) counted
    skipped_ids: set[str] = set()
    remaining = limit if limit is not None else math.inf
    per_batch = BATCH if not rate else max(1, min(BATCH, int(rate)))
    started = time.monotonic()
    is_fifo = plan.destination.url.endswith(".fifo")
    would = 0
    try:
        while remaining > 0:
            batch = _receive(sqs, plan.source, int(min(per_batch, remaining)), hold_seconds)
            to_move, first_seen = [], 0
            for m in batch:
                mid = m["MessageId"]
                if mid in held or mid in handled:
                    held[mid] = m  # its hold ran out: keep holding it, with the newer receipt handle
                    continue
                first_seen += 1
                if task is not None and getattr(_decode(m.get("Body", "")), "task", None) != task:
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
            log.info("moved %d, failed %d, skipped %d", result.moved, result.failed, len(skipped_ids))
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


def _move_batch(sqs, plan: RedrivePlan, messages: list[dict], is_fifo: bool, result: RedriveResult) -> int:
    entries = []
    for i, m in enumerate(messages):
        entry = {"Id": str(i), "MessageBody": m["Body"]}
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
        task_id = getattr(_decode(m.get("Body", "")), "task_id", None)
        if task_id:
            result.moved_task_ids.append(task_id)
    return len(sent)


def redrive(aws: Aws, plan: RedrivePlan, *, limit: int | None = None, rate: float | None = None,
            task: str | None = None, dry_run: bool = False,
            hold_seconds: int = DEFAULT_HOLD_SECONDS) -> RedriveResult:
    if dry_run:
        if plan.mode == "client":
            result = redrive_client(aws.sqs, plan, limit=limit, task=task, dry_run=True, hold_seconds=hold_seconds)
        else:
            # Native moves everything visible; the DLQ is not touched to find that out.
            result = RedriveResult(source=plan.source.name, destination=plan.destination.name, mode=plan.mode,
                                   dry_run=True, would_move=plan.visible)
        return result
    if plan.mode in ("native", "auto"):
        try:
            return redrive_native(aws.sqs, plan, rate=rate)
        except NativeUnsupported as exc:
            if plan.mode == "native":
                raise OpsError(f"this SQS endpoint does not implement the native move task ({exc}): use --mode "
                               "client (moto lacks it; AWS and LocalStack have it)", EXIT_UNREACHABLE) from None
            log.info("native redrive not available at this endpoint (%s): moving messages client-side", exc)
    return redrive_client(aws.sqs, plan, limit=limit, rate=rate, task=task, hold_seconds=hold_seconds)


# ----------------------------------------------------------------------------------- purge


def purge(sqs, ref: QueueRef) -> dict:
    attrs = attributes(sqs, ref)
    counts = _counts(attrs)
    _call(f"purge {ref.name!r}", sqs.purge_queue, QueueUrl=ref.url)
    return {"queue": ref.name, "url": ref.url, "purged_approximately": counts["visible"] + counts["in_flight"]
            + counts["delayed"], **{f"before_{k}": v for k, v in counts.items()}}
