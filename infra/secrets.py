"""Secrets the stack does not own: the team's (application.secrets) and an external database's.

Imported by their complete ARN, never created. They reach a container only as ECS secrets
(`ecs.Secret.from_secrets_manager`), which makes CDK grant the task's execution role
secretsmanager:GetSecretValue (and DescribeSecret) on exactly that ARN when the container is
added. The customer KMS keys named beside them are collected in `keys`: the stack grants each
execution role kms:Decrypt on them (permissions.grant_secret_keys). CDK's own grant of an imported
secret's key would not do it: it names the role in the key's policy, which an imported key does
not let CDK change, and it adds nothing to the role.
"""

from __future__ import annotations

from collections.abc import Mapping

from aws_cdk import aws_ecs as ecs
from aws_cdk import aws_kms as kms
from aws_cdk import aws_secretsmanager as secretsmanager
from constructs import Construct

from .config import SecretReference


def import_secret(scope: Construct, id: str, *, arn: str) -> secretsmanager.ISecret:
    """The secret at the complete `arn` (grants name exactly it, no wildcard suffix)."""
    return secretsmanager.Secret.from_secret_complete_arn(scope, id, arn)


def import_key(scope: Construct, id: str, *, arn: str) -> kms.IKey:
    return kms.Key.from_key_arn(scope, id, arn)


class ApplicationSecrets(Construct):
    """The team's own secrets (DJANGO_SECRET_KEY...) as ECS secrets, one per variable name."""

    def __init__(self, scope: Construct, id: str, *, secrets: Mapping[str, SecretReference]) -> None:
        super().__init__(scope, id)
        self.container_secrets: dict[str, ecs.Secret] = {}
        self.keys: list[kms.IKey] = []
        for name, ref in secrets.items():
            scope = Construct(self, name)
            secret = import_secret(scope, "Secret", arn=ref.arn)
            self.container_secrets[name] = ecs.Secret.from_secrets_manager(secret, ref.field)
            if ref.kms_key_arn:
                self.keys.append(import_key(scope, "Key", arn=ref.kms_key_arn))
