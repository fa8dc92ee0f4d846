"""The queue catalog refuses every contract that cannot hold, with a message naming the queue,
the field and the fix; and the numbers it hands to SQS are the contract's."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from devstack import DEMO_CATALOG
from pcelery import catalog
from pcelery.catalog import (
    CATALOG,
    Catalog,
    CatalogError,
    QueueContract,
    QueueName,
    RetryPolicy,
    check_env,
    load_catalog,
    parse_queue_name,
    queue_prefix,
    resource_name,
    sqs_queue_name,
)

GOOD = QueueContract(
    name="reports", description="test", visibility_timeout=120, max_receive_count=5, retention=3600,
    soft_time_limit=60, hard_time_limit=80, max_countdown=60,
)


def problems_of(**changes) -> str:
    with pytest.raises(CatalogError) as caught:
        replace(GOOD, **changes).validate()
    return str(caught.value)


def test_a_good_contract_validates_and_the_shipped_catalogs_are_valid():
    GOOD.validate()
    for cat in (CATALOG, DEMO_CATALOG):
        for contract in cat:
            contract.validate()
    # The demo catalog only shrinks timings: the same queues, in the same order, same default.
    assert DEMO_CATALOG.names() == CATALOG.names()
    assert DEMO_CATALOG.default_queue == CATALOG.default_queue
    assert [q.heartbeat for q in DEMO_CATALOG] == [q.heartbeat for q in CATALOG]


@pytest.mark.parametrize("changes, expected", [
    ({"name": "Reports"}, "name 'Reports' is not valid: use lower-case letters"),
    ({"name": "9lives"}, "starting with a letter"),
    ({"name": "a.b"}, "name 'a.b' is not valid"),
    ({"concurrency": 0}, "concurrency=0 must be positive: set it above 0"),
    ({"backlog_per_worker": -1}, "backlog_per_worker=-1 must be positive"),
    ({"min_workers": -1}, "must not be negative"),
    ({"visibility_timeout": 13 * 3600, "hard_time_limit": 80}, "outside SQS's 1..43200"),
    ({"max_receive_count": 0}, "max_receive_count=0 is outside SQS's 1..1000"),
    ({"max_receive_count": 1001}, "max_receive_count=1001 is outside SQS's 1..1000"),
    ({"retention": 59}, "retention=59 is outside SQS's 60..1209600"),
    ({"retention": 15 * 24 * 3600}, "is outside SQS's 60..1209600"),
    ({"soft_time_limit": 80}, "soft_time_limit=80 must be below hard_time_limit=80"),
    ({"hard_time_limit": 100}, "must be at least hard_time_limit 100 + margin 30 = 130"),
    ({"max_countdown": 366 * 86400}, "max_countdown=31622400 exceeds the 31536000 s (365 days) a task may be held"),
    ({"retry": RetryPolicy(max_attempts=9)}, "retry.max_attempts=9 must be 1..max_receive_count=5"),
    ({"retry": RetryPolicy(max_attempts=2, backoff=10, backoff_max=5)},
     "retry.backoff=10 must be above 0 and at most backoff_max=5"),
    ({"retry": RetryPolicy(max_attempts=2, backoff_max=50000)}, "retry.backoff_max=50000 exceeds the 43200 s"),
    ({"retry": RetryPolicy(max_attempts=2, retry_on=())}, "retry.retry_on is empty"),
    ({"min_workers": 5, "max_workers": 4}, "min_workers=5 exceeds max_workers=4"),
    ({"name": "a" * 70}, "characters (limit 80): shorten it"),
])
def test_each_impossible_contract_is_refused_with_the_queue_the_field_and_the_fix(changes, expected):
    message = problems_of(**changes)
    assert message.startswith(f"queue {changes.get('name', 'reports')!r}: ")
    assert expected in message


def test_without_heartbeat_the_visibility_timeout_must_cover_the_hard_limit_and_the_fix_is_named():
    message = problems_of(hard_time_limit=100)
    assert "raise visibility_timeout to 130, lower hard_time_limit, or set heartbeat=True" in message
    # With a heartbeat, the same numbers hold: only one beat interval must fit.
    replace(GOOD, hard_time_limit=100, heartbeat=True).validate()


def test_with_heartbeat_the_visibility_timeout_must_survive_a_beat_and_the_hard_limit_must_fit_sqs():
    tiny = problems_of(heartbeat=True, visibility_timeout=40, soft_time_limit=10, hard_time_limit=20, max_countdown=5)
    assert "must be at least heartbeat interval 13 + margin 30 = 43" in tiny
    huge = problems_of(heartbeat=True, soft_time_limit=100, hard_time_limit=12 * 3600)
    assert "exceeds the 43200 s SQS allows" in huge and "split the task" in huge


def test_several_problems_are_reported_together():
    message = problems_of(max_receive_count=0, retention=1)
    assert "max_receive_count=0" in message and "retention=1" in message


def test_heartbeat_interval_and_backlog_alarm_threshold():
    assert replace(GOOD, visibility_timeout=300).heartbeat_interval == 100
    assert replace(GOOD, visibility_timeout=2, hard_time_limit=1, soft_time_limit=0).heartbeat_interval == 1
    long = CATALOG.get("long")
    # countdown + visibility timeout + one heartbeat interval, at least 5 minutes
    assert long.oldest_message_alarm_seconds() == max(300, 120 + 300 + 100)
    # A countdown longer than SQS's 15-minute delay waits in the store, not in the queue.
    assert DEMO_CATALOG.get("default").oldest_message_alarm_seconds() == 900 + 8 + 5
    assert replace(GOOD, max_countdown=60).oldest_message_alarm_seconds() == 300


def test_sqs_attributes_carry_the_contract_and_the_redrive_policy():
    attrs = GOOD.sqs_attributes("arn:aws:sqs:us-east-1:123:pcelery-dev-reports-dlq")
    assert attrs["VisibilityTimeout"] == "120"
    assert attrs["MessageRetentionPeriod"] == "3600"
    assert int(attrs["ReceiveMessageWaitTimeSeconds"]) < 20  # kombu's curl client times out at 20 s
    assert json.loads(attrs["RedrivePolicy"]) == {
        "deadLetterTargetArn": "arn:aws:sqs:us-east-1:123:pcelery-dev-reports-dlq", "maxReceiveCount": 5}
    dlq = GOOD.dlq_attributes("arn:aws:sqs:us-east-1:123:pcelery-dev-reports")
    assert dlq["MessageRetentionPeriod"] == str(catalog.SQS_MAX_RETENTION)
    assert json.loads(dlq["RedriveAllowPolicy"])["sourceQueueArns"] == ["arn:aws:sqs:us-east-1:123:pcelery-dev-reports"]
    assert "RedriveAllowPolicy" not in GOOD.dlq_attributes()


def test_catalog_level_errors():
    with pytest.raises(CatalogError, match="catalog has no queues"):
        Catalog(queues=())
    with pytest.raises(CatalogError, match=r"queue names must be unique: \['reports'\]"):
        Catalog(queues=(GOOD, GOOD), default_queue="reports")
    with pytest.raises(CatalogError, match=r"default_queue 'default' is not in the catalog \(\['reports'\]\)"):
        Catalog(queues=(GOOD,))
    with pytest.raises(CatalogError, match="queue 'reports': max_receive_count=0"):
        Catalog(queues=(replace(GOOD, max_receive_count=0),), default_queue="reports")
    with pytest.raises(CatalogError, match=r"unknown queue 'nope': the catalog has \['default', 'long'\]"):
        CATALOG.get("nope")


def test_names_per_environment():
    assert queue_prefix("prod") == "pcelery-prod-"
    assert sqs_queue_name("dev", "long") == "pcelery-dev-long"
    assert sqs_queue_name("dev", "long", dlq=True) == "pcelery-dev-long-dlq"
    assert resource_name("prod", "worker", "long") == "pcelery-prod-worker-long"
    assert resource_name("dev") == "pcelery-dev"
    assert check_env("staging") == "staging"
    with pytest.raises(CatalogError, match="unknown environment 'qa': use one of local, dev, staging, prod"):
        sqs_queue_name("qa", "default")


@pytest.mark.parametrize("name, expected", [
    ("pcelery-prod-default", QueueName("prod", "default", dlq=False)),
    ("pcelery-staging-long-dlq", QueueName("staging", "long", dlq=True)),
    ("http://127.0.0.1:5000/123456789012/pcelery-local-long", QueueName("local", "long", dlq=False)),
    ("https://sqs.eu-west-1.amazonaws.com/111111111111/pcelery-dev-default-dlq/", QueueName("dev", "default", True)),
    ("default", QueueName(None, "default", dlq=False)),  # a Celery routing key
    ("default-dlq", QueueName(None, "default", dlq=True)),
])
def test_parse_queue_name_inverts_sqs_queue_name(name, expected):
    assert parse_queue_name(name) == expected
    assert parse_queue_name(name, catalog=CATALOG) == expected
    if expected.env:
        assert sqs_queue_name(expected.env, expected.queue, dlq=expected.dlq) == name.rstrip("/").rsplit("/", 1)[-1]


def test_parse_queue_name_with_a_catalog_refuses_queues_it_lacks():
    assert parse_queue_name("pcelery-prod-bulk", catalog=CATALOG) is None
    assert parse_queue_name("pcelery-prod-bulk") == QueueName("prod", "bulk", dlq=False)
    assert parse_queue_name("-dlq") is None


@pytest.mark.parametrize("spec, expected", [
    ("pcelery.catalog", "must look like 'module:ATTRIBUTE'"),
    (":DEMO_CATALOG", "must look like 'module:ATTRIBUTE'"),
    ("no_such_module:CATALOG", "cannot be loaded (No module named 'no_such_module')"),
    ("pcelery.catalog:NOPE", "cannot be loaded"),
    ("pcelery.catalog:APP_NAME", "names a str, not a Catalog"),
])
def test_load_catalog_explains_a_bad_spec(spec, expected):
    with pytest.raises(CatalogError) as caught:
        load_catalog(spec)
    assert expected in str(caught.value)


def test_load_catalog_defaults_and_loads_by_name():
    assert load_catalog(None) is CATALOG
    assert load_catalog("") is CATALOG
    assert load_catalog("devstack:DEMO_CATALOG") is DEMO_CATALOG
    assert load_catalog("pcelery.catalog:CATALOG") is CATALOG


def test_a_retry_policy_names_exceptions_by_class_or_by_name_and_backs_off_with_jitter():
    class Flaky(TimeoutError):
        pass

    policy = RetryPolicy(max_attempts=4, retry_on=(ConnectionError, "TimeoutError"), backoff=2, backoff_max=5)
    assert policy.retries(ConnectionResetError()) and policy.retries(Flaky()) and not policy.retries(ValueError())
    assert [policy.delay(a, draw=1.0) for a in (1, 2, 3, 4)] == [2, 4, 5, 5]  # doubling, capped
    assert policy.delay(2, draw=0.0) == 2  # the jitter draws from the upper half: never an immediate retry
    assert RetryPolicy(max_attempts=2, jitter=False).delay(3, draw=0.0) == 4
