"""A transactional Django task: `@shared_task(transactional=True)` whose function takes no `db`
runs inside transaction.atomic() on the store's database (settings.PCELERY_DATABASE), and its
success is written on the same connection, so its ORM writes there and its verdict commit together:
a worker killed after the writes leaves neither, and the redelivery runs it once more, from
scratch. Registered with pcelery.worker.use_task_transaction when Django starts."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from pcelery import store
from pcelery.worker import TaskTransaction


class DjangoTaskTransaction(TaskTransaction):
    def __init__(self, alias: str):
        from django.db import InterfaceError, OperationalError

        self.alias = alias
        # A connection that broke inside the block rolled the task's writes back with it: the
        # worker then treats it as a store outage (the message comes back, the task runs again).
        self.errors = (OperationalError, InterfaceError)

    @contextlib.contextmanager
    def atomic(self) -> Iterator[Callable[[str, str, Any], bool]]:
        from django.db import transaction

        from pcelery.django.models import Task

        def record(task_id: str, worker: str, result: Any) -> bool:
            which, values = store.success_update(task_id, worker=worker, result=result)
            return Task.objects.using(self.alias).filter(**which).update(**values) == 1

        with transaction.atomic(using=self.alias):
            yield record
