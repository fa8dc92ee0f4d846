"""The store's schema v3 (due_at, attempt_errors, pcelery_schedules) in the project's database,
and the two new columns in the unmanaged model's state."""

from __future__ import annotations

from django.db import migrations, models

from pcelery.django.migrations import create_store


class Migration(migrations.Migration):
    atomic = False  # as 0001: pcelery.schema.migrate commits on a connection of its own
    dependencies = [("pcelery", "0001_initial")]

    operations = [
        migrations.RunPython(create_store, migrations.RunPython.noop, elidable=False),
        migrations.AddField("task", "due_at", models.DateTimeField(null=True)),
        migrations.AddField("task", "attempt_errors", models.TextField(null=True)),
    ]
