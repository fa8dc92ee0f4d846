"""Celery settings of the worker: derived from the environment (pcelery.settings) and the queue
catalog, never a second list of queues or timings. One setting per line, each with its reason.

Celery loads this module (pcelery.worker: config_from_object) the first time the app's
configuration is read, which looks up the catalog queues' URLs on SQS: a queue that does not
exist stops the process here with a message naming it.
"""

from __future__ import annotations

import sys

from pcelery import startup
from pcelery.catalog import LONG_POLL_SECONDS, queue_prefix
from pcelery.settings import Settings, SettingsError, WorkerSettings
from pcelery.sqs import KOMBU, WORKER, make_client, sqs_timeouts

_settings = Settings.from_env()
try:
    _worker = WorkerSettings.from_env(_settings)
except SettingsError as exc:  # pcelery-worker checked these already; this is `celery worker` run by hand
    print(f"worker: {exc}", file=sys.stderr)
    raise SystemExit(2) from None
_catalog = _settings.catalog


def _queue_urls() -> dict[str, str]:
    """{SQS queue name: URL} of every catalog queue, by GetQueueUrl (the account is not in the
    environment, and the send/consume grants include sqs:GetQueueUrl). pcelery-worker waited
    for SQS already; a failure here (`celery worker` run by hand) is one line and exit 3 or 4."""
    try:
        return startup.queue_urls(_settings, make_client(_settings, timeouts=WORKER))
    except (startup.Refused, startup.Unreachable) as exc:
        raise SystemExit(startup.exit_for("worker", exc)) from None


def _predefined_queue(url: str) -> dict[str, str]:
    entry = {"url": url}
    if _settings.local_credentials:
        # A local endpoint takes the local stack's dummy keys; on AWS, omitting them lets boto3
        # use the task role's credentials.
        entry["access_key_id"] = _settings.local_credentials.access_key_id
        entry["secret_access_key"] = _settings.local_credentials.secret_access_key
    return entry


# --- Broker: SQS, with every queue predefined ------------------------------------------------
broker_url = "sqs://"  # endpoint from AWS_ENDPOINT_URL_SQS (boto3 and kombu's curl client honour it), else AWS
# kombu's SQS transport with a channel that survives receive errors, malformed messages and a
# store outage (kombu 5.7 exits the worker on each; pcelery/celery_internals.py).
broker_transport = "pcelery.celery_internals:PersistentTransport"
broker_connection_retry_on_startup = True  # a slow network at boot is retried, not fatal
broker_transport_options = {
    # Predefined queues: no ListQueues/CreateQueue (least privilege; a missing queue is an error,
    # never silently auto-created without a redrive policy). Keys are the canonical names.
    "predefined_queues": {name: _predefined_queue(url) for name, url in _queue_urls().items()},
    "queue_name_prefix": queue_prefix(_settings.env),  # Celery queue "default" -> pcelery-<env>-default
    "region": _settings.region,  # same region as every other AWS call of the process
    # Long poll below kombu's 20 s curl timeout; it is also how long a requeued message (worker
    # lost, hard time limit) stays hidden, so never longer than the shortest visibility timeout.
    "wait_time_seconds": min(LONG_POLL_SECONDS, *(q.visibility_timeout for q in _catalog)),
    # kombu waits this after an empty poll AND whenever every pool slot is busy, so a full
    # worker refills a freed slot only this often (0.25 s capped 4 slots at ~15 tasks/s, see
    # bench/RESULTS.md). 0 would busy-spin the main loop while the pool is full.
    "polling_interval": 0.05,
    # kombu's blocking boto3 client (DeleteMessage, requeues, GetQueueAttributes) runs on the event
    # loop: botocore's default 60 s timeouts and retries would stall every task of the worker for
    # minutes while SQS hangs. A failed delete costs a duplicate delivery, which the claim acks.
    "client-config": sqs_timeouts(KOMBU),
}

# --- Queues and routing -----------------------------------------------------------------------
task_default_queue = _catalog.default_queue  # the implicit "celery" queue is not predefined
task_routes = ("pcelery.worker.route_task",)  # each task's queue comes from its persistent_task declaration
imports = _worker.task_modules  # PCELERY_TASK_MODULES: the modules whose tasks this worker runs

# --- Delivery semantics (ARCHITECTURE.md, "The task's life") ---------------------------------
task_acks_late = True  # delete the message only after the task finished: a crash means redelivery
task_acks_on_failure = False  # a failed task is rejected and left for SQS to redeliver, then DLQ
task_acks_on_timeout = False  # a hard time limit kill is requeued too, never silently deleted
task_reject_on_worker_lost = True  # a SIGKILLed pool child's task comes back instead of being lost
# Prefetch = concurrency: with late acks, a prefetched message waits invisible behind running
# tasks while its visibility timeout runs out (and nothing heartbeats it); 1 keeps every received
# message running, at the cost of one ReceiveMessage per batch of free slots.
worker_prefetch_multiplier = 1
worker_concurrency = _worker.concurrency  # pcelery-worker passes the same number

# --- Serialization: JSON only (SQS carries the id; the payload is JSON in the store) ---------
task_serializer = "json"  # never pickle: a message must not be able to run code
result_serializer = "json"  # results are JSON in the store too
accept_content = ["json"]  # anything else is rejected (and so left for the DLQ)

# --- Results ----------------------------------------------------------------------------------
result_backend = _worker.result_backend  # optional Redis; None disables it (the row holds the result)
task_ignore_result = _worker.result_backend is None  # no backend: do not even try to store results

# --- Worker process -----------------------------------------------------------------------------
worker_consumer = "pcelery.celery_internals:PersistentConsumer"  # undecodable messages go to the DLQ, not the bin
worker_hijack_root_logger = False  # keep the application's own log handlers
worker_enable_remote_control = False  # SQS has no broadcast: the pidbox queue would be undefined
worker_send_task_events = False  # no event consumer on SQS (Flower shows nothing); the store is the record
