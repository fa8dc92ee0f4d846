"""The ECS cluster and one Fargate worker service per catalog queue, scaled on backlog per task.

The services get their configuration (environment, secrets, image, sizes) as arguments; which
queues a role may touch is granted by the stack (permissions.py).
"""

from __future__ import annotations

from aws_cdk import Duration, RemovalPolicy, Stack
from aws_cdk import aws_applicationautoscaling as appscaling
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as cw_actions
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_ecs as ecs
from aws_cdk import aws_iam as iam
from aws_cdk import aws_logs as logs
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from pcelery.catalog import Catalog, QueueContract, resource_name

ECS_MAX_STOP_TIMEOUT = 120
MIGRATE_COMMAND = ["pcelery-migrate"]
# Set on the container rather than left to the image: a team's image often has an ENTRYPOINT of
# its own (its web server, an entrypoint script) and also runs its web tier.
WORKER_ENTRY_POINT = ["pcelery-worker"]
# Time a warm shutdown needs beyond the task itself: finish the ack, close the pool, exit.
SHUTDOWN_SLACK = 15
# Every container runs on a read-only root file system. The worker alone gets a writable /tmp:
# Celery's prefork pool (billiard) keeps its shared-memory arena in a temporary file there (a worker
# without one dies at start), and the team's tasks may want scratch files. A bind-mount volume on
# the task's ephemeral storage; ECS seeds it from the image's /tmp (mode 1777) when the image
# declares `VOLUME ["/tmp"]`, which is what lets a non-root USER write to it (infra/README.md).
TMP_VOLUME = "tmp"
TMP_PATH = "/tmp"  # the container's own /tmp: a volume of its task


def stop_timeout(contract: QueueContract) -> int:
    """Seconds ECS waits between SIGTERM (Celery's warm shutdown) and SIGKILL.

    Enough for the longest task to run out its hard limit where ECS allows it. A longer task
    (the heartbeat queues) is killed after 120 s; its message comes back once its visibility
    lapses, which the heartbeat keeps short, and counts as one receive.
    """
    return min(ECS_MAX_STOP_TIMEOUT, contract.hard_time_limit + SHUTDOWN_SLACK)


def outlasts_stop_timeout(contract: QueueContract) -> bool:
    """Whether a task of this queue may still run when ECS gives up on a warm shutdown.

    For such a queue any scale-in that picks a busy task kills a running task: its message
    comes back, counts one receive towards maxReceiveCount, and a healthy task can end in the
    DLQ. These services only scale in when the queue is idle (Workers._scaling).
    """
    return contract.hard_time_limit + SHUTDOWN_SLACK > stop_timeout(contract)


# The queue must have had nothing visible and nothing in flight for this long before a service
# whose tasks outlast the stop timeout scales in.
IDLE_SCALE_IN_MINUTES = 15


def add_schema_migration(task: ecs.TaskDefinition, main: ecs.ContainerDefinition, *, image: ecs.ContainerImage,
                         environment: dict[str, str], secrets: dict[str, ecs.Secret],
                         log_group: logs.ILogGroup) -> ecs.ContainerDefinition:
    """Run `pcelery-migrate` to completion before `main` starts in the same task.

    The worker (and relay) refuse to start on a schema older than their code, so without this
    the first deploy of an environment, and every release that adds a migration, would
    crash-loop until someone ran the one-off task, and the circuit breaker would roll the
    release back. Migrate is idempotent and takes an advisory lock, so tasks starting together
    are safe; migrations must stay backward compatible with the code still running. It also
    creates the database roles `main` logs in as, so `environment` and `secrets` are the
    migration's own (the owner's login and the roles' secrets), not `main`'s.
    """
    migrate = task.add_container(
        "migrate", image=image, entry_point=MIGRATE_COMMAND, environment=environment, secrets=secrets,
        essential=False, readonly_root_filesystem=True,
        logging=ecs.LogDrivers.aws_logs(stream_prefix="migrate", log_group=log_group),
    )
    main.add_container_dependencies(
        ecs.ContainerDependency(container=migrate, condition=ecs.ContainerDependencyCondition.SUCCESS)
    )
    return migrate


def insights_metric(name: str, *, cluster_name: str, service_name: str, period: Duration) -> cloudwatch.Metric:
    return cloudwatch.Metric(
        namespace="ECS/ContainerInsights", metric_name=name, statistic="Average", period=period,
        dimensions_map={"ClusterName": cluster_name, "ServiceName": service_name},
    )


class Workers(Construct):
    def __init__(
        self,
        scope: Construct,
        id: str,
        *,
        env_name: str,
        vpc: ec2.IVpc,
        subnets: ec2.SubnetSelection,
        catalog: Catalog,
        queues: dict[str, sqs.IQueue],
        bounds: dict[str, tuple[int, int]],
        image: ecs.ContainerImage,
        cpu: int,
        memory_mib: int,
        environment: dict[str, str],
        secrets: dict[str, ecs.Secret],
        migrate_environment: dict[str, str],
        migrate_secrets: dict[str, ecs.Secret],
        log_retention: logs.RetentionDays,
        log_removal_policy: RemovalPolicy,
    ) -> None:
        super().__init__(scope, id)
        # Names as plain strings too, so alarm descriptions and dimensions read as text, not tokens.
        self.cluster_name = resource_name(env_name)
        self.service_names = {q.name: resource_name(env_name, "worker", q.name) for q in catalog}
        self.cluster = ecs.Cluster(
            self, "Cluster", vpc=vpc, cluster_name=self.cluster_name,
            # The running-low alarms and the scaling metric read its RunningTaskCount.
            container_insights_v2=ecs.ContainerInsights.ENABLED,
        )
        # All outbound: the team's tasks run here and call whatever they call.
        self.security_group = ec2.SecurityGroup(
            self, "SecurityGroup", vpc=vpc, allow_all_outbound=True,
            description=f"{resource_name(env_name)} workers: all outbound (SQS, RDS, Redis, what team tasks call)",
        )
        self.services: dict[str, ecs.FargateService] = {}
        self.task_roles: dict[str, iam.IRole] = {}
        self.log_groups: dict[str, logs.ILogGroup] = {}
        for contract in catalog:
            low, high = bounds[contract.name]
            self._worker(
                contract, env_name=env_name, subnets=subnets, queue=queues[contract.name],
                low=low, high=high, image=image, cpu=cpu, memory_mib=memory_mib,
                environment={**environment, "PCELERY_WORKER_QUEUES": contract.name},
                secrets=secrets, migrate_environment=migrate_environment, migrate_secrets=migrate_secrets,
                log_retention=log_retention, log_removal_policy=log_removal_policy,
            )

    def _worker(self, contract: QueueContract, *, env_name, subnets, queue, low, high, image, cpu,
                memory_mib, environment, secrets, migrate_environment, migrate_secrets, log_retention,
                log_removal_policy) -> None:
        scope = Construct(self, contract.name)
        scaled = high > low or low == 0
        # No fixed name: retained groups of a deleted stateless stack must not block recreating it.
        log_group = logs.LogGroup(
            scope, "Logs",
            retention=log_retention, removal_policy=log_removal_policy,
        )
        self.log_groups[contract.name] = log_group
        task = ecs.FargateTaskDefinition(
            scope, "Task", cpu=cpu, memory_limit_mib=memory_mib,
            family=self.service_names[contract.name],
            runtime_platform=ecs.RuntimePlatform(
                cpu_architecture=ecs.CpuArchitecture.X86_64,
                operating_system_family=ecs.OperatingSystemFamily.LINUX,
            ),
        )
        worker = task.add_container(
            "worker", image=image, entry_point=WORKER_ENTRY_POINT, environment=environment, secrets=secrets,
            logging=ecs.LogDrivers.aws_logs(stream_prefix="worker", log_group=log_group),
            stop_timeout=Duration.seconds(stop_timeout(contract)),
            readonly_root_filesystem=True,
        )
        task.add_volume(name=TMP_VOLUME)
        worker.add_mount_points(ecs.MountPoint(container_path=TMP_PATH, source_volume=TMP_VOLUME, read_only=False))
        add_schema_migration(task, worker, image=image, environment=migrate_environment, secrets=migrate_secrets,
                             log_group=log_group)
        service = ecs.FargateService(
            scope, "Service",
            cluster=self.cluster,
            task_definition=task,
            service_name=self.service_names[contract.name],
            # Left out of the template when auto scaling owns the count: a deploy would otherwise
            # reset it to the template's number in the middle of a busy hour. (A new service then
            # starts with one task and scales from there.)
            desired_count=None if scaled else low,
            vpc_subnets=subnets,
            security_groups=[self.security_group],
            assign_public_ip=False,
            min_healthy_percent=100,
            max_healthy_percent=200,
            circuit_breaker=ecs.DeploymentCircuitBreaker(rollback=True),
        )
        self.services[contract.name] = service
        self.task_roles[contract.name] = task.task_role
        if scaled:
            self._scaling(scope, contract, service=service, queue=queue, low=low, high=high)

    def _scaling(self, scope: Construct, contract: QueueContract, *, service: ecs.FargateService,
                 queue: sqs.IQueue, low: int, high: int) -> None:
        stack = Stack.of(self)
        target = appscaling.ScalableTarget(
            scope, "Scaling",
            service_namespace=appscaling.ServiceNamespace.ECS,
            resource_id=f"service/{self.cluster.cluster_name}/{service.service_name}",
            scalable_dimension="ecs:service:DesiredCount",
            min_capacity=low, max_capacity=high,
            role=iam.Role.from_role_arn(scope, "ScalingRole", stack.format_arn(
                service="iam", region="", resource="role",
                resource_name="aws-service-role/ecs.application-autoscaling.amazonaws.com/"
                              "AWSServiceRoleForApplicationAutoScaling_ECSService",
            )),
        )

        def query(id_, namespace, name, dims):
            P = appscaling.CfnScalingPolicy
            return P.TargetTrackingMetricDataQueryProperty(
                id=id_, return_data=False,
                metric_stat=P.TargetTrackingMetricStatProperty(
                    stat="Average",
                    metric=P.TargetTrackingMetricProperty(
                        namespace=namespace, metric_name=name,
                        dimensions=[P.TargetTrackingMetricDimensionProperty(name=k, value=v) for k, v in dims.items()],
                    ),
                ),
            )

        queue_dims = {"QueueName": queue.queue_name}
        service_dims = {"ClusterName": self.cluster.cluster_name, "ServiceName": service.service_name}
        # Backlog per running task, held at the catalog's backlog_per_worker. In-flight messages
        # count as backlog so busy workers are not taken for spare ones. That does not make
        # scale-in safe for long tasks: a busy worker holds at most `concurrency` messages, below
        # a target like 4, and ECS picks which task to stop. Where a task outlasts the stop
        # timeout, target tracking only scales out and the idle policy below scales in.
        protect_running = outlasts_stop_timeout(contract)
        appscaling.CfnScalingPolicy(
            scope, "BacklogPerTask",
            policy_name=f"{service.service_name}-backlog-per-task",
            policy_type="TargetTrackingScaling",
            scaling_target_id=target.scalable_target_id,
            target_tracking_scaling_policy_configuration=appscaling.CfnScalingPolicy.TargetTrackingScalingPolicyConfigurationProperty(
                target_value=float(contract.backlog_per_worker),
                scale_out_cooldown=60,
                scale_in_cooldown=300,
                disable_scale_in=protect_running,
                customized_metric_specification=appscaling.CfnScalingPolicy.CustomizedMetricSpecificationProperty(
                    metrics=[
                        query("visible", "AWS/SQS", "ApproximateNumberOfMessagesVisible", queue_dims),
                        query("inflight", "AWS/SQS", "ApproximateNumberOfMessagesNotVisible", queue_dims),
                        query("running", "ECS/ContainerInsights", "RunningTaskCount", service_dims),
                        appscaling.CfnScalingPolicy.TargetTrackingMetricDataQueryProperty(
                            id="backlog", expression="(visible + inflight) / running",
                            label="messages per running task", return_data=True,
                        ),
                    ],
                ),
            ),
        )
        if low == 0:
            # Target tracking multiplies the current count, so from zero tasks it never moves:
            # a message waiting while nothing runs sets the service to one task.
            wake = appscaling.StepScalingAction(
                scope, "Wake", scaling_target=target,
                adjustment_type=appscaling.AdjustmentType.EXACT_CAPACITY,
                cooldown=Duration.seconds(120),
                metric_aggregation_type=appscaling.MetricAggregationType.MAXIMUM,
            )
            wake.add_adjustment(adjustment=1, lower_bound=0)
            period = Duration.minutes(1)
            alarm = cloudwatch.Alarm(
                scope, "WakeAlarm",
                alarm_description=(f"Scales {self.service_names[contract.name]} from zero when its queue has work "
                                   "(not a page)."),
                metric=cloudwatch.MathExpression(
                    expression="IF(FILL(running, 0) < 1, FILL(visible, 0), 0)",
                    using_metrics={
                        "visible": queue.metric_approximate_number_of_messages_visible(
                            period=period, statistic="Maximum"),
                        "running": insights_metric("RunningTaskCount", cluster_name=self.cluster.cluster_name,
                                                   service_name=service.service_name, period=period),
                    },
                    period=period,
                    label="visible messages while no task runs",
                ),
                threshold=1,
                comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
                evaluation_periods=1,
                treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
            )
            alarm.add_alarm_action(cw_actions.ApplicationScalingAction(wake))
        if protect_running:
            self._scale_in_when_idle(scope, contract, target=target, queue=queue, low=low)

    def _scale_in_when_idle(self, scope: Construct, contract: QueueContract, *,
                            target: appscaling.ScalableTarget, queue: sqs.IQueue, low: int) -> None:
        """Back to the lower bound once the queue has had nothing visible and nothing in flight
        for IDLE_SCALE_IN_MINUTES: then no task runs, so stopping any worker kills nothing.

        A running task's message is in flight the whole run (heartbeats extend its visibility),
        so a queue with a task running never reads 0 here.
        """
        scale_in = appscaling.StepScalingAction(
            scope, "ScaleInWhenIdle", scaling_target=target,
            adjustment_type=appscaling.AdjustmentType.EXACT_CAPACITY,
            cooldown=Duration.seconds(300),
            metric_aggregation_type=appscaling.MetricAggregationType.MAXIMUM,
        )
        # Relative to the threshold 1: the whole range below it, i.e. a total of 0.
        scale_in.add_adjustment(adjustment=low, upper_bound=0)
        period = Duration.minutes(1)
        alarm = cloudwatch.Alarm(
            scope, "IdleAlarm",
            alarm_description=(
                f"Scales {self.service_names[contract.name]} in to {low} when its queue has held nothing "
                f"visible or in flight for {IDLE_SCALE_IN_MINUTES} minutes (not a page)."
            ),
            metric=cloudwatch.MathExpression(
                expression="FILL(visible, 0) + FILL(inflight, 0)",
                using_metrics={
                    "visible": queue.metric_approximate_number_of_messages_visible(period=period, statistic="Maximum"),
                    "inflight": queue.metric_approximate_number_of_messages_not_visible(
                        period=period, statistic="Maximum"),
                },
                period=period,
                label="visible + in-flight messages",
            ),
            threshold=1,
            comparison_operator=cloudwatch.ComparisonOperator.LESS_THAN_THRESHOLD,
            evaluation_periods=IDLE_SCALE_IN_MINUTES,
            datapoints_to_alarm=IDLE_SCALE_IN_MINUTES,
            # SQS stops publishing a queue's metrics once nothing has touched it for hours. A queue
            # with a task running holds an in-flight message, and running workers long-poll it, so
            # it keeps publishing: silence means idle, and an idle queue must still scale in.
            treat_missing_data=cloudwatch.TreatMissingData.BREACHING,
        )
        alarm.add_alarm_action(cw_actions.ApplicationScalingAction(scale_in))
