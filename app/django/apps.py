"""The Django app "pcelery.django" (label "pcelery"): registers the Django outbox when Django
starts, and checks the settings it depends on (`manage.py check`, and every manage.py command)."""

from __future__ import annotations

from typing import Any

from django.apps import AppConfig
from django.core import checks


class PersistentCeleryConfig(AppConfig):
    name = "pcelery.django"
    label = "pcelery"
    verbose_name = "Persistent Celery"

    def ready(self) -> None:
        from pcelery.django import database_alias
        from pcelery.django.outbox import DjangoOutbox
        from pcelery.django.transactions import DjangoTaskTransaction
        from pcelery.outbox import use_submitter
        from pcelery.worker import use_task_transaction

        # Task.delay() outside an outbox transaction now writes on Django's connection.
        self.outbox = DjangoOutbox(database_alias())
        use_submitter(self.outbox)
        # A transactional task without `db` runs in atomic() on that connection, its success too.
        use_task_transaction(DjangoTaskTransaction(database_alias()))
        checks.register(check_settings)


def check_settings(app_configs: Any = None, **_: Any) -> list[checks.CheckMessage]:
    """What would make a submit fail at the first .delay(), reported when the project starts."""
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured

    from pcelery.django import database_alias, database_url

    problems: list[checks.CheckMessage] = []
    try:
        database_url(database_alias())
    except ImproperlyConfigured as exc:
        problems.append(checks.Error(str(exc), id="pcelery.E001"))
    if not settings.USE_TZ:
        # The store's times are UTC and timezone-aware (pcelery.schema); Django refuses aware
        # datetimes on SQLite with USE_TZ = False, and would show them shifted on Postgres.
        problems.append(checks.Error("USE_TZ is False: the task store keeps timezone-aware UTC times",
                                     hint="set USE_TZ = True in settings.py", id="pcelery.E002"))
    return problems
