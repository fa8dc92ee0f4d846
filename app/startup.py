"""Start-up checks of the worker and the relay: wait for SQS and the store, refuse what is unsafe.

A process that starts while SQS or the database is unreachable (a deploy during an outage, a
database still booting) waits for them with capped backoff and one log line per attempt, up to
PCELERY_STARTUP_TIMEOUT seconds, then exits with one line and EXIT_UNREACHABLE. What can never
work without a change (a queue missing or without its redrive policy, a schema behind the code)
is refused at once with EXIT_REFUSED. Never a traceback.

Exit codes shared by pcelery-worker and pcelery-relay: 2 bad settings, 3 refused, 4 unreachable.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import sqlalchemy as sa
from botocore.exceptions import BotoCoreError, ClientError

from pcelery import schema
from pcelery.catalog import sqs_queue_name
from pcelery.settings import Settings

EXIT_BAD_SETTINGS = 2
EXIT_REFUSED = 3
EXIT_UNREACHABLE = 4
BACKOFF = (1.0, 15.0)  # first and longest wait between attempts, seconds

T = TypeVar("T")


class Unreachable(Exception):
    """SQS or the store did not answer; worth another attempt."""


class Refused(Exception):
    """Starting would be unsafe or cannot work; the message says what to fix."""


def _reason(exc: BaseException) -> str:
    text = " ".join(str(getattr(exc, "orig", None) or exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


def queue_urls(settings: Settings, client: Any, *, consumed: Iterable[str] = ()) -> dict[str, str]:
    """{SQS name: URL} of every catalog queue (GetQueueUrl). Refused when one does not exist, or
    when a consumed queue has no RedrivePolicy (kombu would silently delete every failed task
    there); Unreachable when SQS does not answer."""
    urls: dict[str, str] = {}
    problems: list[str] = []
    consumed = set(consumed)
    for contract in settings.catalog:
        name = sqs_queue_name(settings.env, contract.name)
        try:
            urls[name] = client.get_queue_url(QueueName=name)["QueueUrl"]
            if contract.name in consumed:
                attributes = client.get_queue_attributes(QueueUrl=urls[name], AttributeNames=["RedrivePolicy"])
                if "RedrivePolicy" not in attributes.get("Attributes", {}):
                    problems.append(
                        f"queue {name!r} has no RedrivePolicy, so kombu would silently delete every failed task "
                        f"there: give it its DLQ ({sqs_queue_name(settings.env, contract.name, dlq=True)!r}) with "
                        "the catalog's maxReceiveCount (deploy the stack; locally `python -m ops local up`)")
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"):
                problems.append(f"SQS queue {name!r} (catalog queue {contract.name!r}, env {settings.env!r}) does "
                                "not exist: deploy the environment's stack (locally: `python -m ops local up`)")
            elif code in ("AccessDenied", "AccessDeniedException", "InvalidClientTokenId", "SignatureDoesNotMatch"):
                problems.append(f"SQS refused the credentials for queue {name!r} ({code}): the role needs "
                                "sqs:GetQueueUrl and sqs:GetQueueAttributes on it")
            else:
                raise Unreachable(f"SQS answered {_reason(exc)}") from None
        except (BotoCoreError, OSError) as exc:
            endpoint = settings.sqs_endpoint or f"AWS SQS in {settings.region}"
            raise Unreachable(f"SQS at {endpoint} does not answer ({_reason(exc)})") from None
    if problems:
        raise Refused("; ".join(problems))
    return urls


def store_is_current(engine: sa.Engine) -> int:
    """The schema version, when the store answers and is current. Refused when it is behind the
    code; Unreachable when it does not answer."""
    where = engine.url.render_as_string(hide_password=True)
    try:
        version = schema.schema_version(engine)
    except sa.exc.SQLAlchemyError as exc:
        raise Unreachable(f"the task store at {where} does not answer ({_reason(exc)})") from None
    finally:
        engine.dispose()  # forked pool children open their own connections
    if version < schema.LATEST_SCHEMA_VERSION:
        raise Refused(f"the task store's schema is at version {version}, the code needs "
                      f"{schema.LATEST_SCHEMA_VERSION}: run `pcelery-migrate`")
    return version


def wait_for(what: str, check: Callable[[], T], *, timeout: float, prog: str,
             sleep: Callable[[float], None] = time.sleep) -> T:
    """check() until it stops raising Unreachable, with capped backoff and a line per attempt on
    stderr; Unreachable again once `timeout` seconds have passed. Refused passes straight through."""
    deadline = time.monotonic() + timeout
    attempt = 0
    while True:
        attempt += 1
        try:
            return check()
        except Unreachable as exc:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Unreachable(f"{exc}; gave up waiting for {what} after {timeout:g} s "
                                  "(PCELERY_STARTUP_TIMEOUT)") from None
            delay = min(left, BACKOFF[1], BACKOFF[0] * 2 ** (attempt - 1))
            print(f"{prog}: waiting for {what} (attempt {attempt}): {exc}; next try in {delay:.0f} s",
                  file=sys.stderr, flush=True)
            sleep(delay)


def wait_for_all(checks: Iterable[tuple[str, Callable[[], Any]]], *, timeout: float, prog: str) -> None:
    """wait_for each check in turn; an Unreachable ends it at once, every refusal is collected
    and raised together, so one fix-and-deploy round is enough."""
    refusals = []
    for what, check in checks:
        try:
            wait_for(what, check, timeout=timeout, prog=prog)
        except Refused as exc:
            refusals.append(str(exc))
    if refusals:
        raise Refused("; ".join(refusals))


def exit_for(prog: str, exc: Refused | Unreachable) -> int:
    """Print the one line and return the documented exit code."""
    if isinstance(exc, Refused):
        print(f"{prog}: refusing to start: {exc}", file=sys.stderr, flush=True)
        return EXIT_REFUSED
    print(f"{prog}: error: {exc}", file=sys.stderr, flush=True)
    return EXIT_UNREACHABLE
