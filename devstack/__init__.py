"""The dev harness: everything that runs the product on a laptop, and nothing the product needs.

- `devstack.stack`: a moto SQS server, the catalog's queues created on it with the attributes the
  CDK app gives them, and worker / relay processes started the way ECS starts them.
- `devstack.practice`: the detached local stack behind `python -m ops local up|down|status|seed`.
- `devstack.tasks`: the demo tasks (one per behaviour the demo and the tests show).
- `devstack.demo`: `make demo`.

It lives beside the runtime (the `pcelery` package, app/ and ops/ in this repository), imports it,
and is never imported by it: it is not in the wheel and not in the worker image. It is importable
when the repository's root is on sys.path (`python -m ...` from the root, the tests); the
processes it starts get PYTHONPATH set to the root for the same reason.

DEMO_CATALOG (`PCELERY_CATALOG=devstack:DEMO_CATALOG`) is the product's default catalog with its
timings shrunk, so the demo and the integration tests see redeliveries, dead-lettering and
heartbeats within seconds instead of minutes. Only the numbers differ; the code paths that turn a
contract into SQS attributes are the same.
"""

from __future__ import annotations

from dataclasses import replace

from pcelery.catalog import CATALOG, Catalog

DEMO_CATALOG = Catalog(
    queues=(
        replace(CATALOG.get("default"), visibility_timeout=8, soft_time_limit=4, hard_time_limit=5,
                max_countdown=30 * 86400, max_receive_count=3, concurrency=2, visibility_margin=2),
        replace(CATALOG.get("long"), visibility_timeout=6, soft_time_limit=50, hard_time_limit=60,
                max_countdown=4, max_receive_count=2, concurrency=2, visibility_margin=2),
    ),
    default_queue="default",
)
DEMO_CATALOG_SPEC = "devstack:DEMO_CATALOG"
