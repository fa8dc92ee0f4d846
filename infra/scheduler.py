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

from .relay import product_task
from .workers import add_schema_migration

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
        # Outbound rules are the stack's to add (the database, HTTPS to AWS), none by default.
        self.security_group = ec2.SecurityGroup(
            self, "SecurityGroup", vpc=vpc, allow_all_outbound=False,
            description=f"{resource_name(env_name)} scheduler: the database and SQS only",
        )
        # No fixed name: retained groups of a deleted stateless stack must not block recreating it.
        self.log_group = logs.LogGroup(
            self, "Logs",
            retention=log_retention, removal_policy=log_removal_policy,
        )
        self.task_definition, scheduler = product_task(
            self, "Task", family=self.service_name, image=image, entry_point=SCHEDULER_ENTRY_POINT,
            environment=environment, secrets=secrets, log_group=self.log_group, stream_prefix=SCHEDULER_CONTAINER,
        )
        add_schema_migration(self.task_definition, scheduler, image=image, environment=migrate_environment,
                             secrets=migrate_secrets, log_group=self.log_group)
        self.service = ecs.FargateService(
            self, "Service",
            cluster=cluster,
            task_definition=self.task_definition,
            service_name=self.service_name,
            # Fixed, not scaled: more tasks only add availability, and none is ever idle work.
            desired_count=desired_count,
            vpc_subnets=subnets,
            security_groups=[self.security_group],
            assign_public_ip=False,
            # New tasks start before old ones stop, so a deploy never leaves the schedules without
            # a scheduler; the overlap is harmless (a slot is submitted once however many run).
            min_healthy_percent=100,
            max_healthy_percent=200,
            circuit_breaker=ecs.DeploymentCircuitBreaker(rollback=True),
        )
