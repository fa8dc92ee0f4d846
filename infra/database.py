"""The claim-check store (task rows, outbox, results): RDS Postgres of the stack's own, or the
team's existing Postgres (cdk.json `database.external`).

Both constructs offer what the stateless stack wires up alike: `host`, `port`, `name`, the
RDS-format `secret` (JSON keys username and password), the customer `keys` that encrypt it (none
for RDS's own, on the AWS-managed key) and the `connections` whose security groups get the
tasks' ingress rules. That secret is the migration's alone (it owns the tables); the workers, the
relay and the ops task log in as the database roles whose secrets `RoleSecrets` makes, and which
`pcelery-migrate` creates (pcelery.schema.ensure_roles).
"""

from __future__ import annotations

import json

from aws_cdk import Duration, RemovalPolicy
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_kms as kms
from aws_cdk import aws_logs as logs
from aws_cdk import aws_rds as rds
from aws_cdk import aws_secretsmanager as secretsmanager
from constructs import Construct

from pcelery.catalog import resource_name
from pcelery.settings import ROLE_KINDS

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
# Characters left out of generated role passwords (CDK's default for RDS secrets): nothing that
# needs quoting in a URL, a shell or a libpq connection string.
PASSWORD_EXCLUDE = " %+~`#$&*()|[]{}:;<>?!'/@\"\\"


def role_name(env_name: str, kind: str) -> str:
    """The Postgres login of a database role: pcelery_<env>_<kind> (runtime, ops). Named per
    environment because roles belong to the whole Postgres instance, which a team's external
    database may share between environments."""
    return f"{resource_name(env_name).replace('-', '_')}_{kind}"


def role_secret_name(env_name: str, kind: str) -> str:
    return f"{resource_name(env_name)}/{kind}"


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


class RoleSecrets(Construct):
    """The logins of the database roles, one Secrets Manager secret each (`pcelery-<env>/runtime`,
    `pcelery-<env>/ops`), RDS format, password generated. `pcelery-migrate` creates the roles
    with these passwords and grants each its privileges (the migrate containers get the secrets);
    the workers and relay connect with `runtime`, the ops task with `ops`.

    With the stack's own RDS instance (`database`) each secret names the master secret
    (`masterarn`) and the instance (host, port, engine), and with `rotation_days` Secrets Manager's
    multi-user rotation rotates it: the login alternates between <role> and <role>_clone, so the
    credentials a running task holds stay valid for one more rotation period. Rotation starts only
    after `rotation_days` (not at deploy), once the migration has created the roles. With an
    external database there is no rotation Lambda: the stack cannot reach or administer the team's
    database (infra/README.md says how to rotate by hand).
    """

    def __init__(
        self,
        scope: Construct,
        id: str,
        *,
        env_name: str,
        database: Database | None,
        rotation_days: int,
        rotation_subnets: ec2.SubnetSelection,
        removal_policy: RemovalPolicy,
    ) -> None:
        super().__init__(scope, id)
        # What containers reference (with the stack's RDS, the secret as attached to the instance),
        # and the secret resources themselves (cdk-nag's acknowledgments go there).
        self.secrets: dict[str, secretsmanager.ISecret] = {}
        self.resources: list[secretsmanager.Secret] = []
        self.rotated = bool(database and rotation_days)
        for kind in ROLE_KINDS:
            username, secret_name = role_name(env_name, kind), role_secret_name(env_name, kind)
            description = f"{secret_name}: the {kind} login of the {resource_name(env_name)} store (pcelery-migrate " \
                          "creates the role)"
            if database:
                secret: secretsmanager.Secret = rds.DatabaseSecret(
                    self, kind, username=username, secret_name=secret_name, master_secret=database.secret,
                    exclude_characters=PASSWORD_EXCLUDE,
                )
                attached = secret.attach(database.instance)  # host, port, engine: what rotation reads
                if rotation_days:
                    database.instance.add_rotation_multi_user(
                        f"{kind.capitalize()}Rotation", secret=attached,
                        automatically_after=Duration.days(rotation_days),
                        # Not at deploy: the role does not exist until the first migration has run.
                        rotate_immediately_on_update=False,
                        vpc_subnets=rotation_subnets,
                    )
                self.secrets[kind] = attached
            else:
                secret = secretsmanager.Secret(
                    self, kind, secret_name=secret_name, description=description,
                    generate_secret_string=secretsmanager.SecretStringGenerator(
                        secret_string_template=json.dumps({"username": username}),
                        generate_string_key="password", exclude_characters=PASSWORD_EXCLUDE,
                    ),
                )
                self.secrets[kind] = secret
            # As long as the data they open, like the master secret.
            secret.apply_removal_policy(removal_policy_for_logs(removal_policy))
            self.resources.append(secret)
