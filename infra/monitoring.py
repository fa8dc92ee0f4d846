"""Alarms (the contract RUNBOOK.md documents), their SNS topic, and the dashboard.

Alarm names are `<app>-<env>-<resource>-<signal>` (`catalog.resource_name`); every description
ends with `RUNBOOK.md#<anchor>`, the section on-call opens when paged.
"""

from __future__ import annotations

from dataclasses import dataclass

from aws_cdk import Duration, RemovalPolicy
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as cw_actions
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sns_subscriptions as subscriptions
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from pcelery.catalog import APP_NAME, Catalog, resource_name

from .workers import insights_metric

# What the relay and the scheduler print as CloudWatch EMF (pcelery.relay.EMF_NAMESPACE), with the
# dimension Environment; tests/integration/test_infra.py holds these to what the processes print.
OUTBOX_NAMESPACE = "PersistentCelery"
OUTBOX_METRIC = "OutboxOldestPendingAgeSeconds"
SCHEDULER_PASSES_METRIC = "SchedulerPasses"  # 1 per pass; a pass comes at least every 5 s
SCHEDULER_SUBMITTED_METRIC = "SchedulerSubmitted"

GT = cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD
GTE = cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD
LT = cloudwatch.ComparisonOperator.LESS_THAN_THRESHOLD
MISSING_OK = cloudwatch.TreatMissingData.NOT_BREACHING
MISSING_BAD = cloudwatch.TreatMissingData.BREACHING


@dataclass(frozen=True)
class DatabaseTargets:
    instance_identifier: str
    allocated_storage_gib: int
    max_connections: int


class Monitoring(Construct):
    def __init__(
        self,
        scope: Construct,
        id: str,
        *,
        env_name: str,
        catalog: Catalog,
        work_queues: dict[str, sqs.IQueue],
        dead_letter_queues: dict[str, sqs.IQueue],
        cluster_name: str,
        worker_service_names: dict[str, str],
        relay_service_name: str,
        scheduler_service_name: str | None,
        database: DatabaseTargets | None,
        cache_node_ids: list[str] | None,
        alarm_email: str | None,
        outbox_lag_alarm_seconds: int,
    ) -> None:
        super().__init__(scope, id)
        self.env_name = env_name
        # CloudWatch can publish to an encrypted topic only with a customer-managed key whose
        # policy lets it use the key; the AWS-managed aws/sns key does not.
        key = kms.Key(
            self, "TopicKey", enable_key_rotation=True,
            description=f"{resource_name(env_name)} alarm topic",
            # It encrypts notifications in transit through SNS only; nothing at rest needs it later.
            removal_policy=RemovalPolicy.DESTROY,
        )
        key.grant(iam.ServicePrincipal("cloudwatch.amazonaws.com"), "kms:Decrypt", "kms:GenerateDataKey*")
        self.topic = sns.Topic(
            self, "Topic", topic_name=resource_name(env_name, "alarms"), master_key=key, enforce_ssl=True,
            display_name=f"{APP_NAME} {env_name} alarms",
        )
        if alarm_email:
            self.topic.add_subscription(subscriptions.EmailSubscription(alarm_email))
        self._action = cw_actions.SnsAction(self.topic)
        self.alarms: list[cloudwatch.Alarm] = []

        minute = Duration.minutes(1)
        five = Duration.minutes(5)
        queue_rows = []
        for contract in catalog:
            q, work, dead = contract.name, work_queues[contract.name], dead_letter_queues[contract.name]
            service = worker_service_names[q]
            self._alarm(
                f"{q}-dlq-not-empty", "alarm-dlq-not-empty",
                f"DLQ of queue {q} holds messages: tasks failed {contract.max_receive_count} times or were poison.",
                dead.metric_approximate_number_of_messages_visible(period=minute, statistic="Maximum"),
                threshold=1, comparison=GTE, periods=1, missing=MISSING_OK,
            )
            age = contract.oldest_message_alarm_seconds()
            self._alarm(
                f"{q}-oldest-message-age", "alarm-queue-backlog-old",
                f"Oldest message in queue {q} is older than {age} s (countdown + visibility + one run): "
                "workers are not keeping up or not running.",
                work.metric_approximate_age_of_oldest_message(period=minute, statistic="Maximum"),
                threshold=age, comparison=GT, periods=3, missing=MISSING_OK,
            )
            self._running_low(f"worker-{q}-running-low", cluster_name, service, f"Worker service for queue {q}")
            queue_rows.append((q, work, dead, service))

        self._running_low("relay-running-low", cluster_name, relay_service_name, "Outbox relay service")
        # The relay reports the age of the oldest pending row every cycle, 0 when there is none.
        # No data means no relay (or a relay that cannot reach the DB), which is as bad as lag:
        # missing data is breaching.
        self._alarm(
            "outbox-lag", "alarm-outbox-lag",
            f"Oldest pending outbox row is older than {outbox_lag_alarm_seconds} s, or the relay reports "
            "nothing: submitted tasks are not reaching SQS.",
            cloudwatch.Metric(
                namespace=OUTBOX_NAMESPACE, metric_name=OUTBOX_METRIC, statistic="Maximum", period=minute,
                dimensions_map={"Environment": env_name},
            ),
            threshold=outbox_lag_alarm_seconds, comparison=GT, periods=5, missing=MISSING_BAD,
        )

        # Every scheduler reports each pass (at least every 5 s): five minutes without a single pass
        # from any of them means no periodic task is being submitted. No data is the very signal
        # (no scheduler runs, or none can start), so missing data is breaching.
        if scheduler_service_name:
            self._alarm(
                "scheduler-stopped", "alarm-scheduler-stopped",
                f"No scheduler of {scheduler_service_name} reported a pass for 5 minutes: periodic tasks are "
                "not being submitted.",
                self._scheduler_metric(SCHEDULER_PASSES_METRIC, five),
                threshold=1, comparison=LT, periods=1, missing=MISSING_BAD,
            )

        # Only for the RDS instance the stack owns: an external database is the team's to watch.
        rds = self._database_alarms(database) if database else None
        if cache_node_ids:
            nodes = {
                f"n{i}": cloudwatch.Metric(
                    namespace="AWS/ElastiCache", metric_name="DatabaseMemoryUsagePercentage",
                    statistic="Maximum", period=five, dimensions_map={"CacheClusterId": node},
                )
                for i, node in enumerate(cache_node_ids)
            }
            self._alarm("redis-memory-high", "alarm-redis-memory-high",
                        "Redis result backend memory above 80% on some node: results will be evicted.",
                        cloudwatch.MathExpression(expression=f"MAX([{', '.join(nodes)}])", using_metrics=nodes,
                                                  period=five, label="max memory % of any node"),
                        threshold=80, comparison=GT, periods=3, missing=MISSING_OK)

        self.dashboard = self._dashboard(queue_rows, cluster_name, relay_service_name, scheduler_service_name, rds)

    def _scheduler_metric(self, name: str, period: Duration) -> cloudwatch.Metric:
        return cloudwatch.Metric(namespace=OUTBOX_NAMESPACE, metric_name=name, statistic="Sum", period=period,
                                 dimensions_map={"Environment": self.env_name})

    def _database_alarms(self, database: DatabaseTargets):
        """CPU, free storage and connections of the RDS instance; returns its metric factory."""
        five = Duration.minutes(5)
        db = {"DBInstanceIdentifier": database.instance_identifier}

        def rds(name, stat="Average"):
            return cloudwatch.Metric(namespace="AWS/RDS", metric_name=name, statistic=stat,
                                     period=five, dimensions_map=db)

        self._alarm("db-cpu-high", "alarm-db-cpu-high",
                    "Database CPU above 80% for 15 minutes.",
                    rds("CPUUtilization"), threshold=80, comparison=GT, periods=3, missing=MISSING_OK)
        free_floor = database.allocated_storage_gib * 1024**3 // 10
        self._alarm("db-free-storage-low", "alarm-db-free-storage-low",
                    f"Database free storage below 10% of the allocated {database.allocated_storage_gib} GiB.",
                    rds("FreeStorageSpace", "Minimum"), threshold=free_floor, comparison=LT, periods=1,
                    missing=MISSING_OK)
        conn_ceiling = int(database.max_connections * 0.8)
        self._alarm("db-connections-high", "alarm-db-connections-high",
                    f"Database connections above {conn_ceiling} (80% of max_connections "
                    f"{database.max_connections}) for 10 minutes.",
                    rds("DatabaseConnections", "Maximum"), threshold=conn_ceiling, comparison=GT, periods=2,
                    missing=MISSING_OK)
        return rds

    def _alarm(self, suffix, anchor, text, metric, *, threshold, comparison, periods, missing) -> cloudwatch.Alarm:
        name = resource_name(self.env_name, suffix)
        alarm = cloudwatch.Alarm(
            self, suffix,
            alarm_name=name,
            alarm_description=f"{text} RUNBOOK.md#{anchor}",
            metric=metric,
            threshold=threshold,
            comparison_operator=comparison,
            evaluation_periods=periods,
            datapoints_to_alarm=periods,
            treat_missing_data=missing,
        )
        alarm.add_alarm_action(self._action)
        alarm.add_ok_action(self._action)
        self.alarms.append(alarm)
        return alarm

    def _running_low(self, suffix, cluster_name, service_name, what):
        # desired - running, so a service scaled to zero (desired 0) is quiet, and a deployment
        # or scale-out that takes a few minutes to start tasks does not page.
        period = Duration.minutes(1)
        self._alarm(
            suffix, "alarm-service-running-low",
            f"{what} {service_name} runs fewer tasks than desired for 10 minutes.",
            cloudwatch.MathExpression(
                expression="desired - running",
                using_metrics={
                    "desired": insights_metric("DesiredTaskCount", cluster_name=cluster_name,
                                               service_name=service_name, period=period),
                    "running": insights_metric("RunningTaskCount", cluster_name=cluster_name,
                                               service_name=service_name, period=period),
                },
                period=period, label="tasks missing",
            ),
            threshold=1, comparison=GTE, periods=10, missing=MISSING_OK,
        )

    def _dashboard(self, queue_rows, cluster_name, relay_service_name, scheduler_service_name,
                   rds) -> cloudwatch.Dashboard:
        minute = Duration.minutes(1)
        board = cloudwatch.Dashboard(self, "Dashboard", dashboard_name=resource_name(self.env_name))
        for q, work, dead, service in queue_rows:
            board.add_widgets(
                cloudwatch.GraphWidget(
                    title=f"{q}: queue depth", width=6,
                    left=[work.metric_approximate_number_of_messages_visible(period=minute, label="visible"),
                          work.metric_approximate_number_of_messages_not_visible(period=minute, label="in flight")],
                ),
                cloudwatch.GraphWidget(
                    title=f"{q}: oldest message age (s)", width=6,
                    left=[work.metric_approximate_age_of_oldest_message(period=minute, statistic="Maximum")],
                ),
                cloudwatch.GraphWidget(
                    title=f"{q}: DLQ depth and running workers", width=6,
                    left=[dead.metric_approximate_number_of_messages_visible(period=minute, label="DLQ visible")],
                    right=[insights_metric("RunningTaskCount", cluster_name=cluster_name, service_name=service,
                                           period=minute).with_(label="running workers")],
                ),
                cloudwatch.GraphWidget(
                    title=f"{q}: throughput (deleted/min)", width=6,
                    left=[work.metric_number_of_messages_deleted(period=minute, statistic="Sum", label="done"),
                          work.metric_number_of_messages_sent(period=minute, statistic="Sum", label="sent")],
                ),
            )
        board.add_widgets(
            cloudwatch.GraphWidget(
                title="outbox: oldest pending row (s)", width=8,
                left=[cloudwatch.Metric(namespace=OUTBOX_NAMESPACE, metric_name=OUTBOX_METRIC, statistic="Maximum",
                                        period=minute, dimensions_map={"Environment": self.env_name})],
                right=[insights_metric("RunningTaskCount", cluster_name=cluster_name,
                                       service_name=relay_service_name, period=minute).with_(label="relay tasks")],
            ),
            *([cloudwatch.GraphWidget(
                title="scheduler: passes and submitted slots (/5 min)", width=8,
                left=[self._scheduler_metric(SCHEDULER_PASSES_METRIC, Duration.minutes(5)).with_(label="passes"),
                      self._scheduler_metric(SCHEDULER_SUBMITTED_METRIC, Duration.minutes(5)).with_(
                          label="submitted")],
                right=[insights_metric("RunningTaskCount", cluster_name=cluster_name,
                                       service_name=scheduler_service_name, period=minute).with_(
                    label="scheduler tasks")],
            )] if scheduler_service_name else []),
            *([cloudwatch.GraphWidget(title="database: CPU % and connections", width=8,
                                      left=[rds("CPUUtilization")], right=[rds("DatabaseConnections", "Maximum")])]
              if rds else []),
            cloudwatch.AlarmStatusWidget(title="alarms", width=8, alarms=self.alarms),
        )
        return board
