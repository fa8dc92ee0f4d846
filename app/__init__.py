"""pcelery: persistent Celery on Amazon SQS (the runtime; in this repository it lives in app/).

- `pcelery.catalog`: the queue catalog and the one mapping between catalog and AWS names
- `pcelery.settings`: every setting read from the environment
- `pcelery.outbox`: submit tasks inside your transaction; `pcelery.relay`: publish what was missed
- `pcelery.worker`: `persistent_task` and the wrapper every task runs through
- `pcelery.store` / `pcelery.schema`: the claim-check store's statements / tables and migrations
- `pcelery.ops`: the on-call CLI (`pcelery-ops`; in this repository it lives in ops/)

Console scripts: pcelery-worker, pcelery-relay, pcelery-migrate, pcelery-ops.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("persistent-celery")
except PackageNotFoundError:  # imported from a checkout that was never installed
    __version__ = "0+unknown"
