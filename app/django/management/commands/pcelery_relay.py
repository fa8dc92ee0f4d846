"""`manage.py pcelery_relay`: the outbox relay (pcelery-relay) on the project's database."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError


class Command(BaseCommand):
    help = ("Publish the committed tasks a process could not send (pcelery-relay), from the project's database "
            "(settings.PCELERY_DATABASE, default 'default'). The environment gives SQS and the catalog, as for "
            "the workers.")

    def add_arguments(self, parser: Any) -> None:
        # pcelery-relay's options, passed on as given: its own parser checks the values.
        parser.add_argument("--once", action="store_true", help="one pass until no rows are left, then exit")
        parser.add_argument("--interval", help="seconds between passes (PCELERY_RELAY_INTERVAL, default 5)")
        parser.add_argument("--min-age", help="only rows pending at least this long (PCELERY_RELAY_MIN_AGE, "
                                              "default 30)")
        parser.add_argument("--batch", help="rows per transaction, 1-1000 (default 10)")

    def handle(self, *args: Any, **options: Any) -> None:
        from pcelery import relay
        from pcelery.django import database_alias, database_url

        argv = ["--once"] if options["once"] else []
        for name in ("interval", "min_age", "batch"):
            if options[name] is not None:
                argv += [f"--{name.replace('_', '-')}", options[name]]
        code = relay.main(argv, database_url=database_url(database_alias()))
        if code:
            raise CommandError(f"pcelery-relay exited with {code}", returncode=code)
