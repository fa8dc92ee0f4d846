"""Periodic tasks through the outbox: `pcelery-scheduler`.

Schedules are declared in code, a list of `Schedule` named by PCELERY_SCHEDULES=module:ATTRIBUTE:

    SCHEDULES = [
        Schedule(name="nightly-report", task="shop.tasks.sales_report", cron="30 2 * * *",
                 timezone="Europe/Paris", kwargs={"day": "yesterday"}, missed="catch_up"),
        Schedule(name="sync-prices", task="shop.tasks.sync_prices", every=300),
    ]

Each slot (a cron match, or a multiple of `every` seconds since the Unix epoch, so every scheduler
agrees on them) becomes one task whose id is derived from the schedule's name and the slot. The
submit is idempotent on that id (pcelery.store.insert_task_if_absent), so however many schedulers
run, each slot is submitted once, published once, and runs once (the claim-check). Run two or more
for availability; there is no leader to elect. `pcelery_schedules` records the latest slot of each
schedule, which `pcelery-ops schedules` shows with the next one.

Slots missed while no scheduler ran: `missed="skip"` (the default) submits only slots at most
`grace` seconds old, so after an outage the schedule resumes with its next slot; `missed=
"catch_up"` submits every missed slot, oldest first, the newest `catch_up_limit` of them. A
schedule's first slot is the latest one within `grace` of the moment it is first seen.

Each pass prints one CloudWatch Embedded Metric Format line (SchedulerPasses, SchedulerSubmitted),
which the CDK app alarms on when it stops. Exit codes as pcelery-relay's: 2 bad settings or
schedules, 3 refused at start, 4 SQS or the store unreachable at start; SIGTERM exits 0.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import logging
import math
import re
import signal
import sys
import threading
import time
import uuid
import zoneinfo
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

# At import, not in a call: croniter's own import runs `file` (platform.architecture) once.
from croniter import croniter

from pcelery import startup, store

log = logging.getLogger("pcelery.scheduler")

MISSED_POLICIES = ("skip", "catch_up")
# A slot's task id: uuid5 of "<schedule>|<slot in UTC ISO 8601>" in this namespace.
SLOT_NAMESPACE = uuid.UUID("6f0c2a55-3b1e-4c8e-9a51-70636c727363")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,199}$")
LONGEST_SLEEP = 5.0  # seconds between passes at most, so a schedule added by a deploy starts soon
SKIPPED_COUNT_CAP = 100_000


class ScheduleError(ValueError):
    """A schedule that cannot run. The message names the schedule, the field and the fix."""


@dataclass(frozen=True, kw_only=True)
class Schedule:
    name: str  # stable: the slot's task ids and the store's progress row derive from it
    task: str  # the task's wire name
    cron: str | None = None  # five-field cron expression, in `timezone`
    every: float | None = None  # or: seconds between slots (multiples of it since the epoch, UTC)
    timezone: str = "UTC"
    args: Sequence[Any] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    queue: str | None = None  # default: the task's declared queue, else the catalog's default
    missed: str = "skip"
    grace: float = 60.0  # seconds: how late a slot may still be submitted under "skip"
    catch_up_limit: int = 100

    def __post_init__(self) -> None:
        problems = list(self._problems())
        if problems:
            raise ScheduleError(f"schedule {self.name!r}: " + "; ".join(problems))

    def _problems(self) -> Any:
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            yield "name must be 1-200 letters, digits, '_', '.', ':' or '-': it keys the schedule's slots"
        if not isinstance(self.task, str) or not self.task:
            yield "task must be the task's registered name, e.g. 'shop.tasks.sales_report'"
        if (self.cron is None) == (self.every is None):
            yield "set exactly one of cron='m h dom mon dow' or every=<seconds>"
        if self.cron is not None and (not isinstance(self.cron, str) or len(self.cron.split()) != 5
                                      or not croniter.is_valid(self.cron)):
            yield f"cron={self.cron!r} is not a five-field cron expression, e.g. '30 2 * * *'"
        if self.every is not None and not (isinstance(self.every, (int, float)) and 1 <= self.every <= 366 * 86400):
            yield f"every={self.every!r} must be 1 to 31622400 seconds"
        try:
            zoneinfo.ZoneInfo(self.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError, TypeError):
            yield f"timezone={self.timezone!r} is not an IANA time zone, e.g. 'Europe/Paris'"
        if self.missed not in MISSED_POLICIES:
            yield f"missed={self.missed!r} must be one of {MISSED_POLICIES}"
        if not (isinstance(self.grace, (int, float)) and self.grace > 0):
            yield f"grace={self.grace!r} must be a positive number of seconds"
        if not (isinstance(self.catch_up_limit, int) and self.catch_up_limit >= 1):
            yield f"catch_up_limit={self.catch_up_limit!r} must be 1 or more"

    # -- slots --

    def next_after(self, moment: dt.datetime) -> dt.datetime:
        """The first slot strictly after `moment` (UTC)."""
        if self.every is not None:
            return _from_epoch((math.floor(moment.timestamp() / self.every) + 1) * self.every)
        local = moment.astimezone(zoneinfo.ZoneInfo(self.timezone))
        return croniter(self.cron, local).get_next(dt.datetime).astimezone(dt.UTC)

    def latest_at(self, moment: dt.datetime) -> dt.datetime:
        """The last slot at or before `moment` (UTC)."""
        if self.every is not None:
            return _from_epoch(math.floor(moment.timestamp() / self.every) * self.every)
        # get_prev answers the latest match strictly before its start: start a second after the
        # whole second `moment` is in, so a match at that second counts (cron slots are whole minutes).
        local = moment.astimezone(zoneinfo.ZoneInfo(self.timezone)).replace(microsecond=0) + dt.timedelta(seconds=1)
        return croniter(self.cron, local).get_prev(dt.datetime).astimezone(dt.UTC)

    def task_id(self, slot: dt.datetime) -> str:
        return str(uuid.uuid5(SLOT_NAMESPACE, f"{self.name}|{slot.astimezone(dt.UTC).isoformat()}"))

    def due(self, last_slot: dt.datetime | None, now: dt.datetime) -> tuple[list[dt.datetime], int]:
        """(slots to submit now, oldest first; how many missed slots are skipped)."""
        newest = self.latest_at(now)
        oldest_allowed = now - dt.timedelta(seconds=self.grace)
        if last_slot is None:  # a new schedule starts with its latest slot, if that is recent enough
            return ([newest] if newest >= oldest_allowed else []), 0
        if newest <= last_slot:
            return [], 0
        after = last_slot
        if self.missed == "catch_up":
            slots: list[dt.datetime] = []
            slot = newest
            while slot > after and len(slots) < self.catch_up_limit:
                slots.append(slot)
                slot = self.latest_at(slot - dt.timedelta(microseconds=1))
            slots.reverse()
            return slots, self._count(after, slots[0]) if slots else 0
        slots = []
        slot = newest
        while slot > after and slot >= oldest_allowed:
            slots.append(slot)
            slot = self.latest_at(slot - dt.timedelta(microseconds=1))
        slots.reverse()
        return slots, self._count(after, slots[0] if slots else newest + dt.timedelta(microseconds=1))

    def _count(self, after: dt.datetime, before: dt.datetime) -> int:
        """Slots strictly between after and before (capped): what a policy left out."""
        count, slot = 0, self.next_after(after)
        while slot < before and count < SKIPPED_COUNT_CAP:
            count, slot = count + 1, self.next_after(slot)
        return count


def _from_epoch(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, dt.UTC)


def load_schedules(spec: str, setting: str = "PCELERY_SCHEDULES") -> list[Schedule]:
    """The schedules named by PCELERY_SCHEDULES (or the `setting` that gave spec); ScheduleError
    names what is wrong."""
    module, _, attribute = spec.partition(":")
    try:
        found = getattr(importlib.import_module(module), attribute)
    except ScheduleError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the module raises, name it and the setting
        raise ScheduleError(f"{setting}={spec!r} cannot be loaded ({type(exc).__name__}: {exc}): fix the "
                            "name, or install the code that declares the schedules") from None
    if not isinstance(found, (list, tuple)) or not all(isinstance(s, Schedule) for s in found):
        raise ScheduleError(f"{setting}={spec!r} must be a list of pcelery.scheduler.Schedule")
    names = [s.name for s in found]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ScheduleError(f"{setting}={spec!r}: schedule names {twice} are used twice; names must be unique")
    return list(found)


# --- The loop ---------------------------------------------------------------------------------

@dataclass
class PassResult:
    submitted: int = 0  # slots whose task this scheduler inserted (another may have been first)
    already: int = 0  # slots another scheduler had submitted
    skipped: int = 0  # missed slots left out by a schedule's policy
    failed: list[str] = field(default_factory=list)  # schedules whose submit failed this pass


def scheduler_pass(schedules: Sequence[Schedule], outbox: Any, *, now: dt.datetime | None = None) -> PassResult:
    """Submit every due slot of every schedule (pcelery.outbox; idempotent per slot)."""
    from pcelery.outbox import SubmitError

    now = now or store.utcnow()
    states = store.schedule_states(outbox.engine)
    result = PassResult()
    for schedule in schedules:
        state = states.get(schedule.name)
        slots, skipped = schedule.due(state.last_slot if state else None, now)
        if skipped:
            log.warning("schedule %s: %d missed slot(s) skipped (missed=%r)", schedule.name, skipped, schedule.missed)
            result.skipped += skipped
        for slot in slots:
            task_id = schedule.task_id(slot)
            try:
                with outbox.transaction() as conn:
                    inserted = outbox.add_once(conn, schedule.task, list(schedule.args), dict(schedule.kwargs),
                                               task_id=task_id, queue=schedule.queue)
                    store.record_slot(conn, name=schedule.name, slot=slot, task_id=task_id,
                                      next_slot=schedule.next_after(slot))
            except (SubmitError, sa.exc.SQLAlchemyError) as exc:
                log.error("schedule %s: submitting slot %s failed (%s); retried next pass", schedule.name,
                          slot.isoformat(), str(exc).splitlines()[0])
                result.failed.append(schedule.name)
                break
            if inserted:
                result.submitted += 1
                log.info("schedule %s: slot %s submitted as task %s", schedule.name, slot.isoformat(), task_id)
            else:
                result.already += 1
    return result


def seconds_to_next(schedules: Sequence[Schedule], now: dt.datetime) -> float:
    soonest = min((s.next_after(now) for s in schedules), default=now + dt.timedelta(seconds=LONGEST_SLEEP))
    return max(0.05, min(LONGEST_SLEEP, (soonest - now).total_seconds()))


def emf_line(env: str, result: PassResult, now: float | None = None) -> str:
    """The scheduler's heartbeat for CloudWatch (the CDK app alarms when SchedulerPasses stops)."""
    from pcelery.relay import EMF_NAMESPACE

    return json.dumps({
        "_aws": {
            "Timestamp": int((now if now is not None else time.time()) * 1000),
            "CloudWatchMetrics": [{"Namespace": EMF_NAMESPACE, "Dimensions": [["Environment"]], "Metrics": [
                {"Name": "SchedulerPasses", "Unit": "Count"}, {"Name": "SchedulerSubmitted", "Unit": "Count"}]}],
        },
        "Environment": env,
        "SchedulerPasses": 1,
        "SchedulerSubmitted": result.submitted,
        "SchedulerSkipped": result.skipped,  # properties for Logs Insights, not metrics
        "SchedulerFailed": result.failed,
    })


def main(argv: list[str] | None = None) -> int:
    """`pcelery-scheduler`."""
    from pcelery.cli import define_tasks, import_celery_app, import_task_modules
    from pcelery.outbox import DELAY_LINGER, Outbox, SubmitError
    from pcelery.schema import make_engine
    from pcelery.settings import SchedulerSettings, Settings, SettingsError
    from pcelery.sqs import RELAY, make_client

    parser = argparse.ArgumentParser(
        prog="pcelery-scheduler", description="Submit periodic tasks through the outbox, each slot exactly once "
                                              "(run several for availability).",
        epilog="settings: PCELERY_SCHEDULES (required), PCELERY_TASK_MODULES and PCELERY_CELERY_APP (optional), and "
               "the common ones. exit codes: 0 stopped by SIGTERM or --once done; 2 bad settings or schedules; "
               "3 refused at start; 4 SQS or the store unreachable at start")
    parser.add_argument("--once", action="store_true", help="one pass, then exit")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
        scheduler_settings = SchedulerSettings.from_env()
        if scheduler_settings.celery_app:
            define_tasks(import_celery_app(scheduler_settings.celery_app))
        import_task_modules(scheduler_settings.task_modules)
        schedules = load_schedules(scheduler_settings.schedules)
    except (SettingsError, ScheduleError) as exc:
        print(f"pcelery-scheduler: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=scheduler_settings.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    client = make_client(settings, timeouts=RELAY)
    try:
        startup.wait_for_all([
            ("the task store", lambda: startup.store_is_current(make_engine(settings.database_url))),
            ("SQS", lambda: startup.queue_urls(settings, client)),
        ], timeout=scheduler_settings.startup_timeout, prog="pcelery-scheduler")
    except (startup.Refused, startup.Unreachable) as exc:
        return startup.exit_for("pcelery-scheduler", exc)
    # With the task modules imported, an undeclared task name is refused; the queue each task was
    # declared for is used.
    outbox = Outbox.from_settings(settings, sqs=client, require_declared=bool(scheduler_settings.task_modules),
                                  publish_linger=DELAY_LINGER)
    try:
        for schedule in schedules:
            outbox.validate(schedule.task, list(schedule.args), dict(schedule.kwargs), schedule.queue, 0)
    except SubmitError as exc:
        print(f"pcelery-scheduler: error: schedule {schedule.name!r}: {exc}", file=sys.stderr)
        return 2

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    log.info("scheduler started: env=%s, %d schedule(s): %s", settings.env, len(schedules),
             ", ".join(s.name for s in schedules))
    try:
        while not stop.is_set():
            result = scheduler_pass(schedules, outbox)
            print(emf_line(settings.env, result), flush=True)
            if args.once:
                break
            stop.wait(seconds_to_next(schedules, store.utcnow()))
    finally:
        if outbox.coalescer is not None:
            outbox.coalescer.flush(5.0)
        outbox.engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
