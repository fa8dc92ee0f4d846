"""An SQS queue and its DLQ for every catalog queue, with exactly the catalog's contract.

Names are explicit (`catalog.sqs_queue_name`), so the Celery app (kombu's queue_name_prefix) and
the ops CLI find the queues from the catalog alone, without reading stack outputs.
"""

from __future__ import annotations

from aws_cdk import Duration, RemovalPolicy, Stack
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from pcelery.catalog import DLQ_RETENTION, LONG_POLL_SECONDS, Catalog, sqs_queue_name


class Queues(Construct):
    def __init__(
        self,
        scope: Construct,
        id: str,
        *,
        env_name: str,
        catalog: Catalog,
        removal_policy: RemovalPolicy,
    ) -> None:
        super().__init__(scope, id)
        self.work: dict[str, sqs.Queue] = {}
        self.dead: dict[str, sqs.Queue] = {}
        for contract in catalog:
            holder = Construct(self, contract.name)
            name = sqs_queue_name(env_name, contract.name)
            # The DLQ's redrive-allow policy names its source by ARN. Built from the explicit name
            # rather than the queue's GetAtt, because the source's redrive policy already points
            # at the DLQ and two GetAtts would make a dependency cycle.
            source_arn = Stack.of(self).format_arn(service="sqs", resource=name)
            dead = sqs.Queue(
                holder,
                "DeadLetterQueue",
                queue_name=sqs_queue_name(env_name, contract.name, dlq=True),
                retention_period=Duration.seconds(DLQ_RETENTION),
                encryption=sqs.QueueEncryption.SQS_MANAGED,
                enforce_ssl=True,
                redrive_allow_policy=sqs.RedriveAllowPolicy(
                    redrive_permission=sqs.RedrivePermission.BY_QUEUE,
                    source_queues=[sqs.Queue.from_queue_arn(holder, "Source", source_arn)],
                ),
                removal_policy=removal_policy,
            )
            work = sqs.Queue(
                holder,
                "Queue",
                queue_name=name,
                visibility_timeout=Duration.seconds(contract.visibility_timeout),
                retention_period=Duration.seconds(contract.retention),
                receive_message_wait_time=Duration.seconds(LONG_POLL_SECONDS),
                dead_letter_queue=sqs.DeadLetterQueue(queue=dead, max_receive_count=contract.max_receive_count),
                encryption=sqs.QueueEncryption.SQS_MANAGED,
                enforce_ssl=True,
                removal_policy=removal_policy,
            )
            self.work[contract.name] = work
            self.dead[contract.name] = dead
