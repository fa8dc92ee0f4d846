"""The VPC: public subnets for the NAT gateways, private subnets for the Fargate tasks and
isolated subnets (no route out at all) for RDS and Redis."""

from __future__ import annotations

from aws_cdk import RemovalPolicy
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_logs as logs
from constructs import Construct


class Network(Construct):
    def __init__(
        self,
        scope: Construct,
        id: str,
        *,
        cidr: str,
        availability_zones: list[str],
        nat_gateways: int,
        flow_logs: bool,
        interface_endpoints: bool,
        log_retention: logs.RetentionDays,
        removal_policy: RemovalPolicy,
    ) -> None:
        super().__init__(scope, id)
        self.vpc = ec2.Vpc(
            self,
            "Vpc",
            ip_addresses=ec2.IpAddresses.cidr(cidr),
            # Named zones, never max_azs: an AZ lookup would need credentials at synth time.
            availability_zones=list(availability_zones),
            nat_gateways=nat_gateways,
            subnet_configuration=[
                ec2.SubnetConfiguration(name="public", subnet_type=ec2.SubnetType.PUBLIC, cidr_mask=24),
                ec2.SubnetConfiguration(name="private", subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS, cidr_mask=20),
                ec2.SubnetConfiguration(name="isolated", subnet_type=ec2.SubnetType.PRIVATE_ISOLATED, cidr_mask=24),
            ],
        )
        if flow_logs:
            group = logs.LogGroup(self, "FlowLogs", retention=log_retention, removal_policy=removal_policy)
            self.vpc.add_flow_log("FlowLog", destination=ec2.FlowLogDestination.to_cloud_watch_logs(group))

        # S3 gateway endpoints are free and carry the ECR image layers: always worth it.
        self.vpc.add_gateway_endpoint(
            "S3", service=ec2.GatewayVpcEndpointAwsService.S3,
            subnets=[ec2.SubnetSelection(subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS)],
        )
        if interface_endpoints:
            # One group for all endpoints, HTTPS from the VPC's literal CIDR: the default group
            # per endpoint uses the CIDR as a GetAtt, which cdk-nag cannot evaluate.
            endpoint_group = ec2.SecurityGroup(
                self, "EndpointSecurityGroup", vpc=self.vpc, allow_all_outbound=False,
                description="Interface endpoints: HTTPS from inside the VPC",
            )
            endpoint_group.add_ingress_rule(ec2.Peer.ipv4(cidr), ec2.Port.tcp(443), "HTTPS from the VPC")
            # Everything a worker talks to all day. With these, NAT carries almost nothing, which
            # is what pays for them (about $7.3 per endpoint and AZ a month) in a busy environment.
            for name, service in (
                ("Sqs", ec2.InterfaceVpcEndpointAwsService.SQS),
                ("SecretsManager", ec2.InterfaceVpcEndpointAwsService.SECRETS_MANAGER),
                ("EcrApi", ec2.InterfaceVpcEndpointAwsService.ECR),
                ("EcrDocker", ec2.InterfaceVpcEndpointAwsService.ECR_DOCKER),
                ("Logs", ec2.InterfaceVpcEndpointAwsService.CLOUDWATCH_LOGS),
            ):
                self.vpc.add_interface_endpoint(
                    name, service=service, private_dns_enabled=True, open=False,
                    security_groups=[endpoint_group],
                    subnets=ec2.SubnetSelection(subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS),
                )

    @property
    def task_subnets(self) -> ec2.SubnetSelection:
        return ec2.SubnetSelection(subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS)

    @property
    def data_subnets(self) -> ec2.SubnetSelection:
        return ec2.SubnetSelection(subnet_type=ec2.SubnetType.PRIVATE_ISOLATED)
