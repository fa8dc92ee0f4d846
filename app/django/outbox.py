"""Task.delay() on Django's connection: the row joins the caller's transaction.atomic() block,
and its id is published by `on_commit`; what a crash keeps from being published, the relay
sends (it is a committed `pending` row like any other).

Validation, the row's values and the publishing are the product's own (pcelery.outbox,
pcelery.store); only the INSERT goes through the ORM, because it must run on Django's connection.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import sqlalchemy as sa

from pcelery import store
from pcelery.outbox import DELAY_LINGER, Outbox, SubmitError


class DjangoOutbox:
    """The submitter pcelery.django registers (pcelery.outbox.use_submitter) when Django starts."""

    def __init__(self, alias: str):
        self.alias = alias
        self._outbox: tuple[int, Outbox] | None = None

    def outbox(self) -> Outbox:
        """The product's outbox on the same database (one per process: an engine's pool must not
        cross a fork). It validates the submits and publishes after commit."""
        if self._outbox is None or self._outbox[0] != os.getpid():
            from pcelery.django import database_url
            from pcelery.schema import make_engine
            from pcelery.settings import Settings

            engine = make_engine(database_url(self.alias))
            self._outbox = (os.getpid(), Outbox.from_settings(Settings.from_env(), engine=engine,
                                                              require_declared=True, publish_linger=DELAY_LINGER))
        return self._outbox[1]

    def engine(self) -> sa.Engine:
        return self.outbox().engine

    def submit(self, task_name: str, args: Any, kwargs: Any, *, queue: str | None, countdown: float,
               task_id: str | None) -> str:
        from django.db import IntegrityError, transaction

        from pcelery.django.models import Task

        outbox = self.outbox()
        queue, delay = outbox.validate(task_name, args, kwargs, queue, countdown, task_id)
        row = store.task_row(task_id=task_id or str(uuid.uuid4()), task_name=task_name, queue=queue,
                             args=list(args), kwargs=kwargs, delay_seconds=delay)
        try:
            # A savepoint inside the caller's atomic() (its own transaction outside one): a
            # repeated task_id then fails alone, without aborting the caller's transaction.
            with transaction.atomic(using=self.alias):
                Task.objects.using(self.alias).create(**row)
        except IntegrityError:
            if task_id is None or not self._same_exists(task_id, row):
                raise
            return task_id
        if row["state"] == "scheduled":
            return str(row["id"])  # due beyond SQS's delay: the relay publishes it when it falls due
        entry = store.OutboxEntry(row["id"], task_name, queue, delay, row["due_at"])
        # After the outermost COMMIT (at once outside atomic()); dropped with a rolled-back
        # transaction or savepoint. robust: a failure to publish never reaches the caller, whose
        # data is committed; the row stays pending and the relay sends it.
        transaction.on_commit(lambda: outbox.publish_rows([entry]), using=self.alias, robust=True)
        return str(row["id"])

    def _same_exists(self, task_id: str, row: dict[str, Any]) -> bool:
        """True when task_id's row exists with the same task and arguments (an idempotent repeat);
        SubmitError when it exists with others."""
        from pcelery.django.models import Task

        existing = Task.objects.using(self.alias).filter(id=task_id).values("task_name", "payload").first()
        if existing is None:
            return False
        if (existing["task_name"], json.loads(existing["payload"])) != (row["task_name"], json.loads(row["payload"])):
            raise SubmitError(
                f"task_id={task_id!r} already exists as {existing['task_name']!r} with other arguments: an "
                "idempotent submit must repeat the same task and arguments; use a new task_id otherwise")
        return True
