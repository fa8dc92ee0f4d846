"""The outbox relay service and the one-off task definitions: schema migration and the ops CLI.

All run the environment's one application image (infra/image.py) with a different entry point,
on a read-only root file system. The relay publishes `pending` rows that their submitter failed to
publish; one task is enough (it batches, and several would be safe thanks to SKIP LOCKED), so it
does not scale. Each of the three has a security group of its own with no outbound rule: the stack
allows exactly what it calls (the database, and AWS's APIs: the VPC endpoints where the network has
them), since only the product's code runs there.
"""

from __future__ import annotations

from aws_cdk import RemovalPolicy
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_ecs as ecs
from aws_cdk import aws_logs as logs
from constructs import Construct

from pcelery.catalog import resource_name

from .workers import MIGRATE_COMMAND, add_schema_migration

RELAY_COMMAND = ["pcelery-relay"]
# The ops task's entry point: `aws ecs run-task --overrides` then passes only the ops arguments
# (["tasks", "--state", "dead"]) as the container's command.
OPS_ENTRY_POINT = ["pcelery-ops"]
OPS_CONTAINER = "ops"


class Relay(Construct):
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
        environment: dict[str, str],
        secrets: dict[str, ecs.Secret],
        migrate_environment: dict[str, str],
        migrate_secrets: dict[str, ecs.Secret],
        log_retention: logs.RetentionDays,
        log_removal_policy: RemovalPolicy,
    ) -> None:
        super().__init__(scope, id)
        self.service_name = resource_name(env_name, "relay")
        self.migrate_security_group = ec2.SecurityGroup(
            self, "MigrateSecurityGroup", vpc=vpc, allow_all_outbound=False,
            description=f"{resource_name(env_name)} one-off migrations: the database only",
        )
        # One relay at a time is the steady state; a deployment briefly runs two, which SKIP
        # LOCKED makes harmless.
        self.security_group, self.log_group, self.task_definition, self.service = product_service(
            self, service_name=self.service_name, description=f"{resource_name(env_name)} outbox relay: the "
            "database and SQS only", cluster=cluster, vpc=vpc, subnets=subnets, image=image,
            entry_point=RELAY_COMMAND, container="relay", desired_count=1, environment=environment,
            secrets=secrets, migrate_environment=migrate_environment, migrate_secrets=migrate_secrets,
            log_retention=log_retention, log_removal_policy=log_removal_policy)
        # For running a migration by hand (`aws ecs run-task`, infra/README.md); the services
        # also migrate in an init container before they start.
        self.migrate_task_definition, _ = product_task(
            self, "MigrateTask", family=resource_name(env_name, "migrate"), image=image,
            entry_point=MIGRATE_COMMAND, environment=migrate_environment, secrets=migrate_secrets,
            log_group=self.log_group, stream_prefix="migrate",
        )


class OpsTask(Construct):
    """`pcelery-ops` as a one-off Fargate task inside the VPC, for the commands that need RDS.

    On-call has no host in the VPC; `aws ecs run-task` with a command override is the way in.
    No ECS Exec: every run is one RunTask call whose arguments CloudTrail records, its output goes
    to its own log group, and nobody gets a shell in a container holding the DB credentials
    (infra/README.md). Its own security group, so the database's ingress rules and flow logs tell
    an operator's connection from a worker's.
    """

    def __init__(
        self,
        scope: Construct,
        id: str,
        *,
        env_name: str,
        vpc: ec2.IVpc,
        image: ecs.ContainerImage,
        environment: dict[str, str],
        secrets: dict[str, ecs.Secret],
        log_retention: logs.RetentionDays,
        log_removal_policy: RemovalPolicy,
    ) -> None:
        super().__init__(scope, id)
        self.log_group = logs.LogGroup(
            self, "Logs",
            retention=log_retention, removal_policy=log_removal_policy,
        )
        self.security_group = ec2.SecurityGroup(
            self, "SecurityGroup", vpc=vpc, allow_all_outbound=False,
            description=f"{resource_name(env_name)} ops one-off tasks: the database, SQS and CloudWatch only",
        )
        self.task_definition, self.container = product_task(
            self, "Task", family=resource_name(env_name, "ops"), image=image, entry_point=OPS_ENTRY_POINT,
            environment=environment, secrets=secrets, log_group=self.log_group, stream_prefix=OPS_CONTAINER,
        )


def product_task(scope, id, *, family, image, entry_point, environment, secrets, log_group, stream_prefix):
    """A one-container task definition running a console script of persistent-celery from the
    application image (relay, scheduler, migrate, ops): the smallest Fargate size, a read-only
    root, its output to `log_group` under `stream_prefix`; the container is named after the prefix."""
    task = ecs.FargateTaskDefinition(
        scope, id, cpu=256, memory_limit_mib=512, family=family,
        runtime_platform=ecs.RuntimePlatform(
            cpu_architecture=ecs.CpuArchitecture.X86_64,
            operating_system_family=ecs.OperatingSystemFamily.LINUX,
        ),
    )
    container = task.add_container(
        stream_prefix, image=image, entry_point=entry_point, environment=environment, secrets=secrets,
        logging=ecs.LogDrivers.aws_logs(stream_prefix=stream_prefix, log_group=log_group),
        readonly_root_filesystem=True,
    )
    return task, container


def product_service(scope: Construct, *, service_name: str, description: str, cluster: ecs.ICluster,
                    vpc: ec2.IVpc, subnets: ec2.SubnetSelection, image: ecs.ContainerImage,
                    entry_point: list[str], container: str, desired_count: int, environment: dict[str, str],
                    secrets: dict[str, ecs.Secret], migrate_environment: dict[str, str],
                    migrate_secrets: dict[str, ecs.Secret], log_retention: logs.RetentionDays,
                    log_removal_policy: RemovalPolicy,
                    ) -> tuple[ec2.SecurityGroup, logs.LogGroup, ecs.FargateTaskDefinition, ecs.FargateService]:
    """A fixed-size service of one console script (the relay, the scheduler), as children of
    `scope`: its own security group with no outbound rule (the stack adds what it calls), its own
    log group, a product_task with a `migrate` init container (it refuses an old schema), and a
    service whose deploys start new tasks before stopping old ones and roll back a failed one."""
    security_group = ec2.SecurityGroup(scope, "SecurityGroup", vpc=vpc, allow_all_outbound=False,
                                       description=description)
    # No fixed name: retained groups of a deleted stateless stack must not block recreating it.
    log_group = logs.LogGroup(scope, "Logs", retention=log_retention, removal_policy=log_removal_policy)
    # Every container sets its entry point (the image's own may be the team's web server).
    task_definition, main = product_task(
        scope, "Task", family=service_name, image=image, entry_point=entry_point, environment=environment,
        secrets=secrets, log_group=log_group, stream_prefix=container,
    )
    add_schema_migration(task_definition, main, image=image, environment=migrate_environment,
                         secrets=migrate_secrets, log_group=log_group)
    service = ecs.FargateService(
        scope, "Service",
        cluster=cluster,
        task_definition=task_definition,
        service_name=service_name,
        desired_count=desired_count,
        vpc_subnets=subnets,
        security_groups=[security_group],
        assign_public_ip=False,
        min_healthy_percent=100,
        max_healthy_percent=200,
        circuit_breaker=ecs.DeploymentCircuitBreaker(rollback=True),
    )
    return security_group, log_group, task_definition, service
