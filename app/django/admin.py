"""The task rows in the Django admin: list, filters, each row's arguments and error, and two
actions. Read-only otherwise: rows change only through the store's own transitions
(pcelery.store), never by editing a field."""

from __future__ import annotations

import json
from typing import Any

from django.contrib import admin, messages
from django.utils.html import format_html

from pcelery.django.models import Task


def _pretty(text: str | None) -> str:
    if text is None:
        return "-"
    try:
        return json.dumps(json.loads(text), indent=2, sort_keys=True)
    except ValueError:  # a damaged row is shown as it is stored
        return text


def _django_outbox() -> Any:
    from django.apps import apps

    return apps.get_app_config("pcelery").outbox  # the DjangoOutbox the app registered


@admin.register(Task)
class TaskAdmin(admin.ModelAdmin):
    list_display = ("id", "task_name", "queue", "state", "attempts", "created_at", "due_at", "finished_at",
                    "short_error")
    list_filter = ("state", "queue", "task_name")
    search_fields = ("=id", "task_name", "error")
    date_hierarchy = "created_at"
    list_per_page = 100
    show_full_result_count = False  # COUNT(*) of a large table on every page is slow
    actions = ("replay", "cancel")
    fields = ("id", "task_name", "queue", "state", "attempts", "arguments", "result_json", "error", "errors",
              "worker", "message_id", "delay_seconds", "due_at", "created_at", "queued_at", "started_at",
              "finished_at", "lease_until")
    readonly_fields = fields

    @admin.display(description="error")
    def short_error(self, task: Task) -> str:
        first = (task.error or "").splitlines()[0] if task.error else ""
        return first[:100] + ("…" if len(first) > 100 else "")

    @admin.display(description="arguments")
    def arguments(self, task: Task) -> str:
        return format_html("<pre>{}</pre>", _pretty(task.payload))

    @admin.display(description="each attempt's error")
    def errors(self, task: Task) -> str:
        return format_html("<pre>{}</pre>", task.attempt_errors or "-")

    @admin.display(description="result")
    def result_json(self, task: Task) -> str:
        return format_html("<pre>{}</pre>", _pretty(task.result))

    def has_add_permission(self, request: Any) -> bool:
        return False  # a task is submitted by code (Task.delay), which validates it

    def has_delete_permission(self, request: Any, obj: Any = None) -> bool:
        return False  # a row is the record that a task ran once; deleting one would let it run again

    @admin.action(description="Replay the selected tasks (run them again)", permissions=["change"])
    def replay(self, request: Any, queryset: Any) -> None:
        from pcelery.ops.tasks import replay, select_for_replay

        outbox = _django_outbox()
        engine = outbox.engine()
        done = replay(engine, select_for_replay(engine, task_ids=list(queryset.values_list("id", flat=True)),
                                                limit=len(queryset)), outbox.outbox().publish_ids)
        self.message_user(request, f"{len(done['reset'])} task(s) replayed: {len(done['published'])} sent now, "
                                   f"{len(done['left_for_relay'])} left for the relay; "
                                   f"{len(done['skipped_running'])} running, not replayed.",
                          messages.WARNING if done["skipped_running"] or done["error"] else messages.SUCCESS)

    @admin.action(description="Cancel the selected tasks that have not run", permissions=["change"])
    def cancel(self, request: Any, queryset: Any) -> None:
        from pcelery import store

        ids = list(queryset.values_list("id", flat=True))
        cancelled = store.cancel(_django_outbox().engine(), ids)
        self.message_user(request, f"{len(cancelled)} of {len(ids)} task(s) cancelled; the others had run or were "
                                   f"running (only {', '.join(store.CANCELLABLE)} tasks can be cancelled).",
                          messages.SUCCESS if len(cancelled) == len(ids) else messages.WARNING)
