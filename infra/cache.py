"""ElastiCache Redis, the optional Celery result backend (aws-cdk-lib has no L2 for it)."""

from __future__ import annotations

from aws_cdk import RemovalPolicy
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_elasticache as elasticache
from aws_cdk import aws_secretsmanager as secretsmanager
from constructs import Construct

REDIS_PORT = 6379
ENGINE_VERSION = "7.1"


class Cache(Construct):
    def __init__(
        self,
        scope: Construct,
        id: str,
        *,
        vpc: ec2.IVpc,
        subnets: ec2.SubnetSelection,
        replication_group_id: str,
        node_type: str,
        replicas: int,
        removal_policy: RemovalPolicy,
    ) -> None:
        super().__init__(scope, id)
        # ElastiCache allows 16-128 printable characters without @, " or /: letters and digits only.
        self.auth_token = secretsmanager.Secret(
            self, "AuthToken",
            secret_name=f"{replication_group_id}/redis-auth-token",
            description=f"AUTH token of the {replication_group_id} Redis result backend",
            generate_secret_string=secretsmanager.SecretStringGenerator(exclude_punctuation=True, password_length=64),
            removal_policy=RemovalPolicy.DESTROY if removal_policy == RemovalPolicy.DESTROY else RemovalPolicy.RETAIN,
        )
        self.security_group = ec2.SecurityGroup(
            self, "SecurityGroup", vpc=vpc, allow_all_outbound=False,
            description=f"{replication_group_id} Redis: clients are added by the stack",
        )
        subnet_group = elasticache.CfnSubnetGroup(
            self, "Subnets", description=f"{replication_group_id} Redis",
            subnet_ids=vpc.select_subnets(**_selection_kwargs(subnets)).subnet_ids,
        )
        self.node_count = 1 + replicas
        self.replication_group = elasticache.CfnReplicationGroup(
            self,
            "ReplicationGroup",
            replication_group_id=replication_group_id,
            replication_group_description=f"{replication_group_id} Celery result backend",
            engine="redis",
            engine_version=ENGINE_VERSION,
            cache_node_type=node_type,
            num_cache_clusters=self.node_count,
            automatic_failover_enabled=replicas > 0,
            multi_az_enabled=replicas > 0,
            port=REDIS_PORT,
            transit_encryption_enabled=True,
            at_rest_encryption_enabled=True,
            # A dynamic reference: CloudFormation resolves it at deploy time, the template holds none.
            auth_token=self.auth_token.secret_value.unsafe_unwrap(),
            cache_subnet_group_name=subnet_group.ref,
            security_group_ids=[self.security_group.security_group_id],
            snapshot_retention_limit=0 if removal_policy == RemovalPolicy.DESTROY else 1,
        )
        self.replication_group.apply_removal_policy(
            RemovalPolicy.DESTROY if removal_policy == RemovalPolicy.DESTROY else RemovalPolicy.SNAPSHOT
        )
        self.connections = ec2.Connections(
            security_groups=[self.security_group], default_port=ec2.Port.tcp(REDIS_PORT)
        )

    @property
    def host(self) -> str:
        return self.replication_group.attr_primary_end_point_address

    @property
    def node_ids(self) -> list[str]:
        """CacheClusterId of every node (ElastiCache names them <group>-001, -002, ...)."""
        gid = self.replication_group.replication_group_id
        return [f"{gid}-{i:03d}" for i in range(1, self.node_count + 1)]


def _selection_kwargs(selection: ec2.SubnetSelection) -> dict:
    return {"subnet_type": selection.subnet_type}
