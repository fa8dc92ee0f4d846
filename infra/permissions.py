"""What each task role may do on SQS (and CloudWatch), granted through small functions.

The stateless stack calls these with the queues of the stateful stack; nothing else in infra/
adds a statement to a task role. No wildcard actions anywhere. The migration task gets no grant
at all: it talks to Postgres only. The relay and the scheduler only publish.
tests/integration/test_infra.py holds the roles to exactly these lists, and the ops lists to
exactly the calls in the ops source.

Execution roles get what ECS needs to start a task: CDK grants the image pull, the log group and
the read of each ECS secret as the containers are added; `grant_secret_keys` adds the decrypt on
the customer keys of the team's secrets.
"""

from __future__ import annotations

from collections.abc import Iterable

from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_sqs as sqs

from .nag import acknowledge

# What a Celery worker does on the queue it consumes, and nothing more.
CONSUME_ACTIONS = [
    "sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility",
    "sqs:GetQueueAttributes", "sqs:GetQueueUrl",
]
# Publishing a task (the submit API after commit, the relay for what it missed, the scheduler for
# each slot). GetQueueUrl also on every catalog queue at start (pcelery.startup.queue_urls).
PUBLISH_ACTIONS = ["sqs:SendMessage", "sqs:GetQueueUrl"]
# A worker giving up on a task (its retry policy does not retry, or the last attempt failed) sends
# a copy of the message to its queue's DLQ itself, then acks the original
# (pcelery.worker.PersistentTask._send_to_dlq): the DLQ's URL, then one send. Nothing else on it.
DEAD_LETTER_ACTIONS = ["sqs:SendMessage", "sqs:GetQueueUrl"]
# The ops CLI (ops/, and app/outbox.py for replay) on every work queue and DLQ of its
# environment: depth, peek (receive, then make visible again), redrive in both modes (the
# native move task needs receive/delete/attributes on the DLQ and send on the destination),
# replay (publish) and purge.
OPS_QUEUE_ACTIONS = [
    "sqs:GetQueueUrl", "sqs:GetQueueAttributes", "sqs:ReceiveMessage", "sqs:SendMessage",
    "sqs:DeleteMessage", "sqs:ChangeMessageVisibility", "sqs:ListDeadLetterSourceQueues",
    "sqs:StartMessageMoveTask", "sqs:ListMessageMoveTasks", "sqs:CancelMessageMoveTask", "sqs:PurgeQueue",
]
# `ops depth` reads each queue's ApproximateAgeOfOldestMessage from CloudWatch. CloudWatch has no
# resource-level permissions for reading metrics, so this one is on "*".
OPS_METRIC_ACTIONS = ["cloudwatch:GetMetricStatistics"]


def grant_worker(role: iam.IRole, *, own_queue: sqs.IQueue, own_dead_letter_queue: sqs.IQueue,
                 work_queues: Iterable[sqs.IQueue]) -> None:
    """A worker consumes its own queue, publishes to every work queue, and sends to its own
    queue's DLQ only (a task it gives up on); it never reads, deletes from or moves a DLQ.

    A task may submit follow-up tasks to any queue, and the submit API publishes right after
    commit; without the publish grant every follow-up would wait for the relay.
    """
    role.add_to_principal_policy(iam.PolicyStatement(
        sid="ConsumeOwnQueue", actions=CONSUME_ACTIONS, resources=[own_queue.queue_arn]))
    role.add_to_principal_policy(iam.PolicyStatement(
        sid="DeadLetterOwnFailures", actions=DEAD_LETTER_ACTIONS, resources=[own_dead_letter_queue.queue_arn]))
    _publish(role, work_queues)


def grant_relay(role: iam.IRole, *, work_queues: Iterable[sqs.IQueue]) -> None:
    """The relay only publishes the rows their submitter failed to publish."""
    _publish(role, work_queues)


def grant_scheduler(role: iam.IRole, *, work_queues: Iterable[sqs.IQueue]) -> None:
    """The scheduler only publishes each slot's task (through the outbox, as any submitter), and
    looks up every catalog queue's URL at start."""
    _publish(role, work_queues)


def grant_ops(role: iam.IRole, *, queues: Iterable[sqs.IQueue]) -> None:
    """Exactly what the ops CLI calls, on the given work queues and DLQs of one environment."""
    role.add_to_principal_policy(iam.PolicyStatement(
        sid="OperateQueues", actions=OPS_QUEUE_ACTIONS, resources=[q.queue_arn for q in queues]))
    role.add_to_principal_policy(iam.PolicyStatement(
        sid="ReadQueueAge", actions=OPS_METRIC_ACTIONS, resources=["*"]))
    acknowledge(role, "AwsSolutions-IAM5[Resource::*]",
                "cloudwatch:GetMetricStatistics (ops depth reads each queue's oldest-message age) has no "
                "resource-level permissions; every SQS action of the ops role is scoped to this "
                "environment's queues and DLQs.")


def _publish(role: iam.IRole, queues: Iterable[sqs.IQueue]) -> None:
    role.add_to_principal_policy(iam.PolicyStatement(
        sid="PublishTasks", actions=PUBLISH_ACTIONS, resources=[q.queue_arn for q in queues]))


def grant_secret_keys(role: iam.IRole, *, keys: Iterable[kms.IKey], region: str) -> None:
    """kms:Decrypt on the customer keys of the secrets an execution role reads (cdk.json
    kms_key_arn), and only through Secrets Manager in the environment's region.

    On the role, not the key: the keys are imported, so their policies are the team's. Such a
    policy must let the account's IAM policies use the key (the default key policy does); a key
    of another account must name this account (infra/README.md)."""
    for key in keys:
        iam.Grant.add_to_principal(
            grantee=role, actions=["kms:Decrypt"], resource_arns=[key.key_arn],
            conditions={"StringEquals": {"kms:ViaService": f"secretsmanager.{region}.amazonaws.com"}},
        )
