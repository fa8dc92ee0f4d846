"""Periodic schedules without processes: which slots are due, what a restart after an outage
submits under each missed-slot policy, cron in a time zone across DST, and the errors a bad
schedule gets. (Schedulers running together, and a restart, are in tests/integration/test_scheduling.py.)"""

from __future__ import annotations

import datetime as dt
import sys

import pytest

from pcelery.scheduler import Schedule, ScheduleError, load_schedules, seconds_to_next

U = dt.UTC


def at(h, m=0, s=0, day=1, month=1):
    return dt.datetime(2026, month, day, h, m, s, tzinfo=U)


def test_interval_slots_are_multiples_of_the_interval_so_every_scheduler_agrees():
    every = Schedule(name="e", task="t", every=300)
    assert every.latest_at(at(12, 7)) == at(12, 5) and every.next_after(at(12, 5)) == at(12, 10)
    assert every.task_id(at(12, 5)) == Schedule(name="e", task="other", every=60).task_id(at(12, 5))
    assert every.task_id(at(12, 5)) != every.task_id(at(12, 10))


def test_a_new_schedule_starts_with_its_latest_slot_if_recent():
    every = Schedule(name="e", task="t", every=60, grace=30)
    assert every.due(None, at(12, 0, 20)) == ([at(12, 0)], 0)
    assert every.due(None, at(12, 0, 40)) == ([], 0)  # the 12:00 slot is 40 s old: wait for 12:01


def test_after_an_outage_skip_keeps_only_recent_slots_and_catch_up_submits_the_missed_ones():
    skip = Schedule(name="s", task="t", every=60, grace=90)
    catch_up = Schedule(name="c", task="t", every=60, missed="catch_up", catch_up_limit=3)
    last, now = at(12, 0), at(12, 10, 5)  # ten slots missed
    assert skip.due(last, now) == ([at(12, 9), at(12, 10)], 8)
    assert catch_up.due(last, now) == ([at(12, 8), at(12, 9), at(12, 10)], 7)
    assert skip.due(at(12, 10), now) == ([], 0)  # nothing new


def test_cron_slots_follow_the_time_zone_across_daylight_saving():
    paris = Schedule(name="p", task="t", cron="30 2 * * *", timezone="Europe/Paris")
    # 02:30 does not exist in Paris on 29 March 2026: cron fires at 03:00 local (01:00 UTC).
    assert paris.next_after(at(12, day=28, month=3)) == at(1, 0, day=29, month=3)
    assert paris.next_after(at(12, day=29, month=3)) == at(0, 30, day=30, month=3)
    every_5 = Schedule(name="f", task="t", cron="*/5 * * * *")
    assert every_5.latest_at(at(12, 5)) == at(12, 5) and every_5.latest_at(at(12, 4, 59)) == at(12, 0)


def test_the_scheduler_sleeps_until_the_next_slot_at_most_five_seconds():
    assert seconds_to_next([Schedule(name="e", task="t", every=2)], at(12, 0, 1)) == 1
    assert seconds_to_next([Schedule(name="e", task="t", every=3600)], at(12, 0, 1)) == 5


@pytest.mark.parametrize("fields, message", [
    ({"cron": "61 * * * *"}, "cron='61 * * * *' is not a five-field cron expression"),
    ({"cron": "* * * *"}, "is not a five-field cron expression"),
    ({"every": 0}, "every=0 must be 1 to 31622400 seconds"),
    ({"every": 5, "cron": "* * * * *"}, "set exactly one of cron="),
    ({"every": 5, "timezone": "Mars/Olympus"}, "timezone='Mars/Olympus' is not an IANA time zone"),
    ({"every": 5, "missed": "later"}, "missed='later' must be one of ('skip', 'catch_up')"),
    ({"every": 5, "grace": 0}, "grace=0 must be a positive number of seconds"),
    ({"every": 5, "name": "two words"}, "name must be 1-200 letters"),
])
def test_a_bad_schedule_names_itself_the_field_and_the_fix(fields, message):
    with pytest.raises(ScheduleError, match=r"^schedule '") as caught:
        Schedule(**{"name": "nightly", "task": "shop.tasks.report", **fields})
    assert message in str(caught.value)


def test_loading_schedules_names_the_setting(tmp_path, monkeypatch):
    (tmp_path / "team_schedules.py").write_text(
        "from pcelery.scheduler import Schedule\n"
        "GOOD = [Schedule(name='a', task='t', every=5)]\n"
        "TWICE = [Schedule(name='a', task='t', every=5), Schedule(name='a', task='u', every=9)]\n"
        "NOT_A_LIST = 'a'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "team_schedules", raising=False)
    assert [s.name for s in load_schedules("team_schedules:GOOD")] == ["a"]
    for spec, message in [
        ("team_schedules:TWICE", "schedule names ['a'] are used twice"),
        ("team_schedules:NOT_A_LIST", "must be a list of pcelery.scheduler.Schedule"),
        ("team_schedules:MISSING", "cannot be loaded (AttributeError"),
    ]:
        with pytest.raises(ScheduleError, match=r"^PCELERY_SCHEDULES="):
            load_schedules(spec)
        with pytest.raises(ScheduleError) as caught:
            load_schedules(spec)
        assert message in str(caught.value)
