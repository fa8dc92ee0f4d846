"""The baseline: a plain Celery app on the same SQS queue, configured like the product minus
persistence. Tasks are submitted with bare `.delay()`.

Fair by construction: its settings are the product's own, read from pcelery.celeryconfig rather
than copied, so a change to the product's delivery settings (prefetch multiplier, late acks,
long poll, polling interval, client timeouts...) reaches the baseline in the same run:

- `app_settings(settings)`: every key except the product's own hooks (its transport, consumer
  and router, PRODUCT_HOOKS; a value naming a `pcelery.` object is dropped as well).
- `worker_settings(settings)`: applied when a worker starts (Celery's celeryd_init), as the
  product does: the predefined queues (GetQueueUrl), long poll, polling interval, client config,
  concurrency, no result backend.

The worker (`celery -A bench.plain_app worker`, started by the bench with the flags
pcelery-worker gives the product's worker) reads PCELERY_ENV, AWS_ENDPOINT_URL_SQS and the rest
from its environment, like the product's worker. The bench's submitting process builds its own
app with `make_app(queue_url=..., broker_url=...)` for each endpoint it sends to.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, signals

from pcelery import celeryconfig
from pcelery.catalog import queue_prefix, sqs_queue_name
from pcelery.settings import Settings

TASK_NAME = "bench.add"
# The product's own machinery: not part of a plain Celery app.
PRODUCT_HOOKS = ("broker_transport", "worker_consumer", "task_routes")


def _mentions_product(value: Any) -> bool:
    if isinstance(value, str):
        return value.startswith("pcelery.")
    if isinstance(value, (list, tuple)):
        return any(_mentions_product(v) for v in value)
    return False


def plain_settings(settings: Settings) -> tuple[dict[str, Any], list[str]]:
    """The product's app settings minus its hooks; (settings, names of the keys dropped)."""
    product = celeryconfig.app_settings(settings)
    dropped = [k for k, v in product.items() if k in PRODUCT_HOOKS or _mentions_product(v)]
    return {k: v for k, v in product.items() if k not in dropped}, dropped


def make_app(*, queue_url: str | None = None, broker_url: str | None = None,
             settings: Settings | None = None) -> Celery:
    """queue_url/broker_url: a submitter's app (it sends to queue_url through broker_url's
    endpoint). Without them: the worker's app, whose queues come from worker_settings when the
    worker starts."""
    settings = settings or Settings.from_env()
    conf, _ = plain_settings(settings)
    app = Celery("bench_plain", set_as_current=False)
    app.conf.update(conf)
    if broker_url:
        app.conf.broker_url = broker_url
    if queue_url:
        name = sqs_queue_name(settings.env, settings.catalog.default_queue)
        credentials = settings.local_credentials
        app.conf.broker_transport_options = {
            "predefined_queues": {name: {
                "url": queue_url,
                "access_key_id": credentials.access_key_id if credentials else "local",
                "secret_access_key": credentials.secret_access_key if credentials else "local"}},
            "queue_name_prefix": queue_prefix(settings.env),
            "region": settings.region,
        }

    @app.task(name=TASK_NAME, shared=False)  # one app per endpoint in the bench process
    def add(x, y):
        return x + y

    return app


def worker_conf(settings: Settings, current: Any = None) -> dict[str, Any]:
    """What the product's worker adds when it starts, for the plain worker (the same function)."""
    return celeryconfig.worker_settings(settings, current)


app = make_app()  # the worker's (`celery -A bench.plain_app worker`)


@signals.celeryd_init.connect
def _add_worker_settings(sender: Any = None, instance: Any = None, conf: Any = None, **_: Any) -> None:
    if instance is not None and instance.app is app:
        conf.update(worker_conf(Settings.from_env(), conf))
