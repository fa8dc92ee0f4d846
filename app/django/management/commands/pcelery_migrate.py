"""`manage.py pcelery_migrate`: the store's migration (pcelery-migrate) on the project's database.
`manage.py migrate` runs it too (the app's migration 0001); this runs it alone."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError


class Command(BaseCommand):
    help = "Create or upgrade the task store's table in the project's database (PCELERY_DATABASE, default 'default')."

    def handle(self, *args: Any, **options: Any) -> None:
        from pcelery import schema
        from pcelery.django import database_alias, database_url

        code = schema.main([], database_url=database_url(database_alias()))
        if code:
            raise CommandError(f"pcelery-migrate exited with {code}", returncode=code)
