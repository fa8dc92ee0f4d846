"""The two stacks of each environment and the app that holds them.

Stateful (VPC, queues, RDS, Redis) changes rarely and holds data; stateless (cluster, services,
scaling, alarms, dashboard) changes every release and can be destroyed and recreated at will.
All grants (through permissions.py) and connections between the two are made in the stateless
stack. Every name comes from `catalog.resource_name`: `<app>-<env>-<resource>`.

With `database.external` the stateful stack has no database at all: the stateless stack imports
the team's (its secret, key and security group) and wires it up exactly like the RDS instance.
"""

from __future__ import annotations

import re

import aws_cdk as cdk
from aws_cdk import RemovalPolicy, Stack
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_ecs as ecs
from aws_cdk import aws_logs as logs
from aws_cdk import aws_secretsmanager as secretsmanager
from constructs import Construct

from pcelery.catalog import APP_NAME, resource_name

from .cache import REDIS_PORT, Cache
from .config import EnvConfig
from .database import (
    RDS_CA_BUNDLE,
    Database,
    ExternalDatabase,
    RoleSecrets,
    removal_policy_for_logs,
)
from .image import application_image
from .monitoring import DatabaseTargets, Monitoring
from .nag import acknowledge_stateful, acknowledge_task_definitions
from .network import Network
from .permissions import grant_ops, grant_relay, grant_scheduler, grant_secret_keys, grant_worker
from .queues import Queues
from .relay import OpsTask, Relay
from .scheduler import Scheduler
from .secrets import ApplicationSecrets
from .workers import Workers

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
    def __init__(self, scope: Construct, id: str, *, config: EnvConfig) -> None:
        super().__init__(
            scope, id, config=config, termination_protection=config.protection.termination_protection,
            description=f"{APP_NAME} {config.name}: VPC, SQS queues and DLQs, "
                        f"{'RDS Postgres, ' if config.rds else ''}Redis (stateful)",
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
            self, "Queues", env_name=config.name, catalog=config.catalog,
            # A queue has no snapshot; "snapshot" keeps it.
            removal_policy=removal_policy_for_logs(removal),
        )
        # None with database.external: the team's database is no resource of this app.
        self.database: Database | None = None
        if db := config.rds:
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
        # The logins of the database roles (runtime, ops), for either database: created here, next to
        # the data they open; pcelery-migrate creates the roles themselves.
        self.roles = RoleSecrets(
            self, "DatabaseRoles",
            env_name=config.name,
            database=self.database,
            rotation_days=config.rds.rotation_days if config.rds else 0,
            rotation_subnets=self.network.task_subnets,
            removal_policy=removal,
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
        acknowledge_stateful(config, network=self.network, database=self.database, roles=self.roles,
                             cache=self.cache)


class StatelessStack(_EnvStack):
    def __init__(self, scope: Construct, id: str, *, config: EnvConfig, stateful: StatefulStack) -> None:
        super().__init__(
            scope, id, config=config,
            description=f"{APP_NAME} {config.name}: ECS workers, outbox relay, "
                        f"{'scheduler, ' if config.application.schedules_spec else ''}scaling, alarms, dashboard "
                        "(stateless)",
        )
        self.add_stack_dependency(stateful)
        retention = log_retention(config.log_retention_days)
        log_removal = removal_policy_for_logs(_REMOVAL[config.protection.removal_policy])
        network, queues, cache = stateful.network, stateful.queues, stateful.cache
        application, catalog = config.application, config.catalog
        # The stateful stack's RDS instance, or the team's database (database.external), imported
        # here: its secret, key and security group are the stateless stack's references only.
        database = stateful.database or self._external_database(config)

        # One image for every container of the environment: the team's, with persistent-celery
        # installed, whose console scripts are the entry points. The relay and ops need the team's
        # catalog module, which only its image has, and one image keeps the application and the
        # product in lockstep (infra/image.py).
        image = application_image(self, image=application.image)
        # What every container gets: the environment, the catalog, where the database is.
        environment = {
            "PCELERY_ENV": config.name,
            # The spec synth loaded the catalog from: infra and every container read the same queues.
            "PCELERY_CATALOG": application.catalog_spec,
            "AWS_REGION": config.region,
            "DB_HOST": database.host,
            "DB_PORT": str(database.port),
            "DB_NAME": database.name,
            "DB_SSLROOTCERT": RDS_CA_BUNDLE,
            # The team's own non-secret settings (DJANGO_SETTINGS_MODULE...); config.py refuses
            # the names above and anything that looks like a credential.
            **application.environment,
        }
        # Credentials only ever as ECS secrets: resolved by the agent at task start, never in the
        # task definition or the template. Adding a container grants its execution role the read
        # of exactly its secrets, so each container gets only what its process reads:
        # - workers: the runtime role's login, the team's secrets (its code runs there) and the
        #   Redis token where the cache is on;
        # - the relay and the scheduler: the runtime role's login;
        # - the ops task: the ops role's login;
        # - migrations (the one-off task and the services' init containers): the tables' owner
        #   (the RDS master secret, or database.external's) and the two roles' logins, which
        #   pcelery-migrate creates or updates (pcelery.schema.ensure_roles).
        roles = stateful.roles.secrets
        application_secrets = ApplicationSecrets(self, "ApplicationSecrets", secrets=application.secrets)
        runtime_login = _login(roles["runtime"])
        migrate_secrets = _login(database.secret)
        for kind, secret in roles.items():  # PCELERY_RUNTIME_DB_USER, ..._PASSWORD, PCELERY_OPS_DB_USER...
            for name, value in _login(secret).items():
                migrate_secrets[f"PCELERY_{kind.upper()}_{name}"] = value
        worker_secrets = {**runtime_login, **application_secrets.container_secrets}
        # The team's code: the modules that declare its tasks and, if the team has one, its own
        # Celery app (else the product's). The workers run the tasks; the scheduler imports them to
        # know each task's declared queue.
        team_code = {"PCELERY_TASK_MODULES": ",".join(application.task_modules)}
        if application.celery_app:
            team_code["PCELERY_CELERY_APP"] = application.celery_app
        # What only a worker needs on top: the cache.
        worker_environment = {**environment, **team_code}
        if cache:
            worker_environment.update(REDIS_HOST=cache.host, REDIS_PORT=str(REDIS_PORT))
            worker_secrets["REDIS_AUTH_TOKEN"] = ecs.Secret.from_secrets_manager(cache.auth_token)

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
            environment=worker_environment,
            secrets=worker_secrets,
            migrate_environment=dict(environment),
            migrate_secrets=migrate_secrets,
            log_retention=retention,
            log_removal_policy=log_removal,
        )
        self.relay = Relay(
            self, "Relay",
            env_name=config.name,
            cluster=self.workers.cluster,
            vpc=network.vpc,
            subnets=network.task_subnets,
            image=image,
            environment=dict(environment),
            secrets=dict(runtime_login),
            migrate_environment=dict(environment),
            migrate_secrets=migrate_secrets,
            log_retention=retention,
            log_removal_policy=log_removal,
        )
        # `ops schedules` shows the schedules the scheduler runs, loaded from the same module.
        ops_environment = dict(environment)
        if application.schedules_spec:
            ops_environment["PCELERY_SCHEDULES"] = application.schedules_spec
        self.ops = OpsTask(
            self, "Ops",
            env_name=config.name,
            vpc=network.vpc,
            image=image,
            environment=ops_environment,
            secrets=_login(roles["ops"]),
            log_retention=retention,
            log_removal_policy=log_removal,
        )
        # Periodic tasks, only where the team names schedules (application.schedules). Treated like
        # the relay (the runtime login and no other secret, no Redis); the team's task modules and
        # Celery app besides, which it imports but never runs.
        self.scheduler: Scheduler | None = None
        if application.schedules_spec:
            self.scheduler = Scheduler(
                self, "Scheduler",
                env_name=config.name,
                cluster=self.workers.cluster,
                vpc=network.vpc,
                subnets=network.task_subnets,
                image=image,
                desired_count=config.scheduler.tasks,
                environment={**environment, **team_code, "PCELERY_SCHEDULES": application.schedules_spec},
                secrets=dict(runtime_login),
                migrate_environment=dict(environment),
                migrate_secrets=migrate_secrets,
                log_retention=retention,
                log_removal_policy=log_removal,
            )

        # --- wiring: who may talk to what (the migration task gets no SQS grant at all) ---
        work = [queues.work[q.name] for q in catalog]
        for q in catalog:
            grant_worker(self.workers.task_roles[q.name], own_queue=queues.work[q.name],
                         own_dead_letter_queue=queues.dead[q.name], work_queues=work)
        grant_relay(self.relay.task_definition.task_role, work_queues=work)
        if self.scheduler:
            grant_scheduler(self.scheduler.task_definition.task_role, work_queues=work)
        grant_ops(self.ops.task_definition.task_role, queues=[*work, *(queues.dead[q.name] for q in catalog)])

        # Ingress rules made here, in the stateless stack: the L2 `allow_from` would put them in
        # the stateful stack next to the target group and make the two stacks reference each other.
        # On an external database's own group too, where cdk.json names it (database.external.
        # security_group_id). One rule per group, so the database's rules and the flow logs tell a
        # worker's connection from the relay's, a migration's or an operator's. The team's group
        # says whose rules they are. Only the workers reach Redis (the result backend).
        owner = f"{resource_name(config.name)} " if config.external_database else ""
        clients = {
            "DatabaseFromWorkers": (self.workers.security_group, f"{owner}workers"),
            "DatabaseFromRelay": (self.relay.security_group, f"{owner}the outbox relay"),
            "DatabaseFromMigrate": (self.relay.migrate_security_group, f"{owner}one-off migrations"),
            "DatabaseFromOps": (self.ops.security_group, f"{owner}the ops one-off task"),
        }
        if self.scheduler:
            clients["DatabaseFromScheduler"] = (self.scheduler.security_group, f"{owner}the scheduler")
        for id, (group, description) in clients.items():
            self._allow(group, database.connections, database.port, id, description)
        if cache:
            self._allow(self.workers.security_group, cache.connections, REDIS_PORT, "CacheFromWorkers", "workers")
        # The relay, migrate and ops tasks run only the product's code, and the scheduler only the
        # product's loop (the team's modules are imported, not run): their outbound traffic is what
        # that calls. The workers keep all outbound (the team's tasks call what they call).
        egress = _Egress.of(config, network)
        restricted = [("Relay", self.relay.security_group, "SQS"),
                      ("Migrate", self.relay.migrate_security_group, None),
                      ("Ops", self.ops.security_group, "SQS, CloudWatch")]
        if self.scheduler:
            restricted.append(("Scheduler", self.scheduler.security_group, "SQS"))
        for id, group, calls in restricted:
            egress.restrict(self, id, group, database=database, calls=calls)

        self.monitoring = Monitoring(
            self, "Monitoring",
            env_name=config.name,
            catalog=catalog,
            work_queues=dict(queues.work),
            dead_letter_queues=dict(queues.dead),
            cluster_name=self.workers.cluster_name,
            worker_service_names=dict(self.workers.service_names),
            relay_service_name=self.relay.service_name,
            scheduler_service_name=self.scheduler.service_name if self.scheduler else None,
            # The RDS alarms and dashboard widget watch the instance this app owns; the team
            # watches its own database.
            database=DatabaseTargets(
                instance_identifier=stateful.database.instance.instance_identifier,
                allocated_storage_gib=config.rds.allocated_storage_gib,
                max_connections=config.rds.max_connections,
            ) if stateful.database else None,
            cache_node_ids=cache.node_ids if cache else None,
            alarm_email=config.alarm_email,
            outbox_lag_alarm_seconds=config.outbox_lag_alarm_seconds,
        )

        cdk.CfnOutput(self, "ClusterName", value=self.workers.cluster.cluster_name)
        cdk.CfnOutput(self, "MigrateTaskDefinition", value=self.relay.migrate_task_definition.family)
        # The workers' group (the name predates the relay's and the migrations' own groups).
        cdk.CfnOutput(self, "TaskSecurityGroup", value=self.workers.security_group.security_group_id)
        cdk.CfnOutput(self, "MigrateSecurityGroup", value=self.relay.migrate_security_group.security_group_id)
        cdk.CfnOutput(self, "TaskSubnets", value=",".join(
            network.vpc.select_subnets(subnet_type=network.task_subnets.subnet_type).subnet_ids))
        cdk.CfnOutput(self, "AlarmTopic", value=self.monitoring.topic.topic_arn)
        # What `aws ecs run-task` of the ops task needs (RUNBOOK.md#ops-in-the-vpc), and where its
        # output and every service's logs go (the log groups have generated names).
        cdk.CfnOutput(self, "OpsTaskDefinition", value=self.ops.task_definition.family)
        cdk.CfnOutput(self, "OpsSecurityGroup", value=self.ops.security_group.security_group_id)
        cdk.CfnOutput(self, "OpsLogGroup", value=self.ops.log_group.log_group_name)
        cdk.CfnOutput(self, "RelayLogGroup", value=self.relay.log_group.log_group_name)
        if self.scheduler:
            cdk.CfnOutput(self, "SchedulerLogGroup", value=self.scheduler.log_group.log_group_name)
        for q in catalog:
            cdk.CfnOutput(self, f"WorkerLogGroup{_output_id(q.name)}",
                          value=self.workers.log_groups[q.name].log_group_name)
        scheduler_tasks = [self.scheduler.task_definition] if self.scheduler else []
        task_definitions = [
            *(s.task_definition for s in self.workers.services.values()),
            self.relay.task_definition, self.relay.migrate_task_definition, self.ops.task_definition,
            *scheduler_tasks,
        ]
        # The customer keys of the secrets each task reads: the database's (migrations only) and the
        # team's (workers only). The role secrets are on the AWS-managed key.
        worker_tasks = [s.task_definition for s in self.workers.services.values()]
        migrating = [*worker_tasks, self.relay.task_definition, self.relay.migrate_task_definition, *scheduler_tasks]
        for task in task_definitions:
            keys = [*(database.keys if task in migrating else []),
                    *(application_secrets.keys if task in worker_tasks else [])]
            if keys:
                grant_secret_keys(task.execution_role, keys=keys, region=config.region)
        acknowledge_task_definitions(task_definitions)

    def _external_database(self, config: EnvConfig) -> ExternalDatabase:
        external = config.external_database
        return ExternalDatabase(
            self, "ExternalDatabase",
            host=external.host,
            port=external.port,
            name=external.name,
            secret_arn=external.secret_arn,
            kms_key_arn=external.kms_key_arn,
            security_group_id=external.security_group_id,
        )

    def _allow(self, source: ec2.ISecurityGroup, target: ec2.Connections, port: int, id: str,
               description: str) -> None:
        for i, group in enumerate(target.security_groups):
            ec2.CfnSecurityGroupIngress(
                self, f"{id}{i}", group_id=group.security_group_id, source_security_group_id=source.security_group_id,
                ip_protocol="tcp", from_port=port, to_port=port,
                description=f"from {description}",
            )


def _login(secret: secretsmanager.ISecret) -> dict[str, ecs.Secret]:
    """DB_USER and DB_PASSWORD from an RDS-format secret (JSON keys username and password)."""
    return {"DB_USER": ecs.Secret.from_secrets_manager(secret, "username"),
            "DB_PASSWORD": ecs.Secret.from_secrets_manager(secret, "password")}


class _Egress:
    """The outbound rules of the groups whose tasks run only the product's code (relay, migrate,
    ops, scheduler): the database on its port, and HTTPS to what ECS and the product call. Where the network
    has interface endpoints and the image comes from ECR, HTTPS goes only to the endpoints' group
    and to S3's prefix list (the image layers, through the gateway endpoint); otherwise AWS's APIs
    are reached through NAT, at addresses no rule can name, so HTTPS goes anywhere."""

    def __init__(self, endpoints: ec2.ISecurityGroup | None, s3_prefix_list_id: str | None) -> None:
        self.endpoints, self.s3_prefix_list_id = endpoints, s3_prefix_list_id

    @classmethod
    def of(cls, config: EnvConfig, network: Network) -> _Egress:
        image = config.application.image
        from_ecr = image.directory is not None or image.ecr is not None  # an asset is pushed to ECR
        if from_ecr and network.endpoint_security_group is not None and network.s3_prefix_list_id is not None:
            return cls(network.endpoint_security_group, network.s3_prefix_list_id)
        return cls(None, None)

    def restrict(self, scope: Construct, id: str, group: ec2.SecurityGroup, *, database: Database | ExternalDatabase,
                 calls: str | None) -> None:
        """`calls`: the AWS APIs the task's own code calls (beyond what ECS needs to start it)."""
        port = ec2.Port.tcp(database.port)
        db_groups = database.connections.security_groups
        for i, db_group in enumerate(db_groups):
            ec2.CfnSecurityGroupEgress(
                scope, f"{id}ToDatabase{i}", group_id=group.security_group_id,
                destination_security_group_id=db_group.security_group_id, ip_protocol="tcp",
                from_port=database.port, to_port=database.port, description="to the database")
        if not db_groups:  # an external database without its group: its address is not known here
            group.add_egress_rule(ec2.Peer.any_ipv4(), port, "to the database (its address is the team's)")
        https = ec2.Port.tcp(443)
        what = f"{calls}, " if calls else ""
        if self.endpoints is None:
            group.add_egress_rule(ec2.Peer.any_ipv4(), https,
                                  f"HTTPS to {what}ECR, Secrets Manager and Logs through NAT")
            return
        ec2.CfnSecurityGroupEgress(
            scope, f"{id}ToEndpoints", group_id=group.security_group_id,
            destination_security_group_id=self.endpoints.security_group_id, ip_protocol="tcp",
            from_port=443, to_port=443, description=f"HTTPS to the VPC endpoints: {what}ECR, Secrets Manager, Logs")
        group.add_egress_rule(ec2.Peer.prefix_list(self.s3_prefix_list_id), https,
                              "HTTPS to S3 through the gateway endpoint (ECR image layers)")


def _output_id(name: str) -> str:
    """A catalog queue name as part of a CloudFormation output id (letters and digits only)."""
    return "".join(part.capitalize() for part in re.split(r"[^A-Za-z0-9]+", name))


def build_app(app: cdk.App, configs: list[EnvConfig]) -> dict[str, tuple[StatefulStack, StatelessStack]]:
    """Both stacks of every given environment, in `app`, each with its own catalog and image."""
    stacks = {}
    for config in configs:
        stateful_name, stateless_name = stack_names(config.name)
        stateful = StatefulStack(app, stateful_name, config=config)
        stateless = StatelessStack(app, stateless_name, config=config, stateful=stateful)
        stacks[config.name] = (stateful, stateless)
    return stacks
