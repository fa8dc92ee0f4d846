"""The Celery settings persistent-celery gives an app: derived from the environment
(pcelery.settings) and the queue catalog, never a second list of queues or timings. One setting
per line, each with its reason.

pcelery.worker.configure(app) applies them to the product's own app and to a team's app alike:
- `app_settings`: what every process's copy of the app needs, and costs nothing to compute (no
  network): the transport, delivery semantics, routing, serialization. Applied once the app has
  read its own configuration, over the app's values for these keys only.
- `worker_settings`: what only a worker needs, computed when the worker starts (Celery's
  celeryd_init): the queues' URLs (GetQueueUrl), long polling and client timeouts, the result
  backend. A web process that imports the app never makes these calls.
"""

from __future__ import annotations

import math
import sys
from typing import Any

from pcelery import startup
from pcelery.catalog import LONG_POLL_SECONDS, queue_prefix
from pcelery.settings import Settings, SettingsError, WorkerSettings
from pcelery.sqs import KOMBU, WORKER, make_client, sqs_timeouts

RECEIVE_BATCH = 10  # messages per ReceiveMessage, the SQS maximum


def app_settings(settings: Settings) -> dict[str, Any]:
    return {
        # --- Broker: SQS, through the hardened transport ---------------------------------------
        # The endpoint comes from AWS_ENDPOINT_URL_SQS (boto3 and kombu's curl client honour it), else AWS.
        "broker_url": "sqs://",
        # kombu's SQS transport with a channel that survives receive errors, malformed messages
        # and a store outage (kombu 5.7 exits the worker on each; pcelery/celery_internals.py).
        "broker_transport": "pcelery.celery_internals:PersistentTransport",
        "broker_connection_retry_on_startup": True,  # a slow network at boot is retried, not fatal
        # --- Queues and routing ----------------------------------------------------------------
        "task_default_queue": settings.catalog.default_queue,  # the implicit "celery" queue is not predefined
        "task_routes": ("pcelery.worker.route_task",),  # each task's queue comes from its declaration
        # --- Delivery semantics (ARCHITECTURE.md, "The task's life") -----------------------------
        "task_acks_late": True,  # delete the message only after the task finished: a crash means redelivery
        "task_acks_on_failure": False,  # a failed task is rejected and left for SQS to redeliver, then DLQ
        "task_acks_on_timeout": False,  # a hard time limit kill is requeued too, never silently deleted
        "task_reject_on_worker_lost": True,  # a SIGKILLed pool child's task comes back instead of being lost
        # Prefetch = concurrency until a worker starts (worker_settings sizes it from its queues).
        "worker_prefetch_multiplier": 1,
        # --- Serialization: JSON only (SQS carries the id; the payload is JSON in the store) ---
        "task_serializer": "json",  # never pickle: a message must not be able to run code
        "result_serializer": "json",  # results are JSON in the store too
        "accept_content": ["json"],  # anything else is rejected (and so left for the DLQ)
        # --- Worker process ---------------------------------------------------------------------
        "worker_consumer": "pcelery.celery_internals:PersistentConsumer",  # unreadable messages go to the DLQ
        "worker_hijack_root_logger": False,  # keep the application's own log handlers
        "worker_enable_remote_control": False,  # SQS has no broadcast: the pidbox queue would be undefined
        "worker_send_task_events": False,  # no event consumer on SQS (Flower shows nothing); the store is the record
    }


def receives_in_batches(settings: Settings, worker: WorkerSettings) -> bool:
    """Receive in batches of 10 where messages may wait: the prefetch window then holds the pool's
    concurrency plus a batch, the channel receives only when a whole batch fits, and its
    VisibilityKeeper keeps waiting messages from reappearing (pcelery.celery_internals). Queues with
    heartbeats run long tasks: a message held behind one would starve the other workers, so a
    worker consuming one prefetches only what its pool runs."""
    return not any(settings.catalog.get(q).heartbeat for q in worker.queues)


def prefetch_multiplier(settings: Settings, worker: WorkerSettings) -> int:
    if not receives_in_batches(settings, worker):
        return 1
    return 1 + math.ceil(RECEIVE_BATCH / worker.concurrency)


def worker_settings(settings: Settings, current: Any = None) -> dict[str, Any]:
    """`current`: the app's configuration as it stands (its own result backend is kept when the
    environment names none). Exits with pcelery.startup's codes when it cannot be computed."""
    try:
        worker = WorkerSettings.from_env(settings)
    except SettingsError as exc:  # pcelery-worker checked these already: this is `celery worker` run by hand
        print(f"worker: {exc}", file=sys.stderr)
        raise SystemExit(startup.EXIT_BAD_SETTINGS) from None
    try:
        urls = startup.queue_urls(settings, make_client(settings, timeouts=WORKER))
    except (startup.Refused, startup.Unreachable) as exc:
        raise SystemExit(startup.exit_for("worker", exc)) from None

    def predefined(url: str) -> dict[str, str]:
        entry = {"url": url}
        if settings.local_credentials:
            # A local endpoint takes the local stack's dummy keys; on AWS, omitting them lets boto3
            # use the task role's credentials.
            entry["access_key_id"] = settings.local_credentials.access_key_id
            entry["secret_access_key"] = settings.local_credentials.secret_access_key
        return entry

    result_backend = worker.result_backend or (current.get("result_backend") if current is not None else None)
    batching = receives_in_batches(settings, worker)
    return {
        "broker_transport_options": {
            # Predefined queues: no ListQueues/CreateQueue (least privilege; a missing queue is an
            # error, never silently auto-created without a redrive policy). Keys are canonical names.
            "predefined_queues": {name: predefined(url) for name, url in urls.items()},
            "queue_name_prefix": queue_prefix(settings.env),  # Celery queue "default" -> pcelery-<env>-default
            "region": settings.region,  # same region as every other AWS call of the process
            # Long poll below kombu's 20 s curl timeout; it is also how long a requeued message
            # (worker lost, hard time limit) stays hidden, so never longer than the shortest
            # visibility timeout.
            "wait_time_seconds": min(LONG_POLL_SECONDS, *(q.visibility_timeout for q in settings.catalog)),
            # kombu waits this after an empty poll AND whenever every pool slot is busy, so a full
            # worker refills a freed slot only this often (0.25 s capped 4 slots at ~15 tasks/s,
            # see bench/RESULTS.md). 0 would busy-spin the main loop while the pool is full. Where
            # receives are batched, PersistentChannel looks for 10 free slots every 5 ms instead.
            "polling_interval": 0.05,
            # kombu's blocking boto3 client (requeues, GetQueueAttributes) runs on the event loop:
            # botocore's default 60 s timeouts and retries would stall every task of the worker
            # for minutes while SQS hangs.
            "client-config": sqs_timeouts(KOMBU),
            "pcelery_receive_batch": RECEIVE_BATCH if batching else 1,  # read by PersistentChannel
            "pcelery_ack_linger": worker.ack_linger,  # DeleteMessageBatch fill time (PCELERY_ACK_LINGER)
        },
        "worker_prefetch_multiplier": prefetch_multiplier(settings, worker),  # pcelery-worker passes it too
        "worker_concurrency": worker.concurrency,  # pcelery-worker passes the same number
        # The environment's Redis (PCELERY_RESULT_BACKEND / REDIS_*), else the app's own, else none:
        # the row holds the result either way.
        "result_backend": result_backend,
        "task_ignore_result": result_backend is None,  # no backend: do not even try to store results
    }
