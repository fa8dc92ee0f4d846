"""The one wire format (pcelery.messages): what the submitter and the relay send is what Celery's
own producer sends, kombu's SQS channel and Celery's Request accept it, and decode_body never
raises on what a DLQ may hold. (The byte-for-byte comparison with Celery's producer, through a
real moto server, is in tests/integration/test_outbox.py.)"""

from __future__ import annotations

import base64
import json

import pytest

from pcelery.catalog import queue_prefix, sqs_queue_name
from pcelery.messages import decode_body, encode_body


def test_body_round_trips():
    body = encode_body("task-1", "demo.add", queue="long")
    decoded = decode_body(body)
    assert (decoded.task, decoded.task_id, decoded.args, decoded.kwargs) == ("demo.add", "task-1", [], {})
    assert decoded.queue == "long" and decoded.content_type == "application/json"
    assert decoded.headers["root_id"] == "task-1" and decoded.headers["eta"] is None


def test_sqs_queue_name_becomes_the_celery_routing_key():
    # kombu acks through predefined_queues[prefix + routing_key]: a prefixed key would break acks.
    by_sqs_name = decode_body(encode_body("t", "demo.add", queue=sqs_queue_name("prod", "long")))
    assert by_sqs_name.queue == "long"


def test_kombu_sqs_channel_and_celery_request_accept_our_body():
    """What a worker does with a received SQS message, without the network: kombu's SQS channel
    turns it into a payload, Celery's protocol-2 Request parses it."""
    from celery import Celery
    from celery.worker.request import Request
    from kombu import Connection
    from kombu.transport.virtual import Message

    url = "http://127.0.0.1:1/123456789012/pcelery-local-default"
    conn = Connection("sqs://local:local@127.0.0.1:1", transport_options={
        "region": "us-east-1", "queue_name_prefix": queue_prefix("local"),
        "predefined_queues": {sqs_queue_name("local", "default"): {
            "url": url, "access_key_id": "local", "secret_access_key": "local"}},
    })
    try:
        channel = conn.channel()
        body = encode_body("task-42", "demo.add", queue="default")
        payload = channel._message_to_python(
            {"Body": body, "ReceiptHandle": "receipt-1", "MessageId": "m-1",
             "Attributes": {"ApproximateReceiveCount": "1"}}, "default", url)
        message = Message(payload, channel=channel)
        assert message.content_type == "application/json"
        assert message.delivery_tag == "receipt-1"
        # The ack path: kombu finds the queue's client by prefix + routing key.
        assert channel.canonical_queue_name(message.delivery_info["routing_key"]) in channel.predefined_queues

        app = Celery("wire-check", set_as_current=False)

        @app.task(name="demo.add")
        def add():
            pass

        request = Request(message, app=app)
        assert (request.id, request.name, request.args, request.kwargs, request.eta) == \
            ("task-42", "demo.add", [], {}, None)
    finally:
        conn.release()


@pytest.mark.parametrize("garbage", [
    "", "hello", "not base64 at all!", base64.b64encode(b"[1, 2]").decode(), base64.b64encode(b"\xff\xfe").decode(),
    json.dumps({"headers": {"task": "x"}}), json.dumps({"body": "e30=", "headers": "nope"}), b"\xff\xfe", None,
])
def test_decode_body_returns_none_for_anything_but_a_celery_message(garbage):
    assert decode_body(garbage) is None


@pytest.mark.parametrize("inner", [
    base64.b64encode(b"[[1, 2], {").decode(),  # cut-off JSON
    base64.b64encode(b'{"args": [1]}').decode(),  # JSON, but not [args, kwargs, embed]
    base64.b64encode(b"\xff\xfe not utf-8").decode(),
    "%%% not base64 %%%",
])
def test_decode_body_names_the_task_of_a_json_message_whose_inner_body_is_damaged(inner):
    envelope = json.loads(base64.b64decode(encode_body("d-1", "demo.add", queue="long")))
    envelope["body"] = inner
    decoded = decode_body(base64.b64encode(json.dumps(envelope).encode()).decode())
    assert (decoded.task, decoded.task_id, decoded.queue) == ("demo.add", "d-1", "long")
    assert (decoded.args, decoded.kwargs, decoded.content_type) == (None, None, "application/json")


def test_decode_body_keeps_headers_of_a_non_json_celery_message():
    envelope = {"body": "gAN9cQAu", "content-type": "application/x-python-serialize", "headers":
                {"task": "legacy.task", "id": "p-1"}, "properties": {"body_encoding": "base64"}}
    decoded = decode_body(base64.b64encode(json.dumps(envelope).encode()).decode())
    assert (decoded.task, decoded.task_id, decoded.args, decoded.kwargs) == ("legacy.task", "p-1", None, None)
