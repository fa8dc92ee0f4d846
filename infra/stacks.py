"""The two stacks of each environment and the app that holds them.

Stateful (VPC, queues, RDS, Redis) changes rarely and holds data; stateless (cluster, services,
scaling, alarms, dashboard) changes every release and can be destroyed and recreated at will.
All grants (through permissions.py) and connections between the two are made in the stateless
stack. Every name comes from `catalog.resource_name`: `<app>-<env>-<resource>`.
"""

from __future__ import annotations

import re
from pathlib import Path

import aws_cdk as cdk
from aws_cdk import RemovalPolicy, Stack
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_ecr_assets as ecr_assets
from aws_cdk import aws_ecs as ecs
from aws_cdk import aws_logs as logs
from constructs import Construct

from pcelery.catalog import APP_NAME, CATALOG, Catalog, resource_name

from .cache import REDIS_PORT, Cache
from .config import EnvConfig
from .database import (
    DATABASE_NAME,
    DATABASE_PORT,
    RDS_CA_BUNDLE,
    Database,
    removal_policy_for_logs,
)
from .monitoring import DatabaseTargets, Monitoring
from .nag import acknowledge_stateful, acknowledge_task_definitions
from .network import Network
from .permissions import grant_ops, grant_relay, grant_worker
from .queues import Queues
from .relay import OpsTask, Relay
from .workers import Workers

REPO_ROOT = Path(__file__).resolve().parent.parent


_RETENTION_NAMES = {
    1: "ONE_DAY", 3: "THREE_DAYS", 5: "FIVE_DAYS", 7: "ONE_WEEK", 14: "TWO_WEEKS", 30: "ONE_MONTH",
    60: "TWO_MONTHS", 90: "THREE_MONTHS", 120: "FOUR_MONTHS", 150: "FIVE_MONTHS", 180: "SIX_MONTHS",
    365: "ONE_YEAR", 400: "THIRTEEN_MONTHS", 545: "EIGHTEEN_MONTHS", 731: "TWO_YEARS",
    1096: "THREE_YEARS", 1827: "FIVE_YEARS", 3653: "TEN_YEARS",
}


def log_retention(days: int) -> logs.RetentionDays:
    return logs.RetentionDays[_RETENTION_NAMES[days]]


_REMOVAL = {"destroy": RemovalPolicy.DESTROY, "snapshot": RemovalPolicy.SNAPSHOT, "retain": RemovalPolicy.RETAIN}


def stack_names(env: str) -> tuple[str, str]:
    return resource_name(env, "stateful"), resource_name(env, "stateless")


class _EnvStack(Stack):
    def __init__(self, scope: Construct, id: str, *, config: EnvConfig, description: str, **kwargs) -> None:
        self._zones = list(config.availability_zones)
        super().__init__(
            scope, id, stack_name=id, description=description,
            env=cdk.Environment(account=config.account, region=config.region), **kwargs,
        )
        cdk.Tags.of(self).add("app", APP_NAME)
        cdk.Tags.of(self).add("environment", config.name)

    @property
    def availability_zones(self) -> list[str]:
        # The zones from cdk.json. Without this override a stack with an account and region asks
        # AWS for its zones at synth time, which needs credentials and breaks offline synth.
        return self._zones


class StatefulStack(_EnvStack):
    def __init__(self, scope: Construct, id: str, *, config: EnvConfig, catalog: Catalog) -> None:
        super().__init__(
            scope, id, config=config, termination_protection=config.protection.termination_protection,
            description=f"{APP_NAME} {config.name}: VPC, SQS queues and DLQs, RDS Postgres, Redis (stateful)",
        )
        removal = _REMOVAL[config.protection.removal_policy]
        retention = log_retention(config.log_retention_days)
        self.config = config
        self.network = Network(
            self, "Network",
            cidr=config.network.cidr,
            availability_zones=list(config.availability_zones),
            nat_gateways=config.network.nat_gateways,
            flow_logs=config.network.flow_logs,
            interface_endpoints=config.network.interface_endpoints,
            log_retention=retention,
            removal_policy=removal_policy_for_logs(removal),
        )
        self.queues = Queues(
            self, "Queues", env_name=config.name, catalog=catalog,
            # A queue has no snapshot; "snapshot" keeps it.
            removal_policy=removal_policy_for_logs(removal),
        )
        db = config.database
        self.database = Database(
            self, "Database",
            vpc=self.network.vpc,
            subnets=self.network.data_subnets,
            rotation_subnets=self.network.task_subnets,
            instance_name=resource_name(config.name),
            instance_type=db.instance_type,
            allocated_storage_gib=db.allocated_storage_gib,
            max_allocated_storage_gib=db.max_allocated_storage_gib,
            multi_az=db.multi_az,
            backup_retention_days=db.backup_retention_days,
            rotation_days=db.rotation_days,
            deletion_protection=config.protection.deletion_protection,
            removal_policy=removal,
            log_retention=retention,
        )
        self.cache = None
        if config.cache:
            self.cache = Cache(
                self, "Cache",
                vpc=self.network.vpc,
                subnets=self.network.data_subnets,
                replication_group_id=resource_name(config.name),
                node_type=config.cache.node_type,
                replicas=config.cache.replicas,
                removal_policy=removal,
            )
        acknowledge_stateful(config, network=self.network, database=self.database, cache=self.cache)


class StatelessStack(_EnvStack):
    def __init__(self, scope: Construct, id: str, *, config: EnvConfig, catalog: Catalog,
                 stateful: StatefulStack, image_directory: Path) -> None:
        super().__init__(
            scope, id, config=config,
            description=f"{APP_NAME} {config.name}: ECS workers, outbox relay, scaling, alarms, dashboard (stateless)",
        )
        self.add_stack_dependency(stateful)
        retention = log_retention(config.log_retention_days)
        log_removal = removal_policy_for_logs(_REMOVAL[config.protection.removal_policy])
        network, queues, database, cache = stateful.network, stateful.queues, stateful.database, stateful.cache

        # The asset copies its folder into cdk.out on every synth, filtered by the folder's
        # .dockerignore (an allowlist): only what the image is built from, so an infra-only change
        # builds no new image.
        image = ecs.ContainerImage.from_asset(
            str(image_directory), platform=ecr_assets.Platform.LINUX_AMD64, ignore_mode=cdk.IgnoreMode.DOCKER,
        )
        environment = {
            "PCELERY_ENV": config.name,
            "AWS_REGION": config.region,
            "DB_HOST": database.instance.db_instance_endpoint_address,
            "DB_PORT": str(DATABASE_PORT),
            "DB_NAME": DATABASE_NAME,
            "DB_SSLROOTCERT": RDS_CA_BUNDLE,
        }
        # Credentials only ever as ECS secrets: resolved by the agent at task start, never in the
        # task definition or the template.
        secrets = {
            "DB_USER": ecs.Secret.from_secrets_manager(database.secret, "username"),
            "DB_PASSWORD": ecs.Secret.from_secrets_manager(database.secret, "password"),
        }
        # The ops task talks to SQS and Postgres only: no Redis host, no Redis token.
        ops_environment, ops_secrets = dict(environment), dict(secrets)
        if cache:
            environment.update(REDIS_HOST=cache.host, REDIS_PORT=str(REDIS_PORT))
            secrets["REDIS_AUTH_TOKEN"] = ecs.Secret.from_secrets_manager(cache.auth_token)

        self.workers = Workers(
            self, "Workers",
            env_name=config.name,
            vpc=network.vpc,
            subnets=network.task_subnets,
            catalog=catalog,
            queues=dict(queues.work),
            bounds={q.name: config.worker_bounds(q) for q in catalog},
            image=image,
            cpu=config.workers.cpu,
            memory_mib=config.workers.memory_mib,
            environment=environment,
            secrets=secrets,
            log_retention=retention,
            log_removal_policy=log_removal,
        )
        self.relay = Relay(
            self, "Relay",
            env_name=config.name,
            cluster=self.workers.cluster,
            subnets=network.task_subnets,
            security_group=self.workers.security_group,
            image=image,
            environment=environment,
            secrets=secrets,
            log_retention=retention,
            log_removal_policy=log_removal,
        )
        self.ops = OpsTask(
            self, "Ops",
            env_name=config.name,
            vpc=network.vpc,
            image=image,
            environment=ops_environment,
            secrets=ops_secrets,
            log_retention=retention,
            log_removal_policy=log_removal,
        )

        # --- wiring: who may talk to what (the migration task gets no SQS grant at all) ---
        work = [queues.work[q.name] for q in catalog]
        for q in catalog:
            grant_worker(self.workers.task_roles[q.name], own_queue=queues.work[q.name], work_queues=work)
        grant_relay(self.relay.task_definition.task_role, work_queues=work)
        grant_ops(self.ops.task_definition.task_role, queues=[*work, *(queues.dead[q.name] for q in catalog)])

        # Ingress rules made here, in the stateless stack: the L2 `allow_from` would put them in
        # the stateful stack next to the target group and make the two stacks reference each other.
        tasks = self.workers.security_group
        self._allow(tasks, database.instance.connections, DATABASE_PORT, "DatabaseFromTasks",
                    "workers, relay and migrations")
        self._allow(self.ops.security_group, database.instance.connections, DATABASE_PORT, "DatabaseFromOps",
                    "the ops one-off task")
        if cache:
            self._allow(tasks, cache.connections, REDIS_PORT, "CacheFromTasks", "workers and relay")

        self.monitoring = Monitoring(
            self, "Monitoring",
            env_name=config.name,
            catalog=catalog,
            work_queues=dict(queues.work),
            dead_letter_queues=dict(queues.dead),
            cluster_name=self.workers.cluster_name,
            worker_service_names=dict(self.workers.service_names),
            relay_service_name=self.relay.service_name,
            database=DatabaseTargets(
                instance_identifier=database.instance.instance_identifier,
                allocated_storage_gib=config.database.allocated_storage_gib,
                max_connections=config.database.max_connections,
            ),
            cache_node_ids=cache.node_ids if cache else None,
            alarm_email=config.alarm_email,
            outbox_lag_alarm_seconds=config.outbox_lag_alarm_seconds,
        )

        cdk.CfnOutput(self, "ClusterName", value=self.workers.cluster.cluster_name)
        cdk.CfnOutput(self, "MigrateTaskDefinition", value=self.relay.migrate_task_definition.family)
        cdk.CfnOutput(self, "TaskSecurityGroup", value=self.workers.security_group.security_group_id)
        cdk.CfnOutput(self, "TaskSubnets", value=",".join(
            network.vpc.select_subnets(subnet_type=network.task_subnets.subnet_type).subnet_ids))
        cdk.CfnOutput(self, "AlarmTopic", value=self.monitoring.topic.topic_arn)
        # What `aws ecs run-task` of the ops task needs (RUNBOOK.md#ops-in-the-vpc), and where its
        # output and every service's logs go (the log groups have generated names).
        cdk.CfnOutput(self, "OpsTaskDefinition", value=self.ops.task_definition.family)
        cdk.CfnOutput(self, "OpsSecurityGroup", value=self.ops.security_group.security_group_id)
        cdk.CfnOutput(self, "OpsLogGroup", value=self.ops.log_group.log_group_name)
        cdk.CfnOutput(self, "RelayLogGroup", value=self.relay.log_group.log_group_name)
        for q in catalog:
            cdk.CfnOutput(self, f"WorkerLogGroup{_output_id(q.name)}",
                          value=self.workers.log_groups[q.name].log_group_name)
        acknowledge_task_definitions([
            *(s.task_definition for s in self.workers.services.values()),
            self.relay.task_definition, self.relay.migrate_task_definition, self.ops.task_definition,
        ])

    def _allow(self, source: ec2.ISecurityGroup, target: ec2.Connections, port: int, id: str,
               description: str) -> None:
        for i, group in enumerate(target.security_groups):
            ec2.CfnSecurityGroupIngress(
                self, f"{id}{i}", group_id=group.security_group_id, source_security_group_id=source.security_group_id,
                ip_protocol="tcp", from_port=port, to_port=port,
                description=f"from {description}",
            )


def _output_id(name: str) -> str:
    """A catalog queue name as part of a CloudFormation output id (letters and digits only)."""
    return "".join(part.capitalize() for part in re.split(r"[^A-Za-z0-9]+", name))


def build_app(app: cdk.App, configs: list[EnvConfig], *, catalog: Catalog = CATALOG,
              image_directory: Path = REPO_ROOT) -> dict[str, tuple[StatefulStack, StatelessStack]]:
    """Both stacks of every given environment, in `app`."""
    stacks = {}
    for config in configs:
        stateful_name, stateless_name = stack_names(config.name)
        stateful = StatefulStack(app, stateful_name, config=config, catalog=catalog)
        stateless = StatelessStack(app, stateless_name, config=config, catalog=catalog,
                                   stateful=stateful, image_directory=image_directory)
        stacks[config.name] = (stateful, stateless)
    return stacks
