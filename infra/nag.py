"""cdk-nag: the AwsSolutions pack every stack runs, and the findings this app accepts.

Any finding not acknowledged fails synth. Each acknowledgement sits on the one resource it is
about (never a whole stack) and says why, for the reviewer of the exception; the tests hold them
to that. They are collected here, per stack, so an exception is reviewed in one file; the one a
grant causes (the ops role's CloudWatch read on "*") is made by that grant in permissions.py.
"""

from __future__ import annotations

from collections.abc import Iterable

import aws_cdk as cdk
from aws_cdk import aws_ecs as ecs
from constructs import Construct

from .cache import Cache
from .config import EnvConfig
from .database import Database, RoleSecrets
from .network import Network

# The construct id CDK gives the singleton Lambda of AwsCustomResource (aws-cdk-lib custom_resources).
AWS_CUSTOM_RESOURCE_PROVIDER = "AWS679f53fac002430cb0da5b7982bd2287"


def add_checks(app: cdk.App) -> None:
    """cdk-nag's AwsSolutions pack on every stack: any unacknowledged finding fails synth."""
    from cdk_nag import AwsSolutionsChecks

    cdk.Validations.of(app).add_plugins(AwsSolutionsChecks(app))


def acknowledge(scope: Construct, rule: str, reason: str) -> None:
    """A cdk-nag finding accepted on one construct, with the reason reviewers will read."""
    cdk.Validations.of(scope).acknowledge(cdk.Acknowledgment(id=rule, reason=reason))


def acknowledge_stateful(config: EnvConfig, *, network: Network, database: Database | None,
                         roles: RoleSecrets, cache: Cache | None) -> None:
    """`database` is None with database.external: the team's database is no resource of this app."""
    if database:
        _acknowledge_rds(config, database)
    if not roles.rotated:
        reason = (
            f"{config.name} keeps the generated password of this database role; prod rotates it (multi-user "
            "rotation, cdk.json rotation_days)." if database else
            "The team's database (database.external) is out of this app's reach for a rotation Lambda: rotate by "
            "putting a new password in the secret and running pcelery-migrate (RUNBOOK.md#rotate-secrets).")
        for secret in roles.resources:
            acknowledge(secret, "AwsSolutions-SMG4", reason)
    if network.s3_prefix_list is not None:
        lookup = network.s3_prefix_list.lookup
        acknowledge(lookup, "AwsSolutions-IAM5[Resource::*]",
                    "ec2:DescribePrefixLists has no resource-level permissions; the lookup reads the id of S3's "
                    "AWS-managed prefix list once per deploy, for the relay's, migrations' and ops' egress rules.")
        # CDK's one Lambda behind every AwsCustomResource of the stack.
        provider = cdk.Stack.of(lookup).node.find_child(AWS_CUSTOM_RESOURCE_PROVIDER)
        acknowledge(provider.node.find_child("ServiceRole"), "AwsSolutions-IAM4[Policy::arn:<AWS::Partition>:iam::aws:"
                    "policy/service-role/AWSLambdaBasicExecutionRole]",
                    "CDK's AwsCustomResource provider Lambda: the managed policy only lets it write its own logs.")
    acknowledge(network.vpc, "CloudFormation-Validate::W3010",
                "Zones are named in cdk.json on purpose: synth must work offline, without an AZ lookup.")
    if not config.network.flow_logs:
        acknowledge(network.vpc, "AwsSolutions-VPC7",
                    f"{config.name} has no flow logs to save their cost; staging and prod have them.")
    if cache:
        acknowledge(cache.auth_token, "AwsSolutions-SMG4",
                    "Rotating a Redis AUTH token needs the ElastiCache ROTATE/SET strategy and a client "
                    "restart; it is rotated by hand (infra/README.md).")
        acknowledge(cache.replication_group, "AwsSolutions-AEC5",
                    "The standard port 6379: reachable only from the task security group in isolated subnets.")
        if config.cache.replicas == 0:
            acknowledge(cache.replication_group, "AwsSolutions-AEC4",
                        f"{config.name}'s result backend is a single node: results are also in Postgres, "
                        "so losing Redis loses nothing durable.")


def _acknowledge_rds(config: EnvConfig, database: Database) -> None:
    db = database.instance
    acknowledge(db, "AwsSolutions-RDS11",
                "The standard port 5432: the instance is reachable only from the task security group "
                "in isolated subnets, so a non-standard port adds no protection.")
    if not config.rds.multi_az:
        acknowledge(db, "AwsSolutions-RDS3",
                    f"{config.name} runs single-AZ to halve the database cost; prod is Multi-AZ (cdk.json).")
    if not config.protection.deletion_protection:
        acknowledge(db, "AwsSolutions-RDS10",
                    f"{config.name} is torn down and rebuilt freely; prod has deletion protection (cdk.json).")
    if not config.rds.rotation_days:
        acknowledge(db.node.find_child("Secret"), "AwsSolutions-SMG4",
                    f"{config.name} keeps its generated master password; prod rotates it (cdk.json rotation_days).")


def acknowledge_task_definitions(tasks: Iterable[ecs.TaskDefinition]) -> None:
    for task in tasks:
        acknowledge(task.execution_role, "AwsSolutions-IAM5[Resource::*]",
                    "ecr:GetAuthorizationToken has no resource-level permissions; the image pull and "
                    "log actions CDK adds are scoped to the repository and log group.")
        acknowledge(task, "AwsSolutions-ECS2",
                    "Only non-secret settings (env name, catalog, queue, task modules, Celery app, schedules, DB "
                    "host/port/name/CA path, Redis host, the team's application.environment, where config.py "
                    "refuses credential-like names) are environment variables; credentials, the team's "
                    "application.secrets among them, are ECS secrets from Secrets Manager.")
