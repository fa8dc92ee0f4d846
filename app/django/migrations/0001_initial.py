"""The task store's table in the project's database: pcelery.schema.migrate (idempotent, the same
steps as `pcelery-migrate`), then the unmanaged model's state for Django."""

from __future__ import annotations

from django.db import migrations, models

from pcelery.django.migrations import create_store


class Migration(migrations.Migration):
    # pcelery.schema.migrate commits on a connection of its own; wrapping it in Django's
    # transaction would make SQLite's migration connection and it wait on each other's lock.
    atomic = False
    initial = True
    dependencies: list[tuple[str, str]] = []

    operations = [
        # Never dropped on a reverse migration: the rows are the tasks that must not be lost.
        migrations.RunPython(create_store, migrations.RunPython.noop, elidable=False),
        migrations.CreateModel(
            name="Task",
            fields=[
                ("id", models.CharField(max_length=36, primary_key=True, serialize=False, verbose_name="task id")),
                ("task_name", models.CharField(max_length=200)),
                ("queue", models.CharField(max_length=80)),
                ("payload", models.TextField(help_text='JSON: {"args": [...], "kwargs": {...}}')),
                ("state", models.CharField(max_length=16)),
                ("attempts", models.IntegerField(default=0)),
                ("delay_seconds", models.IntegerField(default=0)),
                ("lease_until", models.DateTimeField(null=True)),
                ("worker", models.CharField(max_length=200, null=True)),
                ("result", models.TextField(null=True, help_text="JSON")),
                ("error", models.TextField(null=True)),
                ("message_id", models.CharField(max_length=100, null=True, verbose_name="SQS message id")),
                ("claimed_message_id", models.CharField(max_length=100, null=True)),
                ("created_at", models.DateTimeField()),
                ("updated_at", models.DateTimeField()),
                ("queued_at", models.DateTimeField(null=True)),
                ("started_at", models.DateTimeField(null=True)),
                ("finished_at", models.DateTimeField(null=True)),
            ],
            options={"managed": False, "db_table": "pcelery_tasks", "ordering": ("-created_at",),
                     "verbose_name": "task"},
        ),
    ]
