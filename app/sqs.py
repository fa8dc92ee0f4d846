"""The one place an SQS client is made: explicit timeouts and attempt counts, the standard AWS
settings, and dummy keys for a local endpoint.

Every boto3 SQS client of the product (submitter, relay, worker heartbeats and start-up checks,
ops) comes from `make_client`. kombu's own consumer (the worker's receive/delete/visibility
calls) is configured from the same Settings in pcelery.celeryconfig.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pcelery.settings import Settings


@dataclass(frozen=True)
class Timeouts:
    """botocore's connect and read timeouts (seconds) and its total attempts (the first included)."""

    connect: float
    read: float
    attempts: int


# The submitter, relay and worker: a down endpoint must cost a commit about a second, not the
# SDK's default minutes of retries; what is not sent stays pending for the relay.
SUBMIT = Timeouts(connect=2, read=5, attempts=3)
# ops: an operator waits for an answer; 1 s long polls must fit in a read.
OPS = Timeouts(connect=5, read=30, attempts=3)


def make_client(settings: Settings | None = None, *, endpoint_url: str | None = None, region: str | None = None,
                timeouts: Timeouts = SUBMIT, session: Any = None) -> Any:
    """A boto3 SQS client. Endpoint, region and local keys come from `settings` unless given;
    `session` (ops's boto3 Session, for --profile) is used when given."""
    import boto3
    from botocore.config import Config

    endpoint = endpoint_url or (settings.sqs_endpoint if settings else None)
    config = Config(connect_timeout=timeouts.connect, read_timeout=timeouts.read,
                    retries={"total_max_attempts": timeouts.attempts, "mode": "standard"})
    kwargs: dict[str, Any] = {"config": config, "region_name": region or (settings.region if settings else None)}
    if endpoint:
        kwargs["endpoint_url"] = endpoint
        credentials = settings.local_credentials if settings else None
        has_own = session is not None and session.get_credentials() is not None
        if not has_own:
            kwargs["aws_access_key_id"] = credentials.access_key_id if credentials else "local"
            kwargs["aws_secret_access_key"] = credentials.secret_access_key if credentials else "local"
    return (session or boto3).client("sqs", **kwargs)
