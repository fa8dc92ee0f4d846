"""The baseline: a plain Celery app on the same SQS queue, configured like the product's worker
(app/celeryconfig.py) minus persistence: predefined queue, late acks, prefetch 1, the same long
poll and polling interval, JSON only. Tasks are submitted with bare `.delay()`.

The worker (`celery -A bench.plain_app worker`) reads its queue URL from BENCH_PLAIN_QUEUE_URL and
its endpoint from AWS_ENDPOINT_URL_SQS, like the product's worker; the bench's submitting
process builds its own app with `make_app(queue_url, broker_url)` for each endpoint it uses.
"""

from __future__ import annotations

import os

from celery import Celery

from pcelery.catalog import CATALOG, LONG_POLL_SECONDS, queue_prefix, sqs_queue_name

ENV = "local"
QUEUE = CATALOG.default_queue
TASK_NAME = "bench.add"


def make_app(queue_url: str, broker_url: str = "sqs://") -> Celery:
    app = Celery("bench_plain")
    app.conf.update(
        broker_url=broker_url,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "predefined_queues": {
                sqs_queue_name(ENV, QUEUE): {
                    "url": queue_url,
                    "access_key_id": os.environ.get("AWS_ACCESS_KEY_ID", "local"),
                    "secret_access_key": os.environ.get("AWS_SECRET_ACCESS_KEY", "local"),
                }
            },
            "queue_name_prefix": queue_prefix(ENV),
            "region": os.environ.get("AWS_REGION", "us-east-1"),
            # The product's values (app/celeryconfig.py) for the real catalog.
            "wait_time_seconds": min(LONG_POLL_SECONDS, *(q.visibility_timeout for q in CATALOG)),
            # The product's 0.05 s (app/celeryconfig.py) unless BENCH_PLAIN_POLLING_INTERVAL says
            # otherwise (an experiment:
            # how much of a worker's rate under a backlog this one setting decides).
            "polling_interval": float(os.environ.get("BENCH_PLAIN_POLLING_INTERVAL", "0.05")),
        },
        task_default_queue=QUEUE,
        task_acks_late=True,
        task_acks_on_failure=False,
        task_acks_on_timeout=False,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,  # the product without a result backend stores no Celery results either
        worker_hijack_root_logger=False,
        worker_enable_remote_control=False,
        worker_send_task_events=False,
    )

    @app.task(name=TASK_NAME, shared=False)  # one app per endpoint in the bench process
    def add(x, y):
        return x + y

    return app


app = make_app(os.environ.get("BENCH_PLAIN_QUEUE_URL", ""))
