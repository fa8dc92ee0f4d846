"""The one place an SQS client is made: explicit timeouts and attempt counts, the standard AWS
settings, and dummy keys for a local endpoint.

Every boto3 SQS client of the product (submitter, relay, worker heartbeats and start-up checks,
ops) comes from `make_client`. kombu's own consumer (the worker's receive/delete/visibility
calls) is configured from the same Settings in pcelery.celeryconfig.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from botocore.exceptions import BotoCoreError

from pcelery.settings import Settings


@dataclass(frozen=True)
class Timeouts:
    """botocore's connect and read timeouts (seconds) and its total attempts (the first included)."""

    connect: float
    read: float
    attempts: int


# The submitter's publish after COMMIT: one attempt, so a commit returns within 1.5 s (connect
# 0.5 s + read 1 s) when SQS refuses, hangs or answers 5xx; what is not sent stays pending and the
# relay sends it. SendMessage normally answers in milliseconds.
SUBMIT = Timeouts(connect=0.5, read=1.0, attempts=1)
# The relay works in the background and retries on its own schedule: more patience per call.
RELAY = Timeouts(connect=2, read=5, attempts=3)
# The worker's heartbeats and start-up checks: a beat must end well inside the heartbeat interval.
WORKER = Timeouts(connect=1, read=2, attempts=2)
# kombu's blocking client in the worker's main loop (DeleteMessage, requeues): a stalled call
# stalls every task of the worker, and a failed delete costs only a duplicate delivery.
KOMBU = Timeouts(connect=1, read=3, attempts=1)
# ops: an operator waits for an answer; 1 s long polls must fit in a read.
OPS = Timeouts(connect=5, read=30, attempts=3)


def sqs_timeouts(timeouts: Timeouts) -> dict[str, Any]:
    """The same numbers as botocore Config keyword arguments (kombu's `client-config`)."""
    return {"connect_timeout": timeouts.connect, "read_timeout": timeouts.read,
            "retries": {"total_max_attempts": timeouts.attempts, "mode": "standard"}}


class NotSQS(BotoCoreError):
    """The endpoint answered, but not as SQS does: a web server, a proxy page, another service.
    A BotoCoreError, so every caller handles it like an endpoint it cannot use."""

    fmt = ("the endpoint {endpoint} does not answer like SQS (HTTP {status}, content type {content_type!r}: "
           "{start}): check AWS_ENDPOINT_URL_SQS / AWS_ENDPOINT_URL (or --endpoint-url)")


def _answers_like_sqs(http_response: Any, **_: Any) -> None:
    """botocore `after-call` hook: SQS answers JSON (or XML on its query protocol). Anything else
    below 500 would otherwise parse as an empty answer and fail later with a KeyError. A 500, 502,
    503 or 504 page stays a ClientError, which callers treat as a transient outage; 501 (a server
    that has no such method) and 505 never are."""
    content_type = http_response.headers.get("Content-Type", "")
    transient = http_response.status_code in (500, 502, 503, 504)
    if not transient and not ("json" in content_type or "xml" in content_type):
        parts = urlsplit(http_response.url or "")
        start = " ".join((http_response.content or b"")[:80].decode("utf-8", "replace").split())
        raise NotSQS(endpoint=f"{parts.scheme}://{parts.netloc}", status=http_response.status_code,
                     content_type=content_type, start=start or "empty")


def make_client(settings: Settings | None = None, *, endpoint_url: str | None = None, region: str | None = None,
                timeouts: Timeouts = SUBMIT, session: Any = None) -> Any:
    """A boto3 SQS client. Endpoint, region and local keys come from `settings` unless given;
    `session` (ops's boto3 Session, for --profile) is used when given."""
    import boto3
    from botocore.config import Config

    endpoint = endpoint_url or (settings.sqs_endpoint if settings else None)
    config = Config(**sqs_timeouts(timeouts))
    kwargs: dict[str, Any] = {"config": config, "region_name": region or (settings.region if settings else None)}
    if endpoint:
        kwargs["endpoint_url"] = endpoint
        credentials = settings.local_credentials if settings else None
        has_own = session is not None and session.get_credentials() is not None
        if not has_own:
            kwargs["aws_access_key_id"] = credentials.access_key_id if credentials else "local"
            kwargs["aws_secret_access_key"] = credentials.secret_access_key if credentials else "local"
    client = (session or boto3).client("sqs", **kwargs)
    client.meta.events.register("after-call.sqs", _answers_like_sqs)
    return client
