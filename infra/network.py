"""The VPC: public subnets for the NAT gateways, private subnets for the Fargate tasks and
isolated subnets (no route out at all) for RDS and Redis.

With interface endpoints, everything the relay, migrate and ops tasks call is inside the VPC: the
endpoints (behind `endpoint_security_group`) and S3 through its gateway endpoint (the ECR image
layers), whose addresses are the AWS-managed prefix list `s3_prefix_list_id`. The stateless stack
limits those tasks' outbound traffic to them and the database.
"""

from __future__ import annotations

from aws_cdk import RemovalPolicy, Stack
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_iam as iam
from aws_cdk import aws_logs as logs
from aws_cdk import custom_resources as cr
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

        # Set with interface endpoints (below): the group of the endpoints, and the S3 prefix list.
        self.endpoint_security_group: ec2.ISecurityGroup | None = None
        self.s3_prefix_list_id: str | None = None
        self.s3_prefix_list: _S3PrefixList | None = None
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
            self.endpoint_security_group = endpoint_group
            # Everything a worker talks to all day. With these, NAT carries almost nothing, which
            # is what pays for them (about $7.3 per endpoint and AZ a month) in a busy environment.
            # CloudWatch (monitoring) is the ops task's `depth`: with it, ops needs no NAT at all.
            for name, service in (
                ("Sqs", ec2.InterfaceVpcEndpointAwsService.SQS),
                ("SecretsManager", ec2.InterfaceVpcEndpointAwsService.SECRETS_MANAGER),
                ("EcrApi", ec2.InterfaceVpcEndpointAwsService.ECR),
                ("EcrDocker", ec2.InterfaceVpcEndpointAwsService.ECR_DOCKER),
                ("Logs", ec2.InterfaceVpcEndpointAwsService.CLOUDWATCH_LOGS),
                ("Monitoring", ec2.InterfaceVpcEndpointAwsService.CLOUDWATCH_MONITORING),
            ):
                self.vpc.add_interface_endpoint(
                    name, service=service, private_dns_enabled=True, open=False,
                    security_groups=[endpoint_group],
                    subnets=ec2.SubnetSelection(subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS),
                )
            self.s3_prefix_list = _S3PrefixList(self, "S3PrefixList")
            self.s3_prefix_list_id = self.s3_prefix_list.prefix_list_id

    @property
    def task_subnets(self) -> ec2.SubnetSelection:
        return ec2.SubnetSelection(subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS)

    @property
    def data_subnets(self) -> ec2.SubnetSelection:
        return ec2.SubnetSelection(subnet_type=ec2.SubnetType.PRIVATE_ISOLATED)


class _S3PrefixList(Construct):
    """The id of the AWS-managed prefix list of S3 in this region (com.amazonaws.<region>.s3):
    what a security group names to allow S3 through the gateway endpoint. CloudFormation has no
    attribute for it and a synth-time lookup would need credentials, so a custom resource reads it
    (ec2:DescribePrefixLists) when the stack deploys."""

    def __init__(self, scope: Construct, id: str) -> None:
        super().__init__(scope, id)
        name = f"com.amazonaws.{Stack.of(self).region}.s3"
        call = cr.AwsSdkCall(
            service="EC2", action="DescribePrefixLists",
            parameters={"Filters": [{"Name": "prefix-list-name", "Values": [name]}]},
            physical_resource_id=cr.PhysicalResourceId.of(name),
            output_paths=["PrefixLists.0.PrefixListId"],
        )
        self.lookup = cr.AwsCustomResource(
            self, "Lookup", on_create=call, on_update=call, install_latest_aws_sdk=False,
            # DescribePrefixLists has no resource-level permissions.
            policy=cr.AwsCustomResourcePolicy.from_statements([
                iam.PolicyStatement(actions=["ec2:DescribePrefixLists"], resources=["*"])]),
        )
        self.prefix_list_id = self.lookup.get_response_field("PrefixLists.0.PrefixListId")
