"""The periodic-task scheduler service: `pcelery-scheduler`, where `application.schedules` is set.

Its own construct and module rather than a corner of relay.py: it is optional per environment,
runs several tasks where the relay runs one, and imports the team's task modules and Celery app
(to know each task's declared queue and refuse an undeclared name), which the relay never does.
It gets the relay's least privilege all the same: a security group of its own with no outbound rule
(the stack allows the database and HTTPS to AWS's APIs), the runtime role's login and no other
secret, no Redis, a read-only root, and a `migrate` init container, since it refuses to start on an
old schema. Each slot's task id derives from the schedule and the slot and its insert is idempotent,
so the tasks of the service never submit a slot twice and need no leader; every pass prints an EMF
line (PersistentCelery/SchedulerPasses) that the `scheduler-stopped` alarm watches.
"""

from __future__ import annotations

from aws_cdk import RemovalPolicy
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_ecs as ecs
from aws_cdk import aws_logs as logs
from constructs import Construct

from pcelery.catalog import resource_name

from .relay import product_service

SCHEDULER_ENTRY_POINT = ["pcelery-scheduler"]
SCHEDULER_CONTAINER = "scheduler"


class Scheduler(Construct):
    def __init__(
        self,
        scope: Construct,
        id: str,
        *,
        env_name: str,
        cluster: ecs.ICluster,
        vpc: ec2.IVpc,
        subnets: ec2.SubnetSelection,
        image: ecs.ContainerImage,
        desired_count: int,
        environment: dict[str, str],
        secrets: dict[str, ecs.Secret],
        migrate_environment: dict[str, str],
        migrate_secrets: dict[str, ecs.Secret],
        log_retention: logs.RetentionDays,
        log_removal_policy: RemovalPolicy,
    ) -> None:
        super().__init__(scope, id)
        self.service_name = resource_name(env_name, "scheduler")
        # Fixed, not scaled: more tasks only add availability, and none is ever idle work. A
        # deploy's overlap is harmless (a slot is submitted once however many run).
        self.security_group, self.log_group, self.task_definition, self.service = product_service(
            self, service_name=self.service_name, description=f"{resource_name(env_name)} scheduler: the "
            "database and SQS only", cluster=cluster, vpc=vpc, subnets=subnets, image=image,
            entry_point=SCHEDULER_ENTRY_POINT, container=SCHEDULER_CONTAINER, desired_count=desired_count,
            environment=environment, secrets=secrets, migrate_environment=migrate_environment,
            migrate_secrets=migrate_secrets, log_retention=log_retention, log_removal_policy=log_removal_policy)
