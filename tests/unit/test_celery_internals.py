"""pcelery.celery_internals leans on kombu's and Celery's internals. This fails loudly, naming
what moved, when an upgrade changes one of them, before a worker meets it in production.
(pyproject.toml pins kombu and Celery to the minor release these were checked against.)"""

from __future__ import annotations

import inspect
from importlib.metadata import version
from types import SimpleNamespace

import pytest
from celery.worker.consumer import Consumer
from celery.worker.request import Request
from kombu.asynchronous.aws.connection import AsyncAWSQueryConnection
from kombu.asynchronous.aws.sqs.connection import AsyncSQSConnection
from kombu.transport import virtual
from kombu.transport.SQS import Channel, Transport

from pcelery.celery_internals import (
    PersistentChannel,
    PersistentConsumer,
    PersistentRequest,
    PersistentTransport,
    ReceiveFailure,
    _ResilientAsyncSQS,
    sqs_receipt,
)


def params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


@pytest.mark.parametrize("owner, name, expected", [
    # The receive loop the channel wraps: who calls whom, with which arguments.
    (Channel, "_schedule_queue", ["self", "queue"]),
    (Channel, "_loop1", ["self", "queue", "messages_fetched"]),
    (Channel, "_get_async", ["self", "queue", "count", "callback"]),
    (Channel, "_on_messages_ready", ["self", "queue", "qname", "messages"]),
    (Channel, "_message_to_python", ["self", "message", "queue_name", "q_url"]),
    (Channel, "_release_messages", ["self", "queue", "qname", "messages"]),
    (Channel, "asynsqs", ["self", "queue"]),
    (Channel, "sqs", ["self", "queue"]),
    (Channel, "canonical_queue_name", ["self", "queue_name"]),
    (Channel, "basic_ack", ["self", "delivery_tag", "multiple"]),
    (Channel, "basic_reject", ["self", "delivery_tag", "requeue"]),
    (Channel, "close", ["self"]),
    (virtual.Channel, "basic_ack", ["self", "delivery_tag", "multiple"]),
    (AsyncAWSQueryConnection, "_on_list_ready", ["self", "parent", "markers", "operation", "response"]),
    (Request, "on_failure", ["self", "exc_info", "send_failed_event", "return_ok"]),
    (Request, "on_timeout", ["self", "soft", "timeout"]),
    (Consumer, "on_decode_error", ["self", "message", "exc"]),
    (Consumer, "on_unknown_message", ["self", "body", "message"]),
    (Consumer, "on_unknown_task", ["self", "body", "message", "exc"]),
])
def test_the_internals_we_override_keep_their_signatures(owner, name, expected):
    assert params(getattr(owner, name)) == expected, f"{owner.__module__}.{owner.__name__}.{name} changed"


def test_our_subclasses_sit_on_the_classes_they_replace():
    assert issubclass(PersistentTransport, Transport) and PersistentTransport.Channel is PersistentChannel
    assert issubclass(PersistentChannel, Channel)
    assert issubclass(_ResilientAsyncSQS, AsyncSQSConnection)
    assert issubclass(PersistentRequest, Request) and issubclass(PersistentConsumer, Consumer)


def test_kombu_still_hands_a_failed_receive_a_list_which_we_turn_into_a_receive_failure():
    """kombu 5.7 answers a 5xx or a timeout with [] (and the channel then crashes on .get); if a
    release changes that, ReceiveFailure may no longer be needed, or no longer be reached."""

    class Response:
        status, reason = 503, "Service Unavailable"

        def read(self):
            return b"<html>503</html>"

    source = inspect.getsource(AsyncAWSQueryConnection._on_list_ready)
    assert "return []" in source, "kombu no longer answers a failed list call with []: revisit _ResilientAsyncSQS"
    connection = object.__new__(_ResilientAsyncSQS)
    connection.sqs_connection = SimpleNamespace(meta=SimpleNamespace(service_model=None))
    failure = connection._on_list_ready(None, None, "ReceiveMessage", Response())
    assert failure == ReceiveFailure(503, "HTTP 503 (Service Unavailable)")
    assert "messages.get('Messages')" in inspect.getsource(Channel._on_messages_ready)


def test_where_kombu_leaves_the_sqs_message_on_a_request():
    request = SimpleNamespace(
        properties={"delivery_tag": "receipt-1", "delivery_info": {
            "sqs_queue": "http://sqs/123/pcelery-prod-long",
            "sqs_message": {"MessageId": "m-1", "Attributes": {"ApproximateReceiveCount": "2"}}}},
        delivery_info={"routing_key": "long"})
    receipt = sqs_receipt(request)
    assert (receipt.queue_url, receipt.receipt_handle, receipt.receive_count, receipt.message_id,
            receipt.routing_key) == ("http://sqs/123/pcelery-prod-long", "receipt-1", 2, "m-1", "long")
    source = inspect.getsource(Channel._envelope_payload)
    assert "'sqs_message': message" in source and "'sqs_queue': q_url" in source
    assert "props['delivery_tag'] = message['ReceiptHandle']" in source


def test_the_virtual_qos_keeps_deliveries_where_the_channel_looks():
    assert "_delivered" in inspect.getsource(virtual.QoS.__init__)


def test_batched_receives_rest_on_how_kombu_sizes_and_schedules_a_receive():
    """PersistentChannel receives only when a whole batch fits: that relies on kombu asking SQS
    for as many messages as the QoS window has free (at most 10), on `_schedule_queue` being where
    each receive starts, and on Celery's command line passing --prefetch-multiplier (which
    pcelery-worker sets) over the app's configuration."""
    from kombu.transport import SQS as sqs_transport

    assert sqs_transport.SQS_MAX_MESSAGES == 10
    assert "self.qos.can_consume_max_estimate()" in inspect.getsource(Channel._get_message_estimate)
    assert "self._get_bulk_async(" in inspect.getsource(Channel._schedule_queue)
    assert "self._active_queues" in inspect.getsource(Channel._schedule_queue)
    assert "transport_options" in inspect.getsource(virtual.Channel.__init__)
    qos = virtual.QoS(SimpleNamespace(do_restore=False), prefetch_count=14)
    assert (qos.prefetch_count, qos.can_consume_max_estimate()) == (14, 14)


def test_the_versions_these_were_checked_against():
    assert version("kombu").startswith("5.7.") and version("celery").startswith("5.7.")
