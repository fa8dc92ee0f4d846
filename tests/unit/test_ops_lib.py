"""The ops library in-process: the orchestration of its functions against moto's in-process SQS
(`mock_aws`) or a fake client standing in for the collaborator, and its pure helpers. (The CLI
itself, as a subprocess against a moto server and LocalStack, is tests/integration/test_ops_cli.py.)
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from devstack import DEMO_CATALOG
from devstack.stack import create_queues, sqs_client
from pcelery.ops.aws import Aws
from pcelery.ops.queues import QueueRef, oldest_age, queue_ref, resolve
from pcelery.ops.redrive import (
    NativeUnsupported,
    RedrivePlan,
    plan_redrive,
    redrive_client,
    redrive_native,
)
from pcelery.ops.render import when
from pcelery.ops.tasks import parse_duration
from pcelery.scheduler import Schedule  # at collection: croniter's import runs `file` once

# ------------------------------------------------------------------------------ queue names


def test_queue_refs_name_their_catalog_queue_only_in_their_own_environment():
    url = "http://x/1/q"
    assert queue_ref("pcelery-local-default", url, env="local", catalog=DEMO_CATALOG) == QueueRef(
        "pcelery-local-default", url, catalog_queue="default", is_catalog_dlq=False)
    assert queue_ref("pcelery-local-long-dlq", url, env="local", catalog=DEMO_CATALOG) == QueueRef(
        "pcelery-local-long-dlq", url, catalog_queue="long", is_catalog_dlq=True)
    # Another environment's queue, a queue the catalog lacks, a raw name: not catalog queues here.
    for name in ("pcelery-prod-default", "pcelery-local-other", "orphan", "default"):
        assert queue_ref(name, url, env="local", catalog=DEMO_CATALOG) == QueueRef(name, url), name


# -------------------------------------------------------------------------------- depth age


def test_oldest_age_comes_from_cloudwatch_on_aws_and_is_null_locally():
    now = dt.datetime.now(dt.UTC)

    class CloudWatch:
        def __init__(self, points=None, fail=False):
            self.points, self.fail, self.asked = points or [], fail, []

        def get_metric_statistics(self, **kw):
            self.asked.append(kw)
            if self.fail:
                raise RuntimeError("AccessDenied")
            return {"Datapoints": self.points}

    def aws(cw, endpoint=None):
        session = type("Session", (), {"client": lambda self, *a, **k: cw})()
        return Aws(session=session, sqs=None, endpoint=endpoint, region="eu-west-1")

    cw = CloudWatch([{"Timestamp": now - dt.timedelta(minutes=2), "Maximum": 700.0},
                     {"Timestamp": now - dt.timedelta(minutes=1), "Maximum": 420.0}])
    assert oldest_age(aws(cw), "pcelery-prod-default") == 420.0  # the newest minute, not the largest
    assert cw.asked[0]["MetricName"] == "ApproximateAgeOfOldestMessage"
    assert cw.asked[0]["Dimensions"] == [{"Name": "QueueName", "Value": "pcelery-prod-default"}]
    assert oldest_age(aws(CloudWatch([])), "q") is None  # no datapoints yet
    assert oldest_age(aws(CloudWatch(fail=True)), "q") is None  # no permission: depth still answers
    local = CloudWatch([{"Timestamp": now, "Maximum": 1.0}])
    assert oldest_age(aws(local, endpoint="http://127.0.0.1:5000"), "q") is None and local.asked == []


# ------------------------------------------------------------------------- native redrive


class FakeMoveTaskSqs:
    """Stands in for SQS's move-task API, scripted status by status."""

    def __init__(self, statuses: list[dict[str, Any]], interrupt_on_poll: int | None = None):
        self.statuses = list(statuses)
        self.polls = 0
        self.cancelled: list[str] = []
        self.started: list[dict[str, Any]] = []
        self.interrupt_on_poll = interrupt_on_poll

    def start_message_move_task(self, **kw):
        self.started.append(kw)
        return {"TaskHandle": "handle-1"}

    def list_message_move_tasks(self, **kw):
        self.polls += 1
        if self.polls == self.interrupt_on_poll:
            raise KeyboardInterrupt
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return {"Results": [{"TaskHandle": "handle-1", **status}]}

    def cancel_message_move_task(self, TaskHandle):
        self.cancelled.append(TaskHandle)
        self.statuses = [{"Status": "CANCELLED", "ApproximateNumberOfMessagesMoved": 4,
                          "ApproximateNumberOfMessagesToMove": 10}]
        return {"ApproximateNumberOfMessagesMoved": 4}


def _plan(source="pcelery-local-default-dlq", dest="pcelery-local-default", mode="native") -> RedrivePlan:
    return RedrivePlan(source=QueueRef(source, f"http://x/1/{source}"), source_arn=f"arn:aws:sqs:r:1:{source}",
                       destination=QueueRef(dest, f"http://x/1/{dest}"), destination_arn=f"arn:aws:sqs:r:1:{dest}",
                       mode=mode, visible=10)


def test_native_redrive_follows_progress_until_completed(caplog):
    fake = FakeMoveTaskSqs([
        {"Status": "RUNNING", "ApproximateNumberOfMessagesMoved": 3, "ApproximateNumberOfMessagesToMove": 10},
        {"Status": "RUNNING", "ApproximateNumberOfMessagesMoved": 7, "ApproximateNumberOfMessagesToMove": 10},
        {"Status": "COMPLETED", "ApproximateNumberOfMessagesMoved": 10, "ApproximateNumberOfMessagesToMove": 10},
    ])
    caplog.set_level("INFO", logger="ops")
    progress: list[tuple[int, int | None]] = []
    result = redrive_native(fake, _plan(), rate=900, sleep=lambda s: None,
                            progress=lambda done, total: progress.append((done, total)))
    assert (result.moved, result.failed, result.interrupted, result.failure_reason) == (10, 0, False, None)
    assert fake.started == [{"SourceArn": "arn:aws:sqs:r:1:pcelery-local-default-dlq",
                             "DestinationArn": "arn:aws:sqs:r:1:pcelery-local-default",
                             "MaxNumberOfMessagesPerSecond": 500}]  # SQS's ceiling
    # Progress goes to the bar (or a line now and then); the log says how it ended, once.
    assert progress == [(3, 10), (7, 10), (10, 10)]
    assert [r.getMessage() for r in caplog.records if "moved" in r.getMessage()] == [
        "move task COMPLETED: 10 of 10 moved"]


def test_native_redrive_cancels_the_move_task_on_ctrl_c():
    fake = FakeMoveTaskSqs([{"Status": "RUNNING", "ApproximateNumberOfMessagesMoved": 2,
                             "ApproximateNumberOfMessagesToMove": 10}], interrupt_on_poll=2)
    result = redrive_native(fake, _plan(), sleep=lambda s: None)
    assert fake.cancelled == ["handle-1"]
    assert result.interrupted and result.moved == 4 and result.skipped == 6
    assert result.failure_reason == "move task cancelled"


def test_native_redrive_reports_the_failure_reason():
    fake = FakeMoveTaskSqs([{"Status": "FAILED", "ApproximateNumberOfMessagesMoved": 6,
                             "ApproximateNumberOfMessagesToMove": 10,
                             "FailureReason": "AWS.SimpleQueueService.NonExistentQueue"}])
    result = redrive_native(fake, _plan(), sleep=lambda s: None)
    assert (result.moved, result.failed) == (6, 4)
    assert result.failure_reason == "AWS.SimpleQueueService.NonExistentQueue"


def test_native_unsupported_endpoint_is_recognised():
    from botocore.exceptions import ClientError

    class Moto:
        def start_message_move_task(self, **kw):
            raise ClientError({"Error": {"Code": "500", "Message": "not implemented"},
                               "ResponseMetadata": {"HTTPStatusCode": 500}}, "StartMessageMoveTask")

    with pytest.raises(NativeUnsupported, match=r"^StartMessageMoveTask answered HTTP 500$"):
        redrive_native(Moto(), _plan(), sleep=lambda s: None)


# ------------------------------------------------------------------------- client redrive


def test_client_redrive_paces_itself_to_the_rate_and_stops_at_the_limit():
    from moto import mock_aws

    with mock_aws():
        sqs = sqs_client(None)
        q = create_queues(sqs, DEMO_CATALOG, "local")
        for i in range(12):
            sqs.send_message(QueueUrl=q["default"]["dlq_url"], MessageBody=f"b{i}")
        dlq = resolve(sqs, "default-dlq", env="local", catalog=DEMO_CATALOG)
        plan = plan_redrive(sqs, dlq, env="local", catalog=DEMO_CATALOG, mode="client")
        assert plan.destination.catalog_queue == "default" and not plan.destination.is_catalog_dlq
        batches, waits = [], []
        real_send = sqs.send_message_batch

        def spy_send(**kw):
            batches.append(len(kw["Entries"]))
            return real_send(**kw)

        sqs.send_message_batch = spy_send
        result = redrive_client(sqs, plan, rate=4, sleep=waits.append)
        assert result.moved == 12 and max(batches) <= 4
        # The clock is not advanced by the fake sleep, so each wait is the time owed so far:
        # the last one covers all 12 messages at 4 a second.
        assert waits and abs(max(waits) - 12 / 4) < 0.5

        for i in range(5):
            sqs.send_message(QueueUrl=q["default"]["dlq_url"], MessageBody=f"c{i}")
        limited = redrive_client(sqs, plan, limit=2)
        assert limited.moved == 2
        attrs = sqs.get_queue_attributes(QueueUrl=q["default"]["dlq_url"], AttributeNames=["All"])["Attributes"]
        assert (attrs["ApproximateNumberOfMessages"], attrs["ApproximateNumberOfMessagesNotVisible"]) == ("3", "0")


class ClientWrapper:
    """A real (mock_aws) SQS client with one call replaced by a subclass: the collaborator's
    behaviour the test needs, everything else real."""

    def __init__(self, real):
        self.real = real

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_client_redrive_handles_partial_send_failures_without_losing_messages():
    """Half of every SendMessageBatch fails: those stay in the DLQ (visible at once), only the
    sent half is deleted."""
    from moto import mock_aws

    with mock_aws():
        sqs = sqs_client(None)
        q = create_queues(sqs, DEMO_CATALOG, "local")
        for i in range(12):
            sqs.send_message(QueueUrl=q["default"]["dlq_url"], MessageBody=f"b{i}")

        class FlakySend(ClientWrapper):
            def send_message_batch(self, QueueUrl, Entries):
                ok = [e for i, e in enumerate(Entries) if i % 2 == 0]
                resp = self.real.send_message_batch(QueueUrl=QueueUrl, Entries=ok)
                resp["Failed"] = [{"Id": e["Id"], "SenderFault": False, "Code": "InternalError"}
                                  for i, e in enumerate(Entries) if i % 2]
                return resp

        flaky = FlakySend(sqs)
        dlq = resolve(flaky, "default-dlq", env="local", catalog=DEMO_CATALOG)
        plan = plan_redrive(flaky, dlq, env="local", catalog=DEMO_CATALOG, mode="client")
        result = redrive_client(flaky, plan, hold_seconds=30)

        def count(url):
            a = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
            return int(a["ApproximateNumberOfMessages"]), int(a["ApproximateNumberOfMessagesNotVisible"])

        assert (result.moved, result.failed) == (6, 6)
        assert count(q["default"]["url"]) == (6, 0)
        assert count(q["default"]["dlq_url"]) == (6, 0)  # the failed half, visible again at once


def test_client_redrive_moves_each_message_once_even_when_it_comes_straight_back():
    """Poison that no worker can read is back in the DLQ within seconds of a redrive; a run that
    moved it again would never end (seen in the chaos test). Here a "worker" dead-letters every
    copy the moment it is sent."""
    from moto import mock_aws

    with mock_aws():
        sqs = sqs_client(None)
        q = create_queues(sqs, DEMO_CATALOG, "local")
        for i in range(3):
            sqs.send_message(QueueUrl=q["default"]["dlq_url"], MessageBody=f"poison {i}")

        class BouncingWorker(ClientWrapper):
            def send_message_batch(self, QueueUrl, Entries):
                resp = self.real.send_message_batch(QueueUrl=QueueUrl, Entries=Entries)
                for _ in range(DEMO_CATALOG.get("default").max_receive_count + 1):  # spends every receive
                    self.real.receive_message(QueueUrl=QueueUrl, MaxNumberOfMessages=10, VisibilityTimeout=0,
                                              WaitTimeSeconds=0)
                return resp

        bouncing = BouncingWorker(sqs)
        dlq = resolve(bouncing, "default-dlq", env="local", catalog=DEMO_CATALOG)
        plan = plan_redrive(bouncing, dlq, env="local", catalog=DEMO_CATALOG, mode="client")
        result = redrive_client(bouncing, plan, hold_seconds=30)
        assert result.moved == 3 and len(result.sent_ids) == 3
        attrs = sqs.get_queue_attributes(QueueUrl=q["default"]["dlq_url"], AttributeNames=["All"])["Attributes"]
        assert attrs["ApproximateNumberOfMessages"] == "3"  # the bounced copies, visible again, not moved twice


# -------------------------------------------------------------------------------- helpers


def test_parse_duration():
    assert [parse_duration(t) for t in ("90s", "15m", "2h", "1d", "1.5h")] == [90, 900, 7200, 86400, 5400]
    for bad in ("", "15", "m", "2 weeks", "-1h"):
        with pytest.raises(ValueError, match="is not like 90s, 15m, 2h or 1d"):
            parse_duration(bad)


def test_table_times_read_the_same_from_a_row_and_from_its_json():
    at = dt.datetime(2026, 11, 24, 1, 38, 21, 123456, tzinfo=dt.UTC)
    assert when(at) == when("2026-11-24T01:38:21.123456Z") == "2026-11-24 01:38:21"
    assert when(at.replace(microsecond=0)) == "2026-11-24 01:38:21"
    assert when(None) is None


# ------------------------------------------------------------- what the operator is told


def test_count_tasks_counts_what_list_tasks_lists(engine):
    """tasks says how many rows --limit left out: count_tasks keeps the filters of
    pcelery.store.list_tasks, whatever they become."""
    import uuid

    from pcelery import store
    from pcelery.ops.tasks import count_tasks

    def add(name: str) -> str:
        tid = str(uuid.uuid4())
        with engine.begin() as conn:
            store.insert_task(conn, task_id=tid, task_name=name, queue="default", args=[], kwargs={})
        return tid

    for _ in range(3):
        add("demo.add")
    dead = add("demo.always_fail")
    store.claim(engine, dead, worker="w", lease_seconds=30)
    store.finish_failure(engine, dead, worker="w", error="boom", final=True)
    stuck = add("demo.slow")
    store.claim(engine, stuck, worker="gone", lease_seconds=0)
    for filters in ({}, {"state": "pending"}, {"state": "dead"}, {"task_name": "demo.add"}, {"stuck": True},
                    {"older_than_seconds": 0}, {"older_than_seconds": 3600}, {"state": "pending", "task_name": "x"}):
        assert count_tasks(engine, **filters) == len(store.list_tasks(engine, limit=1000, **filters)), filters


def test_requeue_moved_says_what_became_of_each_row(engine):
    import uuid

    from pcelery import store
    from pcelery.ops.tasks import requeue_moved

    ids = []
    for _ in range(3):
        tid = str(uuid.uuid4())
        with engine.begin() as conn:
            store.insert_task(conn, task_id=tid, task_name="demo.add", queue="default", args=[], kwargs={})
        store.claim(engine, tid, worker="w", lease_seconds=30)
        store.finish_failure(engine, tid, worker="w", error="boom", final=True)
        ids.append(tid)
    store.claim(engine, ids[2], worker="w2", lease_seconds=30)  # a worker took this one already
    ghost = str(uuid.uuid4())
    outcome = requeue_moved(engine, [*ids, ghost], not_celery=2)
    assert outcome == {"requeued": 2, "other_states": {"running": 1}, "no_row": 1, "not_celery": 2, "unknown": 0}
    assert requeue_moved(None, ids)["unknown"] == 3


def test_find_copies_deletes_only_the_given_tasks_messages_and_leaves_the_rest_visible():
    from moto import mock_aws

    from pcelery.messages import encode_body
    from pcelery.ops.queues import attributes, counts, find_copies

    with mock_aws():
        sqs = sqs_client(None)
        q = create_queues(sqs, DEMO_CATALOG, "local")
        dlq_url = q["default"]["dlq_url"]
        for tid in ("a", "b", "c", "a"):  # two copies of a
            sqs.send_message(QueueUrl=dlq_url, MessageBody=encode_body(tid, "demo.add", queue="default"))
        sqs.send_message(QueueUrl=dlq_url, MessageBody="not celery")
        dlq = resolve(sqs, "default-dlq", env="local", catalog=DEMO_CATALOG)
        seen = []
        assert find_copies(sqs, dlq, {"a", "c"}, delete=False, progress=lambda d, t: seen.append((d, t))) == 3
        assert counts(attributes(sqs, dlq)) == {"visible": 5, "in_flight": 0, "delayed": 0}
        assert seen and seen[-1] == (5, 5)
        assert find_copies(sqs, dlq, {"a", "c"}, delete=True) == 3
        assert counts(attributes(sqs, dlq)) == {"visible": 2, "in_flight": 0, "delayed": 0}


def test_the_native_move_task_is_probed_without_moving_anything():
    from pcelery.ops.redrive import native_missing

    class Answers:
        def list_message_move_tasks(self, **kw):
            return {"Results": []}

    class Moto500:
        def list_message_move_tasks(self, **kw):
            raise ClientError({"Error": {"Code": "500", "Message": ""}, "ResponseMetadata": {"HTTPStatusCode": 500}},
                              "ListMessageMoveTasks")

    class Denied:
        def list_message_move_tasks(self, **kw):
            raise ClientError({"Error": {"Code": "AccessDenied", "Message": "no"},
                               "ResponseMetadata": {"HTTPStatusCode": 403}}, "ListMessageMoveTasks")

    from botocore.exceptions import ClientError

    assert native_missing(Answers(), "arn") is None
    assert native_missing(Moto500(), "arn") == "ListMessageMoveTasks answered HTTP 500"
    assert native_missing(Denied(), "arn") is None  # cannot tell: the run tries it and falls back


def test_a_deployed_env_refuses_a_local_stack_s_settings(tmp_path, monkeypatch):
    from pcelery.ops.cli import is_local_endpoint, local_settings_in_env
    from pcelery.settings import Settings

    monkeypatch.chdir(tmp_path)
    assert is_local_endpoint("http://127.0.0.1:4566") and is_local_endpoint("https://localhost:9")
    assert is_local_endpoint("http://sqs.internal:80")  # plain http is never SQS itself
    assert not is_local_endpoint("https://sqs.eu-west-1.amazonaws.com")
    assert not is_local_endpoint("https://vpce-1.sqs.eu-west-1.vpce.amazonaws.com")
    local = {"AWS_ENDPOINT_URL_SQS": "http://127.0.0.1:5000", "DATABASE_URL": "sqlite:////x/tasks.sqlite3"}

    def found(env: str, environ: dict[str, str], **kw: str | None) -> list[str]:
        return local_settings_in_env(Settings.from_env(environ, env=env), endpoint_flag=kw.pop("flag", None), **kw)

    assert found("local", local, access_key="local") == []
    assert found("prod", local) == ["the SQS endpoint http://127.0.0.1:5000 (AWS_ENDPOINT_URL_SQS or AWS_ENDPOINT_URL)",
                                    "DATABASE_URL=sqlite:////x/tasks.sqlite3"]
    # An endpoint named on the command line is meant; the embedded default store is not a setting.
    assert found("prod", local, flag="http://127.0.0.1:5000") == ["DATABASE_URL=sqlite:////x/tasks.sqlite3"]
    assert found("prod", {}) == []
    assert found("prod", {}, access_key="local") == ["AWS_ACCESS_KEY_ID=local (the emulators' dummy key)"]
    assert found("staging", {"AWS_ENDPOINT_URL_SQS": "https://vpce-1.sqs.eu-west-1.vpce.amazonaws.com",
                             "DATABASE_URL": "postgresql://db/x"}) == []


def test_tables_fit_by_narrowing_in_order_and_never_drop_a_column():
    from pcelery.ops.render import Col, Styled, fit, table_lines

    cols = [Col("ID"), Col("TASK", shrink=2, least=6, keep_end=True), Col("STATE"), Col("ERROR", shrink=1, least=10)]
    natural = [36, 20, 9, 80]
    assert fit(cols, natural, None) == natural
    assert fit(cols, natural, 120) == [36, 20, 9, 49]  # the error gives first
    assert fit(cols, natural, 80) == [36, 19, 9, 10]  # then the task name, down to what it must keep
    assert fit(cols, natural, 40) == [36, 6, 9, 10]  # too narrow even so: wider than asked, nothing dropped
    rows = [["6009ff2b-f35d-4f09-8054-93425d5d9ca5", "shop.payments.capture_card", Styled("dead", "red"), "E" * 80]]
    lines = [t.plain for t in table_lines(cols, rows, 70)]
    assert lines[0].split() == ["ID", "TASK", "STATE", "ERROR"] and all(len(ln) <= 70 for ln in lines)
    assert "…capture_card" in lines[1] and lines[1].endswith("E…")  # a task name keeps its end
    # A column that may go below: under its row, indented, when it would be cut to its minimum.
    below = [Col("ID"), Col("STATE"), Col("ERROR", shrink=1, least=24, below=True)]
    lines = [t.plain for t in table_lines(below, [["x" * 36, "dead", "RuntimeError: payment API down"]], 60)]
    assert lines == ["ID" + " " * 36 + "STATE", "x" * 36 + "  dead", "    RuntimeError: payment API down"]
    assert [t.plain for t in table_lines(below, [["x" * 36, "dead", None]], 60)][1:] == ["x" * 36 + "  dead   -"]


def test_ages_and_durations_read_at_a_glance():
    from pcelery.ops.render import ago, duration

    now = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)
    assert ago(now - dt.timedelta(seconds=42), now) == "42s ago"
    assert ago("2026-11-30T11:55:00Z", now) == "5m ago"
    assert ago(now - dt.timedelta(hours=3, minutes=59), now) == "3h ago"
    assert ago(now - dt.timedelta(days=2), now) == "2d ago" and ago(None, now) is None
    assert [duration(s) for s in (42, 150, 7300, 200000)] == ["42s", "2m30s", "2h01m", "2d07h"]


def test_without_a_terminal_progress_is_a_line_every_few_seconds(monkeypatch, capsys):
    from pcelery.ops import render

    clock = [100.0]
    monkeypatch.setattr(render.time, "monotonic", lambda: clock[0])
    progress = render.Progress("redrive q-dlq", 100, every=5)
    for done in range(0, 101, 10):
        clock[0] += 1
        progress.update(done)
    progress.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["ops: redrive q-dlq: 40 of about 100 (8.0 msg/s, about 7s left)",
                     "ops: redrive q-dlq: 90 of about 100 (9.0 msg/s, about 1s left)"]


def test_completion_covers_every_command_option_and_choice():
    from pcelery.ops.cli import build_parser
    from pcelery.ops.completion import script
    from pcelery.store import STATES

    bash = script(build_parser(), "bash")
    assert bash.rstrip().endswith("complete -F _pcelery_ops pcelery-ops")
    for word in ("depth", "peek", "redrive", "tasks", "replay", "purge", "local", "completion", "--hold-seconds",
                 "--keep-dlq-copies", "'local seed --task'", "'auto native client'", *STATES):
        assert word in bash, word
    assert script(build_parser(), "zsh").startswith("autoload -U +X compinit && compinit\n")


def test_a_setup_problem_says_the_fix_for_a_checkout_and_for_an_install():
    from pcelery.ops import setup_problem

    text = setup_problem(ModuleNotFoundError("No module named 'sqlalchemy'", name="sqlalchemy"), ["tasks", "--state",
                                                                                                  "dead"])
    assert text.startswith("ops: setup problem: this Python (") and "cannot import 'sqlalchemy'" in text
    assert "-m ops tasks --state dead`" in text and "activate` once per shell" in text


def test_cancel_says_what_it_cancelled_and_why_each_other_id_was_not(engine):
    import uuid

    from pcelery import store
    from pcelery.ops.tasks import cancel

    def add(**kw: Any) -> str:
        tid = str(uuid.uuid4())
        with engine.begin() as conn:
            store.insert_task(conn, task_id=tid, task_name="demo.add", queue="default", args=[], kwargs={}, **kw)
        return tid

    scheduled, pending, running = add(delay_seconds=30 * 86400), add(), add()
    assert store.get_task(engine, scheduled).state == "scheduled"
    store.claim(engine, running, worker="w", lease_seconds=30)
    ids = [scheduled, pending, running, "no-such-id", pending]
    dry = cancel(engine, ids, dry_run=True)
    assert dry == {"requested": [scheduled, pending, running, "no-such-id"], "cancelled": [scheduled, pending],
                   "not_cancelled": {running: "running", "no-such-id": None}}
    assert store.get_task(engine, scheduled).state == "scheduled"  # a dry run changes nothing
    assert cancel(engine, ids) == dry
    assert {store.get_task(engine, t).state for t in (scheduled, pending)} == {"cancelled"}
    assert cancel(engine, [scheduled])["not_cancelled"] == {scheduled: "cancelled"}


def test_schedules_show_the_code_s_and_the_store_s_with_last_and_next_run(engine):
    from pcelery import store
    from pcelery.ops.render import until
    from pcelery.ops.tasks import list_schedules

    now = dt.datetime(2026, 11, 30, 12, 0, 30, tzinfo=dt.UTC)
    every = Schedule(name="sync", task="shop.sync", every=60)
    nightly = Schedule(name="nightly", task="shop.report", cron="30 2 * * *", timezone="Europe/Paris")
    slot = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)
    with engine.begin() as conn:
        store.insert_task(conn, task_id=every.task_id(slot), task_name="shop.sync", queue="default", args=[],
                          kwargs={})
        store.record_slot(conn, name="sync", slot=slot, task_id=every.task_id(slot), next_slot=every.next_after(slot))
        store.record_slot(conn, name="retired", slot=slot, task_id="gone", next_slot=slot + dt.timedelta(hours=1))
    views = list_schedules(engine, [every, nightly], now=now)
    assert [(v.name, v.task, v.when) for v in views] == [
        ("sync", "shop.sync", "every 60s"), ("nightly", "shop.report", "cron 30 2 * * * Europe/Paris"),
        ("retired", None, None)]
    sync, report, retired = views
    assert (sync.last_task_id, sync.last_task_state) == (every.task_id(slot), "pending")
    assert sync.next_slot == dt.datetime(2026, 11, 30, 12, 1, tzinfo=dt.UTC)
    assert report.last_slot is None and report.next_slot == dt.datetime(2026, 12, 1, 1, 30, tzinfo=dt.UTC)
    assert retired.last_task_state is None and retired.next_slot is not None
    assert report.as_json()["next_slot"] == "2026-12-01T01:30:00Z"
    assert [v.name for v in list_schedules(None, [every], now=now)] == ["sync"]  # no store: the code's alone
    assert until(report.next_slot, now) == "in 13h29m" and until(slot, now) == "30s ago"
