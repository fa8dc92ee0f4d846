"""The queue catalog: every Celery queue and its operating contract, in one place, and the one
mapping between catalog names and AWS resource names.

Pure data and the standard library only, so infra/ (CDK), the runtime (Celery) and ops (on-call
CLI) can all import it without dragging each other's dependencies along. Data flows one way: from
here into infra, the runtime and ops; nothing here imports them.

The contract of a queue is checked when the catalog is built (import time for the default
catalog), so a contract that cannot hold fails synth, worker start and the tests alike.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

APP_NAME = "pcelery"  # prefix of every stack, queue and alarm name: <app>-<env>-<resource>

# Environments the CDK app deploys, plus "local" for the moto/LocalStack stack on a laptop.
ENVIRONMENTS = ("local", "dev", "staging", "prod")

# SQS hard limits (see FIELD-NOTES.md, "SQS quotas").
SQS_MAX_VISIBILITY = 12 * 3600
SQS_MIN_RETENTION = 60
SQS_MAX_RETENTION = 14 * 24 * 3600
SQS_MAX_DELAY = 15 * 60
# The longest countdown/ETA a contract may allow: a task due later is held in the store
# (`scheduled`) and published by the relay when it is due, so only the store bounds it.
MAX_COUNTDOWN = 365 * 24 * 3600
SQS_MAX_RECEIVE_COUNT = (1, 1000)
SQS_MAX_NAME_LENGTH = 80
DLQ_RETENTION = SQS_MAX_RETENTION  # a dead task must outlive any weekend

# Slack between the end of the longest uncovered run and the message becoming visible again:
# worker start-up, DB claim, result write and the DeleteMessage call all happen inside it.
VISIBILITY_MARGIN = 30
# Where heartbeats are on, the visibility timeout must survive this many missed beats.
HEARTBEAT_BEATS_PER_TIMEOUT = 3

_NAME_RE = re.compile(r"^[a-z][a-z0-9-]*$")


class CatalogError(ValueError):
    """A queue contract that cannot hold. The message names the queue, the field and the fix."""


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How a failed attempt is retried, on a queue's contract or on one task. A failure whose
    exception `retry_on` names comes back after a backoff (the worker shortens its message's
    visibility to it) instead of after a whole visibility timeout: backoff, 2 x backoff, 4 x ...
    capped at backoff_max, with jitter (each delay drawn from its upper half). Any other exception,
    or the failure of the last of `max_attempts`, dead-letters at once: the worker sends the
    message to the DLQ itself rather than spending the remaining receives.

    retry_on: exception classes, or their names (`"TimeoutError"`, `"requests.ConnectionError"`:
    matched against the class and its bases), so a catalog names them without importing them."""

    max_attempts: int
    retry_on: tuple[type[BaseException] | str, ...] = (Exception,)
    backoff: float = 1.0
    backoff_max: float = 60.0
    jitter: bool = True

    def problems(self, max_receive_count: int) -> Iterator[str]:
        if not 1 <= self.max_attempts <= max_receive_count:
            yield (f"retry.max_attempts={self.max_attempts} must be 1..max_receive_count={max_receive_count}: "
                   "SQS dead-letters a message after maxReceiveCount receives, so more attempts never happen; "
                   "lower max_attempts or raise max_receive_count")
        if not 0 < self.backoff <= self.backoff_max:
            yield (f"retry.backoff={self.backoff} must be above 0 and at most backoff_max={self.backoff_max}: "
                   "fix the pair")
        if self.backoff_max > SQS_MAX_VISIBILITY:
            yield (f"retry.backoff_max={self.backoff_max} exceeds the {SQS_MAX_VISIBILITY} s a message can be "
                   "held invisible: lower it")
        if not self.retry_on:
            yield "retry.retry_on is empty: name the exceptions that retry, e.g. (TimeoutError,)"

    def retries(self, exc: BaseException) -> bool:
        """True when `exc` is one of retry_on (by class, or by name along its class's bases)."""
        names = {n for cls in type(exc).__mro__ for n in (cls.__name__, f"{cls.__module__}.{cls.__qualname__}")}
        return any(isinstance(exc, k) if isinstance(k, type) else k in names for k in self.retry_on)

    def delay(self, attempt: int, draw: float = 1.0) -> float:
        """Seconds before attempt + 1, given a uniform draw in [0, 1) for the jitter."""
        ceiling = min(self.backoff_max, self.backoff * 2 ** max(0, attempt - 1))
        return ceiling / 2 + ceiling / 2 * draw if self.jitter else ceiling


@dataclass(frozen=True, kw_only=True)
class QueueContract:
    """One Celery queue (an SQS queue plus its DLQ) and the promises made about it.

    All durations are in seconds.
    """

    name: str
    description: str
    visibility_timeout: int
    max_receive_count: int
    retention: int
    soft_time_limit: int
    hard_time_limit: int
    max_countdown: int
    # A heartbeat extends the message's visibility (and the row's lease) while the task runs,
    # so a task may run longer than the visibility timeout without being delivered twice.
    # Without it the visibility timeout has to cover the whole hard time limit.
    heartbeat: bool = False
    # Worker sizing for the service that consumes this queue.
    concurrency: int = 2
    min_workers: int = 0
    max_workers: int = 4
    backlog_per_worker: int = 20  # scaling target: visible messages per running worker task
    visibility_margin: int = VISIBILITY_MARGIN
    # Backoff retries for every task of the queue (a task's own policy replaces it); None: a
    # failure comes back after the visibility timeout, up to max_receive_count receives.
    retry: RetryPolicy | None = None

    @property
    def heartbeat_interval(self) -> int:
        """Seconds between heartbeats: a third of the visibility timeout."""
        return max(1, self.visibility_timeout // HEARTBEAT_BEATS_PER_TIMEOUT)

    @property
    def uncovered_run(self) -> int:
        """Longest time a received message goes without its visibility being extended."""
        return self.heartbeat_interval if self.heartbeat else self.hard_time_limit

    def oldest_message_alarm_seconds(self) -> int:
        """Age of the oldest visible message that means the queue is not being served.

        A message may legitimately wait for its countdown and then for one full run of a task
        ahead of it; beyond that plus the visibility timeout, workers are not keeping up.
        """
        return max(300, min(self.max_countdown, SQS_MAX_DELAY) + self.visibility_timeout + self.uncovered_run)

    def validate(self) -> None:
        problems = list(self._problems())
        if problems:
            raise CatalogError(
                f"queue {self.name!r}: " + "; ".join(problems)
            )

    def _problems(self):
        if not _NAME_RE.match(self.name):
            yield (
                f"name {self.name!r} is not valid: use lower-case letters, digits and '-', "
                "starting with a letter (it becomes part of the SQS queue name)"
            )
        for fld in ("visibility_timeout", "soft_time_limit", "hard_time_limit", "retention",
                    "concurrency", "max_workers", "backlog_per_worker"):
            if getattr(self, fld) <= 0:
                yield f"{fld}={getattr(self, fld)} must be positive: set it above 0"
        if self.max_countdown < 0 or self.min_workers < 0:
            yield "max_countdown and min_workers must not be negative: set them to 0 or more"
        if not 0 < self.visibility_timeout <= SQS_MAX_VISIBILITY:
            yield (
                f"visibility_timeout={self.visibility_timeout} is outside SQS's 1..{SQS_MAX_VISIBILITY}: "
                "pick a value in that range (enable heartbeat for longer tasks)"
            )
        lo, hi = SQS_MAX_RECEIVE_COUNT
        if not lo <= self.max_receive_count <= hi:
            yield (
                f"max_receive_count={self.max_receive_count} is outside SQS's {lo}..{hi}: "
                f"pick a value in that range"
            )
        if not SQS_MIN_RETENTION <= self.retention <= SQS_MAX_RETENTION:
            yield (
                f"retention={self.retention} is outside SQS's {SQS_MIN_RETENTION}..{SQS_MAX_RETENTION}: "
                "pick a value in that range"
            )
        if self.soft_time_limit >= self.hard_time_limit:
            yield (
                f"soft_time_limit={self.soft_time_limit} must be below hard_time_limit="
                f"{self.hard_time_limit}: the soft limit is the task's chance to clean up"
            )
        needed = self.uncovered_run + self.visibility_margin
        if self.visibility_timeout < needed:
            if self.heartbeat:
                yield (
                    f"visibility_timeout={self.visibility_timeout} must be at least heartbeat interval "
                    f"{self.heartbeat_interval} + margin {self.visibility_margin} = {needed}: raise visibility_timeout"
                )
            else:
                yield (
                    f"visibility_timeout={self.visibility_timeout} must be at least hard_time_limit "
                    f"{self.hard_time_limit} + margin {self.visibility_margin} = {needed}, or the task is "
                    "delivered again while it still runs: raise visibility_timeout to "
                    f"{needed}, lower hard_time_limit, or set heartbeat=True"
                )
        if self.heartbeat and self.hard_time_limit + self.visibility_margin > SQS_MAX_VISIBILITY:
            yield (
                f"hard_time_limit={self.hard_time_limit} + margin {self.visibility_margin} exceeds the "
                f"{SQS_MAX_VISIBILITY} s SQS allows a message to stay invisible even with heartbeats: "
                "split the task"
            )
        if self.max_countdown > MAX_COUNTDOWN:
            yield (
                f"max_countdown={self.max_countdown} exceeds the {MAX_COUNTDOWN} s (365 days) a task may be "
                "held: lower it"
            )
        if self.retry is not None:
            yield from self.retry.problems(self.max_receive_count)
        if self.min_workers > self.max_workers:
            yield (
                f"min_workers={self.min_workers} exceeds max_workers={self.max_workers}: "
                "raise max_workers or lower min_workers"
            )
        longest = len(sqs_queue_name("staging", self.name, dlq=True))
        if longest > SQS_MAX_NAME_LENGTH:
            yield (
                f"name {self.name!r} makes SQS names of {longest} characters (limit "
                f"{SQS_MAX_NAME_LENGTH}): shorten it"
            )

    # --- What the SQS queue and its DLQ get. One code path for CDK and the local stack. ---

    def sqs_attributes(self, dlq_arn: str) -> dict[str, str]:
        """CreateQueue/SetQueueAttributes attributes of the work queue (the local stack uses
        these verbatim; the CDK construct asserts its numbers against the same properties)."""
        return {
            "VisibilityTimeout": str(self.visibility_timeout),
            "MessageRetentionPeriod": str(self.retention),
            "ReceiveMessageWaitTimeSeconds": str(LONG_POLL_SECONDS),
            "RedrivePolicy": json.dumps(
                {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": self.max_receive_count}
            ),
        }

    def dlq_attributes(self, source_arn: str | None = None) -> dict[str, str]:
        attrs = {"MessageRetentionPeriod": str(DLQ_RETENTION)}
        if source_arn:
            attrs["RedriveAllowPolicy"] = json.dumps(
                {"redrivePermission": "byQueue", "sourceQueueArns": [source_arn]}
            )
        return attrs


# Long poll per ReceiveMessage. kombu's curl client times out at 20 s and reads that as empty,
# so stay below it (FIELD-NOTES.md).
LONG_POLL_SECONDS = 19


@dataclass(frozen=True)
class Catalog:
    queues: tuple[QueueContract, ...]
    default_queue: str = "default"
    _by_name: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_by_name", {q.name: q for q in self.queues})
        if not self.queues:
            raise CatalogError("catalog has no queues: add at least one QueueContract")
        if len(self._by_name) != len(self.queues):
            names = [q.name for q in self.queues]
            dupes = sorted({n for n in names if names.count(n) > 1})
            raise CatalogError(f"queue names must be unique: {dupes} appear more than once")
        for q in self.queues:
            q.validate()
        if self.default_queue not in self._by_name:
            raise CatalogError(
                f"default_queue {self.default_queue!r} is not in the catalog "
                f"({sorted(self._by_name)}): set it to one of them"
            )

    def __iter__(self) -> Iterator[QueueContract]:
        return iter(self.queues)

    def __len__(self) -> int:
        return len(self.queues)

    def names(self) -> list[str]:
        return [q.name for q in self.queues]

    def get(self, name: str) -> QueueContract:
        try:
            return self._by_name[name]
        except KeyError:
            raise CatalogError(
                f"unknown queue {name!r}: the catalog has {sorted(self._by_name)}"
            ) from None


def check_env(env: str) -> str:
    if env not in ENVIRONMENTS:
        raise CatalogError(f"unknown environment {env!r}: use one of {', '.join(ENVIRONMENTS)}")
    return env


# --- Names: the one mapping between catalog names and AWS resource names ----------------------

def resource_name(env: str, *parts: str) -> str:
    """`<app>-<env>[-<part>...]`: the name of every stack, queue, service, alarm and secret."""
    return "-".join((APP_NAME, check_env(env), *parts))


def queue_prefix(env: str) -> str:
    """kombu's queue_name_prefix: Celery queue 'default' in prod is SQS queue 'pcelery-prod-default'."""
    return resource_name(env) + "-"


DLQ_SUFFIX = "-dlq"


def sqs_queue_name(env: str, queue: str, *, dlq: bool = False) -> str:
    return f"{queue_prefix(env)}{queue}" + (DLQ_SUFFIX if dlq else "")


@dataclass(frozen=True)
class QueueName:
    """What an SQS queue name (or URL) says about itself: see `parse_queue_name`."""

    env: str | None  # None when the name carries no environment prefix
    queue: str  # the catalog (Celery) queue name
    dlq: bool


def parse_queue_name(name: str, *, catalog: Catalog | None = None) -> QueueName | None:
    """The inverse of `sqs_queue_name`, for an SQS name, a queue URL or a bare catalog name
    (`default`, `default-dlq`): "pcelery-prod-long-dlq" -> QueueName("prod", "long", dlq=True).
    With a catalog, a name whose queue is not in it gives None; without one, any name parses."""
    name = name.rstrip("/").rsplit("/", 1)[-1]
    env = None
    for candidate in ENVIRONMENTS:
        prefix = queue_prefix(candidate)
        if name.startswith(prefix):
            env, name = candidate, name[len(prefix):]
            break
    queue, dlq = (name[: -len(DLQ_SUFFIX)], True) if name.endswith(DLQ_SUFFIX) else (name, False)
    if not queue or (catalog is not None and queue not in catalog.names()):
        return None
    return QueueName(env, queue, dlq)


# The default catalog. Two contracts, so multi-queue paths (routing, per-queue workers,
# per-queue alarms) are exercised everywhere.
CATALOG = Catalog(
    queues=(
        QueueContract(
            name="default",
            description="Short tasks: e-mails, webhooks, small writes.",
            visibility_timeout=120,
            max_receive_count=5,
            retention=4 * 24 * 3600,
            soft_time_limit=60,
            hard_time_limit=75,
            max_countdown=60,
            concurrency=4,
            min_workers=0,
            max_workers=10,
            backlog_per_worker=40,
        ),
        QueueContract(
            name="long",
            description="Long tasks (reports, exports): heartbeats keep them invisible while they run.",
            visibility_timeout=300,
            max_receive_count=3,
            retention=7 * 24 * 3600,
            soft_time_limit=3300,
            hard_time_limit=3600,
            max_countdown=120,
            heartbeat=True,
            concurrency=2,
            min_workers=0,
            max_workers=4,
            backlog_per_worker=4,
        ),
    ),
    default_queue="default",
)


def load_catalog(spec: str | None = None) -> Catalog:
    """The catalog named by ``module:attribute`` (the PCELERY_CATALOG setting), else CATALOG.

    Entry points (worker, relay, ops, local stack) call this; constructs and library code take
    a Catalog argument instead.
    """
    if not spec:
        return CATALOG
    module_name, _, attr = spec.partition(":")
    if not attr or not module_name:
        raise CatalogError(f"catalog spec {spec!r} must look like 'module:ATTRIBUTE', e.g. 'myproject.queues:CATALOG'")
    try:
        found = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise CatalogError(f"catalog spec {spec!r} cannot be loaded ({exc}): check the module and attribute") from None
    if not isinstance(found, Catalog):
        raise CatalogError(f"catalog spec {spec!r} names a {type(found).__name__}, not a Catalog")
    return found
