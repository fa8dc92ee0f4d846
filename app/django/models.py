"""The claim-check table (pcelery.schema.tasks) as a Django model, for the admin and for queries
of a project's own. Unmanaged: pcelery.schema owns the table and its migrations (the app's
migration runs them); a test checks that these fields match the table's columns."""

from __future__ import annotations

from django.db import models

from pcelery.store import STATES


class Task(models.Model):
    id = models.CharField(primary_key=True, max_length=36, verbose_name="task id")
    task_name = models.CharField(max_length=200)
    queue = models.CharField(max_length=80)
    payload = models.TextField(help_text='JSON: {"args": [...], "kwargs": {...}}')
    state = models.CharField(max_length=16, choices=[(s, s) for s in STATES])
    attempts = models.IntegerField(default=0)
    delay_seconds = models.IntegerField(default=0)
    lease_until = models.DateTimeField(null=True)
    worker = models.CharField(max_length=200, null=True)
    result = models.TextField(null=True, help_text="JSON")
    error = models.TextField(null=True, help_text="the last attempt's error (a succeeded task may have one)")
    message_id = models.CharField(max_length=100, null=True, verbose_name="SQS message id")
    claimed_message_id = models.CharField(max_length=100, null=True)
    created_at = models.DateTimeField()
    updated_at = models.DateTimeField()
    queued_at = models.DateTimeField(null=True)
    started_at = models.DateTimeField(null=True)
    finished_at = models.DateTimeField(null=True)
    due_at = models.DateTimeField(null=True, help_text="when its countdown/ETA falls due")
    attempt_errors = models.TextField(null=True, help_text="each failed attempt's error, one JSON object per line")

    class Meta:
        managed = False
        db_table = "pcelery_tasks"
        ordering = ("-created_at",)
        verbose_name = "task"

    def __str__(self) -> str:
        return f"{self.task_name}[{self.id}] {self.state}"
