"""The claim-check store (task rows, outbox, results): RDS Postgres of the stack's own, or the
team's existing Postgres (cdk.json `database.external`).

Both constructs offer what the stateless stack wires up alike: `host`, `port`, `name`, the
RDS-format `secret` (JSON keys username and password), the customer `keys` that encrypt it (none
for RDS's own, on the AWS-managed key) and the `connections` whose security groups get the
tasks' ingress rules.
"""

from __future__ import annotations

from aws_cdk import Duration, RemovalPolicy
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_kms as kms
from aws_cdk import aws_logs as logs
from aws_cdk import aws_rds as rds
from constructs import Construct

from .secrets import import_key, import_secret

# Pinned to a minor version: an unpinned "17" lets RDS pick, and cfn-lint (W3691) rightly warns.
# Bump it here deliberately; auto minor upgrades are off so the template stays the truth.
ENGINE_VERSION = rds.PostgresEngineVersion.VER_17_6
DATABASE_NAME = "pcelery"
DATABASE_PORT = 5432
# Where the image keeps AWS's RDS CA bundle (Dockerfile). With DB_SSLROOTCERT set, app/settings.py
# connects with sslmode=verify-full: the server's certificate must chain to RDS's CA and name
# the host, so a spoofed endpoint inside the VPC cannot read the credentials.
RDS_CA_BUNDLE = "/etc/ssl/certs/rds-global-bundle.pem"
MASTER_USERNAME = "pcelery"


def removal_policy_for_logs(policy: RemovalPolicy) -> RemovalPolicy:
    # Log groups have no snapshot; keeping them is the closest thing.
    return RemovalPolicy.RETAIN if policy == RemovalPolicy.SNAPSHOT else policy


class Database(Construct):
    def __init__(
        self,
        scope: Construct,
        id: str,
        *,
        vpc: ec2.IVpc,
        subnets: ec2.SubnetSelection,
        rotation_subnets: ec2.SubnetSelection,
        instance_name: str,
        instance_type: str,
        allocated_storage_gib: int,
        max_allocated_storage_gib: int,
        multi_az: bool,
        backup_retention_days: int,
        rotation_days: int,
        deletion_protection: bool,
        removal_policy: RemovalPolicy,
        log_retention: logs.RetentionDays,
    ) -> None:
        super().__init__(scope, id)
        exports = ("postgresql", "upgrade")
        engine = rds.DatabaseInstanceEngine.postgres(version=ENGINE_VERSION)
        parameters = rds.ParameterGroup(
            self, "Parameters", engine=engine,
            description=f"{instance_name}: TLS only",
            # Without it a client that forgets sslmode=require talks to the store in clear text.
            parameters={"rds.force_ssl": "1"},
        )
        self.instance = rds.DatabaseInstance(
            self,
            "Instance",
            engine=engine,
            instance_identifier=instance_name,
            instance_type=ec2.InstanceType(instance_type),
            port=DATABASE_PORT,
            vpc=vpc,
            vpc_subnets=subnets,
            publicly_accessible=False,
            credentials=rds.Credentials.from_generated_secret(MASTER_USERNAME, secret_name=f"{instance_name}/master"),
            database_name=DATABASE_NAME,
            storage_encrypted=True,
            storage_type=rds.StorageType.GP3,
            allocated_storage=allocated_storage_gib,
            max_allocated_storage=max_allocated_storage_gib,
            multi_az=multi_az,
            backup_retention=Duration.days(backup_retention_days),
            copy_tags_to_snapshot=True,
            deletion_protection=deletion_protection,
            removal_policy=removal_policy,
            parameter_group=parameters,
            auto_minor_version_upgrade=False,
            cloudwatch_logs_exports=list(exports),
        )
        # The log groups RDS exports to, made here with a retention: cloudwatch_logs_retention
        # would add a custom-resource Lambda just to set it.
        for export in exports:
            group = logs.LogGroup(
                self, f"Logs-{export}", log_group_name=f"/aws/rds/instance/{instance_name}/{export}",
                retention=log_retention, removal_policy=removal_policy_for_logs(removal_policy),
            )
            self.instance.node.add_dependency(group)
        self.secret = self.instance.secret
        self.host = self.instance.db_instance_endpoint_address
        self.port = DATABASE_PORT
        self.name = DATABASE_NAME
        self.connections = self.instance.connections
        self.keys: list[kms.IKey] = []  # the master secret uses the AWS-managed aws/secretsmanager key
        # Keep the credentials as long as the data: a retained snapshot without them needs a
        # master-password reset before anything can connect.
        self.instance.node.find_child("Secret").apply_removal_policy(removal_policy_for_logs(removal_policy))
        if rotation_days:
            # Single-user rotation: ECS injects the password when a task starts, so running
            # tasks keep the old one for new connections until they are replaced. infra/README.md
            # says to force a new deployment after a rotation (or move to multi-user rotation).
            self.instance.add_rotation_single_user(
                automatically_after=Duration.days(rotation_days),
                # The rotation Lambda calls the Secrets Manager API, which the isolated subnets
                # cannot reach; it reaches the database from the task subnets instead.
                vpc_subnets=rotation_subnets,
            )


class ExternalDatabase(Construct):
    """The team's existing Postgres, so that the task rows commit with the team's own data.

    Nothing is created: the secret (and its customer key) and the security group are imported
    references. The database must be reachable from the stack's VPC (peering or a Transit
    Gateway, the team's to set up; infra/README.md). Without `security_group_id` the stack adds
    no ingress rule and the team allows the tasks in itself.
    """

    def __init__(
        self,
        scope: Construct,
        id: str,
        *,
        host: str,
        port: int,
        name: str,
        secret_arn: str,
        kms_key_arn: str | None,
        security_group_id: str | None,
    ) -> None:
        super().__init__(scope, id)
        self.host, self.port, self.name = host, port, name
        self.secret = import_secret(self, "Secret", arn=secret_arn)
        self.keys = [import_key(self, "SecretKey", arn=kms_key_arn)] if kms_key_arn else []
        groups = []
        if security_group_id:
            # Not mutable: the stack adds its ingress rules as resources of its own (stacks.py),
            # never by changing the team's group through the L2.
            groups.append(ec2.SecurityGroup.from_security_group_id(
                self, "SecurityGroup", security_group_id, mutable=False))
        self.connections = ec2.Connections(security_groups=groups, default_port=ec2.Port.tcp(port))
