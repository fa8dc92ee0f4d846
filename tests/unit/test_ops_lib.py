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
    result = redrive_native(fake, _plan(), rate=900, sleep=lambda s: None)
    assert (result.moved, result.failed, result.interrupted, result.failure_reason) == (10, 0, False, None)
    assert fake.started == [{"SourceArn": "arn:aws:sqs:r:1:pcelery-local-default-dlq",
                             "DestinationArn": "arn:aws:sqs:r:1:pcelery-local-default",
                             "MaxNumberOfMessagesPerSecond": 500}]  # SQS's ceiling
    assert [r.getMessage() for r in caplog.records if "moved" in r.getMessage()] == [
        "move task RUNNING: 3 of 10 moved", "move task RUNNING: 7 of 10 moved", "move task COMPLETED: 10 of 10 moved"]


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
