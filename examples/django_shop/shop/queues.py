"""The shop's queue catalog: its own, named once (PCELERY_CATALOG=shop.queues:CATALOG in the
containers, `application.catalog` in cdk.json), and read by the CDK app, the workers, the relay
and ops alike. The queues and their promises are the shop's to choose."""

from pcelery.catalog import Catalog, QueueContract

CATALOG = Catalog(
    queues=(
        QueueContract(
            name="default",
            description="Receipts, webhooks, small writes.",
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
            description="Sales reports: heartbeats keep them invisible while they run.",
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
