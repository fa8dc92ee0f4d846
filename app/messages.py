"""The one Celery-on-SQS wire format: what the submitter and the relay send, and what ops reads.

The product sends Celery messages with boto3 directly instead of through Celery's producer, so
the submitter and the relay need neither the worker's dependencies (pycurl) nor a Celery app,
and the relay can use SendMessageBatch. The message carries only the task id and name: the
payload lives in the claim-check row, so the body is tiny and the same for every task.

The body is exactly what Celery 5.7's producer puts on SQS through kombu's transport (checked
byte for byte against `app.send_task` on a moto queue; tests/test_outbox.py parses our bodies
with kombu's own SQS channel and Celery's Request, so a drift in either breaks a test):

    SQS Body = base64( JSON envelope )          kombu: sqs_base64_encoding (default True)
    envelope = {"body": base64(JSON [args, kwargs, embed]), "content-encoding": "utf-8",
                "content-type": "application/json", "headers": {Celery protocol 2 headers},
                "properties": {"correlation_id": id, "delivery_info": {"exchange": "",
                "routing_key": <Celery queue name>}, "body_encoding": "base64", ...}}

`routing_key` must be the Celery (catalog) queue name, e.g. "default", not the SQS name: kombu
acks through `predefined_queues[queue_name_prefix + routing_key]`, so a prefixed routing key
would make every ack fail with UndefinedQueueException.

No Celery ETA is ever set: a countdown becomes SQS DelaySeconds, so a worker never holds a
message in memory past its visibility timeout.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import os
import re
import socket
import uuid
from dataclasses import dataclass, field
from typing import Any

from pcelery.catalog import parse_queue_name

CONTENT_TYPE = "application/json"


def routing_key(queue: str) -> str:
    """The Celery queue name a message must carry for a catalog name or an SQS name
    ("pcelery-prod-default" -> "default")."""
    parsed = parse_queue_name(queue)
    return parsed.queue if parsed else queue


def _origin() -> str:
    # What Celery's anon_nodename() gives a producer; shows up in worker logs as the sender.
    return f"gen{os.getpid()}@{socket.gethostname()}"


def encode_body(task_id: str, task_name: str, *, queue: str) -> str:
    """The SQS MessageBody for one task: Celery protocol 2, args [] and kwargs {} (the worker
    reads the payload from the row). `queue` is the catalog queue name (an SQS queue name, with
    its environment prefix, is mapped back to it)."""
    if not queue:
        raise ValueError("encode_body needs the queue: pass queue=<catalog queue name>")
    if not task_id or not task_name:
        raise ValueError("encode_body needs a task_id and a task_name")
    inner = json.dumps([[], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
    envelope = {
        "body": base64.b64encode(inner.encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": CONTENT_TYPE,
        "headers": {
            "lang": "py",
            "task": task_name,
            "id": task_id,
            "shadow": None,
            "eta": None,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": 0,
            "timelimit": [None, None],  # the worker's catalog-derived limits apply
            "root_id": task_id,
            "parent_id": None,
            "argsrepr": "()",
            "kwargsrepr": "{}",
            "origin": _origin(),
            "ignore_result": None,  # None: the task's own ignore_result setting applies
            "replaced_task_nesting": 0,
            "stamped_headers": None,
            "stamps": {},
        },
        "properties": {
            "correlation_id": task_id,
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": routing_key(queue)},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    return base64.b64encode(json.dumps(envelope).encode()).decode()


@dataclass(frozen=True)
class DecodedMessage:
    task: str
    task_id: str
    # None when the inner body cannot be read as Celery's [args, kwargs, embed]: another content
    # type (a pickled message), or a JSON content type over a body that is not that JSON.
    args: list[Any] | None
    kwargs: dict[str, Any] | None
    headers: dict[str, Any] = field(default_factory=dict)
    queue: str | None = None  # Celery queue name from delivery_info.routing_key
    content_type: str | None = None


def _maybe_b64(text: str) -> str:
    """kombu accepts both base64 and raw JSON bodies; so do we."""
    stripped = text.strip()
    if stripped.startswith("{"):
        return stripped
    try:
        return base64.b64decode(stripped, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return text


def decode_body(body: str | bytes) -> DecodedMessage | None:
    """The Celery task in an SQS body, or None when it is not a Celery protocol-2 message
    (ops then shows the raw body). Never raises.

    The task name and id come from the envelope's headers, so a message whose inner body is
    damaged (not base64, not JSON, not [args, kwargs, ...]) still decodes, with args and kwargs
    None: that is exactly the poison message ops must be able to name."""
    try:
        if isinstance(body, bytes):
            body = body.decode("utf-8")
        envelope = json.loads(_maybe_b64(body))
        if not isinstance(envelope, dict):
            return None
        headers = envelope.get("headers")
        if not isinstance(headers, dict) or not headers.get("task") or not headers.get("id"):
            return None
        raw_properties = envelope.get("properties")
        properties: dict[str, Any] = raw_properties if isinstance(raw_properties, dict) else {}
        raw_info = properties.get("delivery_info")
        delivery_info: dict[str, Any] = raw_info if isinstance(raw_info, dict) else {}
        content_type = envelope.get("content-type")
        args, kwargs = _task_arguments(envelope, properties) if content_type == CONTENT_TYPE else (None, None)
        return DecodedMessage(
            task=str(headers["task"]),
            task_id=str(headers["id"]),
            args=args,
            kwargs=kwargs,
            headers=headers,
            queue=delivery_info.get("routing_key"),
            content_type=content_type,
        )
    except Exception:  # noqa: BLE001 - garbage in a DLQ must never take ops or a worker down
        return None


def _task_arguments(envelope: dict[str, Any],
                    properties: dict[str, Any]) -> tuple[list[Any] | None, dict[str, Any] | None]:
    """(args, kwargs) from a JSON envelope's inner body, or (None, None) when it is not what it
    claims to be."""
    inner = envelope.get("body")
    if not isinstance(inner, str):
        return None, None
    try:
        if properties.get("body_encoding") == "base64":
            inner = base64.b64decode(inner).decode(envelope.get("content-encoding") or "utf-8")
        parsed = json.loads(inner)
    except (binascii.Error, ValueError, LookupError):  # LookupError: an unknown content-encoding
        return None, None
    if isinstance(parsed, list) and len(parsed) >= 2 and isinstance(parsed[0], list) and isinstance(parsed[1], dict):
        return parsed[0], parsed[1]
    return None, None


# --- What a worker accepts -------------------------------------------------------------------

_B64 = re.compile(r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$")


def _kombu_text(body: str) -> str:
    """The envelope text kombu's SQS transport reads: base64-decoded when the body is strict
    base64 of UTF-8 text, else the body as it is (kombu accepts both)."""
    candidate = body.strip()
    if not _B64.fullmatch(candidate):
        return body
    try:
        return base64.b64decode(candidate, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return body


def _json(text: str | bytes) -> tuple[Any, str | None]:
    try:
        return json.loads(text), None
    except RecursionError:
        return None, "nested too deeply to decode"
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        return None, f"not JSON ({exc})"


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, int | float) else type(value).__name__)


def envelope_problem(body: str | bytes) -> str | None:
    """Why no worker can ever run this SQS message body, or None when it is a well-formed Celery
    protocol-2 JSON message (whose task may still be unknown or whose row missing: the worker
    decides those). The one definition of what a worker accepts: the worker's transport sends
    what this refuses to the DLQ before kombu or Celery parse it, and `ops peek` shows the same
    reason. Never raises."""
    try:
        return _envelope_problem(body)
    except Exception as exc:  # noqa: BLE001 - a checker that crashes on garbage would be the bug
        return f"unreadable ({type(exc).__name__}: {exc})"


def _envelope_problem(body: str | bytes) -> str | None:
    if isinstance(body, bytes):
        try:
            body = body.decode("utf-8")
        except UnicodeDecodeError:
            return "the message is not UTF-8 text"
    if not body.strip():
        return "the message is empty"
    envelope, error = _json(_kombu_text(body))
    if error:
        return f"the envelope is {error}: not a Celery message (a Celery message is base64 of a JSON envelope)"
    if not isinstance(envelope, dict):
        return f"the envelope is {_kind(envelope)}, not a JSON object"
    properties = envelope.get("properties")
    if not isinstance(properties, dict):
        return "the envelope has no properties object: not a Celery message" if properties is None \
            else f"properties is {_kind(properties)}, not an object"
    encoding = properties.get("body_encoding")
    if encoding not in (None, "base64"):
        return f"unknown body_encoding {encoding!r} (kombu knows base64)"
    info = properties.get("delivery_info")
    if info is not None and not isinstance(info, dict):
        return f"properties.delivery_info is {_kind(info)}, not an object"
    if isinstance(info, dict) and not isinstance(info.get("routing_key", ""), str | type(None)):
        return "properties.delivery_info.routing_key is not a string"
    headers = envelope.get("headers")
    if not isinstance(headers, dict):
        return "the envelope has no headers object: not a Celery protocol-2 message" if headers is None \
            else f"headers is {_kind(headers)}, not an object"
    for key in ("task", "id"):
        value = headers.get(key)
        if not isinstance(value, str) or not value.strip():
            return f"headers.{key} is {'missing' if value is None else _kind(value)}: a task needs a name and an id"
    problem = _header_problem(headers)
    if problem:
        return problem
    content_type = envelope.get("content-type")
    if content_type != CONTENT_TYPE:
        return f"content type {content_type!r} is not accepted: workers run JSON messages only (no pickle)"
    content_encoding = envelope.get("content-encoding")
    if content_encoding not in (None, "utf-8"):
        return f"content encoding {content_encoding!r} is not utf-8"
    inner = envelope.get("body")
    if not isinstance(inner, str):
        return f"the body is {_kind(inner)}, not a string"
    raw: str | bytes = inner
    if encoding == "base64":
        try:
            raw = base64.b64decode(inner, validate=True)
        except (binascii.Error, ValueError):
            return "the body is not valid base64 although body_encoding says so"
    parsed, error = _json(raw)
    if error:
        return f"the body is {error}"
    if not (isinstance(parsed, list) and len(parsed) == 3 and isinstance(parsed[0], list)
            and isinstance(parsed[1], dict) and isinstance(parsed[2], dict | type(None))):
        return "the body is not Celery's [args, kwargs, embed]"
    return None


def _header_problem(headers: dict[str, Any]) -> str | None:
    for key in ("eta", "expires"):
        value = headers.get(key)
        if value is None or (isinstance(value, int | float) and key == "expires"):
            continue
        if not isinstance(value, str):
            return f"headers.{key} is {_kind(value)}, not a date"
        try:
            dt.datetime.fromisoformat(value)
        except ValueError:
            return f"headers.{key}={value[:40]!r} is not an ISO 8601 date"
    limits = headers.get("timelimit")
    if limits is not None and not (isinstance(limits, list) and len(limits) == 2
                                   and all(v is None or isinstance(v, int | float) for v in limits)):
        return "headers.timelimit is not [soft, hard] seconds"
    retries = headers.get("retries")
    if retries is not None and not (isinstance(retries, int) and not isinstance(retries, bool) and retries >= 0):
        return "headers.retries is not a count"
    for key in ("root_id", "parent_id", "group", "shadow", "argsrepr", "kwargsrepr", "origin"):
        value = headers.get(key)
        if value is not None and not isinstance(value, str):
            return f"headers.{key} is {_kind(value)}, not a string"
    return None

